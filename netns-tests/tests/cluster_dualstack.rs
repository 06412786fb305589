//! Dual stack and IPv6-only clusters of 3 hosts (root only): IPv6 pod-to-pod traffic over vxlan
//! (`flannel-v6.1`) and host-gw, IPv4 still working beside it, and an IPv6-only vxlan cluster.
//!
//! The test bed speaks IPv4; what IPv6 needs is added here: a global IPv6 address on every
//! host's `eth0` (`fd00:18::<10+i>/64`, on the same bridge as the IPv4 underlay), IPv6
//! forwarding, and IPv6 addresses on the pods (`<host IPv6 subnet>::<n>`, gateway `::1` on the
//! host's `cni0`).

use std::net::Ipv6Addr;
use std::time::Duration;

use netns_tests::{wait_until, Cluster, Netns, PodMode};

mod common;

const CONVERGE: Duration = Duration::from_secs(30);

/// Builds a cluster without starting flanneld, gives every host its IPv6 underlay address,
/// then starts flanneld everywhere and waits until each wrote its subnet file.
fn dual_cluster(config: &str, hosts: usize, extra: &[&str]) -> Cluster {
    let mut b = Cluster::builder()
        .hosts(hosts)
        .config_json(config)
        .pod_mode(PodMode::Static)
        .no_start();
    for a in extra {
        b = b.flanneld_arg(a);
    }
    let c = b.build().expect("cluster");
    common::start_dual_stack(&c, CONVERGE);
    c
}

/// Pings `dst` from `from` until a ping gets through (routes may still be propagating), then
/// asserts that a burst of 3 all arrive.
fn assert_reaches6(from: &Netns, dst: Ipv6Addr) {
    let d = dst.to_string();
    wait_until(CONVERGE, &format!("{} to reach {d}", from.name()), || {
        from.exec("ping", &["-6", "-c", "1", "-W", "1", &d])
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .unwrap();
    let out = from
        .exec("ping", &["-6", "-c", "3", "-i", "0.2", "-W", "2", &d])
        .unwrap_or_else(|e| panic!("{} → {d}: {e}", from.name()));
    assert!(
        out.contains(" 0% packet loss"),
        "{} → {d}: {out}",
        from.name()
    );
}

fn dual_stack_pods_reach_each_other(backend: &str, mtu: &str) {
    let config = format!(
        r#"{{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{{"Type":"{backend}"}}}}"#
    );
    let c = dual_cluster(&config, 3, &[]);
    let mut subnets = Vec::new();
    for h in c.hosts() {
        let env = h.subnet_env().unwrap();
        assert_eq!(env["FLANNEL_IPV6_NETWORK"], "fc00::/48", "{env:?}");
        assert_eq!(env["FLANNEL_MTU"], mtu, "{env:?}");
        let s = h.subnet_v6().unwrap();
        assert_eq!(s.prefix(), 64);
        subnets.push(s);
    }
    subnets.sort();
    subnets.dedup();
    assert_eq!(subnets.len(), 3, "distinct IPv6 subnets: {subnets:?}");

    // Dual-stack lease keys and, for vxlan, BackendV6Data with flannel-v6.1's MAC.
    let out = c
        .etcd()
        .netns()
        .exec(
            "etcdctl",
            &[
                "--endpoints",
                &c.etcd().endpoint(),
                "get",
                "--prefix",
                &c.subnets_prefix(),
            ],
        )
        .unwrap();
    let lines: Vec<&str> = out.lines().collect();
    for h in c.hosts() {
        let key = lines
            .iter()
            .position(|l| l.contains(&format!("&{}-64", h.subnet_v6().unwrap().network())))
            .unwrap_or_else(|| panic!("no dual-stack key for {}: {out}", h.name()));
        let value: serde_json::Value = serde_json::from_str(lines[key + 1]).unwrap();
        assert_eq!(
            value["PublicIPv6"],
            common::host_v6(h.index()).to_string(),
            "{value}"
        );
        if backend == "vxlan" {
            let mac = h.link_mac("flannel-v6.1").unwrap().expect("flannel-v6.1");
            assert_eq!(value["BackendV6Data"]["VtepMAC"], mac, "{value}");
        }
    }

    // One dual-stack pod per host; every pod reaches every other over IPv6 and IPv4.
    let pods: Vec<_> = (0..3).map(|i| c.add_pod(i).expect("pod")).collect();
    let v6: Vec<Ipv6Addr> = pods
        .iter()
        .map(|p| {
            let n = p.ip().octets()[3] as u16;
            common::give_v6(c.host(p.host_index()), p.netns(), n, false)
        })
        .collect();
    for (i, p) in pods.iter().enumerate() {
        for (j, q) in pods.iter().enumerate() {
            if i != j {
                assert_reaches6(p.netns(), v6[j]);
                p.wait_reaches(q.ip(), CONVERGE).unwrap();
            }
        }
    }
}

#[test]
fn dual_stack_vxlan_pods_reach_each_other_over_ipv6() {
    netns_tests::require_test_bed!();
    dual_stack_pods_reach_each_other("vxlan", "1430");
}

#[test]
fn dual_stack_hostgw_pods_reach_each_other_over_ipv6() {
    netns_tests::require_test_bed!();
    dual_stack_pods_reach_each_other("host-gw", "1500");
}

#[test]
fn ipv6_only_vxlan_cluster() {
    netns_tests::require_test_bed!();
    let c = dual_cluster(
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}"#,
        3,
        &[],
    );
    for h in c.hosts() {
        let env = h.subnet_env().unwrap();
        assert!(!env.contains_key("FLANNEL_SUBNET"), "{env:?}");
        assert_eq!(env["FLANNEL_MTU"], "1430", "{env:?}");
        assert!(h.link_mac("flannel.1").unwrap().is_none(), "no IPv4 device");
        assert!(h.link_mac("flannel-v6.1").unwrap().is_some());
    }
    let pods: Vec<(Netns, Ipv6Addr)> = c
        .hosts()
        .iter()
        .map(|h| {
            let ns = Netns::create(&format!("{}q2", h.name())).expect("pod namespace");
            let ip = common::give_v6(h, &ns, 2, true);
            (ns, ip)
        })
        .collect();
    for (i, (ns, _)) in pods.iter().enumerate() {
        for (j, (_, ip)) in pods.iter().enumerate() {
            if i != j {
                assert_reaches6(ns, *ip);
            }
        }
    }
}
