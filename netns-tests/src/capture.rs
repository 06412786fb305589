//! Watching what a link of a test's namespace carries, from inside that namespace: the tests
//! that assert an underlay shows only encrypted traffic read it here.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use crate::Netns;

/// How long a capture's `recv` waits before its loop looks at the stop flag again.
const RECV_TIMEOUT_US: i64 = 100_000;
/// Room for a burst of GSO-sized frames while the capture thread is descheduled.
const RECV_BUFFER: i32 = 8 << 20;

/// What a packet socket receives: whole Ethernet frames of every protocol, or the network
/// layer packets of one family (link header removed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frames {
    All,
    Ipv4,
    Ipv6,
}

impl Frames {
    fn socket_args(self) -> (i32, u16) {
        match self {
            Frames::All => (libc::SOCK_RAW, libc::ETH_P_ALL as u16),
            Frames::Ipv4 => (libc::SOCK_DGRAM, libc::ETH_P_IP as u16),
            Frames::Ipv6 => (libc::SOCK_DGRAM, libc::ETH_P_IPV6 as u16),
        }
    }
}

/// An `AF_PACKET` socket bound to `dev` of the calling thread's namespace, with a short
/// receive timeout (so a loop around `recv` can be stopped) and a large receive buffer.
pub fn packet_socket(dev: &str, frames: Frames) -> io::Result<OwnedFd> {
    let (kind, proto) = frames.socket_args();
    let proto = proto.to_be();
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, kind, i32::from(proto)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let index = nix::net::if_::if_nametoindex(dev)
        .map_err(|e| io::Error::other(format!("no device {dev}: {e}")))?;
    // SAFETY: sockaddr_ll is plain old data; all zeroes is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: sll is a valid sockaddr_ll of the length passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("bind to {dev}: {e}")));
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: RECV_TIMEOUT_US,
    };
    set_option(&fd, libc::SO_RCVTIMEO, &tv)?;
    // A larger buffer only makes a capture more complete; a kernel refusing it is no error.
    let _ = set_option(&fd, libc::SO_RCVBUFFORCE, &RECV_BUFFER);
    Ok(fd)
}

fn set_option<T>(fd: &OwnedFd, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: value points to a T of the size passed, as the option expects.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Calls `each` with every frame `fd` receives until `stop` is set.
pub fn receive_until(fd: &OwnedFd, stop: &AtomicBool, mut each: impl FnMut(&[u8])) {
    let mut buf = vec![0u8; 65536 + 128];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: buf is valid for writes of its length; fd is an open socket.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 {
            each(&buf[..n as usize]);
        }
    }
}

/// The UDP payloads to or from `port` over IPv4 (`v6` false) or IPv6 seen on `dev` of the
/// calling thread's namespace, until `stop` is set; `ready` hears once the socket is bound,
/// from when on it sees every packet.
pub fn udp_payloads(
    dev: &str,
    port: u16,
    v6: bool,
    ready: mpsc::Sender<()>,
    stop: &AtomicBool,
) -> Vec<Vec<u8>> {
    let frames = if v6 { Frames::Ipv6 } else { Frames::Ipv4 };
    let fd = packet_socket(dev, frames).unwrap_or_else(|e| panic!("capture on {dev}: {e}"));
    let _ = ready.send(());
    let mut out = Vec::new();
    receive_until(&fd, stop, |p| {
        if let Some(payload) = udp_payload(p, port, v6) {
            out.push(payload.to_vec());
        }
    });
    out
}

/// The payload of `packet` when it is UDP to or from `port`. The test bed's underlay packets
/// carry no IPv6 extension headers, so the UDP header follows the fixed one.
fn udp_payload(packet: &[u8], port: u16, v6: bool) -> Option<&[u8]> {
    let (l4, is_udp) = if v6 {
        (40, packet.len() >= 48 && packet[6] == 17)
    } else {
        let ihl = usize::from(*packet.first()? & 0x0f) * 4;
        (ihl, packet.len() >= ihl + 8 && packet[9] == 17)
    };
    if !is_udp {
        return None;
    }
    let sport = u16::from_be_bytes([packet[l4], packet[l4 + 1]]);
    let dport = u16::from_be_bytes([packet[l4 + 2], packet[l4 + 3]]);
    (sport == port || dport == port).then(|| &packet[l4 + 8..])
}

/// What a capture on an underlay link must show while WireGuard carries test traffic across
/// it (see [`assert_wireguard_only_while`]).
#[derive(Debug, Clone)]
pub struct WireguardUnderlay<'a> {
    /// The underlay link captured, e.g. `eth0`.
    pub link: &'a str,
    /// The WireGuard port (source or destination).
    pub port: u16,
    /// The underlay family expected to carry the WireGuard traffic (`true`: IPv6); the other
    /// must show nothing on `port`.
    pub v6: bool,
    /// Bytes of transport messages (type 4) the traffic must at least make.
    pub min_transport_bytes: u64,
    /// Byte strings no datagram may contain: the inner address pairs (see [`address_pairs`]).
    pub inner: Vec<Vec<u8>>,
}

/// Source and destination addresses as they follow each other in an IP header, both ways.
pub fn address_pairs(a: IpAddr, b: IpAddr) -> Vec<Vec<u8>> {
    let bytes = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    vec![[bytes(a), bytes(b)].concat(), [bytes(b), bytes(a)].concat()]
}

/// Runs `traffic` while capturing UDP on `expect.port` over both families on `expect.link` of
/// namespace `ns`, then asserts that the expected family carried the traffic in WireGuard
/// messages only, with no inner address pair in the clear, and the other family nothing.
pub fn assert_wireguard_only_while<T>(
    ns: &Netns,
    expect: &WireguardUnderlay,
    traffic: impl FnOnce() -> T,
) -> T {
    let stop = AtomicBool::new(false);
    let (out, v4_seen, v6_seen) = std::thread::scope(|s| {
        let (ready, started) = mpsc::channel();
        let caps: Vec<_> = [false, true]
            .into_iter()
            .map(|v6| {
                let (ready, stop) = (ready.clone(), &stop);
                s.spawn(move || {
                    ns.run_in(|| udp_payloads(expect.link, expect.port, v6, ready, stop))
                        .expect("the capture runs in the namespace")
                })
            })
            .collect();
        // A panic in the traffic must still end the captures, or the scope never returns.
        let _stop_captures = StopOnDrop(&stop);
        for _ in 0..2 {
            started
                .recv_timeout(Duration::from_secs(10))
                .expect("captures started");
        }
        let out = traffic();
        stop.store(true, Ordering::Relaxed);
        let mut seen = caps.into_iter().map(|h| h.join().unwrap());
        (out, seen.next().unwrap(), seen.next().unwrap())
    });
    let (carrier, silent) = if expect.v6 {
        (v6_seen, v4_seen)
    } else {
        (v4_seen, v6_seen)
    };
    let family = |v6: bool| if v6 { "IPv6" } else { "IPv4" };
    let what = format!(
        "{} underlay {}, port {}",
        family(expect.v6),
        expect.link,
        expect.port
    );
    assert_wireguard_only(&carrier, &what, expect);
    assert!(
        silent.is_empty(),
        "the {} underlay carries nothing on port {}: {} datagrams",
        family(!expect.v6),
        expect.port,
        silent.len()
    );
    out
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The datagrams carry the traffic in WireGuard transport messages (veth hands UDP GSO runs
/// over whole, so one captured frame may hold many: bytes are counted), nothing but WireGuard
/// messages, and no inner address pair in the clear.
fn assert_wireguard_only(seen: &[Vec<u8>], what: &str, expect: &WireguardUnderlay) {
    let transport: usize = seen
        .iter()
        .filter(|d| d.first() == Some(&4))
        .map(Vec::len)
        .sum();
    assert!(
        transport as u64 >= expect.min_transport_bytes,
        "{what}: type-4 bytes {transport} in {} datagrams, want at least {}",
        seen.len(),
        expect.min_transport_bytes
    );
    let odd: Vec<u8> = seen
        .iter()
        .map(|d| d.first().copied().unwrap_or(0))
        .filter(|t| !(1..=4).contains(t))
        .collect();
    assert!(odd.is_empty(), "{what}: not WireGuard: types {odd:?}");
    for d in seen {
        for pair in &expect.inner {
            assert!(
                !d.windows(pair.len()).any(|w| w == pair.as_slice()),
                "{what}: an inner IP header is visible on the underlay"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::udp_payload;

    #[test]
    fn udp_payloads_are_found_by_either_port_and_family() {
        let mut v4 = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        v4.extend([198, 18, 0, 10, 198, 18, 0, 11]);
        v4.extend(51820u16.to_be_bytes());
        v4.extend(4000u16.to_be_bytes());
        v4.extend([0, 12, 0, 0, 4, 0, 0, 0]);
        assert_eq!(udp_payload(&v4, 51820, false), Some(&[4u8, 0, 0, 0][..]));
        assert_eq!(udp_payload(&v4, 4000, false), Some(&[4u8, 0, 0, 0][..]));
        assert_eq!(udp_payload(&v4, 51821, false), None);
        v4[9] = 6;
        assert_eq!(udp_payload(&v4, 51820, false), None, "TCP is not UDP");

        let mut v6 = vec![0x60, 0, 0, 0, 0, 12, 17, 64];
        v6.extend([0u8; 32]);
        v6.extend(5000u16.to_be_bytes());
        v6.extend(51821u16.to_be_bytes());
        v6.extend([0, 12, 0, 0, 1, 2, 3, 4]);
        assert_eq!(udp_payload(&v6, 51821, true), Some(&[1u8, 2, 3, 4][..]));
        assert_eq!(udp_payload(&v6, 51820, true), None);
        assert_eq!(udp_payload(&v6[..40], 51821, true), None, "too short");
    }
}
