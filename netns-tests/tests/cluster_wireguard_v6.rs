//! IPv6 with the wireguard backend (root only), in dual-stack clusters whose hosts have an
//! IPv6 underlay address beside the IPv4 one (see `common::start_dual_stack`):
//! - `Mode: separate` (flannel's default): `flannel-wg` carries IPv4 over the IPv4 underlay
//!   and `flannel-wg-v6` IPv6 over the IPv6 underlay, on `ListenPortV6`;
//! - `Mode: ipv6`: one `flannel-wg` carries both families over the IPv6 underlay;
//! - `Mode: auto`: one `flannel-wg` for both families, the underlay chosen per peer as
//!   flannel's `selectMode` (here IPv4: the test bed's 198.18/15 is not RFC 1918, and its
//!   IPv6 underlay is in fc00::/7).
//!
//! In each, pods of both families reach each other (ping, checksummed TCP), and a capture
//! on a host's underlay link shows WireGuard transport messages (type 4) on the expected
//! family and port, no inner addresses in the clear.

use std::net::Ipv6Addr;
use std::time::Duration;

use netns_tests::capture::{address_pairs, assert_wireguard_only_while, WireguardUnderlay};
use netns_tests::{tcp_transfer, tcp_transfer_to, wait_until, Cluster, Netns, Pod, PodMode};
use serde_json::{json, Value};

mod common;

const CONVERGE: Duration = Duration::from_secs(30);
const PORT: u16 = 51820;
const PORT_V6: u16 = 51821;
const TRANSFER: u64 = 2 << 20;

/// A dual-stack cluster of `hosts` with the wireguard backend in `mode` (flannel's default
/// when `None`), flanneld started once every host has its IPv6 underlay address.
fn cluster(hosts: usize, mode: Option<&str>) -> Cluster {
    let mut backend = json!({"Type": "wireguard", "PersistentKeepaliveInterval": 25});
    if let Some(m) = mode {
        backend["Mode"] = json!(m);
    }
    let config = json!({
        "Network": "10.5.0.0/16",
        "EnableIPv6": true,
        "IPv6Network": "fc00::/48",
        "Backend": backend,
    });
    let c = Cluster::builder()
        .hosts(hosts)
        .config_json(&config.to_string())
        .pod_mode(PodMode::Static)
        .no_start()
        .build()
        .expect("cluster");
    common::start_dual_stack(&c, CONVERGE);
    c
}

/// One pod per host, each with an IPv4 and an IPv6 address.
fn pods(c: &Cluster) -> Vec<(Pod, Ipv6Addr)> {
    (0..c.hosts().len())
        .map(|i| {
            let p = c.add_pod(i).expect("pod");
            let n = u16::from(p.ip().octets()[3]);
            let v6 = common::give_v6(c.host(i), p.netns(), n, false);
            (p, v6)
        })
        .collect()
}

fn ping6(from: &Netns, dst: Ipv6Addr) -> Result<String, String> {
    from.exec("ping", &["-6", "-c", "1", "-W", "1", &dst.to_string()])
        .map_err(|e| e.to_string())
}

/// Every pod reaches every other over IPv4 and IPv6 (pings until the first passes).
fn all_reach(c: &Cluster, pods: &[(Pod, Ipv6Addr)]) {
    for (a, _) in pods {
        for (b, b6) in pods {
            if a.ip() == b.ip() {
                continue;
            }
            a.wait_reaches(b.ip(), CONVERGE)
                .unwrap_or_else(|e| panic!("{} → {}: {e}\n{}", a.ip(), b.ip(), logs(c)));
            wait_until(CONVERGE, &format!("{} to reach {b6}", a.name()), || {
                ping6(a.netns(), *b6)
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(c)));
        }
    }
}

fn logs(c: &Cluster) -> String {
    c.hosts()
        .iter()
        .map(|h| format!("--- {}:\n{}", h.name(), h.log_tail(25)))
        .collect()
}

/// A checksummed TCP transfer to `to`'s IPv6 address `to6`.
fn tcp_transfer6(from: &Pod, to: &Pod, to6: Ipv6Addr, bytes: u64) {
    tcp_transfer_to(from, to, to6.into(), bytes)
        .unwrap_or_else(|e| panic!("TCP {} → {to6}: {e}", from.ip()));
}

/// Runs `traffic` while capturing on host `host`'s underlay: WireGuard on `port` over the
/// IPv6 underlay (`v6`) or the IPv4 one, and nothing on that port over the other; no address
/// pair of `inner` in the clear.
fn wireguard_only_while(
    c: &Cluster,
    host: usize,
    port: u16,
    v6: bool,
    inner: Vec<Vec<u8>>,
    traffic: impl FnOnce(),
) {
    let expect = WireguardUnderlay {
        link: "eth0",
        port,
        v6,
        min_transport_bytes: TRANSFER / 2,
        inner,
    };
    assert_wireguard_only_while(c.host(host).netns(), &expect, traffic);
}

fn lease_values(c: &Cluster) -> Vec<Value> {
    (0..c.hosts().len())
        .map(|i| c.lease_of(i).unwrap().expect("host has a lease").value)
        .collect()
}

fn has_link(c: &Cluster, i: usize, dev: &str) -> bool {
    c.host(i).netns().exec("ip", &["link", "show", dev]).is_ok()
}

/// Whether `dev` on host `i` holds `addr` and the route for `fc00::/48`.
fn v6_device_programmed(c: &Cluster, i: usize, dev: &str) -> Result<(), String> {
    let ns = c.host(i).netns();
    let own = c.host(i).subnet_v6().map_err(|e| e.to_string())?;
    let addrs = ns
        .exec("ip", &["-6", "addr", "show", "dev", dev])
        .map_err(|e| e.to_string())?;
    let want = format!("{}/128", own.network());
    if !addrs.contains(&want) {
        return Err(format!("{dev} lacks {want}: {addrs}"));
    }
    let routes = ns
        .exec("ip", &["-6", "route", "show", "fc00::/48"])
        .map_err(|e| e.to_string())?;
    if !routes.contains(&format!("dev {dev}")) {
        return Err(format!("no route fc00::/48 dev {dev}: {routes}"));
    }
    Ok(())
}

#[test]
fn separate_mode_carries_ipv6_on_flannel_wg_v6_over_the_ipv6_underlay() {
    netns_tests::require_test_bed!();
    let c = cluster(3, None);
    for (i, v) in lease_values(&c).iter().enumerate() {
        assert_eq!(v["BackendData"]["Port"], json!(PORT), "{v}");
        assert_eq!(v["BackendV6Data"]["Port"], json!(PORT_V6), "{v}");
        assert_eq!(
            v["BackendData"]["PublicKey"], v["BackendV6Data"]["PublicKey"],
            "one key for both devices: {v}"
        );
        assert_eq!(v["PublicIPv6"], common::host_v6(i).to_string(), "{v}");
        assert!(has_link(&c, i, "flannel-wg"), "the IPv4 device");
        wait_until(CONVERGE, "flannel-wg-v6 programmed", || {
            v6_device_programmed(&c, i, "flannel-wg-v6")
        })
        .unwrap();
    }
    let pods = pods(&c);
    all_reach(&c, &pods);
    // Both families, checksummed; the IPv6 one watched on host 1's underlay.
    let ((a, a6), (b, b6)) = (&pods[0], &pods[1]);
    tcp_transfer(a, b, TRANSFER).expect("checksummed transfer over IPv4");
    let inner = address_pairs((*a6).into(), (*b6).into());
    wireguard_only_while(&c, 1, PORT_V6, true, inner, || {
        tcp_transfer6(a, b, *b6, TRANSFER);
        tcp_transfer6(b, a, *a6, TRANSFER);
    });
    // Every pod pair, IPv6, checksummed.
    for (p, _) in &pods {
        for (q, q6) in &pods {
            if p.ip() != q.ip() {
                tcp_transfer6(p, q, *q6, 256 << 10);
            }
        }
    }
}

#[test]
fn ipv6_mode_carries_both_families_on_one_device_over_the_ipv6_underlay() {
    netns_tests::require_test_bed!();
    let c = cluster(2, Some("ipv6"));
    for (i, v) in lease_values(&c).iter().enumerate() {
        // The one device listens on ListenPort, and that is what both halves say.
        assert_eq!(v["BackendData"]["Port"], json!(PORT), "{v}");
        assert_eq!(v["BackendV6Data"]["Port"], json!(PORT), "{v}");
        assert!(
            !has_link(&c, i, "flannel-wg-v6"),
            "no second device in this mode"
        );
        wait_until(CONVERGE, "flannel-wg carries IPv6", || {
            v6_device_programmed(&c, i, "flannel-wg")
        })
        .unwrap();
    }
    let pods = pods(&c);
    all_reach(&c, &pods);
    let ((a, a6), (b, b6)) = (&pods[0], &pods[1]);
    let mut inner = address_pairs((*a6).into(), (*b6).into());
    inner.extend(address_pairs(a.ip().into(), b.ip().into()));
    // The IPv4 underlay carries nothing in this mode.
    wireguard_only_while(&c, 1, PORT, true, inner, || {
        tcp_transfer(a, b, TRANSFER).expect("checksummed transfer over IPv4");
        tcp_transfer6(a, b, *b6, TRANSFER);
    });
}

#[test]
fn auto_mode_carries_both_families_on_one_device_over_the_underlay_it_selects() {
    netns_tests::require_test_bed!();
    let c = cluster(2, Some("auto"));
    for i in 0..2 {
        wait_until(CONVERGE, "flannel-wg carries IPv6", || {
            v6_device_programmed(&c, i, "flannel-wg")
        })
        .unwrap();
    }
    let pods = pods(&c);
    all_reach(&c, &pods);
    let ((a, a6), (b, b6)) = (&pods[0], &pods[1]);
    // 198.18/15 is not RFC 1918 and we have IPv4: flannel's selectMode takes IPv4.
    let inner = address_pairs((*a6).into(), (*b6).into());
    wireguard_only_while(&c, 1, PORT, false, inner, || {
        tcp_transfer6(a, b, *b6, TRANSFER);
        tcp_transfer6(b, a, *a6, TRANSFER);
    });
}
