//! The Kubernetes control plane of the test bed (root only; kube-apiserver, kubectl and etcd 3.6
//! from scripts/kube-peers.sh): Nodes made through the API, reachable over the underlay from a
//! host's namespace, flannel's token limited to exactly the manifest's ClusterRole, data kept
//! across an apiserver restart, everything gone after drop.

use std::time::Duration;

use netns_tests::kube::{wait_nodes, ControlPlane, FLANNEL_LIMITED_TOKEN, FLANNEL_TOKEN};
use netns_tests::{require_kube_peers, require_test_bed, unique_prefix, Netns, Underlay};

const PREFIX: &str = "flannel.alpha.coreos.com/";

fn forbidden(result: netns_tests::Result<String>, what: &str) {
    match result {
        Ok(out) => panic!("{what}: allowed, but the role does not grant it: {out}"),
        Err(e) => assert!(e.to_string().contains("Forbidden"), "{what}: {e}"),
    }
}

#[test]
fn control_plane_serves_nodes_to_the_manifests_role_and_keeps_them_across_a_restart() {
    require_test_bed!();
    let peers = require_kube_peers!();
    let prefix = unique_prefix();
    let underlay = Underlay::new(&prefix).expect("underlay");
    let cp = ControlPlane::start_on(peers, &underlay, &prefix, false).expect("control plane");
    // A host of the cluster, as flanneld's would be.
    let host = Netns::create(&format!("{prefix}-h0")).expect("host namespace");
    underlay
        .attach(&host, "h0", Underlay::host_ip(0))
        .expect("host on the underlay");

    // What a controller-manager would do: Nodes with podCIDRs, one assigned after creation.
    cp.create_node("node-a", &["10.244.1.0/24"], &[]).unwrap();
    cp.create_node(
        "node-b",
        &["10.244.2.0/24", "fd00:10:244:2::/64"],
        &[(&format!("{PREFIX}kube-subnet-manager"), "true")],
    )
    .unwrap();
    cp.create_node("node-c", &[], &[]).unwrap();
    assert_eq!(
        cp.node("node-c").unwrap()["spec"]["podCIDR"],
        serde_json::Value::Null
    );
    cp.set_pod_cidrs("node-c", &["10.244.3.0/24"]).unwrap();
    assert_eq!(
        cp.node("node-c").unwrap()["spec"]["podCIDR"],
        "10.244.3.0/24"
    );
    let b = cp.node("node-b").unwrap();
    assert_eq!(
        b["spec"]["podCIDRs"],
        serde_json::json!(["10.244.2.0/24", "fd00:10:244:2::/64"])
    );
    assert_eq!(
        b["metadata"]["annotations"][format!("{PREFIX}kube-subnet-manager")],
        "true"
    );
    cp.set_network_unavailable("node-a", true).unwrap();
    assert_eq!(
        cp.network_unavailable("node-a").unwrap().unwrap()["status"],
        "True"
    );

    // flannel's token, bound by the manifest's own ClusterRoleBinding, used from the host.
    let flannel = cp
        .bind_flannel_token()
        .expect("the manifest's RBAC objects");
    let as_flannel = |args: &[&str]| cp.kubectl_from(host.name(), &flannel, args);
    let listed = as_flannel(&["get", "nodes", "-o", "name"]).expect("nodes list");
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        ["node/node-a", "node/node-b", "node/node-c"]
    );
    // flannel's annotation patch: strategic merge on the status subresource, no GET before.
    let patch = serde_json::json!({"metadata": {"annotations": {
        format!("{PREFIX}public-ip"): "198.18.0.10"}}});
    let (code, body) = cp
        .patch_node_status(Some(host.name()), FLANNEL_TOKEN, "node-a", &patch)
        .unwrap();
    assert_eq!(code, 200, "nodes/status patch is granted: {body}");
    assert_eq!(
        cp.annotations("node-a").unwrap()[&format!("{PREFIX}public-ip")],
        "198.18.0.10"
    );
    cp.create_pod("kube-flannel", "kube-flannel-ds-a", "node-a")
        .unwrap();
    let node_name = as_flannel(&[
        "get",
        "pod",
        "-n",
        "kube-flannel",
        "kube-flannel-ds-a",
        "-o",
        "jsonpath={.spec.nodeName}",
    ])
    .expect("pods get is granted");
    assert_eq!(node_name, "node-a");

    // What the role lacks is refused.
    forbidden(as_flannel(&["delete", "node", "node-b"]), "delete a Node");
    let (code, body) = cp
        .request(
            Some(host.name()),
            FLANNEL_TOKEN,
            "PATCH",
            "/api/v1/nodes/node-a",
            Some(("application/strategic-merge-patch+json", &patch.to_string())),
        )
        .unwrap();
    assert_eq!(code, 403, "patch a Node (not its status): {body}");
    forbidden(as_flannel(&["get", "pods", "-A"]), "list Pods");
    forbidden(as_flannel(&["get", "secrets", "-A"]), "list Secrets");

    // The variant without nodes/status patch: reads, but cannot write the annotations.
    let limited = cp.bind_role_without_status_patch().unwrap();
    let as_limited = |args: &[&str]| cp.kubectl_from(host.name(), &limited, args);
    as_limited(&["get", "node", "node-a", "-o", "name"]).expect("nodes get is granted");
    let (code, body) = cp
        .patch_node_status(Some(host.name()), FLANNEL_LIMITED_TOKEN, "node-a", &patch)
        .unwrap();
    assert_eq!(code, 403, "nodes/status patch without the rule: {body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains(r#"cannot patch resource "nodes/status""#),
        "{body}"
    );

    // An outage: the apiserver goes, etcd and its data stay.
    cp.stop_apiserver();
    assert!(
        as_flannel(&["get", "nodes"]).is_err(),
        "the apiserver is stopped"
    );
    cp.start_apiserver().expect("apiserver back");
    wait_nodes(&cp, &["node-a", "node-b", "node-c"], Duration::from_secs(5)).unwrap();
    assert_eq!(
        cp.annotations("node-a").unwrap()[&format!("{PREFIX}public-ip")],
        "198.18.0.10"
    );
    cp.delete_node("node-c").unwrap();
    wait_nodes(&cp, &["node-a", "node-b"], Duration::from_secs(5)).unwrap();

    // Drop removes the processes, the namespace and the directory.
    let ns = cp.netns().unwrap().to_string();
    let dir = cp.dir().to_path_buf();
    let pids = [cp.apiserver_pid().unwrap(), cp.etcd_pid().unwrap()];
    drop(cp);
    assert!(!netns_tests::netns::list().contains(&ns), "{ns} is left");
    assert!(!dir.exists(), "{} is left", dir.display());
    for pid in pids {
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok();
        assert!(!alive, "process {pid} is left");
    }
}
