//! Test harness: a real `etcd` on free loopback ports and real `flanneld` processes, each in a
//! guard that removes what it made, even when the test fails.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub use netns_tests::{free_port, CertKey, Etcd, LocalEtcd};
use netns_tests::{Daemon, FlanneldCommand};

/// Polls `f` until it returns `Some`, failing the test with `what` at the deadline.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a CA in `dir` named `name`: returns (cert, key).
pub fn make_ca(dir: &Path, name: &str) -> CertKey {
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &crt,
        ],
    );
    CertKey {
        cert: dir.join(crt),
        key: dir.join(key),
    }
}

/// Issues a certificate signed by `ca`, valid for 127.0.0.1, for server and client use.
pub fn issue(dir: &Path, ca: &CertKey, name: &str) -> CertKey {
    let (crt, key, csr, ext) = (
        format!("{name}.crt"),
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
    );
    std::fs::write(
        dir.join(&ext),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            ca.cert.to_str().unwrap(),
            "-CAkey",
            ca.key.to_str().unwrap(),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    );
    CertKey {
        cert: dir.join(crt),
        key: dir.join(key),
    }
}

/// Writes the network config at flannel's default prefix.
pub fn config(etcd: &Etcd, json: &str) {
    etcd.put("/coreos.com/network/config", json)
        .expect("etcdctl put config");
}

/// A loopback etcd whose simple auth tokens expire 3 s after their last use, logging each
/// expiry.
pub fn short_lived_tokens() -> LocalEtcd {
    LocalEtcd {
        extra_args: [
            "--auth-token=simple",
            "--auth-token-ttl=3",
            "--logger=zap",
            "--log-level=info",
        ]
        .map(String::from)
        .to_vec(),
        ..LocalEtcd::default()
    }
}

/// Tokens of user `flannel` that etcd dropped as expired (logged by an etcd started with
/// [`short_lived_tokens`]).
pub fn expired_flannel_tokens(etcd: &Etcd) -> usize {
    etcd.log()
        .lines()
        .filter(|l| l.contains("deleted a simple token") && l.contains("\"flannel\""))
        .count()
}

/// A `flanneld` process with its own subnet file, health port and log.
pub struct Flanneld {
    process: Daemon,
    pub dir: tempfile::TempDir,
    pub netns: Option<String>,
    pub health_port: u16,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Flanneld {
    /// Starts flanneld on `lo` advertising `public_ip`, with extra flags.
    pub fn start(endpoint: &str, public_ip: &str, extra: &[&str]) -> Flanneld {
        Self::start_in(None, endpoint, public_ip, extra)
    }

    /// Starts flanneld inside network namespace `netns`.
    pub fn start_in(
        netns: Option<&str>,
        endpoint: &str,
        public_ip: &str,
        extra: &[&str],
    ) -> Flanneld {
        Self::start_with_env(netns, endpoint, public_ip, extra, &[])
    }

    pub fn start_with_env(
        netns: Option<&str>,
        endpoint: &str,
        public_ip: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Flanneld {
        let mut args = vec![
            format!("--etcd-endpoints={endpoint}"),
            "--iface=lo".to_string(),
            // The root namespace is the machine's own: leave its FORWARD chain alone.
            "--iptables-forward-rules=false".to_string(),
            format!("--public-ip={public_ip}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let dir = tempfile::tempdir().unwrap();
        let mut f = Flanneld {
            process: Daemon::new("flanneld", dir.path().join("flanneld.log"), 30),
            netns: netns.map(String::from),
            dir,
            health_port: free_port(),
            args,
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        f.resume();
        f
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.path().join("subnet.env")
    }

    pub fn resume(&mut self) {
        assert!(!self.process.is_running());
        let mut flanneld = FlanneldCommand::new(env!("CARGO_BIN_EXE_flanneld"));
        flanneld.netns = self.netns.clone();
        flanneld.args = self.args.clone();
        flanneld.subnet_file = Some(self.subnet_file());
        flanneld.healthz = Some((Ipv4Addr::LOCALHOST.into(), self.health_port));
        flanneld.env = self.envs.clone();
        self.process
            .start(flanneld.command())
            .expect("start flanneld");
    }

    /// SIGTERM and wait: a clean stop (SIGKILL only if it hangs for a minute).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.process
            .stop(Duration::from_secs(60))
            .expect("flanneld was running")
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Waits for the process to exit on its own; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.process.wait_exit(timeout).unwrap()
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// GET a path on the health server: (status code, body), or None when not listening.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.health_port)),
            path,
        )
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    pub fn wait_ready(&self, timeout: Duration) {
        poll("flanneld /readyz to return 200", timeout, || {
            matches!(self.http_get("/readyz"), Some((200, _))).then_some(())
        });
    }

    /// `FLANNEL_SUBNET` from the subnet file, once written.
    pub fn subnet(&self) -> Option<String> {
        read_env(&self.subnet_file(), "FLANNEL_SUBNET")
    }
}

/// A network namespace with its loopback up, deleted (with its processes) on drop.
pub struct Netns {
    pub name: String,
    _guard: netns_tests::Netns,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ft{tag}{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let guard = netns_tests::Netns::create(&name).unwrap();
        Netns {
            name,
            _guard: guard,
        }
    }

    /// Runs a command in the namespace: Ok(stdout) or Err(stderr).
    pub fn run(&self, argv: &[&str]) -> Result<String, String> {
        let out = netns_tests::netns::command_in(Some(&self.name), argv[0])
            .args(&argv[1..])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

pub fn read_env(path: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(String::from))
}

pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The subnet part of a lease key: `/coreos.com/network/subnets/10.5.3.0-24` → `10.5.3.0-24`.
pub fn subnet_keys(etcd: &Etcd) -> Vec<String> {
    etcd.get_prefix("/coreos.com/network/subnets/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k.rsplit('/').next().unwrap().to_string())
        .collect()
}

/// `10.5.3.1/24` (subnet file) → `10.5.3.0-24` (lease key).
pub fn key_of_subnet(subnet: &str) -> String {
    let (ip, len) = subnet.split_once('/').unwrap();
    let net = ipnetwork::Ipv4Network::new(ip.parse().unwrap(), len.parse().unwrap()).unwrap();
    format!("{}-{}", net.network(), len)
}
