use std::path::PathBuf;

use super::table::{self, Style};
use super::*;

/// A cluster as one node sees it: one peer programmed, one whose route the kernel refused,
/// a repair in the last pass, an overlapping lease rejected, one etcd member down.
fn fixture() -> Status {
    let now = 1_700_000_000;
    let fix = |peer: &str, effect: &str, what: &str, error: Option<&str>| Change {
        peer: Some(peer.to_string()),
        effect: effect.to_string(),
        what: what.to_string(),
        error: error.map(str::to_string),
    };
    let peer = |key: &str, subnet: &str, ip: &str, mac: &str, changed: u64| PeerStatus {
        key: key.to_string(),
        subnet: Some(subnet.to_string()),
        ipv6_subnet: None,
        public_ip: Some(ip.to_string()),
        public_ipv6: None,
        backend: "vxlan".to_string(),
        backend_data: Some(serde_json::json!({"VNI": 1, "VtepMAC": mac})),
        backend_v6_data: None,
        first_seen: now - 3600,
        changed,
        data_plane: PlaneState::Programmed,
        differs: Vec::new(),
        fixed: Vec::new(),
    };
    let repaired = fix(
        "10.5.8.0-24",
        "added",
        "replace route 10.5.8.0/24 via 10.5.8.0 dev 5 onlink proto 102",
        None,
    );
    let refused = fix(
        "10.5.9.0-24",
        "added",
        "replace neighbour 10.5.9.0 lladdr 0e:00:00:00:00:09 dev 5",
        Some("File exists (os error 17)"),
    );
    let mut broken = peer(
        "10.5.9.0-24",
        "10.5.9.0/24",
        "198.18.0.3",
        "0e:00:00:00:00:09",
        now - 90,
    );
    broken.data_plane = PlaneState::Missing;
    broken.differs = vec![refused.clone()];
    let mut fixed = peer(
        "10.5.8.0-24",
        "10.5.8.0/24",
        "198.18.0.2",
        "0e:00:00:00:00:08",
        now - 3600,
    );
    fixed.fixed = vec![repaired.clone()];
    let pass = ReconcileStatus {
        at: now - 4,
        duration_ms: 3,
        added: 1,
        removed: 0,
        repaired: 0,
        changes: vec![repaired, refused],
        more_changes: 0,
        error: Some("backend vxlan: netlink: 1 change(s) failed".to_string()),
    };
    Status {
        version: "0.0.0-test".to_string(),
        now,
        lease: Some(OwnLease {
            key: "10.5.7.0-24".to_string(),
            subnet: Some("10.5.7.0/24".to_string()),
            ipv6_subnet: None,
            public_ip: Some("198.18.0.1".to_string()),
            public_ipv6: None,
            backend: "vxlan".to_string(),
            expires: Some(now + 86_000),
            held_by: None,
        }),
        registry: RegistryStatus {
            kind: "etcd".to_string(),
            up: true,
            endpoints: vec![
                EndpointStatus {
                    endpoint: "http://198.18.0.100:2379".to_string(),
                    answers: Some(true),
                },
                EndpointStatus {
                    endpoint: "http://198.18.0.101:2379".to_string(),
                    answers: Some(false),
                },
            ],
        },
        peers: vec![fixed, broken],
        last_reconcile: Some(pass.clone()),
        last_repair: Some(pass),
        rejected: vec![RejectedLease {
            key: "10.5.8.128-25".to_string(),
            public_ip: Some("198.18.0.9".to_string()),
            reason: "wrong_prefix_length".to_string(),
            detail: "prefix length 25, the config says 24".to_string(),
        }],
        udp: None,
    }
}

fn healthy() -> Status {
    let mut s = fixture();
    s.registry.endpoints.truncate(1);
    s.peers.truncate(1);
    s.last_reconcile = Some(ReconcileStatus {
        at: s.now - 2,
        duration_ms: 1,
        ..Default::default()
    });
    s.last_repair.as_mut().unwrap().changes.truncate(1);
    s.last_repair.as_mut().unwrap().error = None;
    s.udp = Some(UdpStatus {
        tx_packets: 10,
        tx_bytes: 840,
        tx_dropped: 0,
        rx_packets: 9,
        rx_bytes: 756,
        rx_dropped: 1,
    });
    s
}

/// Compares `actual` with the golden file; `UPDATE_GOLDEN=1` rewrites it instead.
fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/status/testdata")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(
        actual,
        want,
        "{} differs (UPDATE_GOLDEN=1 rewrites it)",
        path.display()
    );
}

#[test]
fn table_with_problems_matches_golden() {
    let (text, code) = client::output(&fixture(), false, Style::plain());
    golden("problems.txt", &text);
    assert_eq!(code, client::EXIT_PROBLEMS);
}

#[test]
fn healthy_table_matches_golden_and_exits_zero() {
    let (text, code) = client::output(&healthy(), false, Style::plain());
    golden("healthy.txt", &text);
    assert_eq!(code, 0);
}

#[test]
fn json_matches_golden_and_reads_back() {
    let (text, code) = client::output(&fixture(), true, Style::plain());
    golden("problems.json", &text);
    assert_eq!(code, client::EXIT_PROBLEMS);
    let back: Status = serde_json::from_str(&text).unwrap();
    assert_eq!(back, fixture());
}

#[test]
fn colour_only_when_asked() {
    let plain = table::render(&fixture(), Style::plain());
    let coloured = table::render(&fixture(), Style::coloured());
    assert!(!plain.contains('\x1b'), "{plain}");
    assert!(coloured.contains("\x1b[1;31mMISSING\x1b[0m"), "{coloured}");
}

#[test]
fn problems_name_the_member_and_the_peer() {
    let problems = fixture().problems();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("http://198.18.0.101:2379")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("10.5.9.0-24")),
        "{problems:?}"
    );
    assert!(healthy().problems().is_empty());
}

fn lease(key: &str, ip: &str) -> Lease {
    let json = format!(r#"{{"PublicIP":"{ip}","BackendType":"vxlan"}}"#);
    Lease {
        key: key.parse().unwrap(),
        attrs: serde_json::from_str(&json).unwrap(),
        etcd_lease: Some(1),
        revision: 1,
        create_revision: 1,
    }
}

fn peers(leases: &[Lease]) -> PeerSet {
    leases.iter().map(|l| (l.key, l.clone())).collect()
}

#[test]
fn a_peer_keeps_first_seen_and_changes_when_its_value_does() {
    let mut plane = PlaneRecord::default();
    plane.observe(&peers(&[lease("10.5.8.0-24", "198.18.0.2")]), 100);
    plane.observe(&peers(&[lease("10.5.8.0-24", "198.18.0.2")]), 200);
    let p = plane.peers.values().next().unwrap();
    assert_eq!((p.first_seen, p.changed), (100, 100));
    plane.observe(&peers(&[lease("10.5.8.0-24", "198.18.0.22")]), 300);
    let p = plane.peers.values().next().unwrap();
    assert_eq!((p.first_seen, p.changed), (100, 300));
    assert_eq!(p.public_ip.as_deref(), Some("198.18.0.22"));
    plane.observe(&PeerSet::new(), 400);
    assert!(plane.peers.is_empty());
}

#[test]
fn a_full_pass_marks_refused_changes_and_keeps_the_last_repair() {
    let mut plane = PlaneRecord::default();
    let (a, b) = (
        lease("10.5.8.0-24", "198.18.0.2"),
        lease("10.5.9.0-24", "198.18.0.3"),
    );
    plane.observe(&peers(&[a.clone(), b.clone()]), 100);
    assert!(plane
        .peers
        .values()
        .all(|p| p.data_plane == PlaneState::Unknown));
    let change = |key: SubnetKey, effect, error: Option<&str>| KernelChange {
        peer: Some(key),
        effect,
        what: "replace route".to_string(),
        error: error.map(str::to_string),
    };
    let report = ReconcileReport {
        added: 1,
        repaired: 0,
        removed: 0,
        changes: vec![
            change(a.key, Effect::Added, None),
            change(b.key, Effect::Repaired, Some("Invalid argument")),
        ],
    };
    plane.full_pass(
        110,
        Duration::from_millis(5),
        &report,
        Some("failed".into()),
    );
    let (pa, pb) = (&plane.peers[&a.key], &plane.peers[&b.key]);
    assert_eq!(pa.data_plane, PlaneState::Programmed);
    assert_eq!(pa.fixed.len(), 1);
    assert_eq!(pb.data_plane, PlaneState::Differs);
    assert_eq!(pb.differs[0].error.as_deref(), Some("Invalid argument"));
    // A later pass with nothing to do is the last reconcile; the repair stays visible.
    plane.full_pass(
        120,
        Duration::from_millis(1),
        &ReconcileReport::default(),
        None,
    );
    assert!(plane
        .peers
        .values()
        .all(|p| p.data_plane.is_ok() && p.fixed.is_empty()));
    assert_eq!(plane.last_reconcile.as_ref().unwrap().at, 120);
    assert_eq!(plane.last_repair.as_ref().unwrap().at, 110);
}

#[test]
fn the_client_reaches_a_daemon_on_every_address_through_loopback() {
    use clap::Parser;
    let opts = client::StatusOpts::parse_from(["status", "--healthz-port", "8471"]);
    assert_eq!(client::target(&opts).unwrap().to_string(), "127.0.0.1:8471");
    let opts = client::StatusOpts::parse_from(["status", "--healthz-ip", "::"]);
    assert_eq!(client::target(&opts).unwrap().port(), client::DEFAULT_PORT);
    let opts = client::StatusOpts::parse_from(["status", "--healthz-port", "0"]);
    let err = client::target(&opts).unwrap_err().to_string();
    assert!(err.contains("--healthz-port 0"), "{err}");
}

#[test]
fn an_unreachable_daemon_is_an_error_that_says_where_it_looked() {
    // A port just freed: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let err = client::fetch(addr).unwrap_err().to_string();
    assert!(err.contains(&format!("http://{addr}/v1/status")), "{err}");
    assert!(err.contains("--healthz-port"), "{err}");
}

#[test]
fn a_peer_new_since_the_full_pass_is_programmed_by_a_successful_update() {
    let mut plane = PlaneRecord::default();
    let (a, b) = (
        lease("10.5.8.0-24", "198.18.0.2"),
        lease("10.5.9.0-24", "198.18.0.3"),
    );
    plane.observe(&peers(std::slice::from_ref(&a)), 100);
    plane.full_pass(100, Duration::ZERO, &ReconcileReport::default(), None);
    plane.observe(&peers(&[a.clone(), b.clone()]), 105);
    assert_eq!(plane.peers[&b.key].data_plane, PlaneState::Unknown);
    plane.update(&ReconcileReport::default(), false);
    assert_eq!(plane.peers[&b.key].data_plane, PlaneState::Programmed);

    // An update whose change for a new peer is refused leaves it missing.
    let c = lease("10.5.10.0-24", "198.18.0.4");
    plane.observe(&peers(&[a, b, c.clone()]), 110);
    let refused = ReconcileReport {
        changes: vec![KernelChange {
            peer: Some(c.key),
            effect: Effect::Added,
            what: "replace route".to_string(),
            error: Some("No such device".to_string()),
        }],
        ..Default::default()
    };
    plane.update(&refused, true);
    assert_eq!(plane.peers[&c.key].data_plane, PlaneState::Missing);
}

#[test]
fn a_single_endpoint_answers_as_the_registry_does() {
    let board = Board::default();
    board.set_registry("etcd", &["http://127.0.0.1:2379".to_string()]);
    let up = board.snapshot(true, None, None);
    assert_eq!(up.registry.endpoints[0].answers, Some(true));
    let down = board.snapshot(false, None, None);
    assert_eq!(down.registry.endpoints[0].answers, Some(false));
    // Named once, as the registry, not again as a member.
    let problems = down.problems();
    assert_eq!(
        problems
            .iter()
            .filter(|p| p.contains("does not answer"))
            .count(),
        1,
        "{problems:?}"
    );
}

#[test]
fn a_pass_lists_its_first_changes_and_counts_the_rest() {
    let mut plane = PlaneRecord::default();
    let change = KernelChange {
        peer: None,
        effect: Effect::Removed,
        what: "delete route".to_string(),
        error: None,
    };
    let report = ReconcileReport {
        removed: CHANGES_LISTED + 5,
        changes: vec![change; CHANGES_LISTED + 5],
        ..Default::default()
    };
    plane.full_pass(1, Duration::ZERO, &report, None);
    let pass = plane.last_repair.unwrap();
    assert_eq!((pass.changes.len(), pass.more_changes), (CHANGES_LISTED, 5));
}

#[test]
fn a_lease_held_by_a_node_says_so_and_an_etcd_lease_does_not() {
    let kube = Board::default();
    kube.set_lease_holder("Node n1");
    kube.set_lease(&lease("10.5.7.0-24", "198.18.0.1"), "vxlan");
    let own = kube.snapshot(true, None, None).lease.unwrap();
    assert_eq!(own.held_by.as_deref(), Some("Node n1"));

    let etcd = Board::default();
    etcd.set_lease(&lease("10.5.7.0-24", "198.18.0.1"), "vxlan");
    let own = etcd.snapshot(true, Some(99), None).lease.unwrap();
    assert_eq!((own.held_by, own.expires), (None, Some(99)));
}
