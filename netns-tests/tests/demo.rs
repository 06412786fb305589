//! The demo (`scripts/demo.sh` runs `netns-demo`), short form, for every backend (root only):
//! 2 hosts, pods ping across them, and it ends with a `flanneld status` that says OK.

use std::process::Command;

fn demo(backend: &str, name: &str) {
    netns_tests::require_test_bed!();
    // The demo finds flanneld and the CNI plugin the way the test bed does (FLANNELD_BIN, ...).
    netns_tests::bins::flanneld_bin().expect("flanneld binary");
    let out = Command::new(env!("CARGO_BIN_EXE_netns-demo"))
        .args(["--backend", backend, "--hosts", "2", "--name", name])
        .output()
        .expect("run netns-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo --backend {backend}: {}\n{stdout}\n{stderr}",
        out.status
    );
    let status = stdout
        .split_once("== flanneld status on ")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no flanneld status in the demo's output:\n{stdout}"));
    assert!(status.contains("Status    OK"), "{status}");
    assert!(status.contains(&format!("backend {backend}")), "{status}");
    assert!(stdout.contains("demo OK"), "{stdout}");
}

#[test]
fn demo_vxlan() {
    demo("vxlan", "dmvx");
}

#[test]
fn demo_host_gw() {
    demo("host-gw", "dmhg");
}

#[test]
fn demo_udp() {
    demo("udp", "dmudp");
}

#[test]
fn demo_alloc() {
    demo("alloc", "dmal");
}
