//! Mixed clusters (root only, flannel's Go peers from `scripts/go-peers.sh`): 4 hosts, Go
//! flanneld and ours alternating, one pod per host, for each backend. Every pod reaches every
//! other by ping and by a TCP transfer checked by checksum at both ends, so each pair of a Go
//! host and a Rust host is crossed in both directions. Both kinds of host write the same subnet
//! file and lease JSON and (vxlan) make the same device; a host leaving is dropped by both.

mod interop;

use netns_tests::{Backend, Cluster, GoPeers, Host};
use serde_json::Value;

const HOSTS: usize = 4;
const TCP_BYTES: u64 = 1 << 20;

fn every_pod_reaches_every_pod(peers: &GoPeers, backend: Backend) {
    let c = interop::mixed_cluster(peers, backend, HOSTS, |i| i % 2 == 0, &[]);
    let leases = c.leases().expect("leases");
    assert_eq!(leases.len(), HOSTS, "one lease per host: {leases:?}");
    for (i, h) in c.hosts().iter().enumerate() {
        let lease = c.lease_of(i).unwrap().expect("host has a lease");
        assert_eq!(
            lease.subnet,
            h.subnet().unwrap(),
            "{} ({}): subnet file matches its lease",
            h.name(),
            interop::daemon(h)
        );
    }
    assert_same_subnet_file_and_lease(&c);
    if backend == Backend::Vxlan {
        assert_same_vxlan_device(&c);
    }
    let pods = c
        .add_pods(&(0..HOSTS).collect::<Vec<_>>())
        .expect("one pod per host");
    // udp's convergence check sees only flannel0: let the peers' tables fill first.
    for a in &pods {
        for b in pods.iter().filter(|b| b.name() != a.name()) {
            a.wait_reaches(b.ip(), interop::CONVERGE).unwrap();
        }
    }
    c.assert_connected(&pods, TCP_BYTES);
    for h in c.hosts() {
        h.check_alive().unwrap();
    }
}

#[test]
fn mixed_vxlan_every_pod_reaches_every_pod() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_go_peers!();
    every_pod_reaches_every_pod(peers, Backend::Vxlan);
}

#[test]
fn mixed_host_gw_every_pod_reaches_every_pod() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_go_peers!();
    every_pod_reaches_every_pod(peers, Backend::HostGw);
}

#[test]
fn mixed_udp_every_pod_reaches_every_pod() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_go_peers!();
    every_pod_reaches_every_pod(peers, Backend::Udp);
}

/// What a user compares of two hosts' vxlan devices: `ip -d link` (MTU, flags, the vxlan
/// attributes but the local address) and the device's IPv6 `accept_ra`. flannel's device
/// ignores router advertisements; so must ours.
fn vxlan_device(c: &Cluster, h: &Host) -> Value {
    let dev = c.vxlan_dev();
    let link = &h
        .netns()
        .ip_json(&["-d", "link", "show", "dev", &dev])
        .unwrap()[0];
    let mut vxlan = link["linkinfo"]["info_data"].clone();
    vxlan
        .as_object_mut()
        .expect("vxlan attributes")
        .remove("local");
    let accept_ra = h
        .netns()
        .exec(
            "cat",
            &[&format!("/proc/sys/net/ipv6/conf/{dev}/accept_ra")],
        )
        .unwrap();
    serde_json::json!({
        "mtu": link["mtu"],
        "flags": link["flags"],
        "kind": link["linkinfo"]["info_kind"],
        "vxlan": vxlan,
        "accept_ra": accept_ra.trim(),
    })
}

fn assert_same_vxlan_device(c: &Cluster) {
    let (go, ours) = interop::go_and_ours(c);
    let (g, o) = (vxlan_device(c, go), vxlan_device(c, ours));
    assert_eq!(
        o,
        g,
        "{} (ours) and {} (Go): {} differs",
        ours.name(),
        go.name(),
        c.vxlan_dev()
    );
    eprintln!("{} on Go's host and ours: {g}", c.vxlan_dev());
}

/// A Go host and a Rust host write the same subnet file (same lines in the same order, the
/// subnet aside) and publish the same lease JSON (the public IP and VTEP MAC aside).
fn assert_same_subnet_file_and_lease(c: &Cluster) {
    let (go, ours) = interop::go_and_ours(c);
    let file = |h: &Host| {
        let subnet = h.subnet_env().unwrap()["FLANNEL_SUBNET"].clone();
        std::fs::read_to_string(h.subnet_file())
            .unwrap()
            .replace(&subnet, "<subnet>")
    };
    assert_eq!(
        file(ours),
        file(go),
        "subnet files of {} (ours) and {} (Go)",
        ours.name(),
        go.name()
    );
    let lease = |h: &Host| {
        let mut v = c.lease_of(h.index()).unwrap().expect("a lease").value;
        v["PublicIP"] = "<public IP>".into();
        if v["BackendData"].get("VtepMAC").is_some() {
            v["BackendData"]["VtepMAC"] = "<VTEP MAC>".into();
        }
        v
    };
    let (g, o) = (lease(go), lease(ours));
    assert_eq!(
        o,
        g,
        "leases of {} (ours) and {} (Go)",
        ours.name(),
        go.name()
    );
    eprintln!(
        "subnet file of Go's host and ours:\n{}lease of both: {g}",
        file(go)
    );
}

/// A host that leaves (daemon stopped, lease expired: deleted here) is dropped by every peer,
/// Go and ours alike: no route, neighbour or FDB entry for it is left, nothing twice.
#[test]
fn mixed_vxlan_a_host_leaving_is_dropped_by_every_peer() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_go_peers!();
    let c = interop::mixed_cluster(peers, Backend::Vxlan, HOSTS, |i| i % 2 == 0, &[]);
    for leaving in [0, 1] {
        let h = c.host(leaving);
        let lease = c.lease_of(leaving).unwrap().expect("a lease");
        let who = interop::daemon(h);
        h.stop();
        assert_eq!(c.etcd().del(&lease.key).unwrap(), 1);
        let took = c
            .wait_peer_gone(&lease, interop::CONVERGE)
            .unwrap_or_else(|e| panic!("{who}'s host left: {e}\n{}", interop::table(&c)));
        eprintln!(
            "{} ({who}) left: every peer dropped it in {took:?}",
            h.name()
        );
    }
    c.wait_converged(interop::CONVERGE).unwrap();
    for h in c.hosts().iter().filter(|h| h.pid().is_some()) {
        let dup = interop::duplicates(h, Some(&c.vxlan_dev()));
        assert!(dup.is_empty(), "{dup:?}");
    }
}
