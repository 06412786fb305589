//! What the data path does with each frame and datagram, without the I/O: shared by the
//! threads in `fastpath` and by the fuzz targets, so both run exactly the same code.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::counters::DirStats;
use super::offload::{self, Coalescer, PktRef, Segments, TxPacket};
use super::peers::PeerTable;
use super::wire::{self, Drop};

/// The outcome for one frame read from the TUN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOut {
    /// Send to this peer: the packet in place, or the segments.
    Send(SocketAddrV4, TxPacket),
    /// No peer for the destination: the packet starts at this offset of the frame (reply
    /// with ICMP net unreachable, rate permitting).
    NoRoute(usize),
    /// Dropped and counted.
    Dropped,
}

/// Handles one frame read from the TUN device (`vnet`: it starts with a virtio-net header).
pub fn tx_frame(
    frame: &mut [u8],
    vnet: bool,
    peers: &PeerTable,
    segs: &mut Segments,
    stats: &mut DirStats,
) -> TxOut {
    let start = match offload::split_frame(frame, vnet) {
        Ok((_, start)) => start,
        Err(why) => {
            stats.dropped(why);
            return TxOut::Dropped;
        }
    };
    let dst = match wire::parse_ipv4(&frame[start..]) {
        Ok(ip) => ip.dst,
        Err(why) => {
            stats.dropped(why);
            return TxOut::Dropped;
        }
    };
    let Some(to) = peers.lookup(dst) else {
        stats.dropped(Drop::NoRoute);
        return TxOut::NoRoute(start);
    };
    match offload::prepare_from_tun(frame, vnet, segs) {
        Ok((_, pkt)) => TxOut::Send(to, pkt),
        Err(why) => {
            stats.dropped(why);
            TxOut::Dropped
        }
    }
}

/// Builds the ICMP net unreachable reply to the packet at `frame[start..]` into `out`, after
/// a virtio-net header when `vnet`; returns the frame's length.
pub fn unreachable_frame(frame: &[u8], start: usize, vnet: bool, out: &mut [u8]) -> Option<usize> {
    let pkt = frame.get(start..)?;
    let ip = wire::parse_ipv4(pkt).ok()?;
    // The reply comes "from" the unreachable address: a source that is local to this host
    // would be dropped by the kernel as a martian when it enters through the TUN device.
    let vlen = if vnet { offload::VNET_HDR_LEN } else { 0 };
    out.get_mut(..vlen)?.fill(0);
    let n = wire::icmp_net_unreachable(pkt, ip.dst, out.get_mut(vlen..)?)?;
    Some(vlen + n)
}

/// Handles one received message: `bufs[buf][..len]` from `from`, holding one datagram or
/// (GRO) several of `seg_size` bytes back to back, each one inner IPv4 packet. A sender that
/// is no peer is dropped whole; each packet must then pass the reverse path check
/// ([`PeerTable::sent_by`]: peer port, inner source in that peer's subnets). Checked packets
/// get their TTL decremented in place and are queued on `co`.
#[allow(clippy::too_many_arguments)]
pub fn rx_datagram<T: AsRef<[u8]> + AsMut<[u8]>>(
    bufs: &mut [T],
    buf: usize,
    len: usize,
    seg_size: usize,
    from: SocketAddrV4,
    peers: &PeerTable,
    co: &mut Coalescer,
    stats: &mut DirStats,
) {
    let len = len.min(bufs[buf].as_ref().len());
    let seg = if seg_size == 0 { len.max(1) } else { seg_size };
    if !peers.is_peer(*from.ip()) {
        stats.unknown_source += len.div_ceil(seg).max(1) as u64;
        return;
    }
    // The segments of one GRO message are mostly one flow: look each source up once.
    let mut accepted: Option<Ipv4Addr> = None;
    let mut off = 0;
    while off < len {
        let end = (off + seg).min(len);
        let pkt = &mut bufs[buf].as_mut()[off..end];
        match check_from_peer(pkt, from, peers, &mut accepted) {
            Ok(ip) => co.push(
                bufs,
                PktRef {
                    buf: buf as u32,
                    off: off as u32,
                    len: ip.total_len as u32,
                },
            ),
            Err(why) => stats.dropped(why),
        }
        off = end;
    }
    if len == 0 {
        stats.malformed += 1;
    }
}

/// Checks one inner packet received from peer address `from` (source first, so a spoofed
/// packet is counted as such whatever its TTL) and decrements its TTL.
fn check_from_peer(
    pkt: &mut [u8],
    from: SocketAddrV4,
    peers: &PeerTable,
    accepted: &mut Option<Ipv4Addr>,
) -> Result<wire::Ipv4Hdr, Drop> {
    let ip = wire::parse_ipv4(pkt)?;
    if *accepted != Some(ip.src) {
        if !peers.sent_by(from, ip.src) {
            return Err(Drop::SpoofedSource);
        }
        *accepted = Some(ip.src);
    }
    if !wire::decrement_ttl(pkt) {
        return Err(Drop::TtlExpired);
    }
    Ok(ip)
}

#[cfg(test)]
mod tests {
    use super::super::wire::tests::ipv4_packet;
    use super::*;

    #[test]
    fn packets_spoofing_their_source_are_dropped_and_counted() {
        let peer = Ipv4Addr::new(198, 18, 0, 2);
        let peers = PeerTable::from_routes(vec![(
            u32::from(Ipv4Addr::new(10, 5, 2, 0)),
            0xffff_ff00,
            SocketAddrV4::new(peer, 8285),
        )]);
        let pkt = |src: [u8; 4], ttl: u8| {
            ipv4_packet(src, [10, 5, 1, 2], wire::PROTO_UDP, ttl, &[0u8; 44])
        };
        // One GRO message of four 64-byte packets: the peer's, a spoofed one (also with an
        // expiring TTL: spoofing is what it is counted as), the peer's, a spoofed one.
        let msg = [
            pkt([10, 5, 2, 9], 64),
            pkt([10, 5, 3, 9], 1),
            pkt([10, 5, 2, 10], 64),
            pkt([10, 5, 1, 9], 64),
        ]
        .concat();
        let run = |from: SocketAddrV4| {
            let mut bufs = vec![msg.clone()];
            let mut co = Coalescer::new(8, false, false);
            let mut stats = DirStats::default();
            rx_datagram(
                &mut bufs,
                0,
                msg.len(),
                64,
                from,
                &peers,
                &mut co,
                &mut stats,
            );
            (co.len(), stats)
        };
        let (queued, stats) = run(SocketAddrV4::new(peer, 8285));
        assert_eq!(queued, 2);
        assert_eq!(
            (
                stats.spoofed_source,
                stats.ttl_expired,
                stats.unknown_source
            ),
            (2, 0, 0)
        );
        // From the peer's IP on another port: every packet is spoofed.
        let (queued, stats) = run(SocketAddrV4::new(peer, 40000));
        assert_eq!((queued, stats.spoofed_source), (0, 4));
        // From no peer at all: unknown, as before.
        let (queued, stats) = run(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 8285));
        assert_eq!(
            (queued, stats.unknown_source, stats.spoofed_source),
            (0, 4, 0)
        );
    }
}
