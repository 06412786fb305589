//! flanneld against etcd with TLS client certificates and with password authentication.

mod common;

use std::time::Duration;

use common::{issue, make_ca, poll, CertKey, Etcd, Flanneld, LocalEtcd};
use netns_tests::ServerTls;

const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#;
const WAIT: Duration = Duration::from_secs(20);

fn tls_flags(ca: &std::path::Path, client: &CertKey) -> Vec<String> {
    vec![
        format!("--etcd-cafile={}", ca.display()),
        format!("--etcd-certfile={}", client.cert.display()),
        format!("--etcd-keyfile={}", client.key.display()),
    ]
}

#[test]
fn tls_with_client_certificates() {
    netns_tests::require_etcd!();
    let pki = tempfile::tempdir().unwrap();
    let ca = make_ca(pki.path(), "ca");
    let server = issue(pki.path(), &ca, "server");
    let client = issue(pki.path(), &ca, "client");
    let etcd = Etcd::start_local(LocalEtcd {
        tls: Some(ServerTls {
            ca: ca.cert.clone(),
            server,
            client: Some(client.clone()),
        }),
        ..Default::default()
    })
    .unwrap();
    assert!(etcd.endpoint().starts_with("https://"));
    common::config(&etcd, CONFIG);

    let flags = tls_flags(&ca.cert, &client);
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let good = Flanneld::start(&etcd.endpoint(), "198.18.7.1", &flag_refs);
    good.wait_ready(WAIT);
    assert_eq!(common::subnet_keys(&etcd).len(), 1);

    // A CA that did not sign the server's certificate: refused, and the log says why.
    let other_ca = make_ca(pki.path(), "other-ca");
    let flags = tls_flags(&other_ca.cert, &client);
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let wrong = Flanneld::start(&etcd.endpoint(), "198.18.7.2", &flag_refs);
    poll("a certificate error in the log", WAIT, || {
        let log = wrong.log().to_lowercase();
        (log.contains("certificate")
            && (log.contains("unknownissuer") || log.contains("unknown issuer")))
        .then_some(())
    });
    assert_eq!(wrong.http_get("/readyz").map(|r| r.0), Some(503));
    assert_eq!(common::subnet_keys(&etcd).len(), 1);

    // TLS flags with a plain http:// endpoint: refused at start, naming the flag.
    let plain = format!("http://127.0.0.1:{}", etcd.client_port());
    let mut refused = Flanneld::start(&plain, "198.18.7.3", &flag_refs);
    let status = refused.wait_exit(WAIT);
    assert!(!status.success());
    assert!(refused.log().contains("plain http://"), "{}", refused.log());
}

const FLANNEL_USER: [&str; 3] = [
    "--etcd-username=flannel",
    "--etcd-password=s3cret",
    // The test etcd listens on plain http:// on loopback.
    "--etcd-insecure-password",
];

#[test]
fn password_authentication() {
    netns_tests::require_etcd!();
    let mut etcd = Etcd::start_local(Default::default()).unwrap();
    common::config(&etcd, CONFIG);
    etcd.enable_auth().unwrap();
    // Without credentials the keys are out of reach.
    assert!(etcd
        .etcdctl(&["get", "--user=nobody:x", "/coreos.com/network/config"])
        .is_err());

    let good = Flanneld::start(&etcd.endpoint(), "198.18.7.1", &FLANNEL_USER);
    good.wait_ready(WAIT);
    assert_eq!(common::subnet_keys(&etcd).len(), 1);

    let mut wrong = Flanneld::start(
        &etcd.endpoint(),
        "198.18.7.2",
        &[
            "--etcd-username=flannel",
            "--etcd-password=wrong",
            "--etcd-insecure-password",
        ],
    );
    let status = wrong.wait_exit(WAIT);
    assert!(!status.success());
    assert!(
        wrong.log().contains("authentication failed"),
        "{}",
        wrong.log()
    );
    // The exit message is the error with its causes, each said once.
    let log = wrong.log();
    let exit_line = log
        .lines()
        .find(|l| l.starts_with("flanneld: "))
        .unwrap_or_else(|| panic!("no exit message in:\n{log}"));
    assert!(exit_line.starts_with("flanneld: etcd: "), "{exit_line}");
    assert_eq!(
        exit_line.matches("authentication failed").count(),
        1,
        "{exit_line}"
    );
}

/// Waits until etcd dropped every token flanneld holds: the one from its start and each one it
/// logged taking since.
fn wait_for_expiry_of_every_token(etcd: &Etcd, flanneld: &Flanneld) {
    poll("etcd to expire flanneld's tokens", WAIT, || {
        let taken = 1 + flanneld.log().matches("authenticating again").count();
        (common::expired_flannel_tokens(etcd) >= taken).then_some(())
    });
}

/// Deletes the lease key and waits for flanneld to take a lease again, and to renew it.
fn lease_comes_back(etcd: &Etcd, flanneld: &Flanneld, when: &str) {
    let keys = common::subnet_keys(etcd);
    assert_eq!(keys.len(), 1, "{when}: {keys:?}");
    etcd.etcdctl(&["del", &format!("/coreos.com/network/subnets/{}", keys[0])])
        .unwrap();
    poll(
        &format!("{when}: the deleted lease to be taken again"),
        WAIT,
        || (common::subnet_keys(etcd).len() == 1).then_some(()),
    );
    let renewals = flanneld
        .metric("flannel_lease_renewals_total")
        .unwrap_or(0.0);
    poll(&format!("{when}: a renewal of the new lease"), WAIT, || {
        (flanneld.metric("flannel_lease_renewals_total")? > renewals).then_some(())
    });
    assert_eq!(flanneld.http_get("/readyz").map(|r| r.0), Some(200));
}

#[test]
fn password_auth_survives_token_expiry_and_etcd_restart() {
    netns_tests::require_etcd!();
    // Simple tokens that etcd forgets 3 s after their last use, and on restart.
    let mut etcd = Etcd::start_local(common::short_lived_tokens()).unwrap();
    common::config(&etcd, CONFIG);
    etcd.enable_auth().unwrap();
    let mut flags = FLANNEL_USER.to_vec();
    flags.push("--subnet-lease-ttl=20s");
    let flanneld = Flanneld::start(&etcd.endpoint(), "198.18.7.1", &flags);
    flanneld.wait_ready(WAIT);

    // flanneld authenticated once at start; once etcd dropped that token, every request,
    // watch and keep-alive it makes needs a new one.
    wait_for_expiry_of_every_token(&etcd, &flanneld);
    lease_comes_back(&etcd, &flanneld, "after the token expired");

    // Several expiries in a row.
    wait_for_expiry_of_every_token(&etcd, &flanneld);
    lease_comes_back(&etcd, &flanneld, "after a second expiry");

    // A restart forgets every token at once, and breaks the watch.
    etcd.kill9();
    etcd.start().unwrap();
    lease_comes_back(&etcd, &flanneld, "after an etcd restart");
    assert!(
        flanneld.log().contains("authenticating again"),
        "{}",
        flanneld.log()
    );
}

#[test]
fn https_without_cafile_trusts_the_system_roots() {
    netns_tests::require_etcd!();
    let pki = tempfile::tempdir().unwrap();
    let ca = make_ca(pki.path(), "ca");
    let server = issue(pki.path(), &ca, "server");
    let etcd = Etcd::start_local(LocalEtcd {
        tls: Some(ServerTls {
            ca: ca.cert.clone(),
            server,
            client: None,
        }),
        ..Default::default()
    })
    .unwrap();
    common::config(&etcd, CONFIG);
    let ca_file = ca.cert.display().to_string();

    // The system store (here pointed at by SSL_CERT_FILE, which flannel's Go honours too)
    // holds the CA that signed etcd's certificate: no --etcd-cafile needed.
    let trusted = Flanneld::start_with_env(
        None,
        &etcd.endpoint(),
        "198.18.7.1",
        &[],
        &[("SSL_CERT_FILE", &ca_file)],
    );
    trusted.wait_ready(WAIT);

    // A system store without it: refused, and the log says why.
    let other = make_ca(pki.path(), "other-ca");
    let other_file = other.cert.display().to_string();
    let refused = Flanneld::start_with_env(
        None,
        &etcd.endpoint(),
        "198.18.7.2",
        &[],
        &[("SSL_CERT_FILE", &other_file)],
    );
    poll("a certificate error in the log", WAIT, || {
        let log = refused.log().to_lowercase();
        (log.contains("certificate")
            && (log.contains("unknownissuer") || log.contains("unknown issuer")))
        .then_some(())
    });
    assert_eq!(refused.http_get("/readyz").map(|r| r.0), Some(503));
    assert_eq!(common::subnet_keys(&etcd).len(), 1);
}
