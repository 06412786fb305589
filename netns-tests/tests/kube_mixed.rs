//! Test 7 (root only): flannel's own Go flanneld (v0.28.10) in Kubernetes mode on one node,
//! ours on the others, one API server: each reads the other's annotations, and every pod
//! reaches every other.

mod kube_common;

use std::time::Duration;

use kube_common::{pod_cidr, KubeCluster, READY};
use netns_tests::Backend;

#[test]
fn kube_mixed_go_and_rust_nodes_reach_each_other() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_kube_peers!();
    let go = netns_tests::require_go_peers!();
    let k = KubeCluster::new(peers, 3, Backend::Vxlan);
    k.c.host(0).set_go_flanneld(Some(&go.flanneld));
    for i in 0..3 {
        k.create_and_start(i);
    }
    for h in k.c.hosts() {
        h.wait_ready(READY).expect("ready");
    }
    for (i, h) in k.c.hosts().iter().enumerate() {
        assert_eq!(h.subnet().unwrap().to_string(), pod_cidr(i));
        let a = k.annotations(i);
        assert_eq!(a["kube-subnet-manager"], "true", "node{i}: {a:?}");
        assert_eq!(a["backend-type"], "vxlan", "node{i}: {a:?}");
        assert_eq!(a["public-ip"], h.public_ip().to_string(), "node{i}: {a:?}");
    }
    for i in 0..3 {
        k.wait_peer_everywhere(i, Duration::from_secs(20));
    }
    let pods: Vec<_> = (0..3).map(|i| k.c.add_pod(i).expect("pod")).collect();
    k.c.assert_connected(&pods, 2 << 20);
}
