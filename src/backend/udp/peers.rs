//! The peer table the data-path threads read: which public IP holds which subnet, and which
//! addresses may send us datagrams (and with which inner sources). Built off the hot path from
//! a [`PeerSet`], published with one atomic pointer swap ([`arc_swap::ArcSwap`]); readers
//! never lock.

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnetwork::Ipv4Network;

use crate::subnet::PeerSet;

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
    /// The table for `peers` that are udp peers (including flannel's leases without a
    /// `BackendType`), sending to their `port`; `own` (our subnet) is never a peer. Returns
    /// the table and, for logging, the peers that were left out with the reason.
    pub fn build(
        peers: &PeerSet,
        port: u16,
        own: Option<Ipv4Network>,
    ) -> (PeerTable, Vec<(String, String)>) {
        let mut skipped = Vec::new();
        let mut routes = Vec::new();
        for (key, lease) in peers {
            let Some(subnet) = key.ipv4 else {
                continue;
            };
            if Some(subnet) == own {
                continue;
            }
            let kind = lease.attrs.effective_backend_type();
            if kind != "udp" {
                skipped.push((key.to_string(), format!("backend type {kind:?} is not udp")));
                continue;
            }
            let Some(ip) = lease.attrs.public_ip else {
                skipped.push((key.to_string(), "lease has no IPv4 PublicIP".into()));
                continue;
            };
            let mask = u32::from(subnet.mask());
            routes.push((
                u32::from(subnet.network()),
                mask,
                SocketAddrV4::new(ip, port),
            ));
        }
        let mut table = Self::from_routes(routes);
        table.own = own.map(|n| (u32::from(n.network()), u32::from(n.mask())));
        (table, skipped)
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
    use crate::subnet::{Lease, LeaseAttrs, SubnetKey};

    fn lease(key: &str, json: &str) -> (SubnetKey, Lease) {
        let key: SubnetKey = key.parse().unwrap();
        let attrs = LeaseAttrs::from_json("k", json.as_bytes()).unwrap();
        (
            key,
            Lease {
                key,
                attrs,
                etcd_lease: Some(1),
                revision: 1,
                create_revision: 1,
            },
        )
    }

    #[test]
    fn udp_and_untyped_leases_are_peers_others_are_not() {
        let peers: PeerSet = [
            lease(
                "10.5.2.0-24",
                r#"{"PublicIP":"198.18.0.2","PublicIPv6":null}"#,
            ),
            lease(
                "10.5.3.0-24",
                r#"{"PublicIP":"198.18.0.3","PublicIPv6":null,"BackendType":"udp"}"#,
            ),
            lease(
                "10.5.4.0-24",
                r#"{"PublicIP":"198.18.0.4","PublicIPv6":null,"BackendType":"vxlan"}"#,
            ),
            lease("10.5.5.0-24", r#"{"PublicIP":null,"PublicIPv6":null}"#),
            lease(
                "10.5.1.0-24",
                r#"{"PublicIP":"198.18.0.1","PublicIPv6":null}"#,
            ),
        ]
        .into_iter()
        .collect();
        let own: Ipv4Network = "10.5.1.0/24".parse().unwrap();
        let (t, skipped) = PeerTable::build(&peers, 8285, Some(own));
        assert_eq!(t.len(), 2);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            t.lookup(ip("10.5.2.77")),
            Some("198.18.0.2:8285".parse().unwrap())
        );
        assert_eq!(
            t.lookup(ip("10.5.3.1")),
            Some("198.18.0.3:8285".parse().unwrap())
        );
        assert_eq!(t.lookup(ip("10.5.4.1")), None);
        assert_eq!(t.lookup(ip("10.5.1.1")), None);
        assert!(t.is_peer(ip("198.18.0.2")) && t.is_peer(ip("198.18.0.3")));
        assert!(!t.is_peer(ip("198.18.0.4")) && !t.is_peer(ip("198.18.0.9")));
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
        let peers: PeerSet = [
            lease(
                "10.5.2.0-24",
                r#"{"PublicIP":"198.18.0.2","PublicIPv6":null}"#,
            ),
            lease(
                "10.5.3.0-24",
                r#"{"PublicIP":"198.18.0.3","PublicIPv6":null}"#,
            ),
            // A peer may hold more than one subnet.
            lease(
                "10.5.4.0-24",
                r#"{"PublicIP":"198.18.0.2","PublicIPv6":null}"#,
            ),
        ]
        .into_iter()
        .collect();
        let own: Ipv4Network = "10.5.1.0/24".parse().unwrap();
        let (t, _) = PeerTable::build(&peers, 8285, Some(own));
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
        let (t, _) = PeerTable::build(
            &[lease(
                "10.5.0.0-16",
                r#"{"PublicIP":"198.18.0.2","PublicIPv6":null}"#,
            )]
            .into_iter()
            .collect(),
            8285,
            Some(own),
        );
        assert!(t.sent_by(b, ip("10.5.2.7")));
        assert!(!t.sent_by(b, ip("10.5.1.2")));
    }
}
