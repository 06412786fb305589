//! flanneld against a real etcd: leases, peers, restarts, outages and bad input.

mod common;

use std::time::Duration;

use common::{key_of_subnet, poll, subnet_keys, Etcd, Flanneld};

const CONFIG: &str = r#"{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"alloc"}}"#;
const WAIT: Duration = Duration::from_secs(20);

#[test]
fn two_daemons_get_distinct_subnets_see_each_other_and_keep_subnet_on_restart() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    common::config(&etcd, CONFIG);
    let a = Flanneld::start(&etcd.endpoint(), "198.18.7.1", &[]);
    let mut b = Flanneld::start(&etcd.endpoint(), "198.18.7.2", &[]);
    a.wait_ready(WAIT);
    b.wait_ready(WAIT);
    let (sa, sb) = (a.subnet().unwrap(), b.subnet().unwrap());
    assert_ne!(sa, sb, "two hosts got the same subnet");
    let mut keys = subnet_keys(&etcd);
    keys.sort();
    let mut expected = vec![key_of_subnet(&sa), key_of_subnet(&sb)];
    expected.sort();
    assert_eq!(keys, expected);

    // The lease value is flannel's JSON.
    let value = &etcd.get_prefix("/coreos.com/network/subnets/").unwrap()[0].1;
    let v: serde_json::Value = serde_json::from_str(value).unwrap();
    assert!(v["PublicIP"].as_str().unwrap().starts_with("198.18.7."));
    assert!(v["PublicIPv6"].is_null());
    assert_eq!(v["BackendType"], "alloc");

    for f in [&a, &b] {
        poll("each daemon to see one peer", WAIT, || {
            (f.metric("flannel_peers") == Some(1.0)).then_some(())
        });
    }

    // A restarted daemon keeps its subnet (re-use by public IP).
    let status = b.stop();
    assert!(status.success(), "SIGTERM must be a clean exit: {status}");
    assert_eq!(
        subnet_keys(&etcd).len(),
        2,
        "stop must leave the lease in place"
    );
    std::fs::remove_file(b.subnet_file()).unwrap();
    b.resume();
    b.wait_ready(WAIT);
    assert_eq!(b.subnet().unwrap(), sb);
    assert_eq!(subnet_keys(&etcd).len(), 2);
}

#[test]
fn old_subnet_file_is_preferred_when_its_subnet_is_free() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    common::config(&etcd, CONFIG);
    let mut a = Flanneld::start(&etcd.endpoint(), "198.18.7.5", &[]);
    a.wait_ready(WAIT);
    let first = a.subnet().unwrap();
    a.stop();
    // The lease is gone (e.g. expired while the host was down) but the subnet file remains.
    etcd.etcdctl(&["del", "--prefix", "/coreos.com/network/subnets/"])
        .unwrap();
    a.resume();
    a.wait_ready(WAIT);
    assert_eq!(a.subnet().unwrap(), first);
}

#[test]
fn reservation_is_never_taken_and_is_a_peer() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    // 10.5.0.0/26 in /28s: 4 subnets, 3 free by default (the first is never handed out).
    common::config(
        &etcd,
        r#"{"Network":"10.5.0.0/26","SubnetLen":28,"Backend":{"Type":"alloc"}}"#,
    );
    etcd.put(
        "/coreos.com/network/subnets/10.5.0.16-28",
        r#"{"PublicIP":"198.18.9.9","PublicIPv6":null,"BackendType":"alloc"}"#,
    )
    .unwrap();
    let hosts: Vec<Flanneld> = (1..=2)
        .map(|i| Flanneld::start(&etcd.endpoint(), &format!("198.18.7.{i}"), &[]))
        .collect();
    for h in &hosts {
        h.wait_ready(WAIT);
        assert_ne!(
            h.subnet().unwrap(),
            "10.5.0.17/28",
            "reservation handed out"
        );
    }
    poll("the reservation and the other host as peers", WAIT, || {
        (hosts[0].metric("flannel_peers") == Some(2.0)).then_some(())
    });
    // The network is now full: a third host waits, saying why, and never takes the reservation.
    let third = Flanneld::start(&etcd.endpoint(), "198.18.7.3", &[]);
    poll("the out-of-subnets message", WAIT, || {
        third
            .log()
            .contains("no free subnet in network 10.5.0.0/26")
            .then_some(())
    });
    // flannel's body, then our reason.
    assert_eq!(
        third.http_get("/readyz"),
        Some((
            503,
            "flanneld is not ready yet: no lease or subnet file written".into()
        ))
    );
    let reservation = etcd
        .get_prefix("/coreos.com/network/subnets/10.5.0.16-28")
        .unwrap();
    assert!(reservation[0].1.contains("198.18.9.9"));
}

#[test]
fn expired_peer_is_removed_after_its_ttl() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    common::config(&etcd, CONFIG);
    let ttl = ["--subnet-lease-ttl=4s"];
    let a = Flanneld::start(&etcd.endpoint(), "198.18.7.1", &ttl);
    let mut b = Flanneld::start(&etcd.endpoint(), "198.18.7.2", &ttl);
    a.wait_ready(WAIT);
    b.wait_ready(WAIT);
    poll("a to see b", WAIT, || {
        (a.metric("flannel_peers") == Some(1.0)).then_some(())
    });
    // Running daemons renew short leases: after more than one TTL both keys are still there.
    poll("a renewal", WAIT, || {
        (a.metric("flannel_lease_renewals_total")? >= 2.0).then_some(())
    });
    assert_eq!(subnet_keys(&etcd).len(), 2);
    b.stop();
    poll("b's lease to expire and a to drop it", WAIT, || {
        (a.metric("flannel_peers") == Some(0.0)).then_some(())
    });
    assert_eq!(
        subnet_keys(&etcd),
        vec![key_of_subnet(&a.subnet().unwrap())]
    );
}

#[test]
fn own_lease_deleted_is_reacquired_with_the_same_subnet() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    common::config(&etcd, CONFIG);
    let a = Flanneld::start(&etcd.endpoint(), "198.18.7.1", &[]);
    a.wait_ready(WAIT);
    let key = key_of_subnet(&a.subnet().unwrap());
    etcd.etcdctl(&["del", &format!("/coreos.com/network/subnets/{key}")])
        .unwrap();
    poll("the lease to be re-acquired", WAIT, || {
        (a.metric("flannel_lease_acquisitions_total")? >= 2.0).then_some(())
    });
    assert_eq!(subnet_keys(&etcd), vec![key]);
}

#[test]
fn etcd_outage_longer_than_a_renewal_period_is_survived() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    common::config(&etcd, CONFIG);
    // TTL 6 s: renewal every 2 s.
    let mut a = Flanneld::start(&etcd.endpoint(), "198.18.7.1", &["--subnet-lease-ttl=6s"]);
    a.wait_ready(WAIT);
    let subnet = a.subnet().unwrap();
    let renewals_before = a.metric("flannel_lease_renewals_total").unwrap();
    etcd.kill9();
    poll("the outage to show in /metrics", WAIT, || {
        (a.metric("flannel_etcd_up") == Some(0.0)).then_some(())
    });
    // Stay down for more than two renewal periods.
    let down_since = std::time::Instant::now();
    poll("renewal failures to pile up", WAIT, || {
        (a.metric("flannel_etcd_errors_total")? >= 3.0
            && down_since.elapsed() > Duration::from_secs(5))
        .then_some(())
    });
    assert!(a.is_running(), "flanneld exited during the etcd outage");
    assert_eq!(a.http_get("/readyz").map(|r| r.0), Some(200));
    etcd.start().unwrap();
    poll("a renewal after etcd returned", WAIT, || {
        (a.metric("flannel_lease_renewals_total")? > renewals_before
            && a.metric("flannel_etcd_up")? == 1.0)
            .then_some(())
    });
    assert_eq!(a.http_get("/readyz").map(|r| r.0), Some(200));
    assert_eq!(subnet_keys(&etcd), vec![key_of_subnet(&subnet)]);
    assert_eq!(a.subnet().unwrap(), subnet);
}

#[test]
fn daemon_waits_for_etcd_that_is_down_at_start() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    common::config(&etcd, CONFIG);
    etcd.kill9();
    let a = Flanneld::start(&etcd.endpoint(), "198.18.7.1", &[]);
    poll("a retry message", WAIT, || {
        a.log().contains("retrying").then_some(())
    });
    etcd.start().unwrap();
    a.wait_ready(WAIT);
}

#[test]
fn bad_configs_are_named_and_fixing_them_needs_no_restart() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    let mut a = Flanneld::start(&etcd.endpoint(), "198.18.7.1", &[]);
    poll("the wait for a config", WAIT, || {
        a.log()
            .contains("waiting for the network config at /coreos.com/network/config")
            .then_some(())
    });
    let cases = [
        // The parser's own words follow, naming where the text went wrong.
        (
            "{not json",
            "network config is not valid JSON: key must be a string at line 1 column 2",
        ),
        (
            r#"{"Network":"10.5.0.0/16","SubnetLen":31,"Backend":{"Type":"alloc"}}"#,
            "SubnetLen 31",
        ),
    ];
    for (config, expected) in cases {
        common::config(&etcd, config);
        poll(&format!("a message naming {expected}"), WAIT, || {
            a.log().contains(expected).then_some(())
        });
        assert!(a.is_running());
        assert_eq!(a.http_get("/readyz").map(|r| r.0), Some(503));
        assert!(
            !a.subnet_file().exists(),
            "subnet file written for a bad config"
        );
        assert!(
            subnet_keys(&etcd).is_empty(),
            "lease taken for a bad config"
        );
    }
    common::config(&etcd, CONFIG);
    a.wait_ready(WAIT);
    assert!(a.subnet().unwrap().starts_with("10.5."));
    assert!(a.stop().success());
}

/// flannel exits on a backend it does not have ("Error fetching backend: unknown backend type");
/// so do we, naming the field and the value, before any lease is taken.
#[test]
fn an_unknown_backend_type_stops_the_daemon_naming_it() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    common::config(
        &etcd,
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"nosuch"}}"#,
    );
    let mut a = Flanneld::start(&etcd.endpoint(), "198.18.7.1", &[]);
    let status = a.wait_exit(WAIT);
    assert!(!status.success(), "exit status {status}");
    let log = a.log();
    let exit_line = log
        .lines()
        .find(|l| l.starts_with("flanneld: "))
        .unwrap_or_else(|| panic!("no exit message in:\n{log}"));
    assert!(
        exit_line.contains("Backend.Type \"nosuch\": unknown backend type"),
        "{exit_line}"
    );
    assert!(
        subnet_keys(&etcd).is_empty(),
        "lease taken for a bad config"
    );
    assert!(
        !a.subnet_file().exists(),
        "subnet file written for a bad config"
    );
}

#[test]
fn garbage_peer_lease_is_skipped_and_counted() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    common::config(&etcd, CONFIG);
    etcd.put("/coreos.com/network/subnets/10.5.200.0-24", "{garbage")
        .unwrap();
    let a = Flanneld::start(&etcd.endpoint(), "198.18.7.1", &[]);
    a.wait_ready(WAIT);
    assert_eq!(a.metric("flannel_malformed_leases_total"), Some(1.0));
    assert_eq!(a.metric("flannel_peers"), Some(0.0));
    assert_ne!(
        a.subnet().unwrap(),
        "10.5.200.1/24",
        "took a subnet someone holds"
    );
    // Also through the watch, and a good peer still counts.
    etcd.put("/coreos.com/network/subnets/10.5.201.0-24", "[1,2")
        .unwrap();
    etcd.put(
        "/coreos.com/network/subnets/10.5.202.0-24",
        r#"{"PublicIP":"198.18.7.9","PublicIPv6":null,"BackendType":"alloc"}"#,
    )
    .unwrap();
    poll(
        "the second malformed lease counted and the good peer seen",
        WAIT,
        || {
            (a.metric("flannel_malformed_leases_total")? == 2.0
                && a.metric("flannel_peers")? == 1.0)
                .then_some(())
        },
    );
    assert!(
        a.log().contains("10.5.201.0-24"),
        "the log names the bad key"
    );
}

#[test]
fn bad_flags_exit_with_a_message_naming_the_flag() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flanneld"))
        .arg("--subnet-lease-renew-margin=5000")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--subnet-lease-renew-margin"), "{err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flanneld"))
        .args(["--iface=nosuch0", "--etcd-endpoints=http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--iface nosuch0"), "{err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flanneld"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn systemd_is_told_ready_once_the_subnet_file_is_written() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    common::config(&etcd, CONFIG);
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let a = Flanneld::start_with_env(
        None,
        &etcd.endpoint(),
        "198.18.7.1",
        &[],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("no READY=1 from flanneld");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(
        a.subnet().is_some(),
        "READY=1 before the subnet file was written"
    );
    // flannel's bodies, byte for byte.
    assert_eq!(
        a.http_get("/readyz"),
        Some((200, "flanneld is ready".into()))
    );
    assert_eq!(
        a.http_get("/healthz"),
        Some((200, "flanneld is running".into()))
    );
}

#[test]
fn a_flood_of_large_malformed_leases_is_logged_briefly_and_rarely() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    common::config(&etcd, CONFIG);
    let flanneld = Flanneld::start(&etcd.endpoint(), "198.18.7.1", &[]);
    flanneld.wait_ready(WAIT);
    // 100 kB of junk each (a command-line argument holds at most 128 kB).
    let junk = format!("\"{}\"", "x".repeat(100_000));
    for i in 0..30 {
        etcd.put(&format!("/coreos.com/network/subnets/junk-{i}"), &junk)
            .unwrap();
    }
    poll("all 30 malformed leases counted", WAIT, || {
        (flanneld.metric("flannel_malformed_leases_total")? == 30.0).then_some(())
    });
    let log = flanneld.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("skipping malformed lease"))
        .collect();
    assert!(
        !warnings.is_empty() && warnings.len() <= 5,
        "{} warnings for 30 malformed leases",
        warnings.len()
    );
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1000, "a log line of {longest} bytes");
    assert_eq!(flanneld.http_get("/readyz").map(|r| r.0), Some(200));
}
