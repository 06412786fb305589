//! Dual stack and IPv6-only clusters of 3 hosts (root only): IPv6 pod-to-pod traffic over vxlan
//! (`flannel-v6.1`) and host-gw, IPv4 still working beside it, and an IPv6-only vxlan cluster.
//!
//! The test bed speaks IPv4; what IPv6 needs is added here: a global IPv6 address on every
//! host's `eth0` (`fd00:18::<10+i>/64`, on the same bridge as the IPv4 underlay), IPv6
//! forwarding, and IPv6 addresses on the pods (`<host IPv6 subnet>::<n>`, gateway `::1` on the
//! host's `cni0`).

use std::net::Ipv6Addr;
use std::time::Duration;

use ipnetwork::Ipv6Network;
use netns_tests::{wait_until, Cluster, Host, Netns, PodMode};

const CONVERGE: Duration = Duration::from_secs(30);

fn host_v6(i: usize) -> Ipv6Addr {
    format!("fd00:18::{}", 10 + i).parse().unwrap()
}

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
    for (i, h) in c.hosts().iter().enumerate() {
        let ns = h.netns();
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/64", host_v6(i)),
            "dev",
            "eth0",
            "nodad",
        ])
        .expect("IPv6 underlay address");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")
            .expect("IPv6 forwarding");
    }
    for h in c.hosts() {
        h.start().expect("start flanneld");
    }
    for h in c.hosts() {
        wait_until(CONVERGE, &format!("{} ready", h.name()), || {
            h.check_alive()?;
            match h.http_get("/readyz") {
                Ok((200, _)) => {}
                other => return Err(format!("/readyz: {other:?}")),
            }
            v6_subnet(h).map(drop)
        })
        .unwrap_or_else(|e| panic!("{e}\nflanneld log:\n{}", h.log_tail(30)));
    }
    c
}

/// The host's IPv6 lease subnet, from `FLANNEL_IPV6_SUBNET` (`fc00:0:0:3::1/64`).
fn v6_subnet(h: &Host) -> Result<Ipv6Network, String> {
    let env = h.subnet_env().map_err(|e| e.to_string())?;
    let s = env
        .get("FLANNEL_IPV6_SUBNET")
        .ok_or_else(|| format!("no FLANNEL_IPV6_SUBNET in {env:?}"))?;
    let net: Ipv6Network = s.parse().map_err(|e| format!("{s}: {e}"))?;
    Ipv6Network::new(net.network(), net.prefix()).map_err(|e| e.to_string())
}

fn nth6(net: Ipv6Network, n: u16) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net.network()) + u128::from(n))
}

/// An IPv6 address for a pod namespace on host `h`: `cni0` gets `::1/64` (the bridge is made
/// when the host has none, for IPv6-only clusters), the pod `::n` and a default route via
/// `::1`. With `new_port`, a veth `q<n>` to a fresh `eth0` in `pod` is made first.
fn give_v6(h: &Host, pod: &Netns, n: u16, new_port: bool) -> Ipv6Addr {
    let subnet = v6_subnet(h).unwrap();
    let gw = nth6(subnet, 1);
    let ip = nth6(subnet, n);
    let hn = h.netns();
    let mtu = h.subnet_env().unwrap()["FLANNEL_MTU"].clone();
    if hn.ip(&["link", "show", "cni0"]).is_err() {
        hn.ip(&["link", "add", "cni0", "mtu", &mtu, "type", "bridge"])
            .unwrap();
        hn.ip(&["link", "set", "cni0", "up"]).unwrap();
    }
    let have = hn.ip(&["-6", "addr", "show", "dev", "cni0"]).unwrap();
    if !have.contains(&format!("{gw}/64")) {
        hn.ip(&["addr", "add", &format!("{gw}/64"), "dev", "cni0", "nodad"])
            .unwrap();
    }
    if new_port {
        let port = format!("q{n}");
        hn.ip(&[
            "link",
            "add",
            &port,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "mtu",
            &mtu,
            "netns",
            pod.name(),
        ])
        .unwrap();
        hn.ip(&["link", "set", &port, "master", "cni0", "up"])
            .unwrap();
        pod.ip(&["link", "set", "lo", "up"]).unwrap();
        pod.ip(&["link", "set", "eth0", "up"]).unwrap();
    }
    pod.ip(&["addr", "add", &format!("{ip}/64"), "dev", "eth0", "nodad"])
        .unwrap();
    pod.ip(&["-6", "route", "add", "default", "via", &gw.to_string()])
        .unwrap();
    ip
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
        let s = v6_subnet(h).unwrap();
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
            .position(|l| l.contains(&format!("&{}-64", v6_subnet(h).unwrap().network())))
            .unwrap_or_else(|| panic!("no dual-stack key for {}: {out}", h.name()));
        let value: serde_json::Value = serde_json::from_str(lines[key + 1]).unwrap();
        assert_eq!(
            value["PublicIPv6"],
            host_v6(h.index()).to_string(),
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
            give_v6(c.host(p.host_index()), p.netns(), n, false)
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
            let ip = give_v6(h, &ns, 2, true);
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
