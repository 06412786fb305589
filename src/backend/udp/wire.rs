//! Pure packet code of the udp backend: IPv4 header checks, the Internet checksum, the TTL
//! decrement and the ICMP "net unreachable" reply. No I/O, no allocation.
//!
//! Checksums are summed over native-endian 16-bit words: the one's complement sum commutes
//! with byte swapping, so a folded native sum stored with `to_ne_bytes` is the right field on
//! any host.

use std::net::Ipv4Addr;

/// Smallest IPv4 header.
pub const IPV4_MIN_HDR: usize = 20;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// IPv4 "don't fragment" flag in the flags/fragment-offset word.
pub const IP_DF: u16 = 0x4000;
/// IPv4 "more fragments" flag and the fragment offset mask.
pub const IP_MF_OFFSET: u16 = 0x3fff;

/// Why a packet was not forwarded; each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// No peer holds a subnet containing the destination (ICMP net unreachable sent back).
    NoRoute,
    /// The datagram came from an address that is no peer's public IP.
    UnknownSource,
    /// The datagram came from a peer's public IP, but not from the peer port or with an inner
    /// source outside the subnets that peer holds.
    SpoofedSource,
    /// Not a well-formed IPv4 packet (or a GSO packet we cannot split).
    Malformed,
    /// The inner TTL would reach zero.
    TtlExpired,
}

/// The fields of an IPv4 header the data path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Hdr {
    /// Header length in bytes (20..=60).
    pub hdr_len: usize,
    /// The header's total length: header plus payload.
    pub total_len: usize,
    pub tos: u8,
    pub id: u16,
    /// Flags and fragment offset, host order.
    pub frag: u16,
    pub ttl: u8,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
}

impl Ipv4Hdr {
    /// A fragment other than the first, or a first fragment with more to come.
    pub fn is_fragment(&self) -> bool {
        self.frag & IP_MF_OFFSET != 0
    }
}

/// Parses and checks an IPv4 header: version 4, a header length of at least 20 bytes, and a
/// total length that covers the header and fits in `pkt`. Bytes after the total length are
/// allowed (callers trim them).
pub fn parse_ipv4(pkt: &[u8]) -> Result<Ipv4Hdr, Drop> {
    if pkt.len() < IPV4_MIN_HDR || pkt[0] >> 4 != 4 {
        return Err(Drop::Malformed);
    }
    let hdr_len = usize::from(pkt[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if hdr_len < IPV4_MIN_HDR || hdr_len > total_len || total_len > pkt.len() {
        return Err(Drop::Malformed);
    }
    Ok(Ipv4Hdr {
        hdr_len,
        total_len,
        tos: pkt[1],
        id: u16::from_be_bytes([pkt[4], pkt[5]]),
        frag: u16::from_be_bytes([pkt[6], pkt[7]]),
        ttl: pkt[8],
        proto: pkt[9],
        src: Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]),
        dst: Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]),
    })
}

/// Adds `data` to a running checksum. `data` must start at an even offset of the
/// checksummed region; an odd last byte is padded with zero.
pub fn csum_add(sum: u64, data: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if data.len() >= 128 && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { csum_add_avx2(sum, data) };
    }
    csum_add_words(sum, data)
}

/// [`csum_add`] compiled for AVX2: the same loop, vectorised four words at a time. Every
/// byte of every forwarded segment goes through here once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn csum_add_avx2(sum: u64, data: &[u8]) -> u64 {
    csum_add_words(sum, data)
}

#[inline(always)]
fn csum_add_words(mut sum: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        sum += u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        sum += u64::from(u16::from_ne_bytes([rest[i], rest[i + 1]]));
        i += 2;
    }
    if i < rest.len() {
        sum += u64::from(u16::from_ne_bytes([rest[i], 0]));
    }
    sum
}

/// Folds a running checksum to 16 bits (native order, not complemented).
pub fn csum_fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum field for a running sum: the complement of the fold, in network order.
pub fn csum_field(sum: u64) -> [u8; 2] {
    (!csum_fold(sum)).to_ne_bytes()
}

/// The pseudo-header sum of TCP/UDP over IPv4 for an L4 segment of `l4_len` bytes.
pub fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> u64 {
    let len = (l4_len as u16).to_be_bytes();
    let s = src.octets();
    let d = dst.octets();
    csum_add(
        0,
        &[
            s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3], 0, proto, len[0], len[1],
        ],
    )
}

/// Recomputes the header checksum of the IPv4 header `hdr` (exactly the header bytes).
pub fn set_ipv4_checksum(hdr: &mut [u8]) {
    hdr[10] = 0;
    hdr[11] = 0;
    let field = csum_field(csum_add(0, hdr));
    hdr[10..12].copy_from_slice(&field);
}

/// Whether the IPv4 header checksum of `hdr` (the header bytes) is right.
pub fn ipv4_checksum_ok(hdr: &[u8]) -> bool {
    csum_fold(csum_add(0, hdr)) == 0xffff
}

/// Decrements the TTL of a parsed packet and patches the header checksum incrementally
/// (RFC 1624, eqn. 3). Returns `false`, leaving the packet untouched, when the TTL would reach
/// zero.
pub fn decrement_ttl(pkt: &mut [u8]) -> bool {
    let ttl = pkt[8];
    if ttl <= 1 {
        return false;
    }
    let old = u16::from_be_bytes([ttl, pkt[9]]);
    let new = old - 0x100;
    pkt[8] = ttl - 1;
    let hc = u16::from_be_bytes([pkt[10], pkt[11]]);
    let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    pkt[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    true
}

/// Length of the ICMP "destination unreachable" reply to an offender with an `hdr_len`-byte
/// IP header.
pub const fn icmp_unreachable_len(hdr_len: usize) -> usize {
    IPV4_MIN_HDR + 8 + hdr_len + 8
}

/// Largest reply [`icmp_net_unreachable`] builds.
pub const ICMP_UNREACHABLE_MAX: usize = icmp_unreachable_len(60);

/// ICMP types that are error messages (never answered with another error, RFC 1122 3.2.2).
fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 4 | 5 | 11 | 12)
}

/// Builds an ICMP "destination unreachable / net unreachable" (type 3, code 0) about
/// `offender`, from `src`, into `out`; returns its length. `None` when no reply is due: the
/// offender is malformed, a non-first fragment, an ICMP error itself, or from an address that
/// cannot be answered (unspecified, broadcast, multicast).
pub fn icmp_net_unreachable(offender: &[u8], src: Ipv4Addr, out: &mut [u8]) -> Option<usize> {
    let hdr = parse_ipv4(offender).ok()?;
    if hdr.frag & 0x1fff != 0
        || hdr.src.is_unspecified()
        || hdr.src.is_broadcast()
        || hdr.src.is_multicast()
        || hdr.dst.is_multicast()
        || hdr.dst.is_broadcast()
    {
        return None;
    }
    if hdr.proto == PROTO_ICMP {
        let icmp_type = *offender.get(hdr.hdr_len)?;
        if hdr.total_len <= hdr.hdr_len || is_icmp_error(icmp_type) {
            return None;
        }
    }
    let quoted = (hdr.hdr_len + 8).min(hdr.total_len);
    let len = IPV4_MIN_HDR + 8 + quoted;
    let out = out.get_mut(..len)?;
    out.fill(0);
    let tot = (len as u16).to_be_bytes();
    out[0] = 0x45;
    out[1] = 0xc0;
    out[2..4].copy_from_slice(&tot);
    out[8] = 64;
    out[9] = PROTO_ICMP;
    out[12..16].copy_from_slice(&src.octets());
    out[16..20].copy_from_slice(&hdr.src.octets());
    set_ipv4_checksum(&mut out[..IPV4_MIN_HDR]);
    let icmp = &mut out[IPV4_MIN_HDR..];
    icmp[0] = 3;
    icmp[1] = 0;
    icmp[8..].copy_from_slice(&offender[..quoted]);
    let field = csum_field(csum_add(0, icmp));
    icmp[2..4].copy_from_slice(&field);
    Some(len)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A reference checksum: big-endian words, textbook folding.
    pub(crate) fn reference_checksum(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for pair in data.chunks(2) {
            let w = if pair.len() == 2 {
                u16::from_be_bytes([pair[0], pair[1]])
            } else {
                u16::from_be_bytes([pair[0], 0])
            };
            sum += u32::from(w);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// A small deterministic byte generator for tests.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// A valid IPv4 packet with `payload` and a correct header checksum.
    pub(crate) fn ipv4_packet(
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        ttl: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6] = 0x40;
        p[8] = ttl;
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        set_ipv4_checksum(&mut p[..20]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn checksum_matches_reference_for_all_lengths_and_contents() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for len in 0..300 {
            let data = rng.bytes(len);
            let ours = u16::from_be_bytes(csum_field(csum_add(0, &data)));
            assert_eq!(ours, reference_checksum(&data), "length {len}");
        }
        let ones = vec![0xffu8; 70_000];
        assert_eq!(
            u16::from_be_bytes(csum_field(csum_add(0, &ones))),
            reference_checksum(&ones)
        );
    }

    #[test]
    fn ipv4_checksum_is_verifiable() {
        let p = ipv4_packet([10, 5, 1, 2], [10, 5, 2, 3], PROTO_UDP, 64, b"hello");
        assert!(ipv4_checksum_ok(&p[..20]));
        assert_eq!(u16::from_be_bytes([p[10], p[11]]), {
            let mut h = p[..20].to_vec();
            h[10] = 0;
            h[11] = 0;
            reference_checksum(&h)
        });
    }

    #[test]
    fn ttl_decrement_matches_full_recompute() {
        let mut rng = Rng(7);
        for _ in 0..5000 {
            let mut h = rng.bytes(20);
            h[0] = 0x45;
            h[2..4].copy_from_slice(&20u16.to_be_bytes());
            h[8] = (rng.next() % 254) as u8 + 2;
            set_ipv4_checksum(&mut h);
            let ttl = h[8];
            assert!(decrement_ttl(&mut h));
            assert_eq!(h[8], ttl - 1);
            assert!(ipv4_checksum_ok(&h), "{h:?}");
        }
    }

    #[test]
    fn ttl_one_or_zero_is_expired_and_untouched() {
        for ttl in [0u8, 1] {
            let mut p = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], PROTO_UDP, ttl, b"x");
            let before = p.clone();
            assert!(!decrement_ttl(&mut p));
            assert_eq!(p, before);
        }
        let mut p = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], PROTO_UDP, 2, b"x");
        assert!(decrement_ttl(&mut p));
        assert_eq!(p[8], 1);
        assert!(ipv4_checksum_ok(&p[..20]));
    }

    #[test]
    fn malformed_packets_are_rejected() {
        let good = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], PROTO_TCP, 64, &[0u8; 20]);
        assert!(parse_ipv4(&good).is_ok());
        let mut cases: Vec<Vec<u8>> = vec![vec![], good[..19].to_vec()];
        let mut v6 = good.clone();
        v6[0] = 0x65;
        cases.push(v6);
        let mut short_ihl = good.clone();
        short_ihl[0] = 0x44;
        cases.push(short_ihl);
        let mut long_ihl = good.clone();
        long_ihl[0] = 0x4f;
        cases.push(long_ihl);
        let mut too_long = good.clone();
        too_long[2..4].copy_from_slice(&100u16.to_be_bytes());
        cases.push(too_long);
        let mut below_hdr = good.clone();
        below_hdr[2..4].copy_from_slice(&10u16.to_be_bytes());
        cases.push(below_hdr);
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(parse_ipv4(c), Err(Drop::Malformed), "case {i}");
        }
        // Trailing bytes are tolerated: the total length says where the packet ends.
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(parse_ipv4(&padded).unwrap().total_len, good.len());
    }

    #[test]
    fn icmp_net_unreachable_quotes_header_and_8_bytes() {
        let payload: Vec<u8> = (0..40).collect();
        let off = ipv4_packet([10, 5, 1, 2], [10, 5, 9, 3], PROTO_TCP, 63, &payload);
        let mut out = [0u8; ICMP_UNREACHABLE_MAX];
        let gw = Ipv4Addr::new(10, 5, 1, 0);
        let n = icmp_net_unreachable(&off, gw, &mut out).unwrap();
        assert_eq!(n, 20 + 8 + 20 + 8);
        let r = &out[..n];
        let h = parse_ipv4(r).unwrap();
        assert_eq!(
            (h.proto, h.src, h.dst),
            (PROTO_ICMP, gw, Ipv4Addr::new(10, 5, 1, 2))
        );
        assert_eq!(h.total_len, n);
        assert!(ipv4_checksum_ok(&r[..20]));
        assert_eq!((r[20], r[21]), (3, 0));
        assert_eq!(reference_checksum(&r[20..]), 0);
        assert_eq!(&r[28..], &off[..28]);
    }

    #[test]
    fn icmp_net_unreachable_only_when_due() {
        let mut out = [0u8; ICMP_UNREACHABLE_MAX];
        let gw = Ipv4Addr::new(10, 5, 1, 0);
        // Echo request: answered (quote shorter than 8 bytes when the packet is short).
        let echo = ipv4_packet([10, 5, 1, 2], [10, 5, 9, 3], PROTO_ICMP, 64, &[8, 0, 0, 0]);
        assert_eq!(icmp_net_unreachable(&echo, gw, &mut out), Some(20 + 8 + 24));
        // ICMP errors: never.
        let err = ipv4_packet([10, 5, 1, 2], [10, 5, 9, 3], PROTO_ICMP, 64, &[3, 1, 0, 0]);
        assert_eq!(icmp_net_unreachable(&err, gw, &mut out), None);
        // Non-first fragments: never.
        let mut frag = ipv4_packet([10, 5, 1, 2], [10, 5, 9, 3], PROTO_UDP, 64, &[0; 16]);
        frag[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
        assert_eq!(icmp_net_unreachable(&frag, gw, &mut out), None);
        // Broadcast or multicast involvement: never.
        let bcast = ipv4_packet([255, 255, 255, 255], [10, 5, 9, 3], PROTO_UDP, 64, &[0; 8]);
        assert_eq!(icmp_net_unreachable(&bcast, gw, &mut out), None);
        let mcast = ipv4_packet([10, 5, 1, 2], [224, 0, 0, 1], PROTO_UDP, 64, &[0; 8]);
        assert_eq!(icmp_net_unreachable(&mcast, gw, &mut out), None);
        // Garbage: never.
        assert_eq!(icmp_net_unreachable(&[0x45, 0, 0], gw, &mut out), None);
    }
}
