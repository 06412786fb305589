//! Our wireguard backend against a foreign WireGuard peer (root only): Debian's wireguard-go
//! with `wg`, set up as a flannel wireguard node by the test bed (its lease written into etcd
//! by the test, its peers configured from our lease as flannel's backend would), on host 0;
//! our flanneld on host 1. Both directions: the handshake, pings at the MTU edge, checksummed
//! TCP; refusals (a PSK mismatch, a spoofed inner source, an old key after a rotation); our
//! restart with the same key, key rotation on either side, a lease renewal that changes
//! nothing, a lease deletion; and a handshake flood answered with cookie replies while pod
//! traffic flows.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use netns_tests::cluster::LeaseInfo;
use netns_tests::wireguard_go::{self, generate_psk, key_bytes, NodeSpec, Peer};
use netns_tests::{
    require_all, require_test_bed, tcp_transfer, wait_until, Cluster, HandshakeFlood, Host, Netns,
    Pod, WireguardGo,
};
use serde_json::json;

const NETWORK: &str = "10.5.0.0/16";
/// wireguard-go's subnet (ours is allocated by our flanneld around it).
const THEIR_SUBNET: &str = "10.5.1.0/24";
/// Our keepalive towards wireguard-go. Where a test chooses who starts the handshake ours is
/// off too: our engine, like the kernel's, sends a keepalive (and so an initiation) as soon as a
/// peer with a keepalive is added, which races the test's first packet.
const KEEPALIVE: Option<u16> = Some(25);
/// wireguard-go's keepalive towards us: off, because wireguard-go sends one (and so starts a
/// handshake) the moment a keepalive is configured, and the tests choose who starts.
const THEIR_KEEPALIVE: u16 = 0;
const LEASE_TTL: Duration = Duration::from_secs(3600);
/// Time for a path to work once both sides have what they need (one handshake, retried).
const REACH: Duration = Duration::from_secs(15);
/// How long a refused path is watched: longer than a handshake retry (REKEY_TIMEOUT, 5 s).
const REFUSED_WINDOW: Duration = Duration::from_secs(7);

/// Host 0 runs wireguard-go, host 1 our flanneld; a pod on each.
struct Interop {
    /// `[theirs, ours]`; dropped first.
    pods: Vec<Pod>,
    wg: WireguardGo,
    psk: String,
    c: Cluster,
}

impl Interop {
    /// The two nodes with the network's PSK, each knowing the other.
    fn new() -> Interop {
        Interop::peered(KEEPALIVE)
    }

    /// [`Interop::new`] with our `PersistentKeepaliveInterval` (`None`: not set).
    fn peered(keepalive: Option<u16>) -> Interop {
        let t = Interop::unpeered(keepalive);
        t.sync(&t.psk);
        t
    }

    /// Both nodes running, wireguard-go not yet told about our lease.
    fn unpeered(keepalive: Option<u16>) -> Interop {
        let psk = generate_psk().expect("wg genpsk");
        let mut backend = json!({"Type": "wireguard", "PSK": psk});
        if let Some(k) = keepalive {
            backend["PersistentKeepaliveInterval"] = json!(k);
        }
        let config = json!({"Network": NETWORK, "SubnetLen": 24, "Backend": backend}).to_string();
        let c = Cluster::builder()
            .hosts(2)
            .config_json(&config)
            .no_start()
            .build()
            .expect("cluster");
        let spec = NodeSpec::on_host(
            c.host(0),
            NETWORK.parse().unwrap(),
            THEIR_SUBNET.parse().unwrap(),
        );
        let wg = WireguardGo::start(spec).expect("wireguard-go");
        wg.put_lease(c.etcd(), &c.subnets_prefix(), LEASE_TTL)
            .expect("their lease");
        wg.write_subnet_file(&c.host(0).subnet_file())
            .expect("their subnet file");
        c.host(1).start().expect("our flanneld");
        c.host(1)
            .wait_ready(Duration::from_secs(30))
            .expect("our flanneld ready");
        let pods = vec![
            c.add_pod(0).expect("their pod"),
            c.add_pod(1).expect("our pod"),
        ];
        Interop { pods, wg, psk, c }
    }

    fn ours(&self) -> &Host {
        self.c.host(1)
    }

    fn their_pod(&self) -> &Pod {
        &self.pods[0]
    }

    fn our_pod(&self) -> &Pod {
        &self.pods[1]
    }

    fn our_lease(&self) -> LeaseInfo {
        self.c
            .lease_of(1)
            .expect("etcd")
            .expect("our flanneld has a lease")
    }

    fn our_key(&self) -> String {
        let l = self.our_lease();
        l.value["BackendData"]["PublicKey"]
            .as_str()
            .unwrap_or_else(|| panic!("our lease has no PublicKey: {}", l.value))
            .to_string()
    }

    /// wireguard-go's peers from the leases in etcd, with `psk` for them (what flannel's
    /// backend does on a lease event).
    fn sync(&self, psk: &str) {
        let leases = self.c.leases().expect("leases");
        let peers = self
            .wg
            .sync_peers(&leases, Some(psk), THEIR_KEEPALIVE)
            .expect("wireguard-go's peers");
        assert_eq!(peers.len(), 1, "our lease is their one peer: {leases:?}");
    }

    fn put_their_lease(&self) {
        self.wg
            .put_lease(self.c.etcd(), &self.c.subnets_prefix(), LEASE_TTL)
            .expect("their lease");
    }

    /// Both pods reach each other (each direction polled until it works).
    fn wait_connected(&self) {
        reach(self.our_pod(), self.their_pod(), REACH);
        reach(self.their_pod(), self.our_pod(), REACH);
    }

    /// Our `/v1/status` as text.
    fn our_status(&self) -> String {
        let (code, body) = self.ours().http_get("/v1/status").expect("/v1/status");
        assert_eq!(code, 200, "{body}");
        body
    }
}

fn reach(a: &Pod, b: &Pod, within: Duration) -> Duration {
    let start = Instant::now();
    a.wait_reaches(b.ip(), within)
        .unwrap_or_else(|e| panic!("{} → {}: {e}", a.ip(), b.ip()));
    start.elapsed()
}

/// One ping from `ns` (with `args` before the destination) answered?
fn ping_once(ns: &Netns, args: &[&str], dst: Ipv4Addr) -> bool {
    ns.command("ping")
        .args(["-n", "-c", "1", "-W", "1"])
        .args(args)
        .arg(dst.to_string())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Pings from `a` to `b` for `window`: an error naming the first answer, if any came.
fn stays_unreachable(a: &Pod, b: &Pod, window: Duration) -> Result<(), String> {
    let start = Instant::now();
    while start.elapsed() < window {
        if ping_once(a.netns(), &[], b.ip()) {
            return Err(format!(
                "{} reached {} after {:?}",
                a.ip(),
                b.ip(),
                start.elapsed()
            ));
        }
    }
    Ok(())
}

/// `Icmp: InEchos` of a namespace: echo requests its stack received.
fn echo_requests_received(ns: &Netns) -> u64 {
    let text = ns.exec("cat", &["/proc/net/snmp"]).expect("/proc/net/snmp");
    let mut icmp = text.lines().filter(|l| l.starts_with("Icmp:"));
    let (head, values) = (icmp.next().unwrap(), icmp.next().unwrap());
    let at = head
        .split_whitespace()
        .position(|f| f == "InEchos")
        .expect("an InEchos column");
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// The sum of our `/metrics` samples of family `family` whose labels include every one of
/// `labels` (e.g. `reason="spoofed_source"`).
fn our_metric(t: &Interop, family: &str, labels: &[&str]) -> f64 {
    t.ours()
        .metrics()
        .expect("/metrics")
        .iter()
        .filter(|(k, _)| k.starts_with(family) && labels.iter().all(|l| k.contains(l)))
        .map(|(_, v)| v)
        .sum()
}

/// Handshake messages our engine received so far (it does send initiations to the marker
/// peer of [`barrier`], which nobody answers).
fn our_handshake_messages(t: &Interop) -> f64 {
    our_metric(
        t,
        "flannel_wireguard_handshake_messages",
        &["direction=\"rx\""],
    )
}

/// Two TCP streams each way at once, each checked end to end (count and hash).
fn tcp_both_ways(a: &Pod, b: &Pod, bytes: u64) {
    std::thread::scope(|s| {
        let runs: Vec<_> = [(a, b), (a, b), (b, a), (b, a)]
            .into_iter()
            .map(|(from, to)| {
                s.spawn(move || {
                    tcp_transfer(from, to, bytes)
                        .unwrap_or_else(|e| panic!("TCP {} → {}: {e}", from.ip(), to.ip()))
                })
            })
            .collect();
        for r in runs {
            let t = r.join().unwrap();
            assert_eq!(t.bytes, bytes);
        }
    });
}

/// The first packet goes one way; the handshake it starts completes within 5 s and is
/// initiated by that side; then pings at the MTU edge and checksummed TCP, both ways.
fn handshake_mtu_and_tcp(we_initiate: bool) {
    require_test_bed!();
    require_all!(wireguard_go::NEEDS);
    let t = Interop::peered(None);
    assert_eq!(
        t.ours().mtu().unwrap(),
        1420,
        "FLANNEL_MTU for a 1500 underlay"
    );
    let our_key = t.our_key();
    let started = Instant::now();
    let (first, second) = if we_initiate {
        (t.our_pod(), t.their_pod())
    } else {
        (t.their_pod(), t.our_pod())
    };
    reach(first, second, REACH);
    let state =
        t.wg.wait_handshake(
            &our_key,
            0,
            Duration::from_secs(5).saturating_sub(started.elapsed()),
        )
        .expect("a handshake within 5 s of the first packet");
    let our_port = t.our_lease().value["BackendData"]["Port"].as_u64();
    assert_eq!(our_port, Some(51820), "{}", t.our_lease().value);
    assert_eq!(
        state.endpoint,
        Some(SocketAddr::from((t.ours().public_ip(), 51820))),
        "wireguard-go talks to our address: {state:?}"
    );
    t.wg.handshake_log().assert_started_by(we_initiate);
    for (a, b) in [(t.our_pod(), t.their_pod()), (t.their_pod(), t.our_pod())] {
        assert!(
            a.ping_df(b.ip(), 1392).unwrap(),
            "{} → {}: 1420-byte packets pass with DF",
            a.ip(),
            b.ip()
        );
        assert!(
            !a.ping_df(b.ip(), 1393).unwrap(),
            "{} → {}: 1421 bytes must not",
            a.ip(),
            b.ip()
        );
    }
    tcp_both_ways(t.our_pod(), t.their_pod(), 16 << 20);
}

#[test]
fn we_initiate_then_mtu_edge_pings_and_tcp_both_ways() {
    handshake_mtu_and_tcp(true);
}

#[test]
fn wireguard_go_initiates_then_mtu_edge_pings_and_tcp_both_ways() {
    handshake_mtu_and_tcp(false);
}

#[test]
fn a_psk_mismatch_is_refused_both_ways() {
    require_test_bed!();
    require_all!(wireguard_go::NEEDS);
    let t = Interop::unpeered(KEEPALIVE);
    t.sync(&generate_psk().unwrap());
    let our_key = t.our_key();
    for (a, b) in [(t.our_pod(), t.their_pod()), (t.their_pod(), t.our_pod())] {
        stays_unreachable(a, b, REFUSED_WINDOW).expect("no session with a different PSK");
    }
    let state = t.wg.peer_state(&our_key).unwrap().expect("our peer");
    assert_eq!(state.latest_handshake, 0, "{state:?}");
    // The same nodes with the same PSK talk: the refusal was the PSK's doing.
    t.sync(&t.psk);
    t.wait_connected();
}

#[test]
fn a_spoofed_inner_source_is_dropped() {
    require_test_bed!();
    require_all!(wireguard_go::NEEDS);
    let t = Interop::new();
    t.wait_connected();
    let our_pod = t.our_pod();
    let before = echo_requests_received(our_pod.netns());
    assert!(t.their_pod().ping(our_pod.ip(), 3).unwrap().all_received());
    let honest = echo_requests_received(our_pod.netns()) - before;
    assert!(honest >= 3, "the pod counts echo requests: {honest}");

    // wireguard-go routes by destination only, so an address outside its subnet goes out
    // encrypted to us; we must drop it since it is not in its allowed IPs.
    t.wg.ip(&["addr", "add", "10.5.9.1/32", "dev", wireguard_go::DEVICE])
        .unwrap();
    let spoofed = |t: &Interop| {
        our_metric(
            t,
            "flannel_wireguard_drops",
            &["direction=\"rx\"", "reason=\"spoofed_source\""],
        )
    };
    let dropped_before = spoofed(&t);
    let sent_before = t.wg.peer_state(&t.our_key()).unwrap().unwrap().tx_bytes;
    let before = echo_requests_received(our_pod.netns());
    let host0 = t.c.host(0).netns();
    for _ in 0..5 {
        assert!(!ping_once(host0, &["-I", "10.5.9.1"], our_pod.ip()));
    }
    let got = echo_requests_received(our_pod.netns()) - before;
    let sent = t.wg.peer_state(&t.our_key()).unwrap().unwrap().tx_bytes - sent_before;
    assert!(
        sent >= 5 * 84,
        "the spoofed pings went through the tunnel ({sent} bytes)"
    );
    assert_eq!(got, 0, "our pod received spoofed echo requests");
    assert!(
        spoofed(&t) - dropped_before >= 5.0,
        "our engine counts the drops as spoofed_source"
    );
}

#[test]
fn our_restart_with_the_same_key_recovers_within_20s() {
    require_test_bed!();
    require_all!(wireguard_go::NEEDS);
    let t = Interop::new();
    t.wait_connected();
    let key = t.our_key();

    // Only wireguard-go sends: it holds a session we lost, and must notice and handshake anew
    // (keepalive 10 s + rekey timeout 5 s in wireguard-go).
    t.ours().stop();
    t.ours().start().unwrap();
    t.ours().wait_ready(Duration::from_secs(30)).unwrap();
    assert_eq!(t.our_key(), key, "the key file kept our key");
    let took = reach(t.their_pod(), t.our_pod(), Duration::from_secs(20));
    eprintln!("wireguard-go → us after our restart: {took:?}");

    // We send first: our initiation replaces the old session at once.
    t.ours().stop();
    t.ours().start().unwrap();
    t.ours().wait_ready(Duration::from_secs(30)).unwrap();
    let took = reach(t.our_pod(), t.their_pod(), Duration::from_secs(5));
    eprintln!("us → wireguard-go after our restart: {took:?}");
    reach(t.their_pod(), t.our_pod(), REACH);
}

#[test]
fn our_new_key_is_picked_up() {
    require_test_bed!();
    require_all!(wireguard_go::NEEDS);
    let t = Interop::new();
    t.wait_connected();
    let old = t.our_key();
    t.ours().stop();
    std::fs::remove_file(t.ours().wireguard_key_file()).expect("our key file");
    t.ours().start().unwrap();
    t.ours().wait_ready(Duration::from_secs(30)).unwrap();
    let new = wait_until(
        Duration::from_secs(10),
        "our lease to carry a new key",
        || {
            let k = t.our_key();
            if k == old {
                Err(format!("still {k}"))
            } else {
                Ok(k)
            }
        },
    )
    .unwrap();
    t.sync(&t.psk);
    let dump = t.wg.dump().unwrap();
    assert!(
        dump.peer(&old).is_none() && dump.peer(&new).is_some(),
        "{dump:?}"
    );
    t.wait_connected();
}

#[test]
fn their_new_key_replaces_the_peer_and_the_old_key_is_refused() {
    require_test_bed!();
    require_all!(wireguard_go::NEEDS);
    let t = Interop::new();
    t.wait_connected();
    let old = t.wg.keys();
    let new = t.wg.rotate_key().unwrap();
    assert_ne!(new, old.public);
    t.put_their_lease();
    t.wait_connected();
    let our_key = t.our_key();
    let state = t.wg.peer_state(&our_key).unwrap().unwrap();
    assert!(state.latest_handshake > 0, "{state:?}");

    // Someone else holding the old key and claiming the same subnet gets no handshake.
    let ns = Netns::create(&format!("{}-old", t.c.name())).unwrap();
    let ip = Ipv4Addr::new(198, 18, 0, 251);
    t.c.underlay().attach(&ns, "old", ip).unwrap();
    let dir = t.c.dir().join("old-key");
    std::fs::create_dir_all(&dir).unwrap();
    let impostor = WireguardGo::start(NodeSpec {
        netns: ns.name().to_string(),
        dir,
        public_ip: ip,
        subnet: THEIR_SUBNET.parse().unwrap(),
        network: NETWORK.parse().unwrap(),
        port: wireguard_go::DEFAULT_PORT,
        mtu: 1420,
        log_level: "verbose".into(),
        keys: Some(old),
        v6: None,
    })
    .unwrap();
    impostor
        .set_peer(&Peer::from_lease(&t.our_lease(), Some(&t.psk), 0).unwrap())
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < REFUSED_WINDOW {
        assert!(
            !ping_once(&ns, &[], t.our_pod().ip()),
            "the old key still reaches our pod"
        );
    }
    let state = impostor.peer_state(&our_key).unwrap().unwrap();
    assert_eq!(
        state.latest_handshake, 0,
        "the old key got a handshake: {state:?}"
    );
    assert!(
        impostor.handshake_log().initiations_sent >= 1,
        "the old key did try: {:?}",
        impostor.handshake_log()
    );
}

/// Waits until our flanneld has processed every lease event written so far: a marker lease
/// (a wireguard peer nobody runs) is written last and must show up in our `/v1/status`.
fn barrier(t: &Interop, marker: &str) {
    let keys = wireguard_go::KeyPair::generate().unwrap();
    let value = json!({
        "PublicIP": "198.18.0.252",
        "PublicIPv6": null,
        "BackendType": "wireguard",
        "BackendData": {"PublicKey": keys.public, "Port": 51820},
    })
    .to_string();
    let key = format!("{}{}", t.c.subnets_prefix(), marker.replace('/', "-"));
    wireguard_go::put_with_ttl(t.c.etcd(), &key, &value, LEASE_TTL).unwrap();
    wait_until(
        Duration::from_secs(10),
        "our status to list the marker",
        || {
            if t.our_status().contains(marker) {
                Ok(())
            } else {
                Err("not yet".into())
            }
        },
    )
    .unwrap();
}

#[test]
fn a_lease_re_put_without_change_keeps_the_session() {
    require_test_bed!();
    require_all!(wireguard_go::NEEDS);
    let t = Interop::new();
    t.wait_connected();
    let our_key = t.our_key();
    let before = t.wg.peer_state(&our_key).unwrap().unwrap();
    let log_before = t.wg.handshake_log();
    let ours_before = our_handshake_messages(&t);
    assert!(before.latest_handshake > 0);
    // Renewals as flannel writes them: the same value under a fresh etcd lease.
    t.put_their_lease();
    t.put_their_lease();
    barrier(&t, "10.5.250.0/24");
    t.wait_connected();
    tcp_both_ways(t.our_pod(), t.their_pod(), 1 << 20);
    let after = t.wg.peer_state(&our_key).unwrap().unwrap();
    assert_eq!(
        t.wg.handshake_log(),
        log_before,
        "no handshake message after the re-put"
    );
    assert_eq!(after.latest_handshake, before.latest_handshake);
    assert_eq!(our_handshake_messages(&t), ours_before, "nor on our side");
}

#[test]
fn a_lease_deletion_removes_the_peer() {
    require_test_bed!();
    require_all!(wireguard_go::NEEDS);
    let t = Interop::new();
    t.wait_connected();
    let subnet: Ipv4Network = THEIR_SUBNET.parse().unwrap();
    assert!(t.our_status().contains(THEIR_SUBNET));
    let deleted =
        t.c.etcd()
            .del(&t.wg.lease_key(&t.c.subnets_prefix()))
            .unwrap();
    assert_eq!(deleted, 1);
    wait_until(
        Duration::from_secs(10),
        "our status to drop their peer",
        || {
            if t.our_status().contains(&subnet.to_string()) {
                Err("still listed".into())
            } else {
                Ok(())
            }
        },
    )
    .unwrap();
    // Neither our initiation nor their packets on the old session get through.
    for (a, b) in [(t.our_pod(), t.their_pod()), (t.their_pod(), t.our_pod())] {
        stays_unreachable(a, b, REFUSED_WINDOW).expect("the peer is gone");
    }
}

/// Initiations per second: 10× what puts wireguard-go under load, within what one thread
/// sends on a small machine.
const FLOOD_RATE: u64 = 20_000;

#[test]
fn a_handshake_flood_gets_cookie_replies_while_traffic_flows() {
    require_test_bed!();
    require_all!(wireguard_go::NEEDS);
    let t = Interop::new();
    let flooder = Netns::create(&format!("{}-fl", t.c.name())).unwrap();
    t.c.underlay()
        .attach(&flooder, "fl", Ipv4Addr::new(198, 18, 0, 250))
        .unwrap();
    let ours = std::net::SocketAddrV4::new(t.ours().public_ip(), 51820);
    let flood = HandshakeFlood::start(
        &flooder,
        ours,
        &key_bytes(&t.our_key()).unwrap(),
        FLOOD_RATE,
    )
    .expect("flood");
    let cookies = wait_until(
        Duration::from_secs(10),
        "cookie replies from us",
        || match flood.cookie_replies() {
            0 => Err(format!(
                "{} initiations sent, no cookie reply",
                flood.sent()
            )),
            n => Ok(n),
        },
    );
    // The first handshake between the two nodes happens during the flood.
    let first_contact = t
        .their_pod()
        .wait_reaches(t.our_pod().ip(), Duration::from_secs(20));
    let pings = t.our_pod().ping(t.their_pod().ip(), 20);
    let tcp = tcp_transfer(t.their_pod(), t.our_pod(), 4 << 20);
    let report = flood.stop().expect("flood report");
    eprintln!(
        "flood: {report:?} ({:.0}/s); wireguard-go: {:?}",
        report.sent_per_second(),
        t.wg.handshake_log()
    );
    cookies.expect("cookie replies while flooded");
    first_contact.expect("a new handshake completes during the flood");
    let pings = pings.unwrap();
    assert!(pings.received >= 18, "pings during the flood: {pings}");
    tcp.expect("TCP during the flood arrives whole");
    assert_eq!(
        report.other_replies, 0,
        "no junk initiation was answered otherwise"
    );
    t.ours().check_alive().unwrap();
}
