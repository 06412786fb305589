//! Hosts with the udp backend (root only), on the fast path and on the plain path
//! (`"Plain": true` in the Backend object, the same switch as `FLANNEL_UDP_PLAIN=1`).
//!
//! The udp backend's peer table lives in user space, so convergence is judged by traffic:
//! every pod reaches every other, a host that leaves is answered for with ICMP net
//! unreachable, a host that joins becomes reachable.

use std::net::{Ipv4Addr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use netns_tests::packet::ipv4_udp;
use netns_tests::{Cluster, Pod};
use serde_json::json;

const REACH: Duration = Duration::from_secs(20);

fn cluster(hosts: usize, plain: bool) -> Cluster {
    Cluster::builder()
        .hosts(hosts)
        .backend_json(json!({"Type": "udp", "Plain": plain}))
        .build()
        .expect("cluster")
}

/// The flanneld log line that says which data path runs.
fn path_line(c: &Cluster, i: usize) -> String {
    let log = std::fs::read_to_string(c.host(i).log_path()).unwrap_or_default();
    log.lines()
        .find(|l| l.contains("udp: flannel0"))
        .unwrap_or("(no data-path line in the log)")
        .to_string()
}

/// Waits until `a` reaches `b` (the peer table is filled when the watch delivers the lease).
fn reach(a: &Pod, b: &Pod) {
    a.wait_reaches(b.ip(), REACH)
        .unwrap_or_else(|e| panic!("{} → {}: {e}", a.ip(), b.ip()));
}

/// Runs ping in `pod` and returns (success, output).
fn ping_out(pod: &Pod, dst: Ipv4Addr) -> (bool, String) {
    let out = pod
        .netns()
        .command("ping")
        .args(["-n", "-c", "1", "-W", "1", &dst.to_string()])
        .output()
        .expect("ping runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn every_pod_reaches_every_pod(plain: bool) {
    let c = cluster(3, plain);
    for i in 0..3 {
        let line = path_line(&c, i);
        let want = if plain { "plain path" } else { "fast path" };
        assert!(line.contains(want), "host {i}: {line}");
        let lease = c.lease_of(i).unwrap().expect("host has a lease");
        // flannel's udp backend writes no BackendType; ours must look the same.
        assert_eq!(lease.backend_type, None, "{:?}", lease.value);
        assert_eq!(lease.subnet, c.host(i).subnet().unwrap());
        let env = c.host(i).subnet_env().unwrap();
        assert_eq!(env["FLANNEL_MTU"], "1472");
        assert!(c.host(i).link_mac("flannel0").is_ok());
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
    c.assert_connected(&pods, 8 << 20);
    for i in 0..3 {
        let m = c.host(i).metrics().unwrap();
        let get = |k: &str| m.get(k).copied().unwrap_or(-1.0);
        assert!(
            get(r#"flannel_udp_packets_total{direction="tx"}"#) > 0.0,
            "{m:?}"
        );
        assert!(
            get(r#"flannel_udp_packets_total{direction="rx"}"#) > 0.0,
            "{m:?}"
        );
        assert_eq!(
            get(r#"flannel_udp_drops_total{direction="rx",reason="malformed"}"#),
            0.0
        );
    }
}

#[test]
fn udp_fast_every_pod_reaches_every_pod() {
    netns_tests::require_test_bed!();
    every_pod_reaches_every_pod(false);
}

#[test]
fn udp_plain_every_pod_reaches_every_pod() {
    netns_tests::require_test_bed!();
    every_pod_reaches_every_pod(true);
}

fn non_peer_datagram_is_dropped(plain: bool) {
    let c = cluster(2, plain);
    let a = c.add_pod(0).unwrap();
    let b = c.add_pod(1).unwrap();
    reach(&a, &b);
    let target = c.host(1).public_ip();
    let (ready_tx, ready_rx) = mpsc::channel();
    let (pkt_rogue, pkt_spoofed) = (
        ipv4_udp(a.ip(), b.ip(), 9999, b"rogue"),
        ipv4_udp(a.ip(), b.ip(), 9999, b"spoofed"),
    );
    let got = std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            b.netns()
                .run_in(|| {
                    let sock = UdpSocket::bind((b.ip(), 9999)).unwrap();
                    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    ready_tx.send(()).unwrap();
                    let mut got = Vec::new();
                    let mut buf = [0u8; 2048];
                    while let Ok(n) = sock.recv(&mut buf) {
                        got.push(buf[..n].to_vec());
                    }
                    got
                })
                .unwrap()
        });
        ready_rx.recv().unwrap();
        // etcd's namespace is on the underlay and holds no lease.
        c.etcd()
            .netns()
            .run_in(|| {
                let sock = UdpSocket::bind((c.etcd().ip(), 8285)).unwrap();
                for _ in 0..3 {
                    sock.send_to(&pkt_rogue, (target, 8285)).unwrap();
                }
            })
            .unwrap();
        // From a peer's public IP, but not from flanneld's port: dropped as spoofed.
        c.host(0)
            .netns()
            .run_in(|| {
                let sock = UdpSocket::bind((c.host(0).public_ip(), 0)).unwrap();
                for _ in 0..2 {
                    sock.send_to(&pkt_spoofed, (target, 8285)).unwrap();
                }
            })
            .unwrap();
        // The same packet sent by the pod through flanneld is delivered, so the drops are no
        // accident.
        a.netns()
            .run_in(|| {
                let sock = UdpSocket::bind((a.ip(), 4000)).unwrap();
                sock.send_to(b"peer", (b.ip(), 9999)).unwrap();
            })
            .unwrap();
        receiver.join().unwrap()
    });
    assert_eq!(got, vec![b"peer".to_vec()]);
    let dropped = c
        .host(1)
        .metric(r#"flannel_udp_drops_total{direction="rx",reason="unknown_source"}"#)
        .unwrap();
    assert_eq!(dropped, 3.0);
    let spoofed = c
        .host(1)
        .metric(r#"flannel_udp_drops_total{direction="rx",reason="spoofed_source"}"#)
        .unwrap();
    assert_eq!(spoofed, 2.0);
}

#[test]
fn udp_fast_datagram_from_a_non_peer_is_not_delivered() {
    netns_tests::require_test_bed!();
    non_peer_datagram_is_dropped(false);
}

#[test]
fn udp_plain_datagram_from_a_non_peer_is_not_delivered() {
    netns_tests::require_test_bed!();
    non_peer_datagram_is_dropped(true);
}

fn leave_and_join(plain: bool) {
    let mut c = cluster(3, plain);
    let p0 = c.add_pod(0).unwrap();
    let p2 = c.add_pod(2).unwrap();
    reach(&p0, &p2);
    // Host 2 leaves: flanneld stops and its lease is deleted.
    let lease = c.lease_of(2).unwrap().expect("host 2 has a lease");
    c.host(2).stop();
    assert_eq!(c.etcd().del(&lease.key).unwrap(), 1);
    let deadline = Instant::now() + REACH;
    loop {
        let (ok, out) = ping_out(&p0, p2.ip());
        if !ok && out.contains("Destination Net Unreachable") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "host 2 left, yet pod 0 does not get net unreachable: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        c.host(0)
            .metric("flannel_udp_icmp_unreachable_total")
            .unwrap()
            >= 1.0
    );
    // A new host joins: reachable.
    let i = c.add_host().expect("host joins");
    let p3 = c.add_pod(i).unwrap();
    reach(&p0, &p3);
    reach(&p3, &p0);
    // Host 2 comes back (its old subnet from its subnet file): reachable again.
    c.host(2).start().unwrap();
    c.host(2).wait_ready(REACH).unwrap();
    reach(&p0, &p2);
    reach(&p2, &p3);
}

#[test]
fn udp_fast_host_leaves_unreachable_then_joins_reachable() {
    netns_tests::require_test_bed!();
    leave_and_join(false);
}

#[test]
fn udp_plain_host_leaves_unreachable_then_joins_reachable() {
    netns_tests::require_test_bed!();
    leave_and_join(true);
}
