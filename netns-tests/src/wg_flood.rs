//! A WireGuard handshake flood for the tests: initiations that pass the responder's first
//! check (a valid `mac1`, computed with the `blake2` crate from the responder's public key)
//! but carry random ephemeral, static and timestamp fields and no `mac2`, sent at a high rate
//! from one UDP socket in a namespace. A responder under load must answer them with 64-byte
//! cookie replies (message type 3) instead of spending a Diffie-Hellman on each; the flood
//! counts the replies addressed to its own sender indices.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};

use crate::{Error, Netns, Result};

/// Length of a handshake initiation (message type 1).
pub const INITIATION_LEN: usize = 148;
/// Length of a cookie reply (message type 3).
pub const COOKIE_REPLY_LEN: usize = 64;
/// Where `mac1` starts: it covers every byte before it.
const MAC1_AT: usize = 116;
/// The high byte of every sender index the flood uses, to recognise replies meant for it.
const INDEX_TAG: u32 = 0xf1 << 24;
/// Initiations per pacing step.
const BATCH: u64 = 64;
/// Distinct initiations made up front and sent in turn, so that sending costs a system call
/// and no hashing (a responder answers a repeated one as it answers a new one).
const POOL: usize = 1024;

/// The key of `mac1` for a responder: `HASH("mac1----" || responder's public key)`.
pub fn mac1_key(responder_public: &[u8; 32]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    h.update(b"mac1----");
    h.update(responder_public);
    h.finalize().into()
}

/// A handshake initiation to the responder whose `mac1` key is `key`, from `sender_index`,
/// with pseudo-random contents drawn from `seed` (xorshift64 state, not zero) and an all-zero
/// `mac2`.
pub fn initiation(key: &[u8; 32], sender_index: u32, seed: &mut u64) -> [u8; INITIATION_LEN] {
    let mut m = [0u8; INITIATION_LEN];
    m[0] = 1;
    m[4..8].copy_from_slice(&sender_index.to_le_bytes());
    crate::traffic::fill_pseudo_random(seed, &mut m[8..MAC1_AT]);
    let mac1 = mac(key, &m[..MAC1_AT]);
    m[MAC1_AT..MAC1_AT + 16].copy_from_slice(&mac1);
    m
}

/// WireGuard's `MAC(key, input)`: keyed BLAKE2s with a 16-byte output.
pub fn mac(key: &[u8; 32], input: &[u8]) -> [u8; 16] {
    let mut mac = <Blake2sMac<U16> as KeyInit>::new_from_slice(key).expect("a 32-byte key");
    mac.update(input);
    mac.finalize().into_bytes().into()
}

/// Whether `datagram` is a cookie reply to one of the flood's initiations.
pub fn is_cookie_reply_to_flood(datagram: &[u8]) -> bool {
    datagram.len() == COOKIE_REPLY_LEN
        && datagram[..4] == [3, 0, 0, 0]
        && u32::from_le_bytes(datagram[4..8].try_into().expect("4 bytes")) & 0xff00_0000
            == INDEX_TAG
}

/// What a flood sent and got back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloodReport {
    pub sent: u64,
    /// Cookie replies addressed to the flood's sender indices.
    pub cookie_replies: u64,
    /// Any other datagram that came back (a responder must never complete a handshake).
    pub other_replies: u64,
    pub elapsed: Duration,
}

impl FloodReport {
    pub fn sent_per_second(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A running flood (see the module doc); [`HandshakeFlood::stop`] ends it and reports.
#[derive(Debug)]
pub struct HandshakeFlood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    cookies: Arc<AtomicU64>,
    other: Arc<AtomicU64>,
    sender: Option<JoinHandle<std::io::Result<()>>>,
    receiver: Option<JoinHandle<std::io::Result<()>>>,
    started: Instant,
}

impl HandshakeFlood {
    /// Starts flooding `target` (the responder's WireGuard endpoint, whose public key is
    /// `responder_public`) from a socket in `from`, at `rate` initiations per second (0: as
    /// fast as one thread sends).
    pub fn start(
        from: &Netns,
        target: SocketAddrV4,
        responder_public: &[u8; 32],
        rate: u64,
    ) -> Result<HandshakeFlood> {
        let socket = from
            .run_in(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))?
            .map_err(|e| Error::io(format!("binding a UDP socket in {}", from.name()), e))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| Error::io("socket options", e))?;
        let rx = socket
            .try_clone()
            .map_err(|e| Error::io("cloning the flood socket", e))?;
        let key = mac1_key(responder_public);
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, cookies, other) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let started = Instant::now();
        let sender = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || send_loop(&socket, target, &key, rate, &stop, &sent))
        };
        let receiver = {
            let (stop, cookies, other) = (stop.clone(), cookies.clone(), other.clone());
            std::thread::spawn(move || receive_loop(&rx, &stop, &cookies, &other))
        };
        Ok(HandshakeFlood {
            stop,
            sent,
            cookies,
            other,
            sender: Some(sender),
            receiver: Some(receiver),
            started,
        })
    }

    /// Initiations sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Cookie replies received so far.
    pub fn cookie_replies(&self) -> u64 {
        self.cookies.load(Ordering::Relaxed)
    }

    /// Stops sending, waits briefly for replies still on the way, and reports.
    pub fn stop(mut self) -> Result<FloodReport> {
        let elapsed = self.started.elapsed();
        self.stop.store(true, Ordering::Relaxed);
        for (what, h) in [
            ("sender", self.sender.take()),
            ("receiver", self.receiver.take()),
        ] {
            if let Some(h) = h {
                h.join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
                    .map_err(|e| Error::io(format!("flood {what}"), e))?;
            }
        }
        Ok(FloodReport {
            sent: self.sent(),
            cookie_replies: self.cookie_replies(),
            other_replies: self.other.load(Ordering::Relaxed),
            elapsed,
        })
    }
}

impl Drop for HandshakeFlood {
    fn drop(&mut self) {
        // Not stopped by `stop` (a failing test): the threads end on their own at the flag.
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn send_loop(
    socket: &UdpSocket,
    target: SocketAddrV4,
    key: &[u8; 32],
    rate: u64,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> std::io::Result<()> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let pool: Vec<[u8; INITIATION_LEN]> = (0..POOL as u32)
        .map(|i| initiation(key, INDEX_TAG | i, &mut seed))
        .collect();
    let started = Instant::now();
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..BATCH {
            let m = &pool[n as usize % POOL];
            match socket.send_to(m, target) {
                Ok(_) => n += 1,
                // A full socket buffer or an ICMP error from an earlier datagram: keep going.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(e) => return Err(e),
            }
        }
        sent.store(n, Ordering::Relaxed);
        if rate > 0 {
            let due = Duration::from_secs_f64(n as f64 / rate as f64);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
    }
    Ok(())
}

fn receive_loop(
    socket: &UdpSocket,
    stop: &AtomicBool,
    cookies: &AtomicU64,
    other: &AtomicU64,
) -> std::io::Result<()> {
    let mut buf = [0u8; 2048];
    let mut stopped_at: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            // Replies to the last initiations may still be on the way.
            let at = *stopped_at.get_or_insert_with(Instant::now);
            if at.elapsed() > Duration::from_millis(300) {
                return Ok(());
            }
        }
        match socket.recv(&mut buf) {
            Ok(n) if is_cookie_reply_to_flood(&buf[..n]) => {
                cookies.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {
                other.fetch_add(1, Ordering::Relaxed);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_initiation_has_the_layout_of_message_type_1() {
        let key = mac1_key(&[7u8; 32]);
        let mut seed = 1;
        let m = initiation(&key, INDEX_TAG | 5, &mut seed);
        assert_eq!(m[..4], [1, 0, 0, 0]);
        assert_eq!(
            u32::from_le_bytes(m[4..8].try_into().unwrap()),
            INDEX_TAG | 5
        );
        assert_eq!(m[132..], [0u8; 16], "no mac2");
        assert_eq!(m[MAC1_AT..MAC1_AT + 16], mac(&key, &m[..MAC1_AT]));
        // Two initiations differ beyond their index (random ephemeral and payload).
        let n = initiation(&key, INDEX_TAG | 5, &mut seed);
        assert_ne!(m[8..MAC1_AT], n[8..MAC1_AT]);
    }

    #[test]
    fn mac1_matches_an_independent_blake2s() {
        // Computed with Python's hashlib: blake2s(b"mac1----" + bytes(32)), and
        // blake2s(bytes(range(116)), key=blake2s(b"mac1----" + bytes([7] * 32)), digest_size=16).
        let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(
            hex(&mac1_key(&[0u8; 32])),
            "d84d593e94aac535d9107d24b9e4576f12a1d0c96b630c2961edee4259e3e3c5"
        );
        let body: Vec<u8> = (0..MAC1_AT as u8).collect();
        assert_eq!(
            hex(&mac(&mac1_key(&[7u8; 32]), &body)),
            "8137f1215f6c2505cc2558b0121d5185"
        );
    }

    #[test]
    fn only_64_byte_type_3_replies_to_our_indices_count() {
        let mut reply = [0u8; COOKIE_REPLY_LEN];
        reply[0] = 3;
        reply[4..8].copy_from_slice(&(INDEX_TAG | 9).to_le_bytes());
        assert!(is_cookie_reply_to_flood(&reply));
        assert!(!is_cookie_reply_to_flood(&reply[..63]));
        let mut other_index = reply;
        other_index[4..8].copy_from_slice(&9u32.to_le_bytes());
        assert!(!is_cookie_reply_to_flood(&other_index));
        let mut response = reply;
        response[0] = 2;
        assert!(!is_cookie_reply_to_flood(&response));
    }
}
