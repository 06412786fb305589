//! The peer table the data-path threads read: which public IP holds which subnet, and which
//! addresses may send us datagrams (and with which inner sources). Built off the hot path from
//! a [`PeerSet`], published with one atomic pointer swap ([`arc_swap::ArcSwap`]); readers
//! never lock.

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnetwork::Ipv4Network;

/// One immutable snapshot of the peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerTable {
    /// (network address, mask, peer's socket address), sorted by mask (longest first) then
    /// network, so each prefix length is one binary-searchable run.
    routes: Vec<(u32, u32, SocketAddrV4)>,
    /// The distinct masks in `routes`, longest first, with the start of their run.
    masks: Vec<(u32, usize)>,
    /// Public IPs datagrams are accepted from, sorted.
    sources: Vec<u32>,
    /// Our own subnet (network, mask): no peer may send packets from inside it.
    own: Option<(u32, u32)>,
}

impl PeerTable {
    /// The table sending each peer subnet to its holder's public IP and `port`; `own` (our
    /// subnet) is the one inner sources no peer may send from. Which leases are peers is
    /// decided before (the peer filter, then `backend::common::candidates`).
    pub fn new(
        peers: impl IntoIterator<Item = (Ipv4Network, Ipv4Addr)>,
        port: u16,
        own: Option<Ipv4Network>,
    ) -> PeerTable {
        let routes = peers
            .into_iter()
            .map(|(subnet, ip)| {
                let mask = u32::from(subnet.mask());
                (
                    u32::from(subnet.network()),
                    mask,
                    SocketAddrV4::new(ip, port),
                )
            })
            .collect();
        let mut table = Self::from_routes(routes);
        table.own = own.map(|n| (u32::from(n.network()), u32::from(n.mask())));
        table
    }

    /// A table from (network, mask, peer) entries.
    pub fn from_routes(mut routes: Vec<(u32, u32, SocketAddrV4)>) -> Self {
        routes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        routes.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        let mut masks: Vec<(u32, usize)> = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            if masks.last().map(|m| m.0) != Some(r.1) {
                masks.push((r.1, i));
            }
        }
        let mut sources: Vec<u32> = routes.iter().map(|r| u32::from(*r.2.ip())).collect();
        sources.sort_unstable();
        sources.dedup();
        PeerTable {
            routes,
            masks,
            sources,
            own: None,
        }
    }

    /// Where to send a packet for `dst`: the peer whose subnet holds it (longest prefix).
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<SocketAddrV4> {
        let dst = u32::from(dst);
        for (i, &(mask, start)) in self.masks.iter().enumerate() {
            let end = self.masks.get(i + 1).map_or(self.routes.len(), |m| m.1);
            let run = &self.routes[start..end];
            let net = dst & mask;
            if let Ok(j) = run.binary_search_by(|r| r.0.cmp(&net)) {
                return Some(run[j].2);
            }
        }
        None
    }

    /// Whether `src` is a peer's public IP.
    pub fn is_peer(&self, src: Ipv4Addr) -> bool {
        self.sources.binary_search(&u32::from(src)).is_ok()
    }

    /// Whether a packet from inner source `src` may arrive in a datagram from `from`: the
    /// reverse path check. `src` must lie in a subnet `from` holds (longest prefix, the peer
    /// replies to it would go to) and outside our own, and `from` must be that peer's public IP
    /// and port (every udp peer sends from the configured `Port`). An ICMP error a peer sends
    /// about a packet we routed to it is sourced from that packet's destination, which by the
    /// same lookup is the peer's, so it passes too.
    pub fn sent_by(&self, from: SocketAddrV4, src: Ipv4Addr) -> bool {
        let src_bits = u32::from(src);
        if self.own.is_some_and(|(net, mask)| src_bits & mask == net) {
            return false;
        }
        self.lookup(src) == Some(from)
    }

    /// The (network, mask, peer) entries.
    pub fn entries(&self) -> &[(u32, u32, SocketAddrV4)] {
        &self.routes
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(subnet: &str, public_ip: &str) -> (Ipv4Network, Ipv4Addr) {
        (subnet.parse().unwrap(), public_ip.parse().unwrap())
    }

    #[test]
    fn longest_prefix_wins_across_lengths() {
        let p = |s: &str| s.parse::<SocketAddrV4>().unwrap();
        let n = |s: &str| u32::from(s.parse::<Ipv4Addr>().unwrap());
        let t = PeerTable::from_routes(vec![
            (n("10.5.0.0"), n("255.255.0.0"), p("1.1.1.1:1")),
            (n("10.5.8.0"), n("255.255.255.0"), p("2.2.2.2:1")),
            (n("10.5.9.128"), n("255.255.255.128"), p("3.3.3.3:1")),
        ]);
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(t.lookup(ip("10.5.8.9")), Some(p("2.2.2.2:1")));
        assert_eq!(t.lookup(ip("10.5.9.200")), Some(p("3.3.3.3:1")));
        assert_eq!(t.lookup(ip("10.5.9.1")), Some(p("1.1.1.1:1")));
        assert_eq!(t.lookup(ip("10.6.0.1")), None);
        assert!(PeerTable::default().lookup(ip("10.5.8.9")).is_none());
    }

    #[test]
    fn inner_sources_must_be_the_sending_peers() {
        let peers = [
            peer("10.5.2.0/24", "198.18.0.2"),
            peer("10.5.3.0/24", "198.18.0.3"),
            // A peer may hold more than one subnet.
            peer("10.5.4.0/24", "198.18.0.2"),
        ];
        let own: Ipv4Network = "10.5.1.0/24".parse().unwrap();
        let t = PeerTable::new(peers, 8285, Some(own));
        let from = |s: &str| s.parse::<SocketAddrV4>().unwrap();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let b = from("198.18.0.2:8285");
        assert!(t.sent_by(b, ip("10.5.2.7")) && t.sent_by(b, ip("10.5.4.200")));
        // The peer's flannel0 address (its subnet's network address) is its own too.
        assert!(t.sent_by(b, ip("10.5.2.0")));
        // Another peer's subnet, ours, one nobody holds, outside the Network.
        for src in ["10.5.3.7", "10.5.1.2", "10.5.9.9", "192.0.2.1"] {
            assert!(!t.sent_by(b, ip(src)), "{src}");
        }
        // Right IP, other port.
        assert!(!t.sent_by(from("198.18.0.2:8286"), ip("10.5.2.7")));
        assert!(!t.sent_by(from("198.18.0.2:0"), ip("10.5.2.7")));
        // Our ICMP net unreachable about 10.5.3.7, answered by 198.18.0.3 to whom we routed
        // it, comes from 10.5.3.7: accepted from that peer, from no other.
        assert!(t.sent_by(from("198.18.0.3:8285"), ip("10.5.3.7")));
        // Our own subnet stays ours even under a lease that covers it.
        let t = PeerTable::new([peer("10.5.0.0/16", "198.18.0.2")], 8285, Some(own));
        assert!(t.sent_by(b, ip("10.5.2.7")));
        assert!(!t.sent_by(b, ip("10.5.1.2")));
    }
}
