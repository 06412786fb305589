//! The peer table the data-path threads read: immutable, swapped whole (`ArcSwap`) when the
//! leases change, so a packet costs one atomic load and no lock on the table. A peer's tunnel
//! state (`Tunn`) has its own mutex; its endpoint is swapped atomically, so roaming takes no
//! lock.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use gotatun::noise::Tunn;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

/// One WireGuard peer: one public key, its tunnel state and where it was last seen.
pub struct Peer {
    pub public_key: [u8; 32],
    /// Written on authenticated packets only (roaming), read per send. IPv4 or IPv6: an
    /// IPv6 endpoint does not fit an atomic word, so the address is swapped whole.
    endpoint: ArcSwap<SocketAddr>,
    pub tunn: Mutex<Tunn>,
}

impl Peer {
    pub fn new(public_key: [u8; 32], endpoint: SocketAddr, tunn: Tunn) -> Peer {
        Peer {
            public_key,
            endpoint: ArcSwap::from_pointee(endpoint),
            tunn: Mutex::new(tunn),
        }
    }

    pub fn endpoint(&self) -> SocketAddr {
        **self.endpoint.load()
    }

    pub fn set_endpoint(&self, to: SocketAddr) {
        self.endpoint.store(Arc::new(to));
    }

    /// The tunnel state; a thread that panicked holding it left nothing half-done that
    /// matters more than the tunnel staying usable.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Tunn> {
        self.tunn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("public_key", &super::config::encode_key(&self.public_key))
            .field("endpoint", &self.endpoint())
            .finish()
    }
}

/// Allowed IPs (longest prefix first, per family) and the peers by key.
#[derive(Debug, Default, Clone)]
pub struct PeerTable {
    /// `(network, mask, peer)`, longest mask first: the first match is the longest prefix.
    routes: Vec<(u32, u32, Arc<Peer>)>,
    routes6: Vec<(u128, u128, Arc<Peer>)>,
    by_key: HashMap<[u8; 32], Arc<Peer>, foldhash::fast::RandomState>,
}

impl PeerTable {
    /// A table of `peers`, each with its allowed IPs. A key listed twice keeps one peer
    /// holding both sets of prefixes.
    pub fn new(peers: Vec<(Arc<Peer>, Vec<IpNetwork>)>) -> PeerTable {
        let mut routes = Vec::new();
        let mut routes6 = Vec::new();
        let mut by_key = HashMap::default();
        for (peer, nets) in peers {
            for n in nets {
                match n {
                    IpNetwork::V4(n) => {
                        routes.push((u32::from(n.network()), u32::from(n.mask()), peer.clone()))
                    }
                    IpNetwork::V6(n) => {
                        routes6.push((u128::from(n.network()), u128::from(n.mask()), peer.clone()))
                    }
                }
            }
            by_key.insert(peer.public_key, peer);
        }
        routes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        routes6.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        PeerTable {
            routes,
            routes6,
            by_key,
        }
    }

    /// The peer whose allowed IPs hold `ip` by longest prefix.
    pub fn route(&self, ip: IpAddr) -> Option<&Arc<Peer>> {
        match ip {
            IpAddr::V4(ip) => {
                let ip = u32::from(ip);
                self.routes
                    .iter()
                    .find(|(net, mask, _)| ip & mask == *net)
                    .map(|(_, _, p)| p)
            }
            IpAddr::V6(ip) => {
                let ip = u128::from(ip);
                self.routes6
                    .iter()
                    .find(|(net, mask, _)| ip & mask == *net)
                    .map(|(_, _, p)| p)
            }
        }
    }

    /// Whether `peer` may send packets from `src` (cryptokey routing).
    pub fn allows(&self, peer: &Arc<Peer>, src: IpAddr) -> bool {
        self.route(src).is_some_and(|p| Arc::ptr_eq(p, peer))
    }

    pub fn by_key(&self, key: &[u8; 32]) -> Option<&Arc<Peer>> {
        self.by_key.get(key)
    }

    pub fn peers(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.by_key.values()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The allowed IPs of the peer with `key`, longest prefix first, IPv4 before IPv6.
    pub fn allowed_ips(&self, key: &[u8; 32]) -> Vec<IpNetwork> {
        let v4 = self
            .routes
            .iter()
            .filter(|(_, _, p)| &p.public_key == key)
            .map(|(net, mask, _)| {
                Ipv4Network::new(Ipv4Addr::from(*net), mask.count_ones() as u8)
                    .expect("a mask's ones are a valid prefix")
                    .into()
            });
        let v6 = self
            .routes6
            .iter()
            .filter(|(_, _, p)| &p.public_key == key)
            .map(|(net, mask, _)| {
                Ipv6Network::new(Ipv6Addr::from(*net), mask.count_ones() as u8)
                    .expect("a mask's ones are a valid prefix")
                    .into()
            });
        v4.chain(v6).collect()
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use gotatun::noise::index_table::IndexTable;
    use gotatun::noise::rate_limiter::RateLimiter;
    use gotatun::x25519::{PublicKey, StaticSecret};

    pub fn peer(seed: u8, endpoint: &str) -> Arc<Peer> {
        let ours = StaticSecret::from([1u8; 32]);
        let theirs = PublicKey::from(&StaticSecret::from([seed; 32]));
        let limiter = Arc::new(RateLimiter::new(&PublicKey::from(&ours), 10));
        let tunn = Tunn::new(ours, theirs, None, None, IndexTable::from_os_rng(), limiter);
        Arc::new(Peer::new(
            *theirs.as_bytes(),
            endpoint.parse().unwrap(),
            tunn,
        ))
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn the_longest_prefix_wins_and_sources_are_checked_against_it() {
        let a = peer(2, "198.18.0.2:51820");
        let b = peer(3, "198.18.0.3:51820");
        let t = PeerTable::new(vec![
            (a.clone(), vec![net("10.5.0.0/16")]),
            (b.clone(), vec![net("10.5.3.0/24")]),
        ]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(Arc::ptr_eq(t.route(ip("10.5.3.9")).unwrap(), &b));
        assert!(Arc::ptr_eq(t.route(ip("10.5.4.9")).unwrap(), &a));
        assert!(t.route(ip("10.6.0.1")).is_none());
        assert!(t.allows(&b, ip("10.5.3.1")));
        // a's /16 covers 10.5.3.1, but b's /24 is longer: a may not use it.
        assert!(!t.allows(&a, ip("10.5.3.1")));
        assert!(!t.allows(&b, ip("10.5.4.1")));
        assert_eq!(t.allowed_ips(&b.public_key), vec![net("10.5.3.0/24")]);
        assert!(Arc::ptr_eq(t.by_key(&a.public_key).unwrap(), &a));
    }

    #[test]
    fn ipv6_allowed_ips_route_and_check_sources_apart_from_ipv4() {
        let a = peer(2, "[fd18::2]:51820");
        let b = peer(3, "198.18.0.3:51820");
        let t = PeerTable::new(vec![
            (a.clone(), vec![net("10.5.2.0/24"), net("fc00:0:0:2::/64")]),
            (b.clone(), vec![net("10.5.3.0/24"), net("fc00:0:0:3::/64")]),
        ]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(Arc::ptr_eq(t.route(ip("fc00:0:0:3::9")).unwrap(), &b));
        assert!(Arc::ptr_eq(t.route(ip("fc00:0:0:2::1")).unwrap(), &a));
        assert!(t.route(ip("fc00:0:0:4::1")).is_none());
        // The IPv4-mapped form of b's IPv4 subnet is not b's.
        assert!(t.route(ip("::ffff:10.5.3.1")).is_none());
        assert!(t.allows(&a, ip("fc00:0:0:2::7")));
        assert!(!t.allows(&a, ip("fc00:0:0:3::7")));
        assert_eq!(
            t.allowed_ips(&a.public_key),
            vec![net("10.5.2.0/24"), net("fc00:0:0:2::/64")]
        );
    }

    #[test]
    fn endpoints_of_either_family_round_trip() {
        let a = peer(2, "198.18.0.2:51820");
        assert_eq!(a.endpoint(), "198.18.0.2:51820".parse().unwrap());
        a.set_endpoint("198.19.255.254:1".parse().unwrap());
        assert_eq!(a.endpoint(), "198.19.255.254:1".parse().unwrap());
        a.set_endpoint("[fd18::1:2]:51821".parse().unwrap());
        assert_eq!(a.endpoint(), "[fd18::1:2]:51821".parse().unwrap());
    }
}
