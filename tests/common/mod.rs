//! Test harness: a real `etcd` on free loopback ports and real `flanneld` processes, each in a
//! guard that removes what it made, even when the test fails.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether tests that need `etcd` can run; when `CI` is set a missing etcd fails the test.
pub fn etcd_available() -> bool {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("etcd is not installed, and CI is set: install etcd-server (the README's test command does)");
        }
        eprintln!("SKIP: etcd is not installed");
    }
    found
}

pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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

/// TLS material for etcd: which flags the server gets.
#[derive(Debug, Clone, Default)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

pub struct Etcd {
    pub dir: tempfile::TempDir,
    pub client_port: u16,
    peer_port: u16,
    tls: Option<ServerTls>,
    child: Option<Child>,
}

impl Etcd {
    pub fn start() -> Etcd {
        Self::start_with(None)
    }

    pub fn start_with(tls: Option<ServerTls>) -> Etcd {
        let mut etcd = Etcd {
            dir: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
            tls,
            child: None,
        };
        etcd.resume();
        etcd
    }

    fn scheme(&self) -> &str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client_port)
    }

    /// Starts etcd (again) on the same ports and data directory.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd already running");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let mut cmd = Command::new("etcd");
        cmd.arg("--name=t")
            .arg(format!("--data-dir={}", self.dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={}", self.endpoint()))
            .arg(format!("--advertise-client-urls={}", self.endpoint()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=t={peer}"))
            .arg("--log-level=warn")
            .env("ETCD_UNSUPPORTED_ARCH", "")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null());
        if let Some(tls) = &self.tls {
            cmd.arg(format!("--cert-file={}", tls.cert.display()))
                .arg(format!("--key-file={}", tls.key.display()));
            if let Some(ca) = &tls.client_ca {
                cmd.arg("--client-cert-auth")
                    .arg(format!("--trusted-ca-file={}", ca.display()));
            }
        }
        self.child = Some(cmd.spawn().expect("start etcd"));
        let port = self.client_port;
        poll("etcd to listen", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        if self.tls.is_none() {
            poll("etcd to answer", Duration::from_secs(20), || {
                self.etcdctl(&["endpoint", "health"]).ok()
            });
        }
    }

    /// Kills etcd hard, keeping its data directory for `resume`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs etcdctl (v3 API) against this etcd; Ok(stdout) on success.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .arg("--command-timeout=3s")
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn put(&self, key: &str, value: &str) {
        self.etcdctl(&["put", key, value]).expect("etcdctl put");
    }

    /// Keys under a prefix with their values.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self.etcdctl(&["get", "--prefix", prefix]).expect("etcdctl get");
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].to_string(), c[1].to_string()))
            .collect()
    }

    pub fn config(&self, json: &str) {
        self.put("/coreos.com/network/config", json);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `flanneld` process with its own subnet file, health port and log.
pub struct Flanneld {
    pub dir: tempfile::TempDir,
    pub health_port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl Flanneld {
    /// Starts flanneld on `lo` advertising `public_ip`, with extra flags.
    pub fn start(endpoint: &str, public_ip: &str, extra: &[&str]) -> Flanneld {
        let mut args = vec![
            format!("--etcd-endpoints={endpoint}"),
            "--iface=lo".to_string(),
            format!("--public-ip={public_ip}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut f = Flanneld {
            dir: tempfile::tempdir().unwrap(),
            health_port: free_port(),
            args,
            child: None,
        };
        f.resume();
        f
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.path().join("subnet.env")
    }

    pub fn resume(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("flanneld.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flanneld"))
            .args(&self.args)
            .arg(format!("--subnet-file={}", self.subnet_file().display()))
            .arg("--healthz-ip=127.0.0.1")
            .arg(format!("--healthz-port={}", self.health_port))
            .env_remove("NOTIFY_SOCKET")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start flanneld");
        self.child = Some(child);
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        c.wait().unwrap()
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Waits for the process to exit on its own; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("running");
        let status = poll("flanneld to exit", timeout, || c.try_wait().unwrap());
        self.child = None;
        status
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("flanneld.log")).unwrap_or_default()
    }

    /// GET a path on the health server: (status code, body), or None when not listening.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(SocketAddr::from((Ipv4Addr::LOCALHOST, self.health_port)), path)
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

impl Drop for Flanneld {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("--- flanneld log tail ({}) ---", self.dir.path().display());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
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
