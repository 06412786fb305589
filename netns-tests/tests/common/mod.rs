//! Scenarios shared by the per-backend test files.
#![allow(dead_code)]

use std::time::Duration;

use netns_tests::{Backend, Cluster, Pod};

pub const CONVERGE: Duration = Duration::from_secs(20);

/// One pod per host plus a second pod on host 0 (same-host traffic too).
pub fn pods(c: &Cluster) -> Vec<Pod> {
    let mut pods: Vec<Pod> = (0..c.hosts().len())
        .map(|i| c.add_pod(i).expect("pod"))
        .collect();
    pods.push(c.add_pod(0).expect("second pod on host 0"));
    pods
}

/// Leases, subnet files and the data plane look right, and every pod reaches every other pod by
/// ping and by a checksummed TCP transfer.
pub fn every_pod_reaches_every_pod(backend: Backend, mtu: u32) {
    let c = Cluster::new(3, backend).expect("cluster");
    let took = c.wait_converged(CONVERGE).expect("converged");
    eprintln!("converged in {took:?}\n{}", c.table().unwrap());

    let leases = c.leases().unwrap();
    assert_eq!(leases.len(), 3, "{leases:?}");
    for (i, h) in c.hosts().iter().enumerate() {
        let lease = c.lease_of(i).unwrap().expect("host has a lease");
        assert_eq!(lease.backend_type.as_deref(), Some(backend.type_name()));
        assert_eq!(
            lease.subnet,
            h.subnet().unwrap(),
            "subnet file matches lease"
        );
        assert!(
            c.config().contains("10.5.0.0/16")
                && lease.subnet.prefix() == 24
                && "10.5.0.0/16"
                    .parse::<ipnetwork::Ipv4Network>()
                    .unwrap()
                    .contains(lease.subnet.ip())
        );
        let env = h.subnet_env().unwrap();
        assert_eq!(env["FLANNEL_NETWORK"], "10.5.0.0/16");
        assert_eq!(env["FLANNEL_MTU"], mtu.to_string());
        assert_eq!(env["FLANNEL_IPMASQ"], "false");
        if backend == Backend::Vxlan {
            let dev_mac = h.link_mac("flannel.1").unwrap().expect("flannel.1 exists");
            assert_eq!(
                lease.vtep_mac.as_deref(),
                Some(dev_mac.as_str()),
                "VtepMAC is flannel.1's"
            );
        }
        assert_eq!(h.http_get("/healthz").unwrap().0, 200);
    }

    c.assert_connected(&pods(&c), 4 << 20);
}

/// A ping with DF set that fills the pod MTU exactly crosses hosts; one byte more does not.
pub fn full_mtu_passes_one_more_fails(backend: Backend, mtu: u32) {
    let c = Cluster::new(2, backend).expect("cluster");
    c.wait_converged(CONVERGE).expect("converged");
    let a = c.add_pod(0).unwrap();
    let b = c.add_pod(1).unwrap();
    assert_eq!(a.mtu(), mtu);
    a.wait_reaches(b.ip(), Duration::from_secs(5)).unwrap();
    let full = mtu - 28; // IPv4 header 20 + ICMP header 8
    assert!(
        a.ping_df(b.ip(), full).unwrap(),
        "a {mtu}-byte packet with DF set must cross from host 0 to host 1"
    );
    assert!(
        b.ping_df(a.ip(), full).unwrap(),
        "a {mtu}-byte packet with DF set must cross from host 1 to host 0"
    );
    assert!(
        !a.ping_df(b.ip(), full + 1).unwrap(),
        "a {}-byte packet with DF set must not pass",
        mtu + 1
    );
}

// ---------------------------------------------------------------------------------------------
// IPv6: the test bed's underlay and pods speak IPv4; dual-stack tests add IPv6 with these.

/// Host `i`'s IPv6 underlay address, `fd00:18::<10+i>` (on the same bridge as the IPv4 one).
pub fn host_v6(i: usize) -> std::net::Ipv6Addr {
    format!("fd00:18::{}", 10 + i).parse().unwrap()
}

/// Gives every host of a cluster built with `no_start` its IPv6 underlay address and IPv6
/// forwarding, starts flanneld everywhere and waits (up to `timeout`) until each is ready and
/// wrote an IPv6 subnet.
pub fn start_dual_stack(c: &Cluster, timeout: Duration) {
    for (i, h) in c.hosts().iter().enumerate() {
        let ns = h.netns();
        let addr = format!("{}/64", host_v6(i));
        ns.ip(&["addr", "add", &addr, "dev", "eth0", "nodad"])
            .expect("IPv6 underlay address");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")
            .expect("IPv6 forwarding");
    }
    for h in c.hosts() {
        h.start().expect("start flanneld");
    }
    for h in c.hosts() {
        wait_ready_v6(h, timeout);
    }
}

/// Waits (up to `timeout`) until the flanneld of `h` is ready and wrote an IPv6 subnet.
pub fn wait_ready_v6(h: &netns_tests::Host, timeout: Duration) {
    netns_tests::wait_until(timeout, &format!("{} ready", h.name()), || {
        h.check_alive()?;
        match h.http_get("/readyz") {
            Ok((200, _)) => {}
            other => return Err(format!("/readyz: {other:?}")),
        }
        h.subnet_v6().map(drop).map_err(|e| e.to_string())
    })
    .unwrap_or_else(|e| panic!("{e}\nflanneld log:\n{}", h.log_tail(30)));
}

/// Address number `n` of `net`.
pub fn nth6(net: ipnetwork::Ipv6Network, n: u16) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::from(u128::from(net.network()) + u128::from(n))
}

/// An IPv6 address for a pod namespace on host `h`: `cni0` gets `::1/64` (the bridge is made
/// when the host has none, for IPv6-only clusters), the pod `::n` and a default route via
/// `::1`. With `new_port`, a veth `q<n>` to a fresh `eth0` in `pod` is made first.
pub fn give_v6(
    h: &netns_tests::Host,
    pod: &netns_tests::Netns,
    n: u16,
    new_port: bool,
) -> std::net::Ipv6Addr {
    let subnet = h.subnet_v6().unwrap();
    let (gw, ip) = (nth6(subnet, 1), nth6(subnet, n));
    let hn = h.netns();
    let mtu = h.mtu().unwrap();
    if hn.ip(&["link", "show", "cni0"]).is_err() {
        hn.ip(&[
            "link",
            "add",
            "cni0",
            "mtu",
            &mtu.to_string(),
            "type",
            "bridge",
        ])
        .unwrap();
        hn.ip(&["link", "set", "cni0", "up"]).unwrap();
    }
    let have = hn.ip(&["-6", "addr", "show", "dev", "cni0"]).unwrap();
    if !have.contains(&format!("{gw}/64")) {
        hn.ip(&["addr", "add", &format!("{gw}/64"), "dev", "cni0", "nodad"])
            .unwrap();
    }
    if new_port {
        netns_tests::pod::plug_into_cni0(hn, &format!("q{n}"), mtu, pod).unwrap();
        pod.ip(&["link", "set", "lo", "up"]).unwrap();
        pod.ip(&["link", "set", "eth0", "up"]).unwrap();
    }
    pod.ip(&["addr", "add", &format!("{ip}/64"), "dev", "eth0", "nodad"])
        .unwrap();
    pod.ip(&["-6", "route", "add", "default", "via", &gw.to_string()])
        .unwrap();
    ip
}
