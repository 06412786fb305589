//! Offload packet code: the virtio-net header of a TUN device opened with `IFF_VNET_HDR`,
//! splitting TSO/USO super-packets into wire-sized packets with complete checksums, and
//! coalescing received packets of one flow back into a super-packet for the TUN device.
//!
//! Pure code over byte slices: no I/O, and no allocation once the scratch vectors have grown.
//! The model is Linux's own GSO/GRO (and wireguard-go's `tun/offload_linux.go`): a split
//! segment is exactly what the kernel's segmentation would produce, and only segments the
//! kernel could have split from one super-packet are coalesced.

use std::io::IoSlice;
use std::net::Ipv4Addr;

use super::wire::{self, Drop, PROTO_TCP, PROTO_UDP};

/// `struct virtio_net_hdr` (without `num_buffers`), as set with `TUNSETVNETHDRSZ`.
pub const VNET_HDR_LEN: usize = 10;
pub const VNET_F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

/// Most segments one super-packet may be split into (an MSS of 64 bytes over 64 KiB).
pub const MAX_SEGS: usize = 1024;
/// Most packets coalesced into one super-packet (Linux GRO's limit).
pub const MAX_COALESCE: usize = 64;
/// Longest IPv4 + TCP header.
pub const MAX_HDR: usize = 120;
/// Largest IPv4 packet.
pub const MAX_IP_LEN: usize = 65535;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;

/// The virtio-net header in front of every packet on an `IFF_VNET_HDR` TUN device. Fields are
/// in host order (legacy virtio without `TUNSETVNETLE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn decode(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

// ---------------------------------------------------------------------------------------------
// Transmit: TUN frame → wire packets

/// One wire packet of a split super-packet: a rewritten header in [`Segments::headers`] and a
/// payload range of the frame it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub hdr_off: u32,
    pub hdr_len: u16,
    pub payload_off: u32,
    pub payload_len: u32,
}

impl Seg {
    pub fn len(&self) -> usize {
        usize::from(self.hdr_len) + self.payload_len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Scratch for splitting one super-packet; reused from frame to frame.
#[derive(Debug)]
pub struct Segments {
    pub headers: Vec<u8>,
    pub segs: Vec<Seg>,
    /// Length of every segment but the last (which may be shorter).
    pub seg_size: usize,
}

impl Default for Segments {
    fn default() -> Self {
        Segments::new()
    }
}

impl Segments {
    pub fn new() -> Self {
        Segments {
            headers: Vec::with_capacity(MAX_SEGS * MAX_HDR / 4),
            segs: Vec::with_capacity(MAX_SEGS),
            seg_size: 0,
        }
    }

    fn clear(&mut self) {
        self.headers.clear();
        self.segs.clear();
        self.seg_size = 0;
    }

    /// The `i`-th segment's header bytes.
    pub fn header(&self, seg: &Seg) -> &[u8] {
        let start = seg.hdr_off as usize;
        &self.headers[start..start + usize::from(seg.hdr_len)]
    }

    /// The segments as contiguous packets (tests, fuzzing, and the copy fallback).
    pub fn materialize(&self, frame: &[u8]) -> Vec<Vec<u8>> {
        self.segs
            .iter()
            .map(|s| {
                let mut p = self.header(s).to_vec();
                let start = s.payload_off as usize;
                p.extend_from_slice(&frame[start..start + s.payload_len as usize]);
                p
            })
            .collect()
    }
}

/// What to send for one frame read from the TUN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxPacket {
    /// One packet, ready in place at `frame[start..start + len]`.
    Single { start: usize, len: usize },
    /// Split into the [`Segments`]' packets.
    Split,
}

/// The IP packet of a frame read from the TUN device, and its virtio-net header.
pub fn split_frame(frame: &[u8], vnet: bool) -> Result<(VnetHdr, usize), Drop> {
    if !vnet {
        return Ok((VnetHdr::default(), 0));
    }
    let hdr = VnetHdr::decode(frame).ok_or(Drop::Malformed)?;
    Ok((hdr, VNET_HDR_LEN))
}

/// Prepares one frame read from the TUN device for the wire: checks the IPv4 packet,
/// decrements its TTL, completes a partial checksum, and splits a TSO/USO super-packet into
/// wire packets each with complete checksums. Returns the packet's destination with the
/// result; nothing is changed when the packet is dropped before the TTL step.
pub fn prepare_from_tun(
    frame: &mut [u8],
    vnet: bool,
    segs: &mut Segments,
) -> Result<(Ipv4Addr, TxPacket), Drop> {
    let (vh, start) = split_frame(frame, vnet)?;
    let pkt = &mut frame[start..];
    let ip = wire::parse_ipv4(pkt)?;
    let pkt = &mut pkt[..ip.total_len];
    if !wire::decrement_ttl(pkt) {
        return Err(Drop::TtlExpired);
    }
    let single = TxPacket::Single {
        start,
        len: ip.total_len,
    };
    match vh.gso_type & !GSO_ECN {
        GSO_NONE => {
            if vh.flags & VNET_F_NEEDS_CSUM != 0 {
                let start = usize::from(vh.csum_start);
                // The checksummed region is the L4 segment: never the IP header itself.
                if start < ip.hdr_len {
                    return Err(Drop::Malformed);
                }
                complete_checksum(pkt, start, usize::from(vh.csum_offset), ip.proto)?;
            }
            Ok((ip.dst, single))
        }
        GSO_TCPV4 if ip.proto == PROTO_TCP && !ip.is_fragment() => {
            let split = split_l4(pkt, start, &ip, usize::from(vh.gso_size), segs, true)?;
            Ok((ip.dst, if split { TxPacket::Split } else { single }))
        }
        GSO_UDP_L4 if ip.proto == PROTO_UDP && !ip.is_fragment() => {
            let split = split_l4(pkt, start, &ip, usize::from(vh.gso_size), segs, false)?;
            Ok((ip.dst, if split { TxPacket::Split } else { single }))
        }
        _ => Err(Drop::Malformed),
    }
}

/// Completes a checksum the kernel left partial: the field at `start + offset` holds the
/// pseudo-header sum, the sum runs from `start` to the end of the packet.
pub fn complete_checksum(
    pkt: &mut [u8],
    start: usize,
    offset: usize,
    proto: u8,
) -> Result<(), Drop> {
    let field = start
        .checked_add(offset)
        .filter(|f| f.checked_add(2).is_some_and(|end| end <= pkt.len()))
        .ok_or(Drop::Malformed)?;
    let mut c = wire::csum_field(wire::csum_add(0, &pkt[start..]));
    if proto == PROTO_UDP && c == [0, 0] && offset == 6 {
        c = [0xff, 0xff];
    }
    pkt[field..field + 2].copy_from_slice(&c);
    Ok(())
}

/// Writes a full TCP or UDP checksum into `l4` (header and payload are `l4_hdr` + `payload`).
fn l4_checksum(ip: &wire::Ipv4Hdr, tcp: bool, l4_hdr: &mut [u8], payload: &[u8]) {
    let (proto, field) = if tcp { (PROTO_TCP, 16) } else { (PROTO_UDP, 6) };
    l4_hdr[field] = 0;
    l4_hdr[field + 1] = 0;
    let mut sum = wire::pseudo_sum(ip.src, ip.dst, proto, l4_hdr.len() + payload.len());
    sum = wire::csum_add(sum, l4_hdr);
    sum = wire::csum_add(sum, payload);
    let mut c = wire::csum_field(sum);
    if !tcp && c == [0, 0] {
        c = [0xff, 0xff];
    }
    l4_hdr[field..field + 2].copy_from_slice(&c);
}

/// Splits a TCP (`tcp`) or UDP super-packet into segments of `gso_size` payload bytes.
/// Returns `false` when it fits in one packet (its checksum is then completed in place).
fn split_l4(
    pkt: &mut [u8],
    base: usize,
    ip: &wire::Ipv4Hdr,
    gso_size: usize,
    segs: &mut Segments,
    tcp: bool,
) -> Result<bool, Drop> {
    let ihl = ip.hdr_len;
    let l4_len = if tcp {
        let doff = usize::from(*pkt.get(ihl + 12).ok_or(Drop::Malformed)? >> 4) * 4;
        if doff < 20 {
            return Err(Drop::Malformed);
        }
        doff
    } else {
        8
    };
    let hlen = ihl + l4_len;
    if hlen > pkt.len() || gso_size == 0 {
        return Err(Drop::Malformed);
    }
    let payload_len = pkt.len() - hlen;
    if payload_len <= gso_size {
        if !tcp {
            pkt[ihl + 4..ihl + 6].copy_from_slice(&((l4_len + payload_len) as u16).to_be_bytes());
        }
        let (hdr, payload) = pkt.split_at_mut(hlen);
        l4_checksum(ip, tcp, &mut hdr[ihl..], payload);
        return Ok(false);
    }
    let count = payload_len.div_ceil(gso_size);
    if count > MAX_SEGS {
        return Err(Drop::Malformed);
    }
    segs.clear();
    segs.seg_size = hlen + gso_size;
    let template = &pkt[..hlen];
    let seq0 = u32::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5], pkt[ihl + 6], pkt[ihl + 7]]);
    for i in 0..count {
        let off = i * gso_size;
        let len = gso_size.min(payload_len - off);
        let last = i + 1 == count;
        let hdr_off = segs.headers.len();
        segs.headers.extend_from_slice(template);
        let h = &mut segs.headers[hdr_off..];
        h[2..4].copy_from_slice(&((hlen + len) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&ip.id.wrapping_add(i as u16).to_be_bytes());
        wire::set_ipv4_checksum(&mut h[..ihl]);
        let l4 = &mut h[ihl..];
        if tcp {
            let seq = seq0.wrapping_add(off as u32);
            l4[4..8].copy_from_slice(&seq.to_be_bytes());
            if !last {
                l4[13] &= !(TCP_FIN | TCP_PSH);
            }
            if i != 0 {
                l4[13] &= !TCP_CWR;
            }
        } else {
            l4[4..6].copy_from_slice(&((8 + len) as u16).to_be_bytes());
        }
        let payload = &pkt[hlen + off..hlen + off + len];
        l4_checksum(ip, tcp, l4, payload);
        segs.segs.push(Seg {
            hdr_off: hdr_off as u32,
            hdr_len: hlen as u16,
            payload_off: (base + hlen + off) as u32,
            payload_len: len as u32,
        });
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Receive: wire packets → TUN frames

/// Where one received packet lies: `bufs[buf][off..off + len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PktRef {
    pub buf: u32,
    pub off: u32,
    pub len: u32,
}

impl PktRef {
    fn slice<'a, T: AsRef<[u8]>>(&self, bufs: &'a [T]) -> &'a [u8] {
        let start = self.off as usize;
        &bufs[self.buf as usize].as_ref()[start..start + self.len as usize]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Single,
    Tcp,
    Udp,
}

/// The identity of a flow: addresses and ports (the bytes 12..20 of the IP header and the
/// first four of the L4 header).
type FlowKey = [u8; 12];

/// The flow key of a TCP or UDP packet over IPv4 without options.
fn flow_of(pkt: &[u8]) -> Option<FlowKey> {
    if pkt.len() < 24 || pkt[0] != 0x45 || !matches!(pkt[9], PROTO_TCP | PROTO_UDP) {
        return None;
    }
    let mut flow = [0u8; 12];
    flow[..8].copy_from_slice(&pkt[12..20]);
    flow[8..].copy_from_slice(&pkt[20..24]);
    Some(flow)
}

/// One frame to write: a packet, or a chain of packets of one flow to coalesce.
#[derive(Debug, Clone, Copy)]
struct Item {
    kind: Kind,
    first: u32,
    last: u32,
    count: u32,
    flow: FlowKey,
    hdr_len: u16,
    gso_size: u32,
    payload: u32,
    next_seq: u32,
    next_id: u16,
    psh: bool,
    open: bool,
}

/// How a received packet may join a flow's super-packet.
struct Candidate {
    kind: Kind,
    flow: FlowKey,
    hdr_len: usize,
    payload: usize,
    seq: u32,
    id: u16,
    psh: bool,
}

/// Counts of one [`Coalescer::flush`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushStats {
    /// Write calls made.
    pub writes: u64,
    /// Packets in frames that were written.
    pub packets: u64,
    /// Bytes of those packets (before coalescing).
    pub bytes: u64,
    /// Packets in frames whose write failed.
    pub failed: u64,
    /// Super-packets the device refused, re-written one packet at a time.
    pub refused_gso: u64,
}

/// Gathers the checked packets of one receive batch and coalesces consecutive TCP (and UDP)
/// segments of a flow into super-packets, as Linux GRO would.
///
/// Rules for TCP: IPv4 without options or fragmentation, flags only ACK (and PSH on the last
/// segment), the same TOS, TTL, DF, ACK number, window and TCP options as the first segment,
/// consecutive sequence numbers and (without DF) IP IDs, every segment but the last exactly as
/// long as the first. UDP likewise, by length. At most [`MAX_COALESCE`] segments and 64 KiB.
/// Packets keep their order within a flow.
#[derive(Debug)]
pub struct Coalescer {
    tcp: bool,
    udp: bool,
    pkts: Vec<PktRef>,
    next: Vec<u32>,
    items: Vec<Item>,
    /// Items that may still grow, most recent last.
    open: Vec<u32>,
}

const NONE: u32 = u32::MAX;
const MAX_OPEN: usize = 16;

impl Coalescer {
    /// A coalescer for batches of up to `capacity` packets; `tcp`/`udp` say which protocols
    /// may be coalesced (nothing is, when both are false).
    pub fn new(capacity: usize, tcp: bool, udp: bool) -> Self {
        Coalescer {
            tcp,
            udp,
            pkts: Vec::with_capacity(capacity),
            next: Vec::with_capacity(capacity),
            items: Vec::with_capacity(capacity),
            open: Vec::with_capacity(MAX_OPEN),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pkts.is_empty()
    }

    pub fn len(&self) -> usize {
        self.pkts.len()
    }

    fn candidate(&self, pkt: &[u8]) -> Option<Candidate> {
        if pkt.len() < 28 {
            return None;
        }
        let frag = u16::from_be_bytes([pkt[6], pkt[7]]);
        if frag & wire::IP_MF_OFFSET != 0 {
            return None;
        }
        let flow = flow_of(pkt)?;
        let id = u16::from_be_bytes([pkt[4], pkt[5]]);
        match pkt[9] {
            PROTO_TCP if self.tcp => {
                let doff = usize::from(*pkt.get(32)? >> 4) * 4;
                let hdr_len = 20 + doff;
                if doff < 20 || pkt.len() <= hdr_len {
                    return None;
                }
                let flags = pkt[33];
                if flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_URG | TCP_CWR) != 0
                    || flags & TCP_ACK == 0
                {
                    return None;
                }
                Some(Candidate {
                    kind: Kind::Tcp,
                    flow,
                    hdr_len,
                    payload: pkt.len() - hdr_len,
                    seq: u32::from_be_bytes([pkt[24], pkt[25], pkt[26], pkt[27]]),
                    id,
                    psh: flags & TCP_PSH != 0,
                })
            }
            PROTO_UDP if self.udp => {
                let udp_len = usize::from(u16::from_be_bytes([pkt[24], pkt[25]]));
                if udp_len != pkt.len() - 20 || udp_len <= 8 {
                    return None;
                }
                Some(Candidate {
                    kind: Kind::Udp,
                    flow,
                    hdr_len: 28,
                    payload: udp_len - 8,
                    seq: 0,
                    id,
                    psh: false,
                })
            }
            _ => None,
        }
        .filter(|_| checksums_verified(pkt))
    }

    /// Whether `c` (bytes `pkt`) continues item `it` whose first packet is `first`.
    fn joins(it: &Item, c: &Candidate, pkt: &[u8], first: &[u8]) -> bool {
        if !it.open
            || it.kind != c.kind
            || usize::from(it.hdr_len) != c.hdr_len
            || c.payload > it.gso_size as usize
            || it.count as usize >= MAX_COALESCE
            || c.hdr_len + it.payload as usize + c.payload > MAX_IP_LEN
            // TOS, TTL and the DF flag (fragments never get here).
            || pkt[1] != first[1]
            || pkt[6] != first[6]
            || pkt[8] != first[8]
        {
            return false;
        }
        let df = first[6] & 0x40 != 0;
        if !df && c.id != it.next_id {
            return false;
        }
        match c.kind {
            Kind::Tcp => {
                c.seq == it.next_seq
                    // ACK number, data offset, window, urgent pointer, options.
                    && pkt[28..33] == first[28..33]
                    && pkt[34..36] == first[34..36]
                    && pkt[38..c.hdr_len] == first[38..c.hdr_len]
            }
            _ => true,
        }
    }

    /// Adds the checked packet `r` (a whole IPv4 packet in `bufs`) to the batch.
    pub fn push<T: AsRef<[u8]>>(&mut self, bufs: &[T], r: PktRef) {
        let idx = self.pkts.len() as u32;
        self.pkts.push(r);
        self.next.push(NONE);
        let pkt = r.slice(bufs);
        let Some(c) = self.candidate(pkt) else {
            // A packet of a flow that cannot be coalesced ends that flow's super-packet, so
            // later segments are not written before it.
            if let Some(flow) = flow_of(pkt) {
                if let Some(pos) = self
                    .open
                    .iter()
                    .rposition(|&i| self.items[i as usize].flow == flow)
                {
                    let item = self.open.remove(pos);
                    self.items[item as usize].open = false;
                }
            }
            self.items.push(Item {
                kind: Kind::Single,
                first: idx,
                last: idx,
                count: 1,
                flow: [0; 12],
                hdr_len: 0,
                gso_size: 0,
                payload: 0,
                next_seq: 0,
                next_id: 0,
                psh: false,
                open: false,
            });
            return;
        };
        if let Some(pos) = self
            .open
            .iter()
            .rposition(|&i| self.items[i as usize].flow == c.flow)
        {
            let item_idx = self.open[pos] as usize;
            let it = self.items[item_idx];
            let first = self.pkts[it.first as usize].slice(bufs);
            if Self::joins(&it, &c, pkt, first) {
                self.next[it.last as usize] = idx;
                let it = &mut self.items[item_idx];
                it.last = idx;
                it.count += 1;
                it.payload += c.payload as u32;
                it.next_seq = c.seq.wrapping_add(c.payload as u32);
                it.next_id = c.id.wrapping_add(1);
                it.psh = c.psh;
                if c.payload < it.gso_size as usize || c.psh {
                    it.open = false;
                    self.open.remove(pos);
                }
                return;
            }
            // The flow goes on in a new item; the old one must not grow past this packet.
            self.items[item_idx].open = false;
            self.open.remove(pos);
        }
        let item_idx = self.items.len() as u32;
        let open = !c.psh;
        self.items.push(Item {
            kind: c.kind,
            first: idx,
            last: idx,
            count: 1,
            flow: c.flow,
            hdr_len: c.hdr_len as u16,
            gso_size: c.payload as u32,
            payload: c.payload as u32,
            next_seq: c.seq.wrapping_add(c.payload as u32),
            next_id: c.id.wrapping_add(1),
            psh: c.psh,
            open,
        });
        if open {
            if self.open.len() == MAX_OPEN {
                let oldest = self.open.remove(0);
                self.items[oldest as usize].open = false;
            }
            self.open.push(item_idx);
        }
    }

    /// Hands every frame of the batch to `write` (as I/O slices: virtio-net header when
    /// `vnet`, then the packet or the super-packet's pieces) and empties the batch. A
    /// super-packet the device refuses is written again one packet at a time.
    pub fn flush<T: AsRef<[u8]>>(
        &mut self,
        bufs: &[T],
        vnet: bool,
        mut write: impl FnMut(&[IoSlice<'_>]) -> std::io::Result<usize>,
    ) -> FlushStats {
        let mut stats = FlushStats::default();
        let zero = [0u8; VNET_HDR_LEN];
        let vlen = if vnet { VNET_HDR_LEN } else { 0 };
        for it in &self.items {
            let mut iov = [IoSlice::new(&[]); MAX_COALESCE + 2];
            let mut head = [0u8; VNET_HDR_LEN + MAX_HDR];
            let bytes = u64::from(it.payload) + u64::from(it.count) * u64::from(it.hdr_len);
            if it.count > 1 && vnet {
                let first = self.pkts[it.first as usize].slice(bufs);
                let hl = usize::from(it.hdr_len);
                build_super_header(it, first, &mut head);
                iov[0] = IoSlice::new(&head[..VNET_HDR_LEN + hl]);
                let mut n = 1;
                let mut p = it.first;
                while p != NONE {
                    iov[n] = IoSlice::new(&self.pkts[p as usize].slice(bufs)[hl..]);
                    n += 1;
                    p = self.next[p as usize];
                }
                stats.writes += 1;
                if write(&iov[..n]).is_ok() {
                    stats.packets += u64::from(it.count);
                    stats.bytes += bytes;
                    continue;
                }
                stats.refused_gso += 1;
            }
            // One packet at a time (a single, or a chain that could not be coalesced).
            let mut p = it.first;
            while p != NONE {
                let pkt = self.pkts[p as usize].slice(bufs);
                iov[0] = IoSlice::new(&zero[..vlen]);
                iov[1] = IoSlice::new(pkt);
                stats.writes += 1;
                if write(&iov[..2]).is_ok() {
                    stats.packets += 1;
                    stats.bytes += pkt.len() as u64;
                } else {
                    stats.failed += 1;
                }
                p = self.next[p as usize];
            }
        }
        self.pkts.clear();
        self.next.clear();
        self.items.clear();
        self.open.clear();
        stats
    }
}

/// Whether the IPv4 header checksum and the TCP or UDP checksum of `pkt` (a TCP or UDP packet
/// over IPv4 without options, trimmed to its total length) are right. A super-packet goes to
/// the kernel marked `NEEDS_CSUM`: the kernel fills its segments' checksums in and never checks
/// them, so a segment may only join one once its own checksums are known good; any other
/// packet is written alone and checked by the kernel. A UDP checksum of zero ("none") passes,
/// as the receiver would take it.
fn checksums_verified(pkt: &[u8]) -> bool {
    let (ip_hdr, l4) = pkt.split_at(wire::IPV4_MIN_HDR);
    if !wire::ipv4_checksum_ok(ip_hdr) {
        return false;
    }
    let proto = ip_hdr[9];
    if proto == PROTO_UDP && l4[6..8] == [0, 0] {
        return true;
    }
    let src = Ipv4Addr::new(ip_hdr[12], ip_hdr[13], ip_hdr[14], ip_hdr[15]);
    let dst = Ipv4Addr::new(ip_hdr[16], ip_hdr[17], ip_hdr[18], ip_hdr[19]);
    let sum = wire::csum_add(wire::pseudo_sum(src, dst, proto, l4.len()), l4);
    wire::csum_fold(sum) == 0xffff
}

/// Writes the virtio-net header and the rewritten IP + L4 header of a coalesced item into
/// `head`.
fn build_super_header(it: &Item, first: &[u8], head: &mut [u8]) {
    let hl = usize::from(it.hdr_len);
    let total = hl + it.payload as usize;
    let tcp = it.kind == Kind::Tcp;
    let vh = VnetHdr {
        flags: VNET_F_NEEDS_CSUM,
        gso_type: if tcp { GSO_TCPV4 } else { GSO_UDP_L4 },
        hdr_len: it.hdr_len,
        gso_size: it.gso_size as u16,
        csum_start: 20,
        csum_offset: if tcp { 16 } else { 6 },
    };
    head[..VNET_HDR_LEN].copy_from_slice(&vh.encode());
    let h = &mut head[VNET_HDR_LEN..VNET_HDR_LEN + hl];
    h.copy_from_slice(&first[..hl]);
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    wire::set_ipv4_checksum(&mut h[..20]);
    let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
    let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
    let (proto, field) = if tcp {
        (PROTO_TCP, 36)
    } else {
        (PROTO_UDP, 26)
    };
    if tcp {
        if it.psh {
            h[33] |= TCP_PSH;
        }
    } else {
        h[24..26].copy_from_slice(&((total - 20) as u16).to_be_bytes());
    }
    let psum = wire::csum_fold(wire::pseudo_sum(src, dst, proto, total - 20));
    h[field..field + 2].copy_from_slice(&psum.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::super::wire::tests::{reference_checksum, Rng};
    use super::*;

    /// A TCP/IPv4 packet with correct checksums.
    fn tcp_packet(seq: u32, id: u16, flags: u8, payload: &[u8], opts: &[u8]) -> Vec<u8> {
        let doff = 20 + opts.len();
        let mut p = vec![0u8; 20 + doff];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + doff + payload.len()) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 5, 1, 2]);
        p[16..20].copy_from_slice(&[10, 5, 2, 3]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&77u32.to_be_bytes());
        p[32] = ((doff / 4) as u8) << 4;
        p[33] = flags;
        p[34..36].copy_from_slice(&512u16.to_be_bytes());
        p[40..40 + opts.len()].copy_from_slice(opts);
        p.extend_from_slice(payload);
        wire::set_ipv4_checksum(&mut p[..20]);
        let ip = wire::parse_ipv4(&p).unwrap();
        let (h, pl) = p.split_at_mut(20 + doff);
        l4_checksum(&ip, true, &mut h[20..], pl);
        p
    }

    fn udp_packet(id: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = wire::tests::ipv4_packet([10, 5, 1, 2], [10, 5, 2, 3], PROTO_UDP, 64, &[0; 8]);
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6] = 0;
        p[20..22].copy_from_slice(&5000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p.extend_from_slice(payload);
        let len = p.len();
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
        wire::set_ipv4_checksum(&mut p[..20]);
        let ip = wire::parse_ipv4(&p).unwrap();
        let (h, pl) = p.split_at_mut(28);
        l4_checksum(&ip, false, &mut h[20..], pl);
        p
    }

    /// Checks IP and L4 checksums of a complete packet.
    fn checksums_ok(p: &[u8]) -> bool {
        let ip = wire::parse_ipv4(p).unwrap();
        let l4 = &p[ip.hdr_len..ip.total_len];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip.src.octets());
        pseudo.extend_from_slice(&ip.dst.octets());
        pseudo.extend_from_slice(&[0, ip.proto]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(l4);
        wire::ipv4_checksum_ok(&p[..ip.hdr_len]) && reference_checksum(&pseudo) == 0
    }

    /// A TSO super-packet as the TUN device hands it: virtio-net header, partial checksum.
    fn tso_frame(payload: &[u8], mss: u16, flags: u8, opts: &[u8]) -> Vec<u8> {
        let mut p = tcp_packet(1000, 500, flags, payload, opts);
        let hl = 40 + opts.len();
        let psum = wire::csum_fold(wire::pseudo_sum(
            Ipv4Addr::new(10, 5, 1, 2),
            Ipv4Addr::new(10, 5, 2, 3),
            PROTO_TCP,
            p.len() - 20,
        ));
        p[36..38].copy_from_slice(&psum.to_ne_bytes());
        let vh = VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: hl as u16,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut f = vh.encode().to_vec();
        f.extend_from_slice(&p);
        f
    }

    #[test]
    fn vnet_header_round_trips() {
        let vh = VnetHdr {
            flags: 1,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1420,
            csum_start: 20,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::decode(&vh.encode()), Some(vh));
        assert_eq!(VnetHdr::decode(&[0; 9]), None);
    }

    #[test]
    fn partial_checksum_is_completed() {
        let mut rng = Rng(3);
        let payload = rng.bytes(999);
        let full = tcp_packet(1000, 500, TCP_ACK | TCP_PSH, &payload, &[]);
        let mut frame = tso_frame(&payload, 1400, TCP_ACK | TCP_PSH, &[]);
        frame[1] = GSO_NONE;
        let mut segs = Segments::new();
        let (dst, tx) = prepare_from_tun(&mut frame, true, &mut segs).unwrap();
        assert_eq!(dst, Ipv4Addr::new(10, 5, 2, 3));
        let TxPacket::Single { start, len } = tx else {
            panic!("{tx:?}")
        };
        let out = &frame[start..start + len];
        assert!(checksums_ok(out));
        assert_eq!(out[8], 63);
        assert!(
            out[20..] == full[20..],
            "TCP segment differs from a fully checksummed one"
        );
    }

    #[test]
    fn tso_split_reassembles_to_the_original() {
        let mut rng = Rng(11);
        let opts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        for (len, mss) in [(65_000usize, 1420u16), (4000, 1000), (2841, 1420), (100, 7)] {
            let payload = rng.bytes(len);
            let mut frame = tso_frame(&payload, mss, TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR, &opts);
            let mut segs = Segments::new();
            let (_, tx) = prepare_from_tun(&mut frame, true, &mut segs).unwrap();
            assert_eq!(tx, TxPacket::Split);
            let out = segs.materialize(&frame);
            assert_eq!(out.len(), len.div_ceil(usize::from(mss)));
            assert_eq!(segs.seg_size, 52 + usize::from(mss));
            let mut joined = Vec::new();
            for (i, p) in out.iter().enumerate() {
                let last = i + 1 == out.len();
                assert!(checksums_ok(p), "segment {i}");
                assert!(last || p.len() == segs.seg_size);
                let ip = wire::parse_ipv4(p).unwrap();
                assert_eq!(ip.total_len, p.len());
                assert_eq!(ip.ttl, 63);
                assert_eq!(ip.id, 500 + i as u16);
                let seq = u32::from_be_bytes(p[24..28].try_into().unwrap());
                assert_eq!(seq, 1000 + (i * usize::from(mss)) as u32);
                let flags = p[33];
                assert_eq!(flags & TCP_PSH != 0, last);
                assert_eq!(flags & TCP_FIN != 0, last);
                assert_eq!(flags & TCP_CWR != 0, i == 0);
                assert_eq!(&p[40..52], &opts);
                joined.extend_from_slice(&p[52..]);
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn uso_split_gives_complete_udp_datagrams() {
        let mut rng = Rng(5);
        let payload = rng.bytes(3000);
        let mut p = udp_packet(9, &payload);
        let psum = wire::csum_fold(wire::pseudo_sum(
            Ipv4Addr::new(10, 5, 1, 2),
            Ipv4Addr::new(10, 5, 2, 3),
            PROTO_UDP,
            p.len() - 20,
        ));
        p[26..28].copy_from_slice(&psum.to_ne_bytes());
        let vh = VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: 28,
            gso_size: 1200,
            csum_start: 20,
            csum_offset: 6,
        };
        let mut frame = vh.encode().to_vec();
        frame.extend_from_slice(&p);
        let mut segs = Segments::new();
        assert_eq!(
            prepare_from_tun(&mut frame, true, &mut segs).unwrap().1,
            TxPacket::Split
        );
        let out = segs.materialize(&frame);
        assert_eq!(
            out.iter().map(Vec::len).collect::<Vec<_>>(),
            [1228, 1228, 628]
        );
        let mut joined = Vec::new();
        for (i, p) in out.iter().enumerate() {
            assert!(checksums_ok(p));
            assert_eq!(
                usize::from(u16::from_be_bytes([p[24], p[25]])),
                p.len() - 20
            );
            assert_eq!(u16::from_be_bytes([p[4], p[5]]), 9 + i as u16);
            joined.extend_from_slice(&p[28..]);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn bad_gso_frames_are_malformed() {
        let mut segs = Segments::new();
        // GSO type TCP on a UDP packet.
        let mut f = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 100,
            ..Default::default()
        }
        .encode()
        .to_vec();
        f.extend_from_slice(&udp_packet(1, &[0; 300]));
        assert_eq!(
            prepare_from_tun(&mut f, true, &mut segs),
            Err(Drop::Malformed)
        );
        // gso_size 0.
        let mut f = tso_frame(&[0; 3000], 0, TCP_ACK, &[]);
        assert_eq!(
            prepare_from_tun(&mut f, true, &mut segs),
            Err(Drop::Malformed)
        );
        // Checksum offset past the end.
        let mut f = tso_frame(&[0; 30], 1000, TCP_ACK, &[]);
        f[1] = GSO_NONE;
        f[8..10].copy_from_slice(&5000u16.to_ne_bytes());
        assert_eq!(
            prepare_from_tun(&mut f, true, &mut segs),
            Err(Drop::Malformed)
        );
        // Checksum region starting inside the IP header.
        let mut f = tso_frame(&[0; 30], 1000, TCP_ACK, &[]);
        f[1] = GSO_NONE;
        f[6..8].copy_from_slice(&0u16.to_ne_bytes());
        f[8..10].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(
            prepare_from_tun(&mut f, true, &mut segs),
            Err(Drop::Malformed)
        );
        // Unknown GSO type.
        let mut f = tso_frame(&[0; 3000], 1000, TCP_ACK, &[]);
        f[1] = 3;
        assert_eq!(
            prepare_from_tun(&mut f, true, &mut segs),
            Err(Drop::Malformed)
        );
        // Truncated virtio-net header.
        assert_eq!(
            prepare_from_tun(&mut [0u8; 5], true, &mut segs),
            Err(Drop::Malformed)
        );
    }

    /// Coalesces `pkts` and returns the frames written.
    fn coalesce(pkts: &[Vec<u8>], tcp: bool, udp: bool) -> Vec<Vec<u8>> {
        let mut c = Coalescer::new(64, tcp, udp);
        for i in 0..pkts.len() {
            c.push(
                pkts,
                PktRef {
                    buf: i as u32,
                    off: 0,
                    len: pkts[i].len() as u32,
                },
            );
        }
        let mut out = Vec::new();
        let stats = c.flush(pkts, true, |iov| {
            let mut f = Vec::new();
            for s in iov {
                f.extend_from_slice(s);
            }
            out.push(f);
            Ok(0)
        });
        assert_eq!(stats.packets as usize, pkts.len());
        out
    }

    #[test]
    fn gro_coalesces_a_flow_and_split_gives_it_back() {
        let mut rng = Rng(21);
        let payload = rng.bytes(1420 * 5 + 300);
        let opts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let segs: Vec<Vec<u8>> = payload
            .chunks(1420)
            .enumerate()
            .map(|(i, c)| {
                let last = (i + 1) * 1420 >= payload.len();
                let flags = if last { TCP_ACK | TCP_PSH } else { TCP_ACK };
                tcp_packet(1000 + (i * 1420) as u32, 500 + i as u16, flags, c, &opts)
            })
            .collect();
        let out = coalesce(&segs, true, true);
        assert_eq!(out.len(), 1);
        let vh = VnetHdr::decode(&out[0]).unwrap();
        assert_eq!(
            (
                vh.flags,
                vh.gso_type,
                vh.gso_size,
                vh.hdr_len,
                vh.csum_start,
                vh.csum_offset
            ),
            (VNET_F_NEEDS_CSUM, GSO_TCPV4, 1420, 52, 20, 16)
        );
        // Splitting the super-packet again (TTL aside) yields exactly the original segments.
        let mut frame = out[0].clone();
        frame[VNET_HDR_LEN + 8] += 1;
        wire::set_ipv4_checksum(&mut frame[VNET_HDR_LEN..VNET_HDR_LEN + 20]);
        let mut scratch = Segments::new();
        assert_eq!(
            prepare_from_tun(&mut frame, true, &mut scratch).unwrap().1,
            TxPacket::Split
        );
        assert_eq!(scratch.materialize(&frame), segs);
    }

    #[test]
    fn gro_respects_flow_boundaries_and_order() {
        let a =
            |seq: u32, id: u16, flags: u8, n: usize| tcp_packet(seq, id, flags, &vec![7; n], &[]);
        let mut other = a(0, 1, TCP_ACK, 100);
        other[22..24].copy_from_slice(&5202u16.to_be_bytes());
        wire::set_ipv4_checksum(&mut other[..20]);
        let pkts = vec![
            a(0, 1, TCP_ACK, 100),
            other.clone(),
            a(100, 2, TCP_ACK, 100),
            a(200, 3, TCP_ACK, 50), // short: closes the group
            a(250, 4, TCP_ACK, 50),
            a(300, 5, TCP_ACK | TCP_FIN, 10), // FIN: never coalesced
            a(999, 6, TCP_ACK, 100),          // gap in sequence numbers
            a(1099, 7, TCP_ACK | TCP_PSH, 100),
            a(1199, 8, TCP_ACK, 100), // after PSH: new group
        ];
        let out = coalesce(&pkts, true, false);
        let sizes: Vec<(u8, usize)> = out.iter().map(|f| (f[1], f.len() - VNET_HDR_LEN)).collect();
        assert_eq!(
            sizes,
            vec![
                (GSO_TCPV4, 40 + 250),
                (GSO_NONE, 140),
                (GSO_NONE, 90),
                (GSO_NONE, 50),
                (GSO_TCPV4, 40 + 200),
                (GSO_NONE, 140),
            ]
        );
        // Uncoalesced packets are written unchanged.
        assert_eq!(out[1][VNET_HDR_LEN..], other[..]);
        // Different ACK numbers or windows never merge.
        let mut b = a(100, 2, TCP_ACK, 100);
        b[34] = 9;
        assert_eq!(coalesce(&[a(0, 1, TCP_ACK, 100), b], true, false).len(), 2);
        // Without DF the IP IDs must be consecutive.
        let mut x = a(0, 1, TCP_ACK, 100);
        let mut y = a(100, 5, TCP_ACK, 100);
        for p in [&mut x, &mut y] {
            p[6] = 0;
            wire::set_ipv4_checksum(&mut p[..20]);
        }
        assert_eq!(coalesce(&[x, y], true, false).len(), 2);
        // Disabled: nothing merges.
        assert_eq!(coalesce(&pkts, false, false).len(), pkts.len());
    }

    #[test]
    fn gro_coalesces_udp_by_length() {
        let pkts: Vec<Vec<u8>> = (0..10)
            .map(|i| udp_packet(i, &[i as u8; 64]))
            .chain([udp_packet(10, &[1; 30]), udp_packet(11, &[1; 64])])
            .collect();
        let out = coalesce(&pkts, true, true);
        assert_eq!(out.len(), 2);
        let vh = VnetHdr::decode(&out[0]).unwrap();
        assert_eq!(
            (vh.gso_type, vh.gso_size, vh.hdr_len, vh.csum_offset),
            (GSO_UDP_L4, 64, 28, 6)
        );
        assert_eq!(out[0].len(), VNET_HDR_LEN + 28 + 64 * 10 + 30);
        // Split back: the same datagrams.
        let mut frame = out[0].clone();
        frame[VNET_HDR_LEN + 8] += 1;
        wire::set_ipv4_checksum(&mut frame[VNET_HDR_LEN..VNET_HDR_LEN + 20]);
        let mut scratch = Segments::new();
        prepare_from_tun(&mut frame, true, &mut scratch).unwrap();
        assert_eq!(scratch.materialize(&frame), pkts[..11].to_vec());
        // UDP coalescing off: TCP only.
        assert_eq!(coalesce(&pkts, true, false).len(), pkts.len());
    }

    #[test]
    fn gro_caps_segments_and_size() {
        let pkts: Vec<Vec<u8>> = (0..100)
            .map(|i| tcp_packet(i * 1000, i as u16, TCP_ACK, &[0; 1000], &[]))
            .collect();
        let out = coalesce(&pkts, true, false);
        for f in &out {
            let len = f.len() - VNET_HDR_LEN;
            assert!(len <= MAX_IP_LEN);
        }
        assert_eq!(out.len(), 2);
    }
    /// Splits every super-packet among `frames` back into its segments (TTL restored first,
    /// as the transmit side expects to decrement it); single packets are returned as they are.
    /// Returns (segments from super-packets, single packets).
    fn unpack(frames: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut coalesced, mut single) = (Vec::new(), Vec::new());
        for f in frames {
            let vh = VnetHdr::decode(f).unwrap();
            if vh.gso_type == GSO_NONE {
                assert_eq!(
                    vh.flags, 0,
                    "a single packet is written for the kernel to check"
                );
                single.push(f[VNET_HDR_LEN..].to_vec());
                continue;
            }
            assert_eq!(vh.flags, VNET_F_NEEDS_CSUM);
            let mut frame = f.clone();
            frame[VNET_HDR_LEN + 8] += 1;
            wire::set_ipv4_checksum(&mut frame[VNET_HDR_LEN..VNET_HDR_LEN + 20]);
            let mut scratch = Segments::new();
            prepare_from_tun(&mut frame, true, &mut scratch).unwrap();
            coalesced.extend(scratch.materialize(&frame));
        }
        (coalesced, single)
    }

    #[test]
    fn gro_never_coalesces_a_segment_with_a_bad_checksum() {
        let burst = || -> Vec<Vec<u8>> {
            (0..8u32)
                .map(|i| tcp_packet(1000 + i * 1000, 1 + i as u16, TCP_ACK, &[9; 1000], &[]))
                .collect()
        };
        type Corrupt = fn(&mut Vec<u8>);
        let corruptions: [(&str, Corrupt); 2] = [
            // Payload bytes changed in flight, TCP checksum left as it was.
            ("payload", |p| p[500] ^= 0x10),
            ("TCP checksum", |p| p[36] ^= 0x01),
        ];
        for (what, corrupt) in corruptions {
            let mut pkts = burst();
            corrupt(&mut pkts[3]);
            let bad = pkts[3].clone();
            assert!(!checksums_ok(&bad), "{what}: the test packet is corrupt");
            let (coalesced, single) = unpack(&coalesce(&pkts, true, true));
            // A segment is known by its sequence number (splitting gives it a fresh checksum).
            assert!(
                !coalesced.iter().any(|p| p[24..28] == bad[24..28]),
                "{what}: the corrupt segment went into a NEEDS_CSUM super-packet"
            );
            assert!(single == [bad], "{what}: not written alone, unchanged");
            // The good segments around it are still coalesced, unchanged.
            assert!(coalesced == [&pkts[..3], &pkts[4..]].concat(), "{what}");
        }
        // An IP header changed in flight (here the TOS of every packet alike, so the packets
        // still match each other): the TCP checksum does not cover it, the header checksum
        // does, and a super-packet's header checksum is computed afresh.
        let mut pkts = burst();
        for p in &mut pkts {
            p[1] ^= 0x04;
        }
        let (coalesced, single) = unpack(&coalesce(&pkts, true, true));
        assert!(
            coalesced.is_empty(),
            "coalesced {} segments",
            coalesced.len()
        );
        assert!(single == pkts, "not written alone, unchanged");
        // The same for UDP; a zero UDP checksum ("none") is no reason to keep a datagram out.
        let mut rng = Rng(31);
        let mut pkts: Vec<Vec<u8>> = (0..6).map(|i| udp_packet(i, &rng.bytes(500))).collect();
        pkts[2][100] ^= 0x80;
        pkts[4][26..28].copy_from_slice(&[0, 0]);
        let (coalesced, single) = unpack(&coalesce(&pkts, true, true));
        assert!(
            !coalesced.iter().any(|p| p[28..] == pkts[2][28..]),
            "the corrupt datagram went into a NEEDS_CSUM super-packet"
        );
        assert!(single == [pkts[2].clone()], "not written alone, unchanged");
        assert_eq!(coalesced.len(), 5);
    }
}
