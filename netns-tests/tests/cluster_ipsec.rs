//! The ipsec backend with one strongSwan charon per host namespace (root only).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use netns_tests::capture::{packet_socket, receive_until, Frames};
use netns_tests::charon::{self, Charon};
use netns_tests::privileges::{Need, TEST_BED};
use netns_tests::{wait_until, Cluster, Pod};
use serde_json::json;

const PSK: &str = "0123456789abcdef0123456789abcdef0123456789abcdef\
                   0123456789abcdef0123456789abcdef0123456789abcdef";
/// Pods reach each other once both charons have negotiated the SA (IKE with MODP-4096).
const SA_UP: Duration = Duration::from_secs(60);

fn needs() -> Vec<Need<'static>> {
    let mut n = TEST_BED.to_vec();
    n.extend([
        Need::File(charon::CHARON_BIN),
        Need::File(charon::SWANCTL_BIN),
        Need::File("/usr/lib/ipsec/plugins/libstrongswan-openssl.so"),
        Need::File("/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so"),
    ]);
    n
}

/// A cluster of `n` ipsec hosts, each with its charon (returned in host order), flanneld
/// started after its charon and ready.
fn ipsec_cluster(n: usize, backend: serde_json::Value) -> (Cluster, Vec<Charon>) {
    let c = Cluster::builder()
        .hosts(n)
        .backend_json(backend)
        .no_start()
        .build()
        .expect("cluster");
    let charons: Vec<Charon> = c
        .hosts()
        .iter()
        .map(|h| Charon::start(h.netns(), &h.dir().join("charon")).expect("charon"))
        .collect();
    for (h, ch) in c.hosts().iter().zip(&charons) {
        h.set_env(
            "FLANNELD_IPSEC_VICI_SOCKET",
            &ch.vici_socket().display().to_string(),
        );
        h.start().expect("flanneld");
    }
    c.wait_all_ready(0..n).expect("flanneld ready");
    (c, charons)
}

fn backend() -> serde_json::Value {
    json!({"Type": "ipsec", "PSK": PSK})
}

/// Waits until every pod reaches every other one (the SAs are negotiated on demand and at load).
fn wait_mesh(pods: &[Pod]) {
    for a in pods {
        for b in pods {
            if a.host_index() != b.host_index() {
                a.wait_reaches(b.ip(), SA_UP)
                    .unwrap_or_else(|e| panic!("{} → {}: {e}", a.name(), b.name()));
            }
        }
    }
}

/// What the underlay of one host carried while it was watched.
#[derive(Debug, Default)]
struct Seen {
    /// IPv4 packets between two host addresses carrying ESP (IP protocol 50, or UDP port 4500
    /// with a non-zero SPI where IKE has its zero marker).
    esp: u64,
    /// IKE (UDP 500, or 4500 with the zero marker).
    ike: u64,
    /// IPv4 packets whose outer addresses are pod addresses: pod traffic in the clear.
    plaintext_outer: u64,
    /// Packets carrying a pod pair's addresses as an inner IPv4 header's source and
    /// destination: pod traffic encapsulated but not encrypted.
    plaintext_inner: u64,
    other: u64,
}

/// Counts the frames of `dev` in namespace `ns` on a thread of its own, until stopped.
struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Seen>>,
}

impl Capture {
    fn start(
        ns: &str,
        dev: &str,
        network: ipnetwork::Ipv4Network,
        pod_ips: Vec<Ipv4Addr>,
    ) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, dev, flag) = (ns.to_string(), dev.to_string(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            netns_tests::netns::enter(&ns).expect("enter host namespace");
            let fd = packet_socket(&dev, Frames::All).expect("capture socket");
            ready_tx.send(()).unwrap();
            let pairs: Vec<[u8; 8]> = pod_ips
                .iter()
                .flat_map(|a| pod_ips.iter().map(move |b| (a, b)))
                .filter(|(a, b)| a != b)
                .map(|(a, b)| {
                    let mut p = [0u8; 8];
                    p[..4].copy_from_slice(&a.octets());
                    p[4..].copy_from_slice(&b.octets());
                    p
                })
                .collect();
            let mut seen = Seen::default();
            receive_until(&fd, &flag, |frame| {
                classify(frame, &network, &pairs, &mut seen)
            });
            seen
        });
        ready_rx.recv().expect("capture started");
        Capture {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("capture thread")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sorts one Ethernet frame into `seen`.
fn classify(frame: &[u8], network: &ipnetwork::Ipv4Network, pairs: &[[u8; 8]], seen: &mut Seen) {
    if pairs
        .iter()
        .any(|p| frame.windows(8).skip(14).any(|w| w == p))
    {
        seen.plaintext_inner += 1;
    }
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        seen.other += 1;
        return;
    }
    let ip = &frame[14..];
    let header = usize::from(ip[0] & 0x0f) * 4;
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    if network.contains(src) || network.contains(dst) {
        seen.plaintext_outer += 1;
        return;
    }
    let payload = &ip[header.min(ip.len())..];
    match ip[9] {
        50 => seen.esp += 1,
        17 if payload.len() >= 12 => {
            let dport = u16::from_be_bytes([payload[2], payload[3]]);
            let sport = u16::from_be_bytes([payload[0], payload[1]]);
            let marker = &payload[8..12];
            if dport == 500 || sport == 500 || marker == [0, 0, 0, 0] {
                seen.ike += 1;
            } else if dport == 4500 || sport == 4500 {
                seen.esp += 1;
            } else {
                seen.other += 1;
            }
        }
        _ => seen.other += 1,
    }
}

#[test]
fn ipsec_every_pod_reaches_every_pod_and_the_underlay_carries_only_esp() {
    netns_tests::require_all!(&needs());
    let (c, charons) = ipsec_cluster(3, backend());
    for (i, h) in c.hosts().iter().enumerate() {
        let lease = c.lease_of(i).unwrap().expect("host has a lease");
        assert_eq!(lease.backend_type.as_deref(), Some("ipsec"));
        assert!(
            lease.value.get("BackendData").is_none_or(|d| d.is_null()),
            "flannel publishes no BackendData for ipsec: {}",
            lease.value
        );
        // flannel's figure: the external MTU less 77 bytes of ESP overhead.
        assert_eq!(h.subnet_env().unwrap()["FLANNEL_MTU"], "1423");
        // One connection per peer, named as flannel names them.
        let conns = charons[i].conns().unwrap();
        assert_eq!(conns.len(), 2, "{conns:?}");
        assert!(
            conns
                .iter()
                .all(|n| n.starts_with(&format!("{}-{}-", h.public_ip(), lease.subnet))),
            "{conns:?}"
        );
    }
    let mut pods: Vec<Pod> = (0..3).map(|i| c.add_pod(i).expect("pod")).collect();
    pods.push(c.add_pod(0).expect("second pod on host 0"));
    wait_mesh(&pods);

    let network = "10.5.0.0/16".parse().unwrap();
    let pod_ips = pods.iter().map(Pod::ip).collect();
    let capture = Capture::start(c.hosts()[0].name(), "eth0", network, pod_ips);
    c.assert_connected(&pods, 1 << 20);
    let seen = capture.finish();
    eprintln!("underlay of host 0: {seen:?}");
    assert!(seen.esp > 500, "pod traffic went as ESP: {seen:?}");
    assert_eq!(
        seen.plaintext_outer, 0,
        "pod packets on the underlay: {seen:?}"
    );
    assert_eq!(
        seen.plaintext_inner, 0,
        "unencrypted inner packets: {seen:?}"
    );
}

#[test]
fn ipsec_a_host_that_leaves_has_its_sas_removed_on_peers() {
    netns_tests::require_all!(&needs());
    let (c, charons) = ipsec_cluster(3, backend());
    let pods: Vec<Pod> = (0..3).map(|i| c.add_pod(i).expect("pod")).collect();
    wait_mesh(&pods);
    let gone = c.hosts()[2].public_ip();
    for ch in &charons[..2] {
        assert!(ch.has_child_sa_with(gone).unwrap(), "{}", ch.sas().unwrap());
    }

    // Host 2 leaves: its flanneld stops and its lease goes; its charon stays and keeps asking.
    let lease = c.lease_of(2).unwrap().expect("lease");
    c.hosts()[2].kill9();
    assert_eq!(c.etcd().del(&lease.key).unwrap(), 1);
    for (i, ch) in charons[..2].iter().enumerate() {
        wait_until(Duration::from_secs(30), "the peer's SAs removed", || {
            let conns = ch.conns().map_err(|e| e.to_string())?;
            if conns.iter().any(|n| n.ends_with(&format!("-{gone}"))) {
                return Err(format!(
                    "host {i} still has a connection to {gone}: {conns:?}"
                ));
            }
            match ch.has_child_sa_with(gone) {
                Ok(false) => Ok(()),
                Ok(true) => Err(format!("host {i} still has an SA with {gone}")),
                Err(e) => Err(e.to_string()),
            }
        })
        .unwrap();
    }
    // The others still reach each other.
    pods[0].wait_reaches(pods[1].ip(), SA_UP).unwrap();
}

#[test]
fn ipsec_charon_restarted_gets_its_connections_back() {
    netns_tests::require_all!(&needs());
    let (c, charons) = ipsec_cluster(2, backend());
    let pods: Vec<Pod> = (0..2).map(|i| c.add_pod(i).expect("pod")).collect();
    wait_mesh(&pods);

    charons[0].restart().expect("charon restarted");
    assert!(
        charons[0].conns().unwrap().is_empty(),
        "a new charon starts empty"
    );
    wait_until(
        Duration::from_secs(30),
        "flanneld reloads the connection",
        || {
            let conns = charons[0].conns().map_err(|e| e.to_string())?;
            if conns.len() == 1 {
                Ok(())
            } else {
                Err(format!("connections {conns:?}"))
            }
        },
    )
    .unwrap();
    wait_mesh(&pods);
    assert!(c.hosts()[0].is_running());
}

#[test]
fn ipsec_refuses_a_short_psk_naming_the_option() {
    netns_tests::require_all!(&needs());
    let c = Cluster::builder()
        .hosts(1)
        .backend_json(json!({"Type": "ipsec", "PSK": "short"}))
        .no_start()
        .build()
        .expect("cluster");
    let h = &c.hosts()[0];
    h.start().unwrap();
    wait_until(Duration::from_secs(20), "flanneld to exit", || {
        if h.is_running() {
            Err("still running".into())
        } else {
            Ok(())
        }
    })
    .unwrap();
    let log = h.log_tail(20);
    assert!(
        log.contains("PSK") && log.contains("at least 96"),
        "log:\n{log}"
    );
}

/// Our flanneld on host 0, flannel's Go flanneld v0.28.10 on host 1 (it starts its own charon,
/// at flannel's fixed paths, in a mount namespace of its own). Go flanneld installs kernel
/// IPsec policies itself, so this needs a kernel with ESP: charon's userspace ESP cannot serve
/// packets those policies hold back. Kernels without ESP (this CI machine's) cannot run it, so
/// it is ignored by default and fails, rather than passing empty, where it is asked for anyway.
#[test]
#[ignore = "needs a kernel with ESP (CONFIG_INET_ESP): run with --ignored there"]
fn ipsec_mixed_pair_with_flannels_go_flanneld() {
    netns_tests::require_all!(&needs());
    let peers = netns_tests::require_go_peers!();
    let c = Cluster::builder()
        .hosts(2)
        .backend_json(backend())
        .no_start()
        .build()
        .expect("cluster");
    let (ours, go) = (&c.hosts()[0], &c.hosts()[1]);
    assert!(
        charon::kernel_has_esp(go.netns()),
        "this kernel has no ESP (CONFIG_INET_ESP), and flannel's Go flanneld needs the kernel's IPsec"
    );
    let ours_charon = Charon::start(ours.netns(), &ours.dir().join("charon")).expect("charon");
    ours.set_env(
        "FLANNELD_IPSEC_VICI_SOCKET",
        &ours_charon.vici_socket().display().to_string(),
    );
    let conf = charon::conf_for_go_flanneld(go.netns(), &go.dir().join("charon")).unwrap();
    go.set_go_flanneld(Some(&peers.flanneld));
    go.set_env("STRONGSWAN_CONF", &conf.display().to_string());
    go.set_wrapper(charon::PRIVATE_RUN);
    ours.start().unwrap();
    go.start().unwrap();
    c.wait_all_ready(0..2).expect("both ready");
    assert_eq!(
        c.lease_of(1).unwrap().unwrap().backend_type.as_deref(),
        Some("ipsec")
    );

    let pods: Vec<Pod> = (0..2).map(|i| c.add_pod(i).expect("pod")).collect();
    wait_mesh(&pods);
    let network = "10.5.0.0/16".parse().unwrap();
    let capture = Capture::start(
        ours.name(),
        "eth0",
        network,
        pods.iter().map(Pod::ip).collect(),
    );
    c.assert_connected(&pods, 1 << 20);
    let seen = capture.finish();
    eprintln!("underlay of host 0: {seen:?}");
    assert!(seen.esp > 500, "pod traffic went as ESP: {seen:?}");
    assert_eq!(seen.plaintext_outer + seen.plaintext_inner, 0, "{seen:?}");
}
