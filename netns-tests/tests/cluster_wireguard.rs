//! Hosts with the wireguard backend (root only). Where the kernel has the WireGuard module,
//! flanneld configures the kernel device over generic netlink; where it has not (as on the
//! CI machine), it falls back to its userspace engine and says so. Either way every pod
//! reaches every other, and the underlay carries only WireGuard messages (data as type-4
//! transport messages, no inner IP header in the clear).

use std::time::Duration;

use netns_tests::capture::{address_pairs, assert_wireguard_only_while, WireguardUnderlay};
use netns_tests::traffic::tcp_transfer;
use netns_tests::{Cluster, Pod};
use serde_json::json;

const REACH: Duration = Duration::from_secs(20);
const PORT: u16 = 51820;

fn cluster(hosts: usize) -> Cluster {
    Cluster::builder()
        .hosts(hosts)
        .backend_json(json!({"Type": "wireguard", "PersistentKeepaliveInterval": 25}))
        .build()
        .expect("cluster")
}

fn reach(a: &Pod, b: &Pod) {
    a.wait_reaches(b.ip(), REACH)
        .unwrap_or_else(|e| panic!("{} → {}: {e}", a.ip(), b.ip()));
}

fn log(c: &Cluster, i: usize) -> String {
    std::fs::read_to_string(c.host(i).log_path()).unwrap_or_default()
}

/// Whether this kernel creates links of kind `wireguard` (tried in host 0's namespace).
fn kernel_has_wireguard(c: &Cluster) -> bool {
    let ns = c.host(0).netns();
    let made = ns
        .command("ip")
        .args(["link", "add", "wgtest-probe", "type", "wireguard"])
        .output()
        .expect("ip runs")
        .status
        .success();
    if made {
        let _ = ns
            .command("ip")
            .args(["link", "del", "wgtest-probe"])
            .status();
    }
    made
}

#[test]
fn wireguard_every_pod_reaches_every_pod_and_the_underlay_carries_only_wireguard() {
    netns_tests::require_test_bed!();
    let c = cluster(3);
    let kernel = kernel_has_wireguard(&c);
    for i in 0..3 {
        let lease = c.lease_of(i).unwrap().expect("host has a lease");
        assert_eq!(
            lease.backend_type.as_deref(),
            Some("wireguard"),
            "{:?}",
            lease.value
        );
        let v = &lease.value;
        assert_eq!(v["BackendData"]["Port"], json!(PORT), "{v}");
        assert_eq!(
            v["BackendData"]["PublicKey"].as_str().map(str::len),
            Some(44),
            "{v}"
        );
        assert_eq!(c.host(i).subnet_env().unwrap()["FLANNEL_MTU"], "1420");
        let l = log(&c, i);
        if kernel {
            assert!(
                l.contains("wireguard: kernel WireGuard on flannel-wg"),
                "host {i}: the kernel device is used:\n{l}"
            );
            let link = c
                .host(i)
                .netns()
                .command("ip")
                .args(["-d", "link", "show", "flannel-wg"])
                .output()
                .unwrap();
            assert!(
                String::from_utf8_lossy(&link.stdout).contains("wireguard"),
                "{link:?}"
            );
        } else {
            assert!(
                l.contains("kernel WireGuard unavailable")
                    && l.contains("using the userspace engine"),
                "host {i}: the fallback is chosen and logged:\n{l}"
            );
        }
        let key = c.host(i).wireguard_key_file();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        let secret = std::fs::read_to_string(&key).unwrap();
        assert!(
            !l.contains(secret.trim()),
            "host {i} logged its private key"
        );
    }
    let mut pods: Vec<Pod> = (0..3).map(|i| c.add_pod(i).expect("pod")).collect();
    pods.push(c.add_pod(0).expect("second pod on host 0"));
    for a in &pods {
        for b in &pods {
            if a.ip() != b.ip() {
                reach(a, b);
            }
        }
    }
    c.assert_connected(&pods, 4 << 20);

    // A transfer from host 0's pod to host 1's pod, watched on host 1's underlay link: the
    // receiver hashes what it got (a mismatch is an error), the wire shows only WireGuard.
    let (a, b) = (&pods[0], &pods[1]);
    let expect = WireguardUnderlay {
        link: "eth0",
        port: PORT,
        v6: false,
        min_transport_bytes: 2 << 20,
        inner: address_pairs(a.ip().into(), b.ip().into()),
    };
    assert_wireguard_only_while(c.host(1).netns(), &expect, || {
        tcp_transfer(a, b, 2 << 20).expect("checksummed transfer over wireguard")
    });
    // The kernel device keeps its own counters (`wg show`); ours are the userspace engine's.
    for i in (0..3).filter(|_| !kernel) {
        let m = c.host(i).metrics().unwrap();
        let get = |k: &str| m.get(k).copied().unwrap_or(-1.0);
        assert!(
            get(r#"flannel_wireguard_packets_total{direction="tx"}"#) > 0.0,
            "{m:?}"
        );
        assert!(
            get(r#"flannel_wireguard_packets_total{direction="rx"}"#) > 0.0,
            "{m:?}"
        );
        assert!(
            get(
                r#"flannel_wireguard_handshake_messages_total{message="initiation",direction="tx"}"#
            ) + get(
                r#"flannel_wireguard_handshake_messages_total{message="initiation",direction="rx"}"#
            ) > 0.0,
            "{m:?}"
        );
        assert_eq!(
            get(r#"flannel_wireguard_drops_total{direction="rx",reason="spoofed_source"}"#),
            0.0
        );
    }
}
