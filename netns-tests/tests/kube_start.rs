//! Kubernetes mode at start (root only): waiting for a podCIDR and for the API server instead
//! of exiting (test 4), what the RBAC-limited token allows (test 8), and finding our Node from
//! our Pod as the DaemonSet runs us.

mod kube_common;

use std::time::Duration;

use kube_common::{node_name, pod_cidr, KubeCluster, READY};
use netns_tests::Backend;

/// `/readyz` stays 503 and flanneld keeps running, for `for_` (polled, no fixed sleep beyond
/// what the check needs to be meaningful: the log line must appear first).
fn waits_with(k: &KubeCluster, i: usize, log_line: &str) {
    let h = k.c.host(i);
    netns_tests::wait_until(Duration::from_secs(30), log_line, || {
        h.check_alive()?;
        if h.log_tail(200).contains(log_line) {
            Ok(())
        } else {
            Err(h.log_tail(5))
        }
    })
    .unwrap();
    let (code, body) = h.http_get("/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    h.check_alive().unwrap();
}

/// Test 4a: a Node without a podCIDR is waited for; once it has one, flanneld is ready.
#[test]
fn kube_waits_for_the_podcidr() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_kube_peers!();
    let k = KubeCluster::new(peers, 1, Backend::Vxlan);
    k.cp.create_node(&node_name(0), &[], &[]).unwrap();
    k.c.host(0).start().unwrap();
    waits_with(&k, 0, "has no podCIDR yet");
    k.cp.set_pod_cidrs(&node_name(0), &[&pod_cidr(0)]).unwrap();
    k.c.host(0).wait_ready(READY).unwrap();
    assert_eq!(k.c.host(0).subnet().unwrap().to_string(), pod_cidr(0));
}

/// Test 4b: the API server down at start is waited for; when it comes, flanneld is ready.
#[test]
fn kube_waits_for_the_apiserver() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_kube_peers!();
    let k = KubeCluster::new(peers, 1, Backend::HostGw);
    k.create_node(0);
    k.cp.stop_apiserver();
    k.c.host(0).start().unwrap();
    waits_with(&k, 0, "waiting for the Kubernetes API server");
    k.cp.start_apiserver().unwrap();
    k.c.host(0).wait_ready(READY).unwrap();
}

/// Test 8: the manifest's ClusterRole is enough (every other kube test runs with it); without
/// `nodes/status patch` flanneld says so and is not ready.
#[test]
fn kube_token_without_status_patch_is_a_clear_error() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_kube_peers!();
    let k = KubeCluster::new(peers, 1, Backend::Vxlan);
    let limited = k.cp.bind_role_without_status_patch().unwrap();
    k.set_kube(0, &limited);
    k.create_node(0);
    k.c.host(0).start().unwrap();
    waits_with(&k, 0, "nodes/status patch");
    let log = k.c.host(0).log_tail(200);
    assert!(log.contains("forbidden"), "{log}");
}

/// The DaemonSet sets no `NODE_NAME`, only `POD_NAME` and `POD_NAMESPACE`: flanneld reads its
/// Pod's `spec.nodeName` (the manifest's `pods get`) and runs as that Node.
#[test]
fn kube_finds_its_node_from_its_pod() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_kube_peers!();
    let k = KubeCluster::new(peers, 1, Backend::Vxlan);
    k.create_node(0);
    let pod = "kube-flannel-ds-pod-test";
    k.cp.create_pod("kube-flannel", pod, &node_name(0)).unwrap();
    let h = k.c.host(0);
    let mut mode = h.kube().expect("kube mode");
    mode.node_name = String::new();
    h.set_kube(Some(mode));
    h.set_env("POD_NAME", pod);
    h.set_env("POD_NAMESPACE", "kube-flannel");
    h.start().unwrap();
    h.wait_ready(READY).unwrap();
    let log = h.log_tail(200);
    assert!(log.contains("this is Node \"node0\""), "{log}");
    assert_eq!(h.subnet().unwrap().to_string(), pod_cidr(0));
    assert_eq!(k.annotations(0)["kube-subnet-manager"], "true");
}
