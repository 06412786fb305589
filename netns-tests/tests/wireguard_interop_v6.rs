//! Our wireguard backend against Debian's wireguard-go over an IPv6 underlay (root only):
//! flannel's `Mode: separate` in a dual-stack network. wireguard-go runs on host 0 as a
//! flannel node with both devices (`flannel-wg` on the IPv4 underlay, `flannel-wg-v6` on the
//! IPv6 one, `ListenPortV6` 51821), its dual-stack lease — `PublicIPv6` and `BackendV6Data` —
//! written into etcd by the test; our flanneld on host 1. Pod IPv6 traffic goes through the
//! two `flannel-wg-v6` devices: the handshake (either side first), pings at the MTU edge and
//! checksummed TCP both ways, watched on the underlay to be WireGuard over IPv6.

use std::net::{Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use netns_tests::capture::{address_pairs, assert_wireguard_only_while, WireguardUnderlay};
use netns_tests::wireguard_go::{self, generate_psk, NodeSpec, V6Spec, DEVICE_V6};
use netns_tests::{
    require_all, require_test_bed, tcp_transfer_to, wait_until, Cluster, Host, Netns, Pod, PodMode,
    WireguardGo,
};
use serde_json::{json, Value};

mod common;

const NETWORK: &str = "10.5.0.0/16";
const NETWORK_V6: &str = "fc00::/48";
/// wireguard-go's subnets (ours are allocated by our flanneld around them).
const THEIR_SUBNET: &str = "10.5.1.0/24";
const THEIR_SUBNET_V6: &str = "fc00:0:0:1::/64";
const PORT_V6: u16 = wireguard_go::DEFAULT_PORT_V6;
const LEASE_TTL: Duration = Duration::from_secs(3600);
/// Time for a path to work once both sides have what they need (one handshake, retried).
const REACH: Duration = Duration::from_secs(15);
/// flannel's device MTU for a 1500-byte underlay: 1500 − 80, also for `flannel-wg-v6`.
const DEVICE_MTU: u32 = 1420;
/// The ICMPv6 echo payload that makes an inner IPv6 packet of exactly the device MTU.
const EDGE_PAYLOAD: u32 = DEVICE_MTU - 40 - 8;
const TRANSFER: u64 = 4 << 20;

/// Host 0 runs wireguard-go, host 1 our flanneld; a dual-stack pod on each.
struct Interop6 {
    /// `[theirs, ours]` with their IPv6 addresses; dropped first.
    pods: Vec<(Pod, Ipv6Addr)>,
    wg: WireguardGo,
    c: Cluster,
}

impl Interop6 {
    /// Both nodes running and knowing each other (the network's PSK on both).
    fn new() -> Interop6 {
        let psk = generate_psk().expect("wg genpsk");
        let config = json!({
            "Network": NETWORK,
            "SubnetLen": 24,
            "EnableIPv6": true,
            "IPv6Network": NETWORK_V6,
            "IPv6SubnetLen": 64,
            "Backend": {"Type": "wireguard", "PSK": psk, "Mode": "separate"},
        });
        let c = Cluster::builder()
            .hosts(2)
            .config_json(&config.to_string())
            .pod_mode(PodMode::Static)
            .no_start()
            .build()
            .expect("cluster");
        for (i, h) in c.hosts().iter().enumerate() {
            let addr = format!("{}/64", common::host_v6(i));
            h.netns()
                .ip(&["addr", "add", &addr, "dev", "eth0", "nodad"])
                .expect("IPv6 underlay address");
            h.netns()
                .sysctl("net.ipv6.conf.all.forwarding", "1")
                .expect("IPv6 forwarding");
        }
        let mut spec = NodeSpec::on_host(
            c.host(0),
            NETWORK.parse().unwrap(),
            THEIR_SUBNET.parse().unwrap(),
        );
        spec.v6 = Some(V6Spec {
            public_ip: common::host_v6(0),
            subnet: THEIR_SUBNET_V6.parse().unwrap(),
            network: NETWORK_V6.parse().unwrap(),
            port: PORT_V6,
        });
        let wg = WireguardGo::start(spec).expect("wireguard-go, both devices");
        wg.put_lease(c.etcd(), &c.subnets_prefix(), LEASE_TTL)
            .expect("their lease");
        wg.write_subnet_file(&c.host(0).subnet_file())
            .expect("their subnet file");
        let ours = c.host(1);
        ours.start().expect("our flanneld");
        common::wait_ready_v6(ours, Duration::from_secs(30));
        let pods = (0..2)
            .map(|i| {
                let p = c.add_pod(i).expect("pod");
                let n = u16::from(p.ip().octets()[3]);
                let v6 = common::give_v6(c.host(i), p.netns(), n, false);
                (p, v6)
            })
            .collect();
        let t = Interop6 { pods, wg, c };
        let leases = t.c.leases().expect("leases");
        let peers =
            t.wg.sync_peers(&leases, Some(&psk), 0)
                .expect("wireguard-go's peers");
        assert_eq!(
            peers.iter().map(|p| p.device()).collect::<Vec<_>>(),
            [wireguard_go::DEVICE, DEVICE_V6],
            "our dual-stack lease makes a peer on each of their devices: {leases:?}"
        );
        t
    }

    fn ours(&self) -> &Host {
        self.c.host(1)
    }

    fn their_pod(&self) -> (&Pod, Ipv6Addr) {
        (&self.pods[0].0, self.pods[0].1)
    }

    fn our_pod(&self) -> (&Pod, Ipv6Addr) {
        (&self.pods[1].0, self.pods[1].1)
    }

    fn our_lease_value(&self) -> Value {
        self.c
            .lease_of(1)
            .expect("etcd")
            .expect("our flanneld has a lease")
            .value
    }
}

/// One ping (three tries) from `ns` to `dst` with `-s payload`, never fragmented; answered?
fn ping6_df(ns: &Netns, dst: Ipv6Addr, payload: u32) -> bool {
    ns.command("ping")
        .args([
            "-6", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", "-M", "do",
        ])
        .args(["-s", &payload.to_string(), &dst.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn wait_reaches6(from: &Pod, dst: Ipv6Addr, within: Duration) {
    wait_until(within, &format!("{} to reach {dst}", from.ip()), || {
        from.netns()
            .exec(
                "ping",
                &["-6", "-n", "-c", "1", "-W", "1", &dst.to_string()],
            )
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// The first IPv6 packet goes one way; the handshake it starts on the `flannel-wg-v6` devices
/// completes within 5 s and is initiated by that side; then pings at the MTU edge and
/// checksummed TCP both ways, the underlay showing only WireGuard over IPv6.
fn handshake_mtu_and_tcp_over_ipv6(we_initiate: bool) {
    require_test_bed!();
    require_all!(wireguard_go::NEEDS);
    let t = Interop6::new();
    let lease = t.our_lease_value();
    assert_eq!(lease["BackendV6Data"]["Port"], json!(PORT_V6), "{lease}");
    assert_eq!(
        lease["PublicIPv6"],
        json!(common::host_v6(1).to_string()),
        "{lease}"
    );
    let our_key = lease["BackendV6Data"]["PublicKey"]
        .as_str()
        .unwrap_or_else(|| panic!("our lease has no BackendV6Data.PublicKey: {lease}"))
        .to_string();
    assert_eq!(t.ours().mtu().unwrap(), DEVICE_MTU, "FLANNEL_MTU");

    let started = Instant::now();
    let (first, second) = if we_initiate {
        (t.our_pod(), t.their_pod())
    } else {
        (t.their_pod(), t.our_pod())
    };
    wait_reaches6(first.0, second.1, REACH);
    let state =
        t.wg.wait_handshake_on(
            DEVICE_V6,
            &our_key,
            0,
            Duration::from_secs(5).saturating_sub(started.elapsed()),
        )
        .expect("a handshake on flannel-wg-v6 within 5 s of the first packet");
    assert_eq!(
        state.endpoint,
        Some(SocketAddr::from((common::host_v6(1), PORT_V6))),
        "wireguard-go talks to our IPv6 address and ListenPortV6: {state:?}"
    );
    t.wg.handshake_log_on(DEVICE_V6)
        .unwrap()
        .assert_started_by(we_initiate);
    wait_reaches6(second.0, first.1, REACH);

    for ((a, _), (_, b6)) in [(t.our_pod(), t.their_pod()), (t.their_pod(), t.our_pod())] {
        assert!(
            ping6_df(a.netns(), b6, EDGE_PAYLOAD),
            "{} → {b6}: {DEVICE_MTU}-byte IPv6 packets pass unfragmented",
            a.ip()
        );
        assert!(
            !ping6_df(a.netns(), b6, EDGE_PAYLOAD + 1),
            "{} → {b6}: {} bytes must not",
            a.ip(),
            DEVICE_MTU + 1
        );
    }

    let ((ours, ours6), (theirs, theirs6)) = (t.our_pod(), t.their_pod());
    let expect = WireguardUnderlay {
        link: "eth0",
        port: PORT_V6,
        v6: true,
        min_transport_bytes: TRANSFER,
        inner: address_pairs(ours6.into(), theirs6.into()),
    };
    assert_wireguard_only_while(t.ours().netns(), &expect, || {
        std::thread::scope(|s| {
            let runs = [(ours, theirs, theirs6), (theirs, ours, ours6)].map(|(from, to, to6)| {
                s.spawn(move || {
                    let r = tcp_transfer_to(from, to, to6.into(), TRANSFER)
                        .unwrap_or_else(|e| panic!("TCP {} → {to6}: {e}", from.ip()));
                    assert_eq!(r.bytes, TRANSFER);
                })
            });
            for r in runs {
                r.join().unwrap();
            }
        });
    });
}

#[test]
fn we_initiate_over_ipv6_then_mtu_edge_pings_and_tcp_both_ways() {
    handshake_mtu_and_tcp_over_ipv6(true);
}

#[test]
fn wireguard_go_initiates_over_ipv6_then_mtu_edge_pings_and_tcp_both_ways() {
    handshake_mtu_and_tcp_over_ipv6(false);
}
