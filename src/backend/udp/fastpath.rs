//! The data-path threads: one moves packets TUN → socket, one socket → TUN. Blocking-style
//! loops over non-blocking descriptors (read until empty, then poll), preallocated buffers,
//! batched system calls, and the peer table read through one atomic load per batch: no
//! allocation, lock or channel per packet.

use std::io::{self, IoSlice};
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::counters::{Counters, DirStats};
use super::device::Tun;
use super::offload::{Coalescer, Segments, TxPacket, MAX_COALESCE, VNET_HDR_LEN};
use super::peers::PeerTable;
use super::pipeline::{self, TxOut};
use super::socket::{RecvBatch, SendStorage, UdpSock};
use super::wire::ICMP_UNREACHABLE_MAX;

/// How long an idle thread sleeps in `poll` before looking at the stop flag.
const POLL_MS: i32 = 200;
/// Largest frame the TUN device hands over: 64 KiB super-packet plus the virtio-net header.
const FRAME_LEN: usize = 65536 + VNET_HDR_LEN + 64;
/// Receive buffer: the largest UDP payload (a GRO-coalesced message is no larger).
const DATAGRAM_LEN: usize = 65536;
/// ICMP unreachable replies per second (and burst).
const ICMP_RATE: f64 = 10.0;

/// What the data path uses; decided at start from what the kernel accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// Frames on the TUN device carry a virtio-net header.
    pub vnet: bool,
    /// The TUN device hands over TCP super-packets (and takes coalesced ones).
    pub tso: bool,
    /// ... and UDP ones.
    pub uso: bool,
    /// UDP GSO on send.
    pub udp_gso: bool,
    /// UDP GRO on receive.
    pub udp_gro: bool,
    /// Frames read (datagrams received) per batch.
    pub batch: usize,
}

impl Features {
    /// The plain path: flannel's own behaviour, one packet per system call, no offloads.
    pub const PLAIN: Features = Features {
        vnet: false,
        tso: false,
        uso: false,
        udp_gso: false,
        udp_gro: false,
        batch: 1,
    };

    pub fn is_plain(&self) -> bool {
        *self == Self::PLAIN
    }

    /// One line for the log: which path runs.
    pub fn describe(&self) -> String {
        if self.is_plain() {
            return "plain path: one packet per system call, no offloads".into();
        }
        let on = |b: bool| if b { "on" } else { "off" };
        format!(
            "fast path: TUN virtio-net header {}, TSO {}, USO {}, UDP GSO {}, UDP GRO {}, \
             TCP coalescing {}, UDP coalescing {}, batches of {}",
            on(self.vnet),
            on(self.tso),
            on(self.uso),
            on(self.udp_gso),
            on(self.udp_gro),
            on(self.vnet && self.tso),
            on(self.vnet && self.uso),
            self.batch
        )
    }
}

/// State the threads share with the backend.
#[derive(Debug)]
pub struct Shared {
    pub peers: ArcSwap<PeerTable>,
    pub stop: AtomicBool,
    pub counters: Arc<Counters>,
}

impl Shared {
    pub fn new(counters: Arc<Counters>) -> Self {
        Shared {
            peers: ArcSwap::from_pointee(PeerTable::default()),
            stop: AtomicBool::new(false),
            counters,
        }
    }
}

/// Starts both threads.
pub fn spawn(
    tun: Arc<Tun>,
    sock: Arc<UdpSock>,
    shared: Arc<Shared>,
    f: Features,
) -> io::Result<Vec<JoinHandle<()>>> {
    let tx = {
        let (tun, sock, shared) = (tun.clone(), sock.clone(), shared.clone());
        std::thread::Builder::new()
            .name("udp-tx".into())
            .spawn(move || tx_loop(&tun, &sock, &shared, f))?
    };
    let rx = std::thread::Builder::new()
        .name("udp-rx".into())
        .spawn(move || rx_loop(&tun, &sock, &shared, f))?;
    Ok(vec![tx, rx])
}

/// The device was deleted or detached: the thread ends and reconciliation rebuilds it.
fn device_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD | libc::EBADF | libc::ENODEV | libc::ENXIO)
    )
}

/// Logs an I/O error at most once per 10 s per thread.
struct ErrorLog {
    what: &'static str,
    last: Option<Instant>,
}

impl ErrorLog {
    fn report(&mut self, e: &io::Error) {
        let now = Instant::now();
        if self
            .last
            .is_none_or(|t| now.duration_since(t) > Duration::from_secs(10))
        {
            tracing::warn!("udp: {}: {e}", self.what);
            self.last = Some(now);
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `rate` saved.
struct TokenBucket {
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64) -> Self {
        TokenBucket {
            tokens: rate,
            rate,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn tx_loop(tun: &Tun, sock: &UdpSock, shared: &Shared, f: Features) {
    let n_frames = f.batch.max(1);
    let mut frames: Vec<Vec<u8>> = vec![vec![0u8; FRAME_LEN]; n_frames];
    let mut lens = vec![0usize; n_frames];
    let mut segs: Vec<Segments> = (0..n_frames).map(|_| Segments::new()).collect();
    let mut outs: Vec<Option<(SocketAddrV4, TxPacket)>> = vec![None; n_frames];
    let mut storage = SendStorage::new(n_frames.max(64), 4096);
    let mut icmp = [0u8; VNET_HDR_LEN + ICMP_UNREACHABLE_MAX];
    let mut bucket = TokenBucket::new(ICMP_RATE);
    let mut stats = DirStats::default();
    let mut log = ErrorLog {
        what: "reading the TUN device",
        last: None,
    };
    let mut send_log = ErrorLog {
        what: "sending to peers",
        last: None,
    };
    let mut gso = f.udp_gso;
    // The last read found the queue empty: wait before reading again. (After a batch, the
    // next read is tried at once: under load it usually finds more, saving a sleep.)
    let mut drained = false;
    while !shared.stop.load(Ordering::Relaxed) {
        if drained {
            let _ = tun.wait_readable(POLL_MS);
            drained = false;
        }
        let mut n = 0;
        let mut failure = None;
        while n < n_frames {
            match tun.read(&mut frames[n]) {
                Ok(len) if len >= FRAME_LEN => stats.malformed += 1,
                Ok(len) => {
                    lens[n] = len;
                    n += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failure {
            if device_gone(&e) {
                tracing::warn!(
                    "udp: {}: device gone ({e}); TUN → UDP thread stops",
                    tun.name
                );
                return;
            }
            log.report(&e);
            drained = true;
        }
        if n == 0 {
            continue;
        }
        drained = false;
        let peers = shared.peers.load();
        for i in 0..n {
            outs[i] = None;
            let frame = &mut frames[i][..lens[i]];
            match pipeline::tx_frame(frame, f.vnet, &peers, &mut segs[i], &mut stats) {
                TxOut::Send(to, pkt) => outs[i] = Some((to, pkt)),
                TxOut::NoRoute(start) => {
                    if bucket.take() {
                        if let Some(len) =
                            pipeline::unreachable_frame(frame, start, f.vnet, &mut icmp)
                        {
                            if tun.writev(&[IoSlice::new(&icmp[..len])]).is_ok() {
                                shared
                                    .counters
                                    .icmp_unreachable
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                TxOut::Dropped => {}
            }
        }
        drop(peers);
        let mut batch = storage.batch(sock, gso);
        for i in 0..n {
            let Some((to, pkt)) = outs[i] else { continue };
            let frame = &frames[i];
            match pkt {
                TxPacket::Single { start, len } => batch.push(to, &frame[start..start + len], &[]),
                TxPacket::Split => {
                    for s in &segs[i].segs {
                        let p = s.payload_off as usize;
                        let payload = &frame[p..p + s.payload_len as usize];
                        batch.push(to, segs[i].header(s), payload);
                    }
                }
            }
        }
        let sent = batch.finish();
        if sent.gso_refused {
            gso = false;
        }
        if sent.failed > 0 {
            send_log.report(&io::Error::other(format!(
                "{} datagram(s) refused by the socket",
                sent.failed
            )));
        }
        stats.packets += sent.packets;
        stats.bytes += sent.bytes;
        stats.io_errors += sent.failed;
        shared.counters.tx.add(&stats);
        stats = DirStats::default();
    }
}

fn rx_loop(tun: &Tun, sock: &UdpSock, shared: &Shared, f: Features) {
    let n_msgs = f.batch.max(1);
    let mut rb = RecvBatch::new(n_msgs, DATAGRAM_LEN);
    let per_msg = if f.udp_gro { MAX_COALESCE } else { 1 };
    let mut co = Coalescer::new(n_msgs * per_msg, f.vnet && f.tso, f.vnet && f.uso);
    let mut stats = DirStats::default();
    let mut log = ErrorLog {
        what: "receiving from peers",
        last: None,
    };
    let mut write_log = ErrorLog {
        what: "writing to the TUN device",
        last: None,
    };
    // The last receive found the queue empty: wait before receiving again.
    let mut drained = false;
    while !shared.stop.load(Ordering::Relaxed) {
        if drained {
            let _ = sock.wait(libc::POLLIN, POLL_MS);
            drained = false;
        }
        let n = match sock.recv_batch(&mut rb) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                drained = true;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log.report(&e);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peers = shared.peers.load();
        for i in 0..n {
            let m = rb.meta[i];
            if m.truncated {
                stats.malformed += 1;
                continue;
            }
            pipeline::rx_datagram(
                &mut rb.bufs,
                i,
                m.len,
                m.seg_size,
                *m.from.ip(),
                &peers,
                &mut co,
                &mut stats,
            );
        }
        drop(peers);
        let mut gone = None;
        let fs = co.flush(&rb.bufs, f.vnet, |iov| {
            tun.writev(iov).inspect_err(|e| {
                if device_gone(e) {
                    gone = Some(e.raw_os_error());
                } else {
                    write_log.report(e);
                }
            })
        });
        if fs.refused_gso > 0 {
            tracing::warn!(
                "udp: {}: the device refused coalesced packets; writing packets singly",
                tun.name
            );
            co = Coalescer::new(n_msgs * per_msg, false, false);
        }
        stats.packets += fs.packets;
        stats.bytes += fs.bytes;
        stats.io_errors += fs.failed;
        shared.counters.rx.add(&stats);
        stats = DirStats::default();
        if let Some(errno) = gone {
            tracing::warn!(
                "udp: {}: device gone (errno {errno:?}); UDP → TUN thread stops",
                tun.name
            );
            return;
        }
    }
}
