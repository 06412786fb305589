//! flanneld against etcd with TLS client certificates and with password authentication.

mod common;

use std::time::Duration;

use common::{etcd_available, issue, make_ca, poll, CertKey, Etcd, Flanneld, ServerTls};

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
    if !etcd_available() {
        return;
    }
    let pki = tempfile::tempdir().unwrap();
    let ca = make_ca(pki.path(), "ca");
    let server = issue(pki.path(), &ca, "server");
    let client = issue(pki.path(), &ca, "client");
    let etcd = Etcd::start_with(Some(ServerTls {
        ca: ca.cert.clone(),
        server,
        client: Some(client.clone()),
    }));
    assert!(etcd.endpoint().starts_with("https://"));
    etcd.config(CONFIG);

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
    let plain = format!("http://127.0.0.1:{}", etcd.client_port);
    let mut refused = Flanneld::start(&plain, "198.18.7.3", &flag_refs);
    let status = refused.wait_exit(WAIT);
    assert!(!status.success());
    assert!(refused.log().contains("plain http://"), "{}", refused.log());
}

#[test]
fn password_authentication() {
    if !etcd_available() {
        return;
    }
    let mut etcd = Etcd::start();
    etcd.config(CONFIG);
    for args in [
        vec!["user", "add", "root:rootpw"],
        vec!["role", "add", "flannel"],
        vec![
            "role",
            "grant-permission",
            "flannel",
            "--prefix=true",
            "readwrite",
            "/coreos.com/network/",
        ],
        vec!["user", "add", "flannel:s3cret"],
        vec!["user", "grant-role", "flannel", "flannel"],
        vec!["auth", "enable"],
    ] {
        etcd.etcdctl(&args)
            .unwrap_or_else(|e| panic!("etcdctl {args:?}: {e}"));
    }
    etcd.ctl_flags.push("--user=root:rootpw".into());
    // Without credentials the keys are out of reach.
    assert!(etcd
        .etcdctl(&["get", "--user=nobody:x", "/coreos.com/network/config"])
        .is_err());

    let good = Flanneld::start(
        &etcd.endpoint(),
        "198.18.7.1",
        &["--etcd-username=flannel", "--etcd-password=s3cret"],
    );
    good.wait_ready(WAIT);
    assert_eq!(common::subnet_keys(&etcd).len(), 1);

    let mut wrong = Flanneld::start(
        &etcd.endpoint(),
        "198.18.7.2",
        &["--etcd-username=flannel", "--etcd-password=wrong"],
    );
    let status = wrong.wait_exit(WAIT);
    assert!(!status.success());
    assert!(
        wrong.log().contains("authentication failed"),
        "{}",
        wrong.log()
    );
}
