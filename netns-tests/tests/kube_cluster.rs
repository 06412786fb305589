//! Kubernetes mode against a real kube-apiserver (root only): annotations and condition exactly
//! flannel's, pods reaching each other, Nodes deleted and added, annotations restored,
//! `public-ip-overwrite`.

mod kube_common;

use std::time::Duration;

use kube_common::{node_name, pod_cidr, KubeCluster, READY};
use netns_tests::Backend;
use serde_json::json;

/// Test 1: three Nodes; each flanneld writes flannel's annotations and condition, and every pod
/// reaches every other.
fn three_nodes(backend: Backend) {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_kube_peers!();
    let k = KubeCluster::new(peers, 3, backend);
    k.start_all();
    for (i, h) in k.c.hosts().iter().enumerate() {
        assert_eq!(h.subnet().unwrap().to_string(), pod_cidr(i), "subnet file");
        let data = match backend {
            Backend::Vxlan => {
                let mac = h.link_mac("flannel.1").unwrap().expect("flannel.1");
                json!({"VNI": 1, "VtepMAC": mac}).to_string()
            }
            _ => "null".to_string(),
        };
        let want = json!({
            "backend-data": data,
            "backend-type": backend.type_name(),
            "kube-subnet-manager": "true",
            "public-ip": h.public_ip().to_string(),
        });
        assert_eq!(json!(k.annotations(i)), want, "annotations of node{i}");
        let cond = netns_tests::wait_until(
            Duration::from_secs(10),
            "NetworkUnavailable=False",
            || match k.cp.network_unavailable(&node_name(i)) {
                Ok(Some(c)) if c["status"] == "False" => Ok(c),
                other => Err(format!("{other:?}")),
            },
        )
        .unwrap();
        assert_eq!(cond["reason"], "FlannelIsUp");
        assert_eq!(cond["message"], "Flannel is running on this node");
    }
    for i in 0..3 {
        k.wait_peer_everywhere(i, Duration::from_secs(10));
    }
    let pods: Vec<_> = (0..3).map(|i| k.c.add_pod(i).expect("pod")).collect();
    k.c.assert_connected(&pods, 2 << 20);
}

#[test]
fn kube_vxlan_three_nodes_annotations_condition_and_traffic() {
    three_nodes(Backend::Vxlan);
}

#[test]
fn kube_hostgw_three_nodes_annotations_condition_and_traffic() {
    three_nodes(Backend::HostGw);
}

/// Test 2: a Node deleted is gone from every peer within 2 s; a Node added is programmed on
/// every peer within 2 s of its flanneld publishing it.
#[test]
fn kube_node_deleted_and_added_within_two_seconds() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_kube_peers!();
    let mut k = KubeCluster::new(peers, 3, Backend::Vxlan);
    k.start_all();
    k.wait_peer_everywhere(2, Duration::from_secs(10));
    let gone = k.peer(2);
    k.c.host(2).stop();
    k.cp.delete_node(&node_name(2)).unwrap();
    let took =
        k.c.wait_peer_gone(&gone, Duration::from_secs(2))
            .expect("node2 removed");
    eprintln!("node2's routes, neighbours and FDB entries gone in {took:?}");

    let i = k.c.add_host_stopped().unwrap();
    k.set_kube(i, &k.kubeconfig.clone());
    k.create_and_start(i);
    k.c.host(i).wait_ready(READY).unwrap();
    // Its annotations are written before its subnet file; from then on, 2 s for the peers.
    let took = k.wait_peer_everywhere(i, Duration::from_secs(2));
    eprintln!("node{i} programmed on every peer {took:?} after it was ready");
    let pods: Vec<_> = [0, i]
        .iter()
        .map(|&h| k.c.add_pod(h).expect("pod"))
        .collect();
    k.c.assert_connected(&pods, 1 << 20);
}

/// Test 5: an annotation removed by hand is put back; `public-ip-overwrite` set by hand is
/// published and the peers use it.
#[test]
fn kube_annotations_restored_and_overwrite_used_by_peers() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_kube_peers!();
    let k = KubeCluster::new(peers, 2, Backend::Vxlan);
    k.start_all();
    let before = k.annotations(1);
    let key = format!("{}backend-data", kube_common::PREFIX);
    k.cp.patch_annotations(&node_name(1), &[(&key, None)])
        .unwrap();
    netns_tests::wait_until(Duration::from_secs(10), "backend-data restored", || {
        let now = k.annotations(1);
        if now == before {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    })
    .unwrap();

    // An address on the underlay that no host has: the peers' FDB must point there.
    let overwrite = "198.18.0.200";
    let key = format!("{}public-ip-overwrite", kube_common::PREFIX);
    k.cp.patch_annotations(&node_name(1), &[(&key, Some(overwrite))])
        .unwrap();
    netns_tests::wait_until(Duration::from_secs(10), "public-ip = overwrite", || match k
        .annotations(1)
        .get("public-ip")
    {
        Some(v) if v == overwrite => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .unwrap();
    let lease = k.peer(1);
    assert_eq!(lease.public_ip.to_string(), overwrite);
    netns_tests::wait_until(Duration::from_secs(5), "host 0 uses the overwrite", || {
        k.c.check_peer(k.c.host(0), &lease)
    })
    .unwrap();
}
