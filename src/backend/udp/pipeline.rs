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
/// (GRO) several of `seg_size` bytes back to back, each one inner IPv4 packet. Checked
/// packets get their TTL decremented in place and are queued on `co`.
#[allow(clippy::too_many_arguments)]
pub fn rx_datagram<T: AsRef<[u8]> + AsMut<[u8]>>(
    bufs: &mut [T],
    buf: usize,
    len: usize,
    seg_size: usize,
    from: Ipv4Addr,
    peers: &PeerTable,
    co: &mut Coalescer,
    stats: &mut DirStats,
) {
    let len = len.min(bufs[buf].as_ref().len());
    let seg = if seg_size == 0 { len.max(1) } else { seg_size };
    if !peers.is_peer(from) {
        stats.unknown_source += len.div_ceil(seg).max(1) as u64;
        return;
    }
    let mut off = 0;
    while off < len {
        let end = (off + seg).min(len);
        let pkt = &mut bufs[buf].as_mut()[off..end];
        match wire::forward_ipv4(pkt) {
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
