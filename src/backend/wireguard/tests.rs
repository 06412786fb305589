//! The protocol flow between two engines, the checks the engine adds around gotatun
//! (cryptokey routing, replay, unknown peers, roaming), and the peer table's lifecycle
//! (renewal keeps sessions, a new key replaces the peer).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use gotatun::x25519::StaticSecret;

use super::counters::{Counters, Drop};
use super::engine::Engine;
use super::fuzzing::{connect, ip6_packet, ip_packet, Harness, Node};
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
    let moved: SocketAddr = "198.18.0.99:40000".parse().unwrap();
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
    assert_eq!(
        b.set_peers(&[a.lease()]),
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
    let changes = b.set_peers(&[a2.lease()]);
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
    let net = |s: &str| s.parse::<ipnetwork::IpNetwork>().unwrap();
    let ep = |s: &str| s.parse::<SocketAddr>().unwrap();
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

/// Two nodes reached over an IPv6 underlay, each with an IPv4 and an IPv6 subnet.
fn pair_over_ipv6() -> (Node, Node) {
    let (mut a, mut b) = (Node::new(1, None), Node::new(2, None));
    a.addr = "[fd18::1]:51821".parse().unwrap();
    b.addr = "[fd18::2]:51821".parse().unwrap();
    a.knows(&b);
    b.knows(&a);
    (a, b)
}

#[test]
fn ipv6_packets_cross_an_ipv6_underlay_and_their_sources_are_checked() {
    let (a, b) = pair_over_ipv6();
    let first = ip6_packet(a.host6(1), b.host6(1), b"first over v6");
    let (to, init) = a.send(&first).unwrap().expect("a handshake initiation");
    assert_eq!(to, b.addr, "b's IPv6 endpoint");
    assert_eq!(init[0], 1);
    let (resp, _) = b.recv(a.addr, &[&init]);
    let (out, _) = a.recv(b.addr, &[&resp[0]]);
    let refs: Vec<&[u8]> = out.iter().map(|d| d.as_slice()).collect();
    let (_, got) = b.recv(a.addr, &refs);
    assert_eq!(got, vec![first], "the queued IPv6 packet arrives");
    // Both families through the one session.
    let v4 = ip_packet(a.host(1), b.host(1), b"v4 too");
    let (_, d) = a.send(&v4).unwrap().unwrap();
    assert_eq!(b.recv(a.addr, &[&d]).1, vec![v4]);
    // An IPv6 source outside a's /64 is dropped.
    let spoofed = ip6_packet("fc00:0:0:9::1".parse().unwrap(), b.host6(1), b"spoof");
    let (_, d) = a.send(&spoofed).unwrap().unwrap();
    assert!(b.recv(a.addr, &[&d]).1.is_empty());
    assert_eq!(b.drops(Drop::SpoofedSource), 1);
    // The peer roams on an authenticated packet from another IPv6 address.
    let moved: SocketAddr = "[fd18::99]:40000".parse().unwrap();
    let pkt = ip6_packet(a.host6(2), b.host6(2), b"moved");
    let (_, d) = a.send(&pkt).unwrap().unwrap();
    assert_eq!(b.recv(moved, &[&d]).1, vec![pkt]);
    let table = b.engine.peers.load();
    assert_eq!(
        table.by_key(&a.engine.public_key()).unwrap().endpoint(),
        moved
    );
}

mod modes {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

    use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
    use serde_json::{json, Value};

    use super::super::config::WgConfig;
    use super::super::{
        device_specs, lease_data, lease_peer, select_underlay, DeviceSpec, OurAddrs, Underlay,
        DEVICE, DEVICE_V6,
    };
    use crate::subnet::{LeaseAttrs, SubnetKey};

    fn cfg(mode: &str) -> WgConfig {
        let v: Value = json!({"Mode": mode, "ListenPort": 5000, "ListenPortV6": 5001});
        WgConfig::parse(v.as_object().unwrap()).unwrap()
    }

    fn v4() -> Option<Ipv4Network> {
        Some("10.5.0.0/16".parse().unwrap())
    }

    fn v6() -> Option<Ipv6Network> {
        Some("fc00::/48".parse().unwrap())
    }

    fn summary(specs: &[DeviceSpec]) -> Vec<(&str, u16, Underlay, bool, bool)> {
        specs
            .iter()
            .map(|s| (s.name, s.port, s.underlay, s.v4.is_some(), s.v6.is_some()))
            .collect()
    }

    #[test]
    fn each_mode_makes_flannels_devices() {
        use Underlay::*;
        assert_eq!(
            summary(&device_specs(&cfg("separate"), v4(), v6())),
            vec![
                (DEVICE, 5000, V4, true, false),
                (DEVICE_V6, 5001, V6, false, true)
            ]
        );
        assert_eq!(
            summary(&device_specs(&cfg("separate"), None, v6())),
            vec![(DEVICE_V6, 5001, V6, false, true)]
        );
        assert_eq!(
            summary(&device_specs(&cfg("separate"), v4(), None)),
            vec![(DEVICE, 5000, V4, true, false)]
        );
        for (mode, underlay) in [("ipv4", V4), ("ipv6", V6), ("auto", Auto)] {
            assert_eq!(
                summary(&device_specs(&cfg(mode), v4(), v6())),
                vec![(DEVICE, 5000, underlay, true, true)],
                "{mode}"
            );
        }
        assert_eq!(
            summary(&device_specs(&cfg("ipv6"), None, v6())),
            vec![(DEVICE, 5000, V6, false, true)]
        );
    }

    #[test]
    fn lease_data_per_mode_names_the_port_a_device_listens_on() {
        let key = [7u8; 32];
        let b64 = super::super::config::encode_key(&key);
        let (d4, d6) = lease_data(&cfg("separate"), &key, true, true);
        assert_eq!(d4, Some(json!({"PublicKey": b64, "Port": 5000})));
        assert_eq!(d6, Some(json!({"PublicKey": b64, "Port": 5001})));
        for mode in ["auto", "ipv4", "ipv6"] {
            let (d4, d6) = lease_data(&cfg(mode), &key, true, true);
            assert_eq!(d4, Some(json!({"PublicKey": b64, "Port": 5000})), "{mode}");
            // flannel advertises 5001 here, where nothing listens.
            assert_eq!(d6, Some(json!({"PublicKey": b64, "Port": 5000})), "{mode}");
        }
        assert_eq!(
            lease_data(&cfg("separate"), &key, false, true),
            (None, Some(json!({"PublicKey": b64, "Port": 5001})))
        );
        assert_eq!(
            lease_data(&cfg("separate"), &key, true, false),
            (Some(json!({"PublicKey": b64, "Port": 5000})), None)
        );
    }

    #[test]
    fn auto_mode_chooses_the_underlay_as_flannels_select_mode() {
        let ip4 = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        let ip6 = |s: &str| Some(s.parse::<Ipv6Addr>().unwrap());
        let (pub4, priv4) = (ip4("198.18.0.2"), ip4("10.0.0.2"));
        let (pub6, priv6) = (ip6("2001:db8::2"), ip6("fd00::2"));
        let our_pub6 = ip6("2001:db8::1");
        let choose = select_underlay;
        // No IPv6 address on the peer: IPv4.
        assert_eq!(choose(priv4, None, ip4("10.0.0.1"), our_pub6), Underlay::V4);
        // A public IPv4 address, and we have IPv4: IPv4.
        assert_eq!(
            choose(pub4, pub6, ip4("198.18.0.1"), our_pub6),
            Underlay::V4
        );
        // A private IPv4 address, both IPv6 addresses public: IPv6.
        assert_eq!(choose(priv4, pub6, ip4("10.0.0.1"), our_pub6), Underlay::V6);
        // ... but not when either IPv6 address is private (fc00::/7).
        assert_eq!(
            choose(priv4, priv6, ip4("10.0.0.1"), our_pub6),
            Underlay::V4
        );
        assert_eq!(
            choose(priv4, pub6, ip4("10.0.0.1"), ip6("fd00::1")),
            Underlay::V4
        );
        assert_eq!(choose(priv4, pub6, ip4("10.0.0.1"), None), Underlay::V4);
        // 172.16/12 and 192.168/16 are private too; 172.32 is not.
        assert_eq!(
            choose(ip4("172.31.0.2"), pub6, None, our_pub6),
            Underlay::V6
        );
        assert_eq!(
            choose(ip4("192.168.1.2"), pub6, None, our_pub6),
            Underlay::V6
        );
        assert_eq!(
            choose(ip4("172.32.0.2"), pub6, ip4("10.0.0.1"), our_pub6),
            Underlay::V4
        );
        // A public IPv4 address but we have none: IPv6 if public.
        assert_eq!(choose(pub4, pub6, None, our_pub6), Underlay::V6);
        // A peer with no IPv4 address at all is reached over IPv6 (flannel: 0.0.0.0).
        assert_eq!(
            choose(None, priv6, ip4("10.0.0.1"), ip6("fd00::1")),
            Underlay::V6
        );
    }

    fn attrs(v: Value) -> LeaseAttrs {
        serde_json::from_value(v).unwrap()
    }

    fn key(s: &str) -> SubnetKey {
        s.parse().unwrap()
    }

    const PEER: &str = "10.5.2.0-24&fc00:0:0:2::-64";

    fn peer_lease(v6_port: u16) -> LeaseAttrs {
        let b64 = super::super::config::encode_key(&[9u8; 32]);
        attrs(json!({
            "PublicIP": "198.18.0.2",
            "PublicIPv6": "fd18::2",
            "BackendType": "wireguard",
            "BackendData": {"PublicKey": b64, "Port": 6000},
            "BackendV6Data": {"PublicKey": b64, "Port": v6_port},
        }))
    }

    fn peer_of(
        spec: &DeviceSpec,
        ours: OurAddrs,
        a: &LeaseAttrs,
    ) -> Option<(SocketAddr, Vec<IpNetwork>)> {
        lease_peer(spec, ours, &key(PEER), a)
            .unwrap()
            .map(|(k, e, n)| {
                assert_eq!(k, [9u8; 32]);
                (e, n)
            })
    }

    #[test]
    fn each_device_takes_the_lease_parts_of_its_families() {
        let ours = OurAddrs::default();
        let nets =
            |s: &[&str]| -> Vec<IpNetwork> { s.iter().map(|n| n.parse().unwrap()).collect() };
        let separate = device_specs(&cfg("separate"), v4(), v6());
        let lease = peer_lease(6001);
        assert_eq!(
            peer_of(&separate[0], ours, &lease),
            Some(("198.18.0.2:6000".parse().unwrap(), nets(&["10.5.2.0/24"])))
        );
        assert_eq!(
            peer_of(&separate[1], ours, &lease),
            Some((
                "[fd18::2]:6001".parse().unwrap(),
                nets(&["fc00:0:0:2::/64"])
            ))
        );
        // One device: both subnets; the port is BackendData's, where a single device
        // listens (flannel advertises ListenPortV6 in BackendV6Data in this mode).
        let both = nets(&["10.5.2.0/24", "fc00:0:0:2::/64"]);
        let one = |mode| device_specs(&cfg(mode), v4(), v6()).remove(0);
        assert_eq!(
            peer_of(&one("ipv6"), ours, &lease),
            Some(("[fd18::2]:6000".parse().unwrap(), both.clone()))
        );
        assert_eq!(
            peer_of(&one("ipv4"), ours, &lease),
            Some(("198.18.0.2:6000".parse().unwrap(), both.clone()))
        );
        // Port 0 (flannel before 2025-03): our own port.
        let mut old = peer_lease(0);
        old.backend_data = None;
        let v6_only = device_specs(&cfg("separate"), None, v6()).remove(0);
        assert_eq!(
            peer_of(&v6_only, ours, &old),
            Some((
                "[fd18::2]:5001".parse().unwrap(),
                nets(&["fc00:0:0:2::/64"])
            ))
        );
        // The IPv6 device has no use for an IPv4-only lease.
        assert_eq!(
            lease_peer(&v6_only, ours, &key("10.5.3.0-24"), &lease),
            Ok(None)
        );
        // What it lacks is named.
        let mut no_v6_ip = peer_lease(6001);
        no_v6_ip.public_ipv6 = None;
        let e = lease_peer(&separate[1], ours, &key(PEER), &no_v6_ip).unwrap_err();
        assert!(e.contains("PublicIPv6"), "{e}");
        let e = lease_peer(&separate[1], ours, &key(PEER), &old_without_v6_data()).unwrap_err();
        assert!(e.contains("BackendV6Data"), "{e}");
    }

    fn old_without_v6_data() -> LeaseAttrs {
        let mut a = peer_lease(1);
        a.backend_v6_data = None;
        a
    }
}

#[test]
fn ipv6_frames_from_the_device_go_to_their_peer_and_the_kernels_own_to_none() {
    use crate::backend::udp::offload::{Segments, VnetHdr};
    use gotatun::tun::MtuWatcher;
    let (a, b) = pair_over_ipv6();
    let peers = a.engine.peers.load();
    let frame = |pkt: Vec<u8>| [VnetHdr::default().encode().to_vec(), pkt].concat();
    let mut out = Vec::new();
    let mut go = |pkt: Vec<u8>| {
        super::engine::encapsulate_frame(
            &a.engine,
            &peers,
            &mut frame(pkt),
            &mut Segments::new(),
            &mut MtuWatcher::new(1420),
            &mut bytes::BytesMut::new(),
            &mut out,
        )
    };
    // A router solicitation: multicast, hop limit 255; an MLD report: hop limit 1.
    let mut rs = ip6_packet(a.host6(1), "ff02::2".parse().unwrap(), b"rs");
    rs[7] = 255;
    let mut mld = ip6_packet(a.host6(1), "ff02::16".parse().unwrap(), b"mld");
    mld[7] = 1;
    assert_eq!(go(rs), Err(Drop::NoRoute));
    assert_eq!(go(mld), Err(Drop::NoRoute));
    assert_eq!(go(ip6_packet(a.host6(1), b.host6(1), b"to b")), Ok(()));
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].0, b.addr,
        "a handshake initiation to b's IPv6 endpoint"
    );
}
