//! dist/kube-flannel.yml against a real kube-apiserver (root only; scripts/kube-peers.sh): the
//! server accepts every object (`kubectl apply --dry-run=server`, strict field validation), the
//! ClusterRole grants exactly flanneld's needs, and the DaemonSet's install step is a command
//! our flanneld runs as written.

use std::path::Path;

use netns_tests::kube::{manifest_path, ControlPlane, KubeOptions};
use netns_tests::{flanneld_bin, require_kube_peers, require_root, unique_prefix, Netns};
use serde_json::{json, Value};

fn control_plane(ns: &Netns) -> ControlPlane {
    let peers = netns_tests::kube::kube_peers().expect("kube peers");
    ControlPlane::start(
        peers,
        KubeOptions {
            netns: Some(ns.name().to_string()),
            ..KubeOptions::default()
        },
    )
    .expect("control plane")
}

fn dry_run(cp: &ControlPlane, manifest: &Path) -> netns_tests::Result<String> {
    cp.kubectl(&[
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        &manifest.display().to_string(),
    ])
}

/// One control plane (its start is the costly part) for both checks.
#[test]
fn the_manifest_is_accepted_by_the_apiserver_and_its_install_step_works() {
    require_root!();
    let _peers = require_kube_peers!();
    let ns = Netns::create(&format!("{}-kube", unique_prefix())).unwrap();
    let cp = control_plane(&ns);
    the_server_accepts_it_and_the_role_grants_only_flannels_needs(&cp);
    its_install_step_installs_plugin_and_conflist(&cp);
}

fn the_server_accepts_it_and_the_role_grants_only_flannels_needs(cp: &ControlPlane) {
    // A dry run creates nothing, so the objects in the manifest's own Namespace would be refused
    // for want of it: that Namespace (from the manifest) is made for real first.
    let namespace = cp
        .manifest_objects()
        .unwrap()
        .into_iter()
        .find(|o| o["kind"] == "Namespace")
        .expect("the manifest has its Namespace");
    cp.apply(&namespace).unwrap();
    let out = dry_run(cp, &manifest_path()).expect("server-side dry run of the manifest");
    for object in [
        "namespace/kube-flannel",
        "serviceaccount/flannel",
        "clusterrole.rbac.authorization.k8s.io/flannel",
        "clusterrolebinding.rbac.authorization.k8s.io/flannel",
        "configmap/kube-flannel-cfg",
        "daemonset.apps/kube-flannel-ds",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(object) && l.ends_with("(server dry run)")),
            "{object} not accepted:\n{out}"
        );
    }

    // The server does refuse what is wrong: a misspelled field in the DaemonSet.
    let bad = tempfile::NamedTempFile::new().unwrap();
    let text = std::fs::read_to_string(manifest_path()).unwrap();
    assert!(text.contains("hostNetwork: true"));
    std::fs::write(
        bad.path(),
        text.replace("hostNetwork: true", "hostNetwrok: true"),
    )
    .unwrap();
    let err = dry_run(cp, bad.path()).expect_err("a misspelled field is refused");
    assert!(err.to_string().contains("hostNetwrok"), "{err}");

    let role = cp.manifest_cluster_role().unwrap();
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
        ])
    );
}

/// The DaemonSet's `install-cni` init container, run with our flanneld: its paths moved into a
/// temporary directory, the ConfigMap's `cni-conf.json` as the conflist.
fn its_install_step_installs_plugin_and_conflist(cp: &ControlPlane) {
    let objects = cp.manifest_objects().unwrap();
    let find = |kind: &str| -> Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in the manifest"))
            .clone()
    };
    let ds = find("DaemonSet");
    let cm = find("ConfigMap");
    let init = &ds["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(init["name"], "install-cni");
    let command: Vec<String> = init["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(command[..2], ["/usr/local/bin/flanneld", "install-cni"]);
    let container_image = ds["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    assert_eq!(init["image"], container_image, "one image is the parameter");

    // The container's filesystem, under a temporary root.
    let root = tempfile::tempdir().unwrap();
    let under = |p: &str| root.path().join(p.trim_start_matches('/'));
    std::fs::create_dir_all(under("/usr/local/bin")).unwrap();
    std::fs::create_dir_all(under("/opt/cni/bin")).unwrap();
    std::fs::create_dir_all(under("/etc/cni/net.d")).unwrap();
    std::fs::create_dir_all(under("/etc/kube-flannel")).unwrap();
    std::fs::write(under("/usr/local/bin/flannel"), b"\x7fELF plugin").unwrap();
    let conf = cm["data"]["cni-conf.json"].as_str().unwrap();
    std::fs::write(under("/etc/kube-flannel/cni-conf.json"), conf).unwrap();
    let args: Vec<String> = command[2..]
        .iter()
        .map(|a| match a.split_once("=/") {
            Some((flag, path)) => format!("{flag}={}", under(&format!("/{path}")).display()),
            None => a.clone(),
        })
        .collect();
    let out = std::process::Command::new(flanneld_bin().unwrap())
        .arg("install-cni")
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "flanneld install-cni {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(under("/opt/cni/bin/flannel")).unwrap(),
        b"\x7fELF plugin"
    );
    assert_eq!(
        std::fs::read_to_string(under("/etc/cni/net.d/10-flannel.conflist")).unwrap(),
        conf
    );
}
