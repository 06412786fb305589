//! Hand-made packets for tests that send what a pod or a peer would put on the wire.

use std::net::Ipv4Addr;

/// The Internet checksum (RFC 1071) of `data`: 0 over a region whose checksum is intact.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u64 = data
        .chunks(2)
        .map(|w| u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4/UDP packet from `src`:4000 to `dst`:`dport` carrying `payload`, with a correct
/// header checksum and no UDP checksum (0).
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((28 + payload.len()) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let header_sum = internet_checksum(&p[..20]);
    p[10..12].copy_from_slice(&header_sum.to_be_bytes());
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(payload);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_checksums_to_zero_and_lengths_count_the_payload() {
        let p = ipv4_udp(
            "10.5.1.2".parse().unwrap(),
            "10.5.2.2".parse().unwrap(),
            9999,
            b"abc",
        );
        assert_eq!(p.len(), 31);
        assert_eq!(internet_checksum(&p[..20]), 0);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 31);
        assert_eq!(u16::from_be_bytes([p[24], p[25]]), 11);
        assert_eq!(&p[28..], b"abc");
    }
}
