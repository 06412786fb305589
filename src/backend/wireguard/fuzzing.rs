//! Engines that talk through function calls instead of sockets, for the unit tests and the
//! fuzz target `wireguard_from_socket` (datagrams from the socket: no panic on any bytes).

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use bytes::BytesMut;
use gotatun::packet::Packet;
use gotatun::tun::MtuWatcher;
use gotatun::x25519::StaticSecret;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use super::counters::{Counters, Drop};
use super::engine::{encapsulate, Engine, Rx};
use super::{next_table, TableChanges};

/// An IPv4 packet (ICMP-ish payload; the engine looks at addresses only).
pub fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let len = 20 + payload.len();
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// An IPv6 packet (UDP-ish payload; the engine looks at addresses and lengths only).
pub fn ip6_packet(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

pub struct Node {
    pub engine: Engine,
    pub addr: SocketAddr,
    pub subnet: Ipv4Network,
    pub subnet6: Ipv6Network,
    endpoints: HashMap<[u8; 32], SocketAddr>,
}

impl Node {
    pub fn new(seed: u8, psk: Option<[u8; 32]>) -> Node {
        Node {
            engine: Engine::new(
                StaticSecret::from([seed; 32]),
                psk,
                None,
                1420,
                Arc::new(Counters::default()),
            ),
            addr: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, seed), 51820).into(),
            subnet: Ipv4Network::new(Ipv4Addr::new(10, 5, seed, 0), 24).unwrap(),
            subnet6: Ipv6Network::new(Ipv6Addr::new(0xfc00, 0, 0, seed.into(), 0, 0, 0, 0), 64)
                .unwrap(),
            endpoints: HashMap::new(),
        }
    }

    /// What a peer's lease gives us of this node: key, endpoint, both subnets.
    pub fn lease(&self) -> ([u8; 32], SocketAddr, Vec<IpNetwork>) {
        let nets = vec![self.subnet.into(), self.subnet6.into()];
        (self.engine.public_key(), self.addr, nets)
    }

    /// Makes the peer table hold `peers` (key, endpoint, allowed IPs), as a lease pass does.
    pub fn set_peers(&mut self, peers: &[([u8; 32], SocketAddr, Vec<IpNetwork>)]) -> TableChanges {
        let wanted: BTreeMap<_, _> = peers
            .iter()
            .map(|(k, e, n)| (*k, (*e, n.clone())))
            .collect();
        let old = self.engine.peers.load_full();
        let (t, changes) = next_table(&self.engine, &old, wanted, &mut self.endpoints);
        self.engine.peers.store(Arc::new(t));
        changes
    }

    pub fn knows(&mut self, other: &Node) {
        self.set_peers(&[other.lease()]);
    }

    pub fn host(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + u32::from(n))
    }

    pub fn host6(&self, n: u16) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.subnet6.network()) + u128::from(n))
    }

    /// Sends one packet from the device: the datagram it produces, if any.
    pub fn send(&self, pkt: &[u8]) -> Result<Option<(SocketAddr, Packet)>, Drop> {
        let peers = self.engine.peers.load();
        encapsulate(&self.engine, &peers, pkt, &mut MtuWatcher::new(1420))
    }

    /// Receives datagrams from `from`: (what it sends back, what reaches its device).
    pub fn recv(&self, from: SocketAddr, data: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut rx = Rx::new(&self.engine);
        let peers = self.engine.peers.load();
        for d in data {
            rx.datagram(&peers, BytesMut::from(*d), from);
        }
        rx.finish_batch();
        let out = rx.out.drain(..).map(|(_, p)| p.to_vec()).collect();
        let got = rx.delivered.drain(..).map(|p| p.to_vec()).collect();
        (out, got)
    }

    pub fn drops(&self, why: Drop) -> u64 {
        self.engine.counters.rx.dropped(why)
    }
}

/// Completes a handshake a → b with one packet, which b's device receives.
pub fn connect(a: &Node, b: &Node) {
    let pkt = ip_packet(a.host(1), b.host(1), b"first");
    let (_, init) = a.send(&pkt).unwrap().expect("a handshake initiation");
    assert_eq!(init[0], 1, "type 1: handshake initiation");
    let (resp, got) = b.recv(a.addr, &[&init]);
    assert_eq!((resp.len(), got.len()), (1, 0));
    assert_eq!(resp[0][0], 2, "type 2: handshake response");
    // a gets the response: it sends a keepalive and the queued packet.
    let (out, _) = a.recv(b.addr, &[&resp[0]]);
    assert!(out.iter().all(|d| d[0] == 4), "transport messages");
    let refs: Vec<&[u8]> = out.iter().map(|d| d.as_slice()).collect();
    let (_, got) = b.recv(a.addr, &refs);
    assert_eq!(
        got,
        vec![pkt],
        "the queued packet arrives once the session is up"
    );
}

/// Two nodes with a session, for the fuzz target: `b` receives the fuzzer's bytes as they
/// are, and again with the receiver index of its live session so they reach decryption.
pub struct Harness {
    a: Node,
    b: Node,
    index: [u8; 4],
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    pub fn new() -> Harness {
        let (mut a, mut b) = (Node::new(1, None), Node::new(2, None));
        a.knows(&b);
        b.knows(&a);
        connect(&a, &b);
        let (_, d) = a
            .send(&ip_packet(a.host(1), b.host(1), b"index"))
            .expect("routed")
            .expect("a session");
        let index = d[4..8].try_into().expect("a transport header");
        b.recv(a.addr, &[&d]);
        Harness { a, b, index }
    }

    pub fn datagram(&self, data: &[u8]) {
        self.b.recv(self.a.addr, &[data]);
        if data.len() >= 8 {
            let mut d = data.to_vec();
            d[0] = 4;
            d[1..4].fill(0);
            d[4..8].copy_from_slice(&self.index);
            self.b.recv(self.a.addr, &[&d]);
        }
    }
}
