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
