//! The peer table the data-path threads read: immutable, swapped whole (`ArcSwap`) when the
//! leases change, so a packet costs one atomic load and no lock on the table. A peer's tunnel
//! state (`Tunn`) has its own mutex; its endpoint is one atomic word, so roaming takes no lock.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gotatun::noise::Tunn;
use ipnetwork::Ipv4Network;

/// One WireGuard peer: one public key, its tunnel state and where it was last seen.
pub struct Peer {
    pub public_key: [u8; 32],
    /// `ip << 16 | port`: written on authenticated packets only (roaming), read per send.
    endpoint: AtomicU64,
    pub tunn: Mutex<Tunn>,
}

fn pack(a: SocketAddrV4) -> u64 {
    (u64::from(u32::from(*a.ip())) << 16) | u64::from(a.port())
}

fn unpack(v: u64) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from((v >> 16) as u32), v as u16)
}

impl Peer {
    pub fn new(public_key: [u8; 32], endpoint: SocketAddrV4, tunn: Tunn) -> Peer {
        Peer {
            public_key,
            endpoint: AtomicU64::new(pack(endpoint)),
            tunn: Mutex::new(tunn),
        }
    }

    pub fn endpoint(&self) -> SocketAddrV4 {
        unpack(self.endpoint.load(Ordering::Relaxed))
    }

    pub fn set_endpoint(&self, to: SocketAddrV4) {
        self.endpoint.store(pack(to), Ordering::Relaxed);
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

/// Allowed IPs (longest prefix first) and the peers by key.
#[derive(Debug, Default, Clone)]
pub struct PeerTable {
    /// `(network, mask, peer)`, longest mask first: the first match is the longest prefix.
    routes: Vec<(u32, u32, Arc<Peer>)>,
    by_key: HashMap<[u8; 32], Arc<Peer>>,
}

impl PeerTable {
    /// A table of `peers`, each with its allowed IPs. A key listed twice keeps one peer
    /// holding both sets of prefixes.
    pub fn new(peers: Vec<(Arc<Peer>, Vec<Ipv4Network>)>) -> PeerTable {
        let mut routes = Vec::new();
        let mut by_key = HashMap::new();
        for (peer, nets) in peers {
            for n in nets {
                routes.push((u32::from(n.network()), u32::from(n.mask()), peer.clone()));
            }
            by_key.insert(peer.public_key, peer);
        }
        routes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        PeerTable { routes, by_key }
    }

    /// The peer whose allowed IPs hold `ip` by longest prefix.
    pub fn route(&self, ip: Ipv4Addr) -> Option<&Arc<Peer>> {
        let ip = u32::from(ip);
        self.routes
            .iter()
            .find(|(net, mask, _)| ip & mask == *net)
            .map(|(_, _, p)| p)
    }

    /// Whether `peer` may send packets from `src` (cryptokey routing).
    pub fn allows(&self, peer: &Arc<Peer>, src: Ipv4Addr) -> bool {
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

    /// The allowed IPs of the peer with `key`, as `network/prefix` strings (for logs, tests).
    pub fn allowed_ips(&self, key: &[u8; 32]) -> Vec<Ipv4Network> {
        self.routes
            .iter()
            .filter(|(_, _, p)| &p.public_key == key)
            .map(|(net, mask, _)| {
                Ipv4Network::new(Ipv4Addr::from(*net), mask.count_ones() as u8)
                    .expect("a mask's ones are a valid prefix")
            })
            .collect()
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

    fn net(s: &str) -> Ipv4Network {
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
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
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
    fn endpoints_round_trip_through_the_atomic_word() {
        let a = peer(2, "198.18.0.2:51820");
        assert_eq!(a.endpoint(), "198.18.0.2:51820".parse().unwrap());
        a.set_endpoint("198.19.255.254:1".parse().unwrap());
        assert_eq!(a.endpoint(), "198.19.255.254:1".parse().unwrap());
    }
}
