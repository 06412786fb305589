//! Every start-up error exits non-zero with a message that names what to fix.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs flanneld and waits (at most 15 s) for it to exit: (success, stderr).
fn flanneld(args: &[&str]) -> (bool, String) {
    let iface = if args.iter().any(|a| a.starts_with("--iface=")) {
        None
    } else {
        Some("--iface=lo")
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_flanneld"))
        .args(iface)
        .arg("--public-ip=198.18.7.1")
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("flanneld {args:?} did not exit: a start-up error must stop it");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.success(), stderr)
}

#[test]
fn startup_errors_name_what_to_fix() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port().to_string();
    let busy_flag = format!("--healthz-port={busy_port}");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--subnet-lease-renew-margin=0"],
            "--subnet-lease-renew-margin",
        ),
        (vec!["--iptables-resync=0"], "--iptables-resync"),
        (vec!["--healthz-ip=not-an-ip"], "--healthz-ip"),
        (vec!["--iface=nosuch0"], "--iface nosuch0"),
        (vec!["--iface-regex=("], "--iface-regex"),
        (
            vec!["--etcd-endpoints=127.0.0.1:2379"],
            "must start with http:// or https://",
        ),
        (
            vec![
                "--etcd-endpoints=http://127.0.0.1:1",
                "--etcd-cafile=/nonexistent/ca.pem",
            ],
            "plain http://",
        ),
        (
            vec![
                "--etcd-endpoints=https://127.0.0.1:1",
                "--etcd-cafile=/nonexistent/ca.pem",
            ],
            "--etcd-cafile /nonexistent/ca.pem",
        ),
        (
            vec![
                "--etcd-endpoints=https://127.0.0.1:1",
                "--etcd-certfile=/tmp/x.pem",
            ],
            "--etcd-certfile and --etcd-keyfile go together",
        ),
        (
            vec!["--etcd-username=flannel"],
            "--etcd-username and --etcd-password go together",
        ),
        (
            vec![
                "--etcd-endpoints=http://127.0.0.1:1",
                "--etcd-username=flannel",
                "--etcd-password=s3cret",
            ],
            "--etcd-insecure-password",
        ),
        (
            vec!["--healthz-ip=127.0.0.1", &busy_flag],
            "--healthz-ip/--healthz-port",
        ),
    ];
    for (args, expected) in cases {
        let (ok, stderr) = flanneld(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected {expected:?} in:\n{stderr}"
        );
    }
    drop(busy);
}
