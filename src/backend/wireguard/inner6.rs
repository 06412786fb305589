//! IPv6 packets on the device (the inner side of `flannel-wg-v6`, or of `flannel-wg` when it
//! carries both families): addresses, lengths, and the TUN device's virtio-net header.
//!
//! The device is opened without `TUN_F_TSO6`, so TCP over IPv6 arrives segmented (with a
//! partial checksum at most); `TUN_F_USO6` comes with USO4 (the kernel takes them only as a
//! pair), so a UDP super-packet over IPv6 may arrive and is split here, as the kernel would.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::backend::udp::offload::{
    complete_checksum, split_frame, Seg, Segments, TxPacket, GSO_ECN, GSO_NONE, GSO_UDP_L4,
    VNET_F_NEEDS_CSUM,
};
use crate::backend::udp::wire::{self, PROTO_UDP};

pub const HDR_LEN: usize = 40;
const UDP_HDR_LEN: usize = 8;

/// The IP version of a packet (4 or 6; anything else is not a packet we carry).
pub fn version(pkt: &[u8]) -> Option<u8> {
    pkt.first().map(|b| b >> 4)
}

/// Source or destination (`dst`) of an IPv4 or IPv6 packet, and its length by its header
/// (the sender pads to 16 bytes; the packet ends where its header says).
pub fn addr_and_len(pkt: &[u8], dst: bool) -> Option<(IpAddr, usize)> {
    match version(pkt)? {
        4 if pkt.len() >= 20 => {
            let off = if dst { 16 } else { 12 };
            let b: [u8; 4] = pkt[off..off + 4].try_into().ok()?;
            let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
            Some((Ipv4Addr::from(b).into(), total))
        }
        6 if pkt.len() >= HDR_LEN => {
            let off = if dst { 24 } else { 8 };
            let b: [u8; 16] = pkt[off..off + 16].try_into().ok()?;
            let total = HDR_LEN + usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
            Some((Ipv6Addr::from(b).into(), total))
        }
        _ => None,
    }
}

/// The sum of the IPv6 pseudo-header for an upper-layer segment of `len` bytes.
fn pseudo_sum(pkt: &[u8], proto: u8, len: usize) -> u64 {
    let sum = wire::csum_add(0, &pkt[8..40]);
    let l = (len as u32).to_be_bytes();
    wire::csum_add(sum, &[l[0], l[1], l[2], l[3], 0, 0, 0, proto])
}

/// A full UDP checksum over `hdr` (IPv6 + UDP header) and `payload`, written into `hdr`.
fn udp_checksum(hdr: &mut [u8], payload: &[u8]) {
    let udp_len = UDP_HDR_LEN + payload.len();
    hdr[HDR_LEN + 6..HDR_LEN + 8].fill(0);
    let mut sum = pseudo_sum(hdr, PROTO_UDP, udp_len);
    sum = wire::csum_add(sum, &hdr[HDR_LEN..HDR_LEN + UDP_HDR_LEN]);
    sum = wire::csum_add(sum, payload);
    let mut c = wire::csum_field(sum);
    // Over IPv6 a UDP checksum of zero means none, which is not allowed: it is sent as ones.
    if c == [0, 0] {
        c = [0xff, 0xff];
    }
    hdr[HDR_LEN + 6..HDR_LEN + 8].copy_from_slice(&c);
}

/// Prepares one IPv6 frame read from the TUN device for encryption: checks the header,
/// decrements the hop limit, completes a partial checksum, splits a UDP super-packet into
/// packets of `gso_size` payload bytes. The counterpart of `offload::prepare_from_tun`.
pub fn prepare_from_tun(
    frame: &mut [u8],
    vnet: bool,
    segs: &mut Segments,
) -> Result<(Ipv6Addr, TxPacket), wire::Drop> {
    let (vh, start) = split_frame(frame, vnet)?;
    let pkt = &mut frame[start..];
    let (dst, total) = match addr_and_len(pkt, true) {
        Some((IpAddr::V6(dst), total)) if total <= pkt.len() => (dst, total),
        _ => return Err(wire::Drop::Malformed),
    };
    let pkt = &mut pkt[..total];
    if pkt[7] <= 1 {
        return Err(wire::Drop::TtlExpired);
    }
    pkt[7] -= 1;
    let single = TxPacket::Single { start, len: total };
    match vh.gso_type & !GSO_ECN {
        GSO_NONE => {
            if vh.flags & VNET_F_NEEDS_CSUM != 0 {
                let cs = usize::from(vh.csum_start);
                if cs < HDR_LEN {
                    return Err(wire::Drop::Malformed);
                }
                complete_checksum(pkt, cs, usize::from(vh.csum_offset), pkt[6])?;
            }
            Ok((dst, single))
        }
        GSO_UDP_L4 if pkt[6] == PROTO_UDP => {
            let split = split_udp(pkt, start, usize::from(vh.gso_size), segs)?;
            Ok((dst, if split { TxPacket::Split } else { single }))
        }
        _ => Err(wire::Drop::Malformed),
    }
}

/// Splits a UDP-over-IPv6 super-packet; `false` when it fits one packet (its checksum is
/// then completed in place).
fn split_udp(
    pkt: &mut [u8],
    base: usize,
    gso_size: usize,
    segs: &mut Segments,
) -> Result<bool, wire::Drop> {
    let hlen = HDR_LEN + UDP_HDR_LEN;
    if pkt.len() < hlen || gso_size == 0 {
        return Err(wire::Drop::Malformed);
    }
    let payload_len = pkt.len() - hlen;
    if payload_len <= gso_size {
        let udp_len = ((UDP_HDR_LEN + payload_len) as u16).to_be_bytes();
        pkt[HDR_LEN + 4..HDR_LEN + 6].copy_from_slice(&udp_len);
        let (hdr, payload) = pkt.split_at_mut(hlen);
        udp_checksum(hdr, payload);
        return Ok(false);
    }
    let count = payload_len.div_ceil(gso_size);
    if count > crate::backend::udp::offload::MAX_SEGS {
        return Err(wire::Drop::Malformed);
    }
    segs.headers.clear();
    segs.segs.clear();
    segs.seg_size = hlen + gso_size;
    for i in 0..count {
        let off = i * gso_size;
        let len = gso_size.min(payload_len - off);
        let hdr_off = segs.headers.len();
        segs.headers.extend_from_slice(&pkt[..hlen]);
        let h = &mut segs.headers[hdr_off..];
        let l4 = ((UDP_HDR_LEN + len) as u16).to_be_bytes();
        h[4..6].copy_from_slice(&l4);
        h[HDR_LEN + 4..HDR_LEN + 6].copy_from_slice(&l4);
        udp_checksum(h, &pkt[hlen + off..hlen + off + len]);
        segs.segs.push(Seg {
            hdr_off: hdr_off as u32,
            hdr_len: hlen as u16,
            payload_off: (base + hlen + off) as u32,
            payload_len: len as u32,
        });
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::udp::offload::{VnetHdr, VNET_HDR_LEN};

    fn udp6(payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; HDR_LEN + UDP_HDR_LEN];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((UDP_HDR_LEN + payload.len()) as u16).to_be_bytes());
        p[6] = PROTO_UDP;
        p[7] = 64;
        p[8..24].copy_from_slice(&"fc00:0:0:1::2".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"fc00:0:0:2::3".parse::<Ipv6Addr>().unwrap().octets());
        p[40..42].copy_from_slice(&1234u16.to_be_bytes());
        p[42..44].copy_from_slice(&5678u16.to_be_bytes());
        p[44..46].copy_from_slice(&((UDP_HDR_LEN + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    /// Whether the UDP checksum of an IPv6 packet verifies (the receiver's check).
    fn udp_ok(p: &[u8]) -> bool {
        let l4 = &p[HDR_LEN..];
        wire::csum_fold(wire::csum_add(pseudo_sum(p, PROTO_UDP, l4.len()), l4)) == 0xffff
    }

    #[test]
    fn a_udp_super_packet_over_ipv6_splits_into_checksummed_datagrams() {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let pkt = udp6(&payload);
        let vh = VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: 48,
            gso_size: 1200,
            csum_start: 40,
            csum_offset: 6,
        };
        let mut frame = vh.encode().to_vec();
        frame.extend_from_slice(&pkt);
        let mut segs = Segments::new();
        let (dst, how) = prepare_from_tun(&mut frame, true, &mut segs).unwrap();
        assert_eq!(dst, "fc00:0:0:2::3".parse::<Ipv6Addr>().unwrap());
        assert_eq!(how, TxPacket::Split);
        let out = segs.materialize(&frame);
        assert_eq!(out.len(), 3);
        let mut joined = Vec::new();
        for p in &out {
            assert_eq!(p[7], 63, "hop limit decremented");
            assert_eq!(addr_and_len(p, false).unwrap().1, p.len());
            assert!(udp_ok(p), "checksum of a {}-byte segment", p.len());
            joined.extend_from_slice(&p[48..]);
        }
        assert_eq!(joined, payload);
        assert_eq!(out[2].len(), 48 + 600);
    }

    #[test]
    fn a_partial_checksum_is_completed_and_hop_limit_one_is_dropped() {
        let mut pkt = udp6(b"hello over ipv6");
        // The kernel leaves the pseudo-header sum in the field.
        let len = pkt.len() - HDR_LEN;
        let seed = wire::csum_fold(pseudo_sum(&pkt, PROTO_UDP, len));
        pkt[46..48].copy_from_slice(&seed.to_ne_bytes());
        assert!(!udp_ok(&pkt), "partial until completed");
        let vh = VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            csum_start: 40,
            csum_offset: 6,
            ..VnetHdr::default()
        };
        let mut frame = vh.encode().to_vec();
        frame.extend_from_slice(&pkt);
        let (_, how) = prepare_from_tun(&mut frame, true, &mut Segments::new()).unwrap();
        assert_eq!(
            how,
            TxPacket::Single {
                start: VNET_HDR_LEN,
                len: pkt.len()
            }
        );
        assert!(udp_ok(&frame[VNET_HDR_LEN..]));
        let mut last_hop = udp6(b"x");
        last_hop[7] = 1;
        assert_eq!(
            prepare_from_tun(&mut last_hop, false, &mut Segments::new()),
            Err(wire::Drop::TtlExpired)
        );
        assert_eq!(
            prepare_from_tun(&mut [0x60, 0, 0], false, &mut Segments::new()),
            Err(wire::Drop::Malformed)
        );
    }
}
