//! Test 6 (root only): dual stack in Kubernetes mode. Nodes with `podCIDRs` v4 + v6, the vxlan
//! backend: both halves published with flannel's keys, and v4 and v6 pods reach each other.

mod common;
mod kube_common;

use std::net::Ipv6Addr;
use std::time::Duration;

use kube_common::{node_name, pod_cidr, KubeCluster};
use netns_tests::{wait_until, Cluster, Netns, PodMode};

const CONVERGE: Duration = Duration::from_secs(40);

fn pod_cidr_v6(i: usize) -> String {
    format!("fc00:0:0:{}::/64", i + 1)
}

fn reaches6(from: &Netns, dst: Ipv6Addr) {
    let d = dst.to_string();
    wait_until(CONVERGE, &format!("{} to reach {d}", from.name()), || {
        from.exec("ping", &["-6", "-c", "1", "-W", "1", &d])
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .unwrap();
}

#[test]
fn kube_dual_stack_vxlan_pods_reach_each_other() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_kube_peers!();
    let config = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}"#;
    let k = KubeCluster::with_config(
        peers,
        Cluster::builder()
            .hosts(3)
            .config_json(config)
            .pod_mode(PodMode::Static),
    );
    for i in 0..3 {
        k.cp.create_node(&node_name(i), &[&pod_cidr(i), &pod_cidr_v6(i)], &[])
            .unwrap();
    }
    common::start_dual_stack(&k.c, CONVERGE);
    for (i, h) in k.c.hosts().iter().enumerate() {
        assert_eq!(h.subnet().unwrap().to_string(), pod_cidr(i));
        assert_eq!(h.subnet_v6().unwrap().to_string(), pod_cidr_v6(i));
        let a = k.annotations(i);
        assert_eq!(a["public-ipv6"], common::host_v6(i).to_string(), "{a:?}");
        assert_eq!(a["public-ip"], h.public_ip().to_string(), "{a:?}");
        let mac = h.link_mac("flannel-v6.1").unwrap().expect("flannel-v6.1");
        let v6: serde_json::Value =
            serde_json::from_str(a["backend-v6-data"].as_str().unwrap()).unwrap();
        assert_eq!(v6, serde_json::json!({"VNI": 1, "VtepMAC": mac}), "{a:?}");
    }
    let pods: Vec<_> = (0..3).map(|i| k.c.add_pod(i).expect("pod")).collect();
    let v6: Vec<Ipv6Addr> = pods
        .iter()
        .map(|p| {
            let n = p.ip().octets()[3] as u16;
            common::give_v6(k.c.host(p.host_index()), p.netns(), n, false)
        })
        .collect();
    for (i, p) in pods.iter().enumerate() {
        for (j, q) in pods.iter().enumerate() {
            if i != j {
                reaches6(p.netns(), v6[j]);
                p.wait_reaches(q.ip(), CONVERGE).unwrap();
            }
        }
    }
}
