//! The foreign WireGuard peer of the interop tests and the handshake flood, checked against
//! each other before either is used on our backend (root only): two wireguard-go nodes set up
//! from flannel leases in etcd carry pod traffic, and a flood with a valid mac1 makes
//! wireguard-go answer with cookie replies, while one with a wrong mac1 gets none.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use netns_tests::wireguard_go::{self, key_bytes, NodeSpec};
use netns_tests::{require_all, require_test_bed, Cluster, HandshakeFlood, Netns, WireguardGo};

const NETWORK: &str = "10.5.0.0/16";

fn cluster() -> Cluster {
    Cluster::builder()
        .hosts(2)
        .network(NETWORK, 24)
        .backend_json(serde_json::json!({"Type": "wireguard"}))
        .no_start()
        .build()
        .expect("cluster")
}

/// A wireguard-go node on host `i` with subnet `10.5.<i+1>.0/24`, its lease in etcd and its
/// subnet file written.
fn node(c: &Cluster, i: usize) -> WireguardGo {
    let subnet: Ipv4Network = format!("10.5.{}.0/24", i + 1).parse().unwrap();
    let spec = NodeSpec::on_host(c.host(i), NETWORK.parse().unwrap(), subnet);
    let n = WireguardGo::start(spec).expect("wireguard-go starts");
    n.put_lease(c.etcd(), &c.subnets_prefix(), Duration::from_secs(3600))
        .expect("lease");
    n.write_subnet_file(&c.host(i).subnet_file())
        .expect("subnet file");
    n
}

#[test]
fn two_wireguard_go_nodes_from_flannel_leases_carry_pod_traffic() {
    require_test_bed!();
    require_all!(wireguard_go::NEEDS);
    let c = cluster();
    let nodes = [node(&c, 0), node(&c, 1)];
    let leases = c.leases().expect("leases");
    assert_eq!(leases.len(), 2, "{leases:?}");
    assert_eq!(leases[0].backend_type.as_deref(), Some("wireguard"));
    for n in &nodes {
        let peers = n.sync_peers(&leases, None, 0).expect("peers");
        assert_eq!(peers.len(), 1, "one peer: the other node");
    }
    let pods = [c.add_pod(0).expect("pod 0"), c.add_pod(1).expect("pod 1")];
    assert_eq!(pods[0].mtu(), 1420);
    pods[0]
        .wait_reaches(pods[1].ip(), Duration::from_secs(10))
        .expect("pod 0 reaches pod 1 through wireguard-go");
    let state = nodes[0]
        .peer_state(&nodes[1].public_key())
        .unwrap()
        .expect("node 1 is node 0's peer");
    assert!(state.latest_handshake > 0, "{state:?}");
    assert_eq!(
        state.endpoint,
        Some(std::net::SocketAddr::V4(nodes[1].endpoint()))
    );
    assert!(
        pods[0].ping_df(pods[1].ip(), 1392).unwrap(),
        "1420-byte packets pass"
    );
    assert!(
        !pods[0].ping_df(pods[1].ip(), 1393).unwrap(),
        "1421 bytes do not"
    );
    netns_tests::tcp_transfer(&pods[1], &pods[0], 4 << 20).expect("TCP arrives whole");
    assert!(nodes[1].handshake_log().completed() >= 1);
}

#[test]
fn a_flood_with_a_valid_mac1_gets_cookie_replies_from_wireguard_go() {
    require_test_bed!();
    require_all!(wireguard_go::NEEDS);
    let c = cluster();
    let target = node(&c, 0);
    let flooder = Netns::create(&format!("{}-fl", c.name())).expect("flood namespace");
    c.underlay()
        .attach(&flooder, "fl", Ipv4Addr::new(198, 18, 0, 250))
        .expect("flood namespace on the underlay");
    let key = key_bytes(&target.public_key()).unwrap();

    // A wrong key gives a wrong mac1: wireguard-go drops those before any other work.
    let other = key_bytes(&wireguard_go::KeyPair::generate().unwrap().public).unwrap();
    let wrong = HandshakeFlood::start(&flooder, target.endpoint(), &other, 0).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let wrong = wrong.stop().unwrap();
    assert!(wrong.sent > 1000, "{wrong:?}");
    assert_eq!(
        (wrong.cookie_replies, wrong.other_replies),
        (0, 0),
        "{wrong:?}"
    );

    let flood = HandshakeFlood::start(&flooder, target.endpoint(), &key, 0).unwrap();
    let got = netns_tests::wait_until(Duration::from_secs(10), "cookie replies", || {
        match flood.cookie_replies() {
            0 => Err(format!("{} sent, no cookie reply yet", flood.sent())),
            n => Ok(n),
        }
    });
    let report = flood.stop().unwrap();
    eprintln!(
        "flood: {report:?} ({:.0}/s), wireguard-go log: {:?}",
        report.sent_per_second(),
        target.handshake_log()
    );
    got.expect("wireguard-go under load answers with cookie replies");
    assert_eq!(report.other_replies, 0, "{report:?}");
    target.check_alive().expect("wireguard-go survives");
}
