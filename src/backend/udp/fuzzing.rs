//! Harnesses for the fuzz targets in `fuzz/` (cargo-fuzz): arbitrary bytes through exactly
//! the functions the data-path threads call, checking that nothing panics and that what would
//! be written is well-formed. Also run over mutated packets by the unit tests below, so a
//! plain `cargo test` exercises them too.

use std::io::IoSlice;
use std::net::{Ipv4Addr, SocketAddrV4};

use super::counters::DirStats;
use super::offload::{self, Coalescer, PktRef, Segments, TxPacket, VnetHdr, VNET_HDR_LEN};
use super::peers::PeerTable;
use super::pipeline::{self, TxOut};
use super::wire;

const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

fn table() -> PeerTable {
    PeerTable::from_routes(vec![(
        u32::from(Ipv4Addr::new(10, 5, 0, 0)),
        0xffff_0000,
        SocketAddrV4::new(PEER, 8285),
    )])
}

/// Checks one frame the receive path would write to the TUN device.
fn check_tun_frame(iov: &[IoSlice<'_>], vnet: bool) {
    let frame: Vec<u8> = iov.iter().flat_map(|s| s.iter().copied()).collect();
    let (vh, pkt) = if vnet {
        (
            VnetHdr::decode(&frame).expect("virtio-net header"),
            &frame[VNET_HDR_LEN..],
        )
    } else {
        (VnetHdr::default(), &frame[..])
    };
    let ip = wire::parse_ipv4(pkt).expect("frames written are IPv4");
    assert_eq!(ip.total_len, pkt.len(), "frame length is the packet's");
    if vh.gso_type != offload::GSO_NONE {
        assert!(wire::ipv4_checksum_ok(&pkt[..ip.hdr_len]));
        assert!(usize::from(vh.hdr_len) < pkt.len());
        assert!(vh.gso_size > 0);
    }
}

/// Input: `[flags, seg_size (2 bytes, big endian), datagram...]`. Flags: bit 0 virtio-net
/// header on the TUN device, bit 1 TCP coalescing, bit 2 UDP coalescing, bit 3 the sender is
/// not a peer, bit 4 the sender is the peer's IP on another port.
pub fn from_socket(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let flags = data[0];
    let vnet = flags & 1 != 0;
    let seg_size = usize::from(u16::from_be_bytes([data[1], data[2]]));
    let ip = if flags & 8 != 0 {
        Ipv4Addr::new(198, 18, 0, 99)
    } else {
        PEER
    };
    let from = SocketAddrV4::new(ip, if flags & 16 != 0 { 40000 } else { 8285 });
    let mut bufs = vec![data[3..].to_vec()];
    let len = bufs[0].len();
    let peers = table();
    let mut co = Coalescer::new(64, vnet && flags & 2 != 0, vnet && flags & 4 != 0);
    let mut stats = DirStats::default();
    pipeline::rx_datagram(
        &mut bufs, 0, len, seg_size, from, &peers, &mut co, &mut stats,
    );
    let queued = co.len() as u64;
    let fs = co.flush(&bufs, vnet, |iov| {
        check_tun_frame(iov, vnet);
        Ok(iov.iter().map(|s| s.len()).sum())
    });
    assert_eq!(fs.packets, queued, "every queued packet is written once");
}

/// Input: `[flags, frame...]`. Flags: bit 0 the frame starts with a virtio-net header, bit 1
/// no peers (every destination unreachable).
pub fn from_tun(data: &[u8]) {
    let Some((&flags, frame)) = data.split_first() else {
        return;
    };
    let vnet = flags & 1 != 0;
    let peers = if flags & 2 != 0 {
        PeerTable::default()
    } else {
        table()
    };
    let mut frame = frame.to_vec();
    let mut segs = Segments::new();
    let mut stats = DirStats::default();
    match pipeline::tx_frame(&mut frame, vnet, &peers, &mut segs, &mut stats) {
        TxOut::Send(to, TxPacket::Single { start, len }) => {
            assert_eq!(*to.ip(), PEER);
            let pkt = &frame[start..start + len];
            assert_eq!(wire::parse_ipv4(pkt).map(|ip| ip.total_len), Ok(len));
        }
        TxOut::Send(_, TxPacket::Split) => {
            let out = segs.materialize(&frame);
            assert!(out.len() >= 2);
            for (i, p) in out.iter().enumerate() {
                let ip = wire::parse_ipv4(p).expect("segments are IPv4");
                assert_eq!(ip.total_len, p.len());
                assert!(wire::ipv4_checksum_ok(&p[..ip.hdr_len]));
                assert!(p.len() <= segs.seg_size);
                assert!(i + 1 == out.len() || p.len() == segs.seg_size);
            }
            // The receive side coalesces them again: exercise it on real segments.
            let refs: Vec<PktRef> = out
                .iter()
                .enumerate()
                .map(|(i, p)| PktRef {
                    buf: i as u32,
                    off: 0,
                    len: p.len() as u32,
                })
                .collect();
            let mut co = Coalescer::new(out.len(), true, true);
            for r in refs {
                co.push(&out, r);
            }
            co.flush(&out, true, |iov| {
                check_tun_frame(iov, true);
                Ok(0)
            });
        }
        TxOut::NoRoute(start) => {
            let mut reply = [0u8; VNET_HDR_LEN + wire::ICMP_UNREACHABLE_MAX];
            if let Some(n) = pipeline::unreachable_frame(&frame, start, vnet, &mut reply) {
                let vlen = if vnet { VNET_HDR_LEN } else { 0 };
                let ip = wire::parse_ipv4(&reply[vlen..n]).expect("ICMP reply is IPv4");
                assert_eq!(ip.total_len, n - vlen);
                assert_eq!(ip.proto, wire::PROTO_ICMP);
            }
        }
        TxOut::Dropped => assert!(!stats.is_zero()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::tests::{ipv4_packet, Rng};
    use super::*;

    fn seeds() -> Vec<Vec<u8>> {
        let mut rng = Rng(99);
        let mut tcp = ipv4_packet(
            [10, 5, 1, 2],
            [10, 5, 2, 3],
            wire::PROTO_TCP,
            64,
            &rng.bytes(3000),
        );
        tcp[32] = 0x50;
        tcp[33] = 0x10;
        let udp = ipv4_packet(
            [10, 5, 1, 2],
            [10, 5, 2, 3],
            wire::PROTO_UDP,
            64,
            &rng.bytes(200),
        );
        let icmp = ipv4_packet(
            [10, 5, 1, 2],
            [10, 6, 2, 3],
            wire::PROTO_ICMP,
            64,
            &[8, 0, 0, 0, 1, 2],
        );
        vec![tcp, udp, icmp]
    }

    #[test]
    fn harnesses_survive_mutated_packets() {
        let mut rng = Rng(12345);
        let seeds = seeds();
        for round in 0..30_000u32 {
            let mut pkt = seeds[round as usize % seeds.len()].clone();
            let cut = rng.next() as usize % (pkt.len() + 1);
            pkt.truncate(cut.max(pkt.len() / 2));
            for _ in 0..(rng.next() % 4) {
                let i = rng.next() as usize % pkt.len().max(1);
                if let Some(b) = pkt.get_mut(i) {
                    *b = rng.next() as u8;
                }
            }
            let flags = rng.next() as u8;
            // TUN side: sometimes a plausible virtio-net header in front.
            let mut tun = vec![flags];
            if flags & 1 != 0 {
                let vh = VnetHdr {
                    flags: (rng.next() % 2) as u8,
                    gso_type: [0, 1, 5, 3][rng.next() as usize % 4],
                    hdr_len: 40,
                    gso_size: (rng.next() % 1500) as u16,
                    csum_start: 20,
                    csum_offset: [16, 6, 0, 3000][rng.next() as usize % 4],
                };
                tun.extend_from_slice(&vh.encode());
            }
            tun.extend_from_slice(&pkt);
            from_tun(&tun);
            // Socket side: one datagram, or several back to back as GRO returns them.
            let mut sock = vec![flags];
            let seg = if rng.next() % 2 == 0 {
                0
            } else {
                pkt.len() as u16
            };
            sock.extend_from_slice(&seg.to_be_bytes());
            for _ in 0..(1 + rng.next() % 3) {
                sock.extend_from_slice(&pkt);
            }
            from_socket(&sock);
        }
    }

    #[test]
    fn harnesses_survive_short_and_empty_input() {
        for n in 0..64 {
            let data = vec![0x45u8; n];
            from_tun(&data);
            from_socket(&data);
            let ones = vec![0xffu8; n];
            from_tun(&ones);
            from_socket(&ones);
        }
    }
}
