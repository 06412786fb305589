//! The userspace WireGuard data path, on the udp fast path's machinery: the TUN device with
//! the virtio-net header (TSO/USO super-packets split into MTU-sized packets before
//! encryption; decrypted TCP/UDP segments coalesced before the write), the batching UDP
//! socket (recvmmsg, sendmmsg, UDP GSO/GRO). Three dedicated threads: TUN → peers,
//! peers → TUN, and the protocol's timers. The protocol
//! (Noise IK handshake, cookies, sessions, replay window, timers) is gotatun's `noise` layer;
//! this module routes packets to peers and enforces cryptokey routing around it.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use gotatun::noise::errors::WireGuardError;
use gotatun::noise::handshake::parse_handshake_anon;
use gotatun::noise::index_table::IndexTable;
use gotatun::noise::rate_limiter::RateLimiter;
use gotatun::noise::{Tunn, TunnResult};
use gotatun::packet::{Packet, WgKind};
use gotatun::tun::MtuWatcher;
use gotatun::x25519::{PublicKey, StaticSecret};

use super::counters::{bump, Counters, Drop};
use super::inner6;
use super::peers::{Peer, PeerTable};
use crate::backend::udp::device::Tun;
use crate::backend::udp::offload::{
    self, Coalescer, PktRef, Segments, TxPacket, MAX_COALESCE, VNET_HDR_LEN,
};
use crate::backend::udp::socket::{RecvBatch, SendStats, SendStorage, UdpSock};

/// How long an idle thread sleeps in `poll` before looking at the stop flag.
const POLL_MS: i32 = 200;
/// Largest frame the TUN device hands over: a 64 KiB super-packet and the virtio-net header.
const FRAME_LEN: usize = 65536 + VNET_HDR_LEN + 64;
/// Receive buffer per message: a GRO-coalesced run of datagrams is no larger.
const DATAGRAM_LEN: usize = 65536;
/// Frames (datagrams) read per batch.
const BATCH: usize = 64;
/// Datagrams queued before a send: one super-packet makes up to 46.
const SEND_AT_ONCE: usize = 256;
/// Space the segments of a super-packet are cut from before encryption: reclaimed whole
/// once the protocol has copied them out, so a segment costs no allocation of its own.
const SCRATCH_LEN: usize = 2 * FRAME_LEN;
/// Room for a segment's padding to a multiple of 16 bytes.
const PAD_ROOM: usize = 16;
/// How often the timers run (WireGuard's own devices use 250 ms ticks too).
const TICK: Duration = Duration::from_millis(250);
/// Handshakes per source IP per second before cookie replies are demanded.
pub const HANDSHAKE_RATE_LIMIT: u64 = 20;

/// Our session and handshake indices → their peer.
type IndexMap = HashMap<u32, Arc<Peer>, foldhash::fast::RandomState>;

/// The protocol state the threads share with the backend.
pub struct Engine {
    pub peers: ArcSwap<PeerTable>,
    /// Our session and handshake indices → their peer: data messages name only the index.
    by_index: ArcSwap<IndexMap>,
    pub index_table: IndexTable,
    pub rate_limiter: Arc<RateLimiter>,
    secret: StaticSecret,
    public: PublicKey,
    pub psk: Option<[u8; 32]>,
    pub keepalive: Option<u16>,
    pub stop: AtomicBool,
    pub counters: Arc<Counters>,
    mtu: u16,
}

impl Engine {
    pub fn new(
        secret: StaticSecret,
        psk: Option<[u8; 32]>,
        keepalive: Option<u16>,
        mtu: u16,
        counters: Arc<Counters>,
    ) -> Engine {
        let public = PublicKey::from(&secret);
        Engine {
            peers: ArcSwap::from_pointee(PeerTable::default()),
            by_index: ArcSwap::from_pointee(IndexMap::default()),
            index_table: IndexTable::from_os_rng(),
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            psk,
            keepalive,
            stop: AtomicBool::new(false),
            counters,
            mtu,
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    /// A new peer for `key`, reached at `endpoint` until it roams.
    pub fn new_peer(&self, key: [u8; 32], endpoint: SocketAddr) -> Arc<Peer> {
        let tunn = Tunn::new(
            self.secret.clone(),
            PublicKey::from(key),
            self.psk,
            self.keepalive,
            self.index_table.clone(),
            self.rate_limiter.clone(),
        );
        Arc::new(Peer::new(key, endpoint, tunn))
    }

    /// Remembers which peer a handshake index of ours belongs to, forgetting indices no
    /// session or handshake holds any more.
    fn register(&self, idx: u32, peer: &Arc<Peer>) {
        self.by_index.rcu(|m| {
            let mut m: IndexMap = m
                .iter()
                .filter(|(i, _)| self.index_table.in_use(**i))
                .map(|(i, p)| (*i, p.clone()))
                .collect();
            m.insert(idx, peer.clone());
            m
        });
    }

    fn peer_by_index(&self, idx: u32) -> Option<Arc<Peer>> {
        self.by_index.load().get(&idx).cloned()
    }

    /// Notes the handshake messages we send (their index, the counters).
    fn outgoing(&self, peer: &Arc<Peer>, msg: &WgKind) {
        let h = &self.counters.handshakes;
        match msg {
            WgKind::HandshakeInit(p) => {
                self.register(p.sender_idx.get(), peer);
                bump(&h.initiations_sent);
            }
            WgKind::HandshakeResp(p) => {
                self.register(p.sender_idx.get(), peer);
                bump(&h.responses_sent);
            }
            WgKind::CookieReply(_) => bump(&h.cookie_replies_sent),
            WgKind::Data(_) => {}
        }
    }
}

fn drop_for(e: &WireGuardError) -> Drop {
    match e {
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => Drop::Replay,
        WireGuardError::WrongIndex | WireGuardError::NoCurrentSession => Drop::UnknownPeer,
        WireGuardError::InvalidPacket | WireGuardError::IncorrectPacketLength => Drop::Malformed,
        _ => Drop::Invalid,
    }
}

/// The device was deleted or detached: the thread ends and reconciliation rebuilds it.
fn device_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD | libc::EBADF | libc::ENODEV | libc::ENXIO)
    )
}

/// Encrypts one IP packet from the device for the peer its destination routes to: the
/// datagram to send (a transport message, or a handshake initiation while the packet waits
/// in the peer's queue), `None` when the packet waits for a handshake already under way.
pub fn encapsulate(
    engine: &Engine,
    peers: &PeerTable,
    pkt: &[u8],
    mtu: &mut MtuWatcher,
) -> Result<Option<(SocketAddr, Packet)>, Drop> {
    let (dst, _) = inner6::addr_and_len(pkt, true).ok_or(Drop::Malformed)?;
    let peer = peers.route(dst).ok_or(Drop::NoRoute)?;
    let packet = Packet::from_bytes(BytesMut::from(pkt));
    let msg = peer.lock().handle_outgoing_packet(packet, Some(mtu));
    Ok(msg.map(|msg| {
        engine.outgoing(peer, &msg);
        if matches!(msg, WgKind::Data(_)) {
            engine.counters.tx.count(1, pkt.len() as u64);
        }
        (peer.endpoint(), msg.into())
    }))
}

/// Encrypts one frame read from the TUN device with the virtio-net header: a super-packet
/// is split into MTU-sized packets (complete checksums) cut from `scratch`, each encrypted
/// under one lock of the peer. The datagrams go to `out`.
pub fn encapsulate_frame(
    engine: &Engine,
    peers: &PeerTable,
    frame: &mut [u8],
    segs: &mut Segments,
    mtu: &mut MtuWatcher,
    scratch: &mut BytesMut,
    out: &mut Vec<(SocketAddr, Packet)>,
) -> Result<(), Drop> {
    let pkt = frame.get(VNET_HDR_LEN..).unwrap_or_default();
    let (dst, prepared) = match inner6::addr_and_len(pkt, true) {
        Some((IpAddr::V6(dst), _)) => {
            // The kernel's own IPv6 packets (router solicitations, MLD: multicast, hop
            // limit 1) go to no peer: counted as such, not as malformed.
            peers.route(dst.into()).ok_or(Drop::NoRoute)?;
            inner6::prepare_from_tun(frame, true, segs).map(|(d, p)| (d.into(), p))
        }
        _ => offload::prepare_from_tun(frame, true, segs).map(|(d, p)| (d.into(), p)),
    }
    .map_err(|_| Drop::Malformed)?;
    let peer = peers.route(dst).ok_or(Drop::NoRoute)?;
    let (mut packets, mut bytes) = (0u64, 0u64);
    let mut tunn = peer.lock();
    let endpoint = peer.endpoint();
    let mut one = |buf: BytesMut| {
        let len = buf.len() as u64;
        if let Some(msg) = tunn.handle_outgoing_packet(Packet::from_bytes(buf), Some(&mut *mtu)) {
            engine.outgoing(peer, &msg);
            if matches!(msg, WgKind::Data(_)) {
                packets += 1;
                bytes += len;
            }
            out.push((endpoint, msg.into()));
        }
    };
    let mut cut = |parts: [&[u8]; 2]| {
        let len = parts[0].len() + parts[1].len();
        if scratch.capacity() < len + PAD_ROOM {
            scratch.reserve(SCRATCH_LEN.max(len + PAD_ROOM));
        }
        scratch.extend_from_slice(parts[0]);
        scratch.extend_from_slice(parts[1]);
        scratch.extend_from_slice(&[0; PAD_ROOM]);
        // The segment keeps the room past its end: padding it allocates nothing.
        let mut seg = scratch.split_to(len + PAD_ROOM);
        seg.truncate(len);
        seg
    };
    match prepared {
        TxPacket::Single { start, len } => one(cut([&frame[start..start + len], &[]])),
        TxPacket::Split => {
            for s in &segs.segs {
                let p = s.payload_off as usize;
                one(cut([segs.header(s), &frame[p..p + s.payload_len as usize]]));
            }
        }
    }
    drop(tunn);
    engine.counters.tx.count(packets, bytes);
    Ok(())
}

/// Starts the three threads.
pub fn spawn(
    tun: Arc<Tun>,
    sock: Arc<UdpSock>,
    engine: Arc<Engine>,
) -> io::Result<Vec<JoinHandle<()>>> {
    super::heap::keep_freed_batches();
    let tx = {
        let (tun, sock, engine) = (tun.clone(), sock.clone(), engine.clone());
        std::thread::Builder::new()
            .name("wg-tx".into())
            .spawn(move || tx_loop(&tun, &sock, &engine))?
    };
    let timers = {
        let (sock, engine) = (sock.clone(), engine.clone());
        std::thread::Builder::new()
            .name("wg-timers".into())
            .spawn(move || timer_loop(&sock, &engine))?
    };
    let rx = std::thread::Builder::new()
        .name("wg-rx".into())
        .spawn(move || rx_loop(&tun, &sock, &engine))?;
    Ok(vec![tx, rx, timers])
}

/// Send state for batches of up to `max_msgs` datagrams. Each datagram takes two iovecs:
/// with fewer than that, a batch is cut short (a sendmmsg every few datagrams, GSO runs
/// of a few segments) however many messages fit.
fn send_storage(max_msgs: usize) -> SendStorage {
    SendStorage::new(max_msgs, 2 * max_msgs)
}

/// Sends what the protocol produced, in one batch (sendmmsg, GSO when the socket has it).
fn send_all(
    sock: &UdpSock,
    storage: &mut SendStorage,
    out: &[(SocketAddr, Packet)],
    c: &Counters,
) -> SendStats {
    if out.is_empty() {
        return SendStats::default();
    }
    let mut batch = storage.batch(sock, sock.gso);
    for (to, p) in out {
        batch.push(*to, p, &[]);
    }
    let sent = batch.finish();
    for _ in 0..sent.failed {
        c.tx.drop(Drop::IoError);
    }
    sent
}

fn tx_loop(tun: &Tun, sock: &UdpSock, engine: &Engine) {
    let mut buf = vec![0u8; FRAME_LEN];
    let mut segs = Segments::new();
    let vnet = tun.offloads.vnet;
    let mut out: Vec<(SocketAddr, Packet)> = Vec::with_capacity(SEND_AT_ONCE + 64);
    let mut storage = send_storage(SEND_AT_ONCE + 64);
    let mut mtu = MtuWatcher::new(engine.mtu);
    let mut scratch = BytesMut::new();
    let c = &engine.counters;
    while !engine.stop.load(Ordering::Relaxed) {
        let peers = engine.peers.load();
        let mut idle = false;
        for _ in 0..BATCH {
            let n = match tun.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    idle = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if device_gone(&e) => {
                    tracing::warn!(
                        "wireguard: {}: device gone ({e}); TUN → peers stops",
                        tun.name
                    );
                    return;
                }
                Err(e) => {
                    tracing::debug!("wireguard: reading {}: {e}", tun.name);
                    idle = true;
                    break;
                }
            };
            if vnet {
                if let Err(why) = encapsulate_frame(
                    engine,
                    &peers,
                    &mut buf[..n],
                    &mut segs,
                    &mut mtu,
                    &mut scratch,
                    &mut out,
                ) {
                    c.tx.drop(why);
                }
            } else {
                match encapsulate(engine, &peers, &buf[..n], &mut mtu) {
                    Ok(Some(datagram)) => out.push(datagram),
                    Ok(None) => {}
                    Err(why) => c.tx.drop(why),
                }
            }
            // A batch of super-packets makes many datagrams: send before the storage fills.
            if out.len() >= SEND_AT_ONCE {
                send_all(sock, &mut storage, &out, c);
                out.clear();
            }
        }
        drop(peers);
        send_all(sock, &mut storage, &out, c);
        out.clear();
        if idle {
            let _ = tun.wait_readable(POLL_MS);
        }
    }
}

/// The socket → TUN direction's per-batch state.
pub struct Rx<'a> {
    engine: &'a Engine,
    /// Decrypted packets that passed the checks, for the device.
    pub delivered: Vec<Packet>,
    /// Datagrams to send: handshake replies, cookie replies, packets a handshake released.
    pub out: Vec<(SocketAddr, Packet)>,
    mtu: MtuWatcher,
    packets: u64,
    bytes: u64,
}

impl<'a> Rx<'a> {
    pub fn new(engine: &'a Engine) -> Self {
        Rx {
            engine,
            delivered: Vec::with_capacity(BATCH * MAX_COALESCE),
            out: Vec::with_capacity(BATCH),
            mtu: MtuWatcher::new(engine.mtu),
            packets: 0,
            bytes: 0,
        }
    }

    /// Counts what the batch delivered.
    pub fn finish_batch(&mut self) {
        self.engine.counters.rx.count(self.packets, self.bytes);
        self.packets = 0;
        self.bytes = 0;
    }

    /// Handles one datagram from the socket (decrypted in place: it becomes the packet
    /// written to the device).
    pub fn datagram(&mut self, peers: &PeerTable, data: BytesMut, from: SocketAddr) {
        let c = &self.engine.counters;
        let packet = Packet::from_bytes(data);
        let msg = match self.engine.rate_limiter.verify_packet(from, packet) {
            Ok(msg) => msg,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                // Under load: the sender must prove it owns its address first.
                bump(&c.handshakes.cookie_replies_sent);
                c.rx.drop(Drop::UnderLoad);
                self.out.push((from, cookie.into()));
                return;
            }
            Err(TunnResult::Err(e)) => {
                c.rx.drop(drop_for(&e));
                return;
            }
            Err(_) => {
                c.rx.drop(Drop::Malformed);
                return;
            }
        };
        let peer = match &msg {
            WgKind::HandshakeInit(init) => {
                bump(&c.handshakes.initiations_received);
                let half =
                    match parse_handshake_anon(&self.engine.secret, &self.engine.public, init) {
                        Ok(h) => h,
                        Err(e) => {
                            c.rx.drop(drop_for(&e));
                            return;
                        }
                    };
                peers.by_key(&half.peer_static_public).cloned()
            }
            WgKind::HandshakeResp(p) => {
                bump(&c.handshakes.responses_received);
                self.engine.peer_by_index(p.receiver_idx.get())
            }
            WgKind::CookieReply(p) => {
                bump(&c.handshakes.cookie_replies_received);
                self.engine.peer_by_index(p.receiver_idx.get())
            }
            WgKind::Data(p) => self.engine.peer_by_index(p.header.receiver_idx.get()),
        };
        // A peer removed from the table (lease gone, key replaced) is no peer any more.
        let Some(peer) = peer.filter(|p| {
            peers
                .by_key(&p.public_key)
                .is_some_and(|q| Arc::ptr_eq(p, q))
        }) else {
            c.rx.drop(Drop::UnknownPeer);
            return;
        };
        let authenticated_roam = !matches!(msg, WgKind::CookieReply(_));
        let mut tunn = peer.lock();
        match tunn.handle_incoming_packet(msg) {
            TunnResult::Done => {}
            TunnResult::Err(e) => {
                c.rx.drop(drop_for(&e));
                return;
            }
            TunnResult::WriteToNetwork(reply) => {
                self.engine.outgoing(&peer, &reply);
                self.out.push((from, reply.into()));
            }
            TunnResult::WriteToTunnel(inner) => {
                if !inner.is_empty() {
                    self.inner(peers, &peer, inner);
                }
            }
        }
        // Only authenticated messages get here (a failed check returned above): roaming.
        if authenticated_roam && peer.endpoint() != from {
            peer.set_endpoint(from);
        }
        for queued in tunn.get_queued_packets(&mut self.mtu) {
            self.engine.outgoing(&peer, &queued);
            self.out.push((from, queued.into()));
        }
    }

    /// A decrypted packet: written to the device if its source belongs to the peer.
    fn inner(&mut self, peers: &PeerTable, peer: &Arc<Peer>, mut pkt: Packet) {
        let c = &self.engine.counters;
        // The sender pads to a multiple of 16 bytes: the packet ends where its header says.
        let Some((src, total)) = inner6::addr_and_len(&pkt, false) else {
            c.rx.drop(Drop::Malformed);
            return;
        };
        let min = if src.is_ipv4() { 20 } else { inner6::HDR_LEN };
        if total < min || total > pkt.len() {
            c.rx.drop(Drop::Malformed);
            return;
        }
        pkt.truncate(total);
        if !peers.allows(peer, src) {
            c.rx.drop(Drop::SpoofedSource);
            return;
        }
        self.delivered.push(pkt);
    }

    /// Writes the delivered packets to the device, coalescing TCP/UDP segments of a flow
    /// into super-packets when the device takes them; counts what was written.
    pub fn flush(&mut self, tun: &Tun, co: &mut Coalescer) {
        let vnet = tun.offloads.vnet;
        for (i, p) in self.delivered.iter().enumerate() {
            co.push(
                &self.delivered,
                PktRef {
                    buf: i as u32,
                    off: 0,
                    len: p.len() as u32,
                },
            );
        }
        let fs = co.flush(&self.delivered, vnet, |iov| tun.writev(iov));
        self.packets += fs.packets;
        self.bytes += fs.bytes;
        for _ in 0..fs.failed {
            self.engine.counters.rx.drop(Drop::IoError);
        }
        if fs.refused_gso > 0 {
            tracing::warn!(
                "wireguard: {}: the device refused coalesced packets; writing packets singly",
                tun.name
            );
            *co = Coalescer::new(BATCH * MAX_COALESCE, false, false);
        }
        self.delivered.clear();
        self.finish_batch();
    }
}

fn rx_loop(tun: &Tun, sock: &UdpSock, engine: &Engine) {
    let mut rb = RecvBatch::<BytesMut>::new(BATCH, DATAGRAM_LEN);
    let mut storage = send_storage(BATCH * 2);
    let mut rx = Rx::new(engine);
    let o = tun.offloads;
    let mut co = Coalescer::new(BATCH * MAX_COALESCE, o.vnet && o.tso, o.vnet && o.uso);
    while !engine.stop.load(Ordering::Relaxed) {
        let n = match sock.recv_batch(&mut rb) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = sock.wait(libc::POLLIN, POLL_MS);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!("wireguard: receiving: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peers = engine.peers.load();
        for i in 0..n {
            let m = rb.meta[i];
            if m.truncated {
                engine.counters.rx.drop(Drop::Malformed);
                continue;
            }
            let mut data = rb.take(i);
            // A GRO run holds datagrams of `seg_size` bytes (the last may be shorter); each
            // is cut off the received run, not copied.
            let seg = if m.seg_size > 0 {
                m.seg_size
            } else {
                data.len().max(1)
            };
            while !data.is_empty() {
                let d = data.split_to(seg.min(data.len()));
                rx.datagram(&peers, d, m.from);
            }
        }
        drop(peers);
        send_all(sock, &mut storage, &rx.out, &engine.counters);
        rx.out.clear();
        rx.flush(tun, &mut co);
    }
}

fn timer_loop(sock: &UdpSock, engine: &Engine) {
    let mut storage = send_storage(64);
    let mut out = Vec::new();
    let mut last_reset = Instant::now();
    while !engine.stop.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        let peers = engine.peers.load();
        for peer in peers.peers() {
            let r = peer.lock().update_timers();
            match r {
                Ok(Some(msg)) => {
                    engine.outgoing(peer, &msg);
                    out.push((peer.endpoint(), msg.into()));
                }
                Ok(None) => {}
                // The session expired (reject-after-time) or a handshake gave up: the
                // next packet starts over.
                Err(e) => tracing::debug!("wireguard: peer {peer:?}: {e:?}"),
            }
        }
        drop(peers);
        send_all(sock, &mut storage, &out, &engine.counters);
        out.clear();
        if last_reset.elapsed() >= Duration::from_secs(1) {
            engine.rate_limiter.try_reset_count();
            last_reset = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// The datagrams one TSO super-packet becomes (64 KiB of 1420-byte segments, encrypted)
    /// go out in one sendmmsg, not one per few datagrams.
    #[test]
    fn a_super_packets_datagrams_leave_in_one_syscall() {
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let (tx, rx) = (
            UdpSock::bind(any, true).unwrap(),
            UdpSock::bind(any, true).unwrap(),
        );
        let datagram = vec![4u8; 1452];
        let out: Vec<(SocketAddr, Packet)> = (0..46)
            .map(|_| (rx.local, Packet::from_bytes(BytesMut::from(&datagram[..]))))
            .collect();
        let mut storage = send_storage(SEND_AT_ONCE + 64);
        let sent = send_all(&tx, &mut storage, &out, &Counters::default());
        assert_eq!(sent.packets, 46);
        assert_eq!(sent.failed, 0);
        assert_eq!(sent.syscalls, 1, "{sent:?}");
    }
}
