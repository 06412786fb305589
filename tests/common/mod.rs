//! Test harness: a real `etcd` on free loopback ports and real `flanneld` processes, each in a
//! guard that removes what it made, even when the test fails.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netns_tests::{EtcdSpec, EtcdTls, FlanneldCommand};

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

/// A certificate and its key.
#[derive(Debug, Clone)]
pub struct CertKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// TLS material for etcd: the CA, the server's certificate, and a client certificate that the
/// server requires when present.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub ca: PathBuf,
    pub server: CertKey,
    pub client: Option<CertKey>,
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

pub struct Etcd {
    pub dir: tempfile::TempDir,
    /// Network namespace etcd runs in (None: the test's own).
    pub netns: Option<String>,
    pub client_port: u16,
    peer_port: u16,
    tls: Option<ServerTls>,
    child: Option<Child>,
    /// Extra etcdctl flags: TLS client files, `--user`.
    pub ctl_flags: Vec<String>,
    /// Extra etcd flags (e.g. `--auth-token-ttl=3`).
    extra_args: Vec<String>,
}

impl Etcd {
    pub fn start() -> Etcd {
        Self::start_with(None)
    }

    pub fn start_with(tls: Option<ServerTls>) -> Etcd {
        Self::start_in(None, tls)
    }

    /// Starts etcd inside network namespace `netns` (on its loopback).
    pub fn start_in(netns: Option<&str>, tls: Option<ServerTls>) -> Etcd {
        Self::start_full(netns, tls, &[])
    }

    /// Starts etcd with extra flags, kept for `resume`.
    pub fn start_with_args(args: &[&str]) -> Etcd {
        Self::start_full(None, None, args)
    }

    fn start_full(netns: Option<&str>, tls: Option<ServerTls>, args: &[&str]) -> Etcd {
        let mut etcd = Etcd {
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            netns: netns.map(String::from),
            dir: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
            ctl_flags: tls
                .iter()
                .flat_map(|t| {
                    let mut f = vec![format!("--cacert={}", t.ca.display())];
                    if let Some(c) = &t.client {
                        f.push(format!("--cert={}", c.cert.display()));
                        f.push(format!("--key={}", c.key.display()));
                    }
                    f
                })
                .collect(),
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
        let mut spec = EtcdSpec::single("t", self.dir.path().join("data"), &self.endpoint(), &peer);
        spec.tls = self.tls.as_ref().map(|tls| EtcdTls {
            cert: tls.server.cert.clone(),
            key: tls.server.key.clone(),
            client_ca: tls.client.as_ref().map(|_| tls.ca.clone()),
        });
        spec.extra_args = std::iter::once("--log-level=warn".to_string())
            .chain(self.extra_args.iter().cloned())
            .collect();
        let mut cmd = spec.command(self.netns.as_deref());
        cmd.env("ETCD_UNSUPPORTED_ARCH", "")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null());
        self.child = Some(cmd.spawn().expect("start etcd"));
        poll("etcd to answer", Duration::from_secs(20), || {
            self.etcdctl(&["endpoint", "health"]).ok()
        });
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
        let out = in_netns(self.netns.as_deref(), "etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .arg("--command-timeout=3s")
            .args(&self.ctl_flags)
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
        let out = self
            .etcdctl(&["get", "--prefix", prefix])
            .expect("etcdctl get");
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

    /// Creates `root` and a `flannel` user (password `s3cret`) that may read and write the
    /// network prefix, and turns authentication on; etcdctl then acts as root.
    pub fn enable_auth(&mut self) {
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
            self.etcdctl(&args)
                .unwrap_or_else(|e| panic!("etcdctl {args:?}: {e}"));
        }
        self.ctl_flags.push("--user=root:rootpw".into());
    }

    /// Tokens of user `flannel` that etcd dropped as expired (logged by an etcd started with
    /// `--logger=zap --log-level=info`).
    pub fn expired_flannel_tokens(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("deleted a simple token") && l.contains("\"flannel\""))
            .count()
    }
}

/// etcd flags for simple auth tokens that expire 3 s after their last use, logging each expiry.
pub const SHORT_LIVED_TOKENS: [&str; 4] = [
    "--auth-token=simple",
    "--auth-token-ttl=3",
    "--logger=zap",
    "--log-level=info",
];

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `flanneld` process with its own subnet file, health port and log.
pub struct Flanneld {
    pub dir: tempfile::TempDir,
    pub netns: Option<String>,
    pub health_port: u16,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    child: Option<Child>,
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
        let mut f = Flanneld {
            netns: netns.map(String::from),
            dir: tempfile::tempdir().unwrap(),
            health_port: free_port(),
            args,
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
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
        let mut flanneld = FlanneldCommand::new(env!("CARGO_BIN_EXE_flanneld"));
        flanneld.netns = self.netns.clone();
        flanneld.args = self.args.clone();
        flanneld.subnet_file = Some(self.subnet_file());
        flanneld.healthz = Some((Ipv4Addr::LOCALHOST.into(), self.health_port));
        flanneld.env = self.envs.clone();
        let child = flanneld
            .spawn_logged(&self.dir.path().join("flanneld.log"))
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

impl Drop for Flanneld {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = self.dir.path().join("flanneld.log");
            eprintln!("--- flanneld log tail ({}) ---", self.dir.path().display());
            eprintln!("{}", netns_tests::cmd::tail(&log, 30));
        }
    }
}

/// A command run in `netns` through `ip netns exec`, or directly.
pub fn in_netns(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
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
        let out = in_netns(Some(&self.name), argv[0])
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
