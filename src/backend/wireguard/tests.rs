//! The protocol flow between two engines, the checks the engine adds around gotatun
//! (cryptokey routing, replay, unknown peers, roaming), and the peer table's lifecycle
//! (renewal keeps sessions, a new key replaces the peer).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use gotatun::x25519::StaticSecret;

use super::counters::{Counters, Drop};
use super::engine::Engine;
use super::fuzzing::{connect, ip_packet, Harness, Node};
use super::TableChanges;

fn pair(psk_a: Option<[u8; 32]>, psk_b: Option<[u8; 32]>) -> (Node, Node) {
    let (mut a, mut b) = (Node::new(1, psk_a), Node::new(2, psk_b));
    a.knows(&b);
    b.knows(&a);
    (a, b)
}

#[test]
fn a_handshake_then_packets_both_ways() {
    let (a, b) = pair(None, None);
    connect(&a, &b);
    let back = ip_packet(b.host(7), a.host(1), b"back");
    let (_, d) = b.send(&back).unwrap().expect("a session exists");
    assert_eq!(d[0], 4);
    assert!(!d.windows(4).any(|w| w == b"back"), "payload encrypted");
    let (_, got) = a.recv(b.addr, &[&d]);
    assert_eq!(got, vec![back]);
    assert_eq!(
        a.engine
            .counters
            .handshakes
            .initiations_sent
            .load(Ordering::Relaxed),
        1
    );
}

#[test]
fn a_replayed_transport_message_is_dropped() {
    let (a, b) = pair(None, None);
    connect(&a, &b);
    let pkt = ip_packet(a.host(1), b.host(1), b"once");
    let (_, d) = a.send(&pkt).unwrap().unwrap();
    let (_, got) = b.recv(a.addr, &[&d, &d]);
    assert_eq!(got, vec![pkt]);
    assert_eq!(b.drops(Drop::Replay), 1);
}

#[test]
fn an_inner_source_outside_the_senders_allowed_ips_is_dropped() {
    let (a, b) = pair(None, None);
    connect(&a, &b);
    // 10.5.9.1 is in no one's subnet; 10.5.2.1 is b's own.
    for src in [Ipv4Addr::new(10, 5, 9, 1), b.host(1)] {
        let (_, d) = a
            .send(&ip_packet(src, b.host(1), b"spoof"))
            .unwrap()
            .unwrap();
        let (_, got) = b.recv(a.addr, &[&d]);
        assert!(got.is_empty(), "{src} delivered");
    }
    assert_eq!(b.drops(Drop::SpoofedSource), 2);
}

#[test]
fn a_psk_mismatch_gets_no_handshake() {
    let (a, b) = pair(Some([9; 32]), Some([8; 32]));
    let (_, init) = a
        .send(&ip_packet(a.host(1), b.host(1), b"x"))
        .unwrap()
        .unwrap();
    let (resp, _) = b.recv(a.addr, &[&init]);
    assert_eq!(
        resp.len(),
        1,
        "b answers: the PSK is only mixed in after the initiation"
    );
    let (out, _) = a.recv(b.addr, &[&resp[0]]);
    assert!(out.is_empty(), "a refuses the response");
    assert_eq!(a.drops(Drop::Invalid), 1);
}

#[test]
fn an_unknown_key_gets_no_handshake() {
    let (a, _) = pair(None, None);
    let mut stranger = Node::new(3, None);
    stranger.knows(&a);
    let (_, init) = stranger
        .send(&ip_packet(stranger.host(1), a.host(1), b"x"))
        .unwrap()
        .unwrap();
    let (resp, _) = a.recv(stranger.addr, &[&init]);
    assert!(resp.is_empty());
    assert_eq!(a.drops(Drop::UnknownPeer), 1);
}

#[test]
fn roaming_follows_authenticated_packets_only() {
    let (a, b) = pair(None, None);
    connect(&a, &b);
    let peer_a = b
        .engine
        .peers
        .load()
        .by_key(&a.engine.public_key())
        .unwrap()
        .clone();
    let moved: SocketAddrV4 = "198.18.0.99:40000".parse().unwrap();
    // Garbage claiming a session index from elsewhere: no move.
    let (_, d) = a
        .send(&ip_packet(a.host(1), b.host(1), b"m"))
        .unwrap()
        .unwrap();
    let mut forged = d.to_vec();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    b.recv(moved, &[&forged]);
    assert_eq!(peer_a.endpoint(), a.addr);
    // The genuine packet from the new address moves the endpoint.
    b.recv(moved, &[&d]);
    assert_eq!(peer_a.endpoint(), moved);
}

#[test]
fn a_lease_renewal_keeps_the_session_and_a_new_key_replaces_the_peer() {
    let (a, mut b) = pair(None, None);
    connect(&a, &b);
    let same = (a.engine.public_key(), a.addr, a.subnet);
    assert_eq!(
        b.set_peers(&[same]),
        TableChanges::default(),
        "nothing changed"
    );
    // The old session still carries packets: no new handshake.
    let pkt = ip_packet(a.host(1), b.host(1), b"after renewal");
    let (_, d) = a.send(&pkt).unwrap().unwrap();
    assert_eq!(d[0], 4);
    assert_eq!(b.recv(a.addr, &[&d]).1, vec![pkt]);
    assert_eq!(
        b.engine
            .counters
            .handshakes
            .initiations_received
            .load(Ordering::Relaxed),
        1
    );

    // a reboots with a new key under the same subnet: the old key is gone from b.
    let mut a2 = Node::new(1, None);
    a2.engine = Engine::new(
        StaticSecret::from([11; 32]),
        None,
        None,
        1420,
        Arc::new(Counters::default()),
    );
    a2.knows(&b);
    let changes = b.set_peers(&[(a2.engine.public_key(), a2.addr, a2.subnet)]);
    assert_eq!((changes.added, changes.removed), (1, 1));
    let table = b.engine.peers.load();
    assert_eq!(table.len(), 1);
    assert!(
        table.by_key(&a.engine.public_key()).is_none(),
        "no stale peer"
    );
    // The old key's session no longer delivers.
    let (_, d) = a
        .send(&ip_packet(a.host(1), b.host(1), b"old key"))
        .unwrap()
        .unwrap();
    assert!(b.recv(a.addr, &[&d]).1.is_empty());
    assert_eq!(b.drops(Drop::UnknownPeer), 1);
    drop(table);
    connect(&a2, &b);
}

#[test]
fn garbage_is_counted_not_fatal() {
    let (a, b) = pair(None, None);
    let (_, got) = b.recv(a.addr, &[b"", b"\x04", &[4u8; 40], &[1u8; 148], &[9u8; 64]]);
    assert!(got.is_empty());
    assert!(b.drops(Drop::Malformed) + b.drops(Drop::Invalid) + b.drops(Drop::UnknownPeer) >= 4);
}

#[test]
fn the_fuzz_harness_survives_its_seeds() {
    let h = Harness::new();
    for d in [
        &b""[..],
        b"\x01",
        &[4u8; 32],
        &[2u8; 92],
        &[3u8; 64],
        &[0xffu8; 1500],
    ] {
        h.datagram(d);
    }
}

#[test]
fn the_kernel_device_is_told_only_what_changed() {
    use super::kernel_changes;
    use std::collections::BTreeMap;
    let net = |s: &str| s.parse::<ipnetwork::Ipv4Network>().unwrap();
    let ep = |s: &str| s.parse::<SocketAddrV4>().unwrap();
    let told: BTreeMap<_, _> = [
        (
            [1u8; 32],
            (ep("198.18.0.1:51820"), vec![net("10.5.1.0/24")]),
        ),
        (
            [2u8; 32],
            (ep("198.18.0.2:51820"), vec![net("10.5.2.0/24")]),
        ),
        (
            [3u8; 32],
            (ep("198.18.0.3:51820"), vec![net("10.5.3.0/24")]),
        ),
    ]
    .into_iter()
    .collect();
    // A renewal of everything: nothing to tell (the kernel keeps its sessions anyway).
    let (changed, removed) = kernel_changes(&told, &told);
    assert!(changed.is_empty() && removed.is_empty());
    let mut wanted = told.clone();
    // 1 moves its port, 2's subnet changes (its endpoint stays where it may have roamed),
    // 3 is replaced by key 4.
    wanted.get_mut(&[1u8; 32]).unwrap().0 = ep("198.18.0.1:51999");
    wanted.get_mut(&[2u8; 32]).unwrap().1 = vec![net("10.5.20.0/24")];
    let three = wanted.remove(&[3u8; 32]).unwrap();
    wanted.insert([4u8; 32], three);
    let (changed, removed) = kernel_changes(&told, &wanted);
    let summary: Vec<_> = changed
        .iter()
        .map(|p| (p.key[0], p.endpoint, p.allowed.clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, Some(ep("198.18.0.1:51999")), vec![net("10.5.1.0/24")]),
            (2, None, vec![net("10.5.20.0/24")]),
            (4, Some(ep("198.18.0.3:51820")), vec![net("10.5.3.0/24")]),
        ]
    );
    assert_eq!(removed, vec![[3u8; 32]], "no stale peer after a key change");
}
