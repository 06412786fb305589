//! `--ip-masq` on a dual-stack vxlan cluster of 2 hosts (root only): a pod talking to an address
//! outside the Network (a namespace on the underlay) arrives with its host's address as source,
//! over IPv4 and IPv6; pod to pod keeps the pod's address.
//!
//! The test bed speaks IPv4; the IPv6 underlay and pod addresses are added here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use netns_tests::{wait_until, Cluster, Netns, PodMode};

mod common;

const CONVERGE: Duration = Duration::from_secs(30);
const OUTSIDE4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);
const PORT: u16 = 7411;

fn outside6() -> Ipv6Addr {
    "fd00:18::200".parse().unwrap()
}

/// Connects from `from` to `to` (listening in `listen`) and returns the source address the
/// listener saw.
fn observed_source(listen: &Netns, to: IpAddr, from: &Netns) -> Result<IpAddr, String> {
    let addr = SocketAddr::new(to, PORT);
    let listener = listen
        .run_in(|| TcpListener::bind(addr))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("listen on {addr} in {}: {e}", listen.name()))?;
    let conn = from
        .run_in(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{} → {addr}: {e}", from.name()))?;
    let (_, peer) = listener
        .accept()
        .map_err(|e| format!("accept on {addr}: {e}"))?;
    drop(conn);
    Ok(peer.ip())
}

/// Waits until a connection gets through and its source is `want`.
fn assert_source(listen: &Netns, to: IpAddr, from: &Netns, want: IpAddr) {
    let what = format!("{} → {to} arriving from {want}", from.name());
    wait_until(CONVERGE, &what, || {
        match observed_source(listen, to, from) {
            Ok(src) if src == want => Ok(()),
            Ok(src) => Err(format!("arrived from {src}")),
            Err(e) => Err(e),
        }
    })
    .unwrap();
}

#[test]
fn ip_masq_hides_pods_outside_the_network_but_not_between_pods() {
    netns_tests::require_test_bed!();
    let c = Cluster::builder()
        .hosts(2)
        .config_json(
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}"#,
        )
        .pod_mode(PodMode::Static)
        .flanneld_arg("--ip-masq")
        .no_start()
        .build()
        .expect("cluster");
    common::start_dual_stack(&c, CONVERGE);
    for h in c.hosts() {
        assert_eq!(h.subnet_env().unwrap()["FLANNEL_IPMASQ"], "true");
    }

    // A machine on the underlay, outside the Network.
    let outside = Netns::create(&format!("{}-out", c.name())).expect("outside namespace");
    c.underlay()
        .attach(&outside, "out0", OUTSIDE4)
        .expect("attach outside");
    outside
        .ip(&[
            "addr",
            "add",
            &format!("{}/64", outside6()),
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
    outside.ip(&["link", "set", "lo", "up"]).unwrap();

    let p0 = c.add_pod(0).expect("pod on host 0");
    let p1 = c.add_pod(1).expect("pod on host 1");
    let p0v6 = common::give_v6(c.host(0), p0.netns(), u16::from(p0.ip().octets()[3]), false);
    let p1v6 = common::give_v6(c.host(1), p1.netns(), u16::from(p1.ip().octets()[3]), false);

    // Outside the Network: the host's address.
    assert_source(
        &outside,
        OUTSIDE4.into(),
        p0.netns(),
        c.host(0).public_ip().into(),
    );
    assert_source(
        &outside,
        outside6().into(),
        p0.netns(),
        common::host_v6(0).into(),
    );
    // Pod to pod (another host): the pod's own address.
    assert_source(p1.netns(), p1.ip().into(), p0.netns(), p0.ip().into());
    assert_source(p1.netns(), p1v6.into(), p0.netns(), p0v6.into());
    assert_source(p0.netns(), p0.ip().into(), p1.netns(), p1.ip().into());
}
