//! `flannel-bench scale`: the control plane and data plane at thousands of hosts.
//!
//! Everything runs in network namespaces this process creates (and removes on exit, also on a
//! panic), with a real `etcd` and the real `flanneld`:
//!
//! 1. **`ip -batch` baseline** — a fresh namespace with a veth "external interface" and a
//!    hand-made `flannel.1` VXLAN device; `ip -batch` adds the 2,000 neighbour entries and
//!    2,000 routes, `bridge -batch` the 2,000 FDB entries — the same operations flanneld does.
//! 2. **Daemon start** — etcd holds the network config and 2,000 peer leases; flanneld starts in
//!    a fresh host namespace. A netlink monitor in that namespace timestamps the first
//!    permanent neighbour entry and the 2,000th peer route. Reported: process start → last route,
//!    and the programming window (first neighbour → last route), each against the baseline.
//! 3. **RSS** — flanneld's peak resident memory (`VmHWM`) after that start.
//! 4. **Join latency** — 10 flanneld hosts on a bridge watch etcd; 200 new leases are put one at
//!    a time; for each, the time from the put to its route on every host (median, p99).
//!
//! Rounds of 1 and 2 alternate, so a noisy machine affects both alike; medians are reported.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

const ETCD_IP: &str = "198.18.0.2";
const ETCD_PORT: u16 = 2379;
/// etcd's peer port stays on its namespace's loopback.
const ETCD_PEER_URL: &str = "http://127.0.0.1:2380";
const PREFIX: &str = "/coreos.com/network";

struct Opts {
    peers: usize,
    joins: usize,
    hosts: usize,
    rounds: usize,
    json: Option<PathBuf>,
    flanneld: PathBuf,
}

fn usage() -> i32 {
    eprintln!(
        "usage: flannel-bench scale [--peers N] [--joins N] [--hosts N] [--rounds R] \
         [--json FILE] [--flanneld PATH]\n\
         defaults: --peers 2000 --joins 200 --hosts 10 --rounds 3; flanneld: $FLANNELD_BIN, \
         else target/release/flanneld next to this binary"
    );
    2
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        peers: 2000,
        joins: 200,
        hosts: 10,
        rounds: 3,
        json: None,
        flanneld: crate::common::default_flanneld(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        let num = |v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{a}: {v:?} is not a number"))
        };
        match a.as_str() {
            "--peers" => o.peers = num(val()?)?,
            "--joins" => o.joins = num(val()?)?,
            "--hosts" => o.hosts = num(val()?)?,
            "--rounds" => o.rounds = num(val()?)?.max(1),
            "--json" => o.json = Some(PathBuf::from(val()?)),
            "--flanneld" => o.flanneld = PathBuf::from(val()?),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if o.peers == 0 || o.peers > 60_000 {
        return Err("--peers must be between 1 and 60000".into());
    }
    if o.joins > 250 || o.hosts == 0 || o.hosts > 200 {
        return Err("--joins must be at most 250, --hosts between 1 and 200".into());
    }
    Ok(o)
}

pub fn main(args: &[String]) -> i32 {
    let opts = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("scale: {e}");
            return usage();
        }
    };
    if !netns_tests::privileges::is_root() {
        eprintln!("scale: needs root (network namespaces)");
        return 1;
    }
    if !opts.flanneld.exists() {
        eprintln!(
            "scale: flanneld not found at {} (cargo build --release -p flannel, or --flanneld)",
            opts.flanneld.display()
        );
        return 1;
    }
    match run(&opts) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("scale: {e}");
            1
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces, processes, commands

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace, deleted on drop.
struct Ns {
    name: String,
    _guard: netns_tests::Netns,
}

impl Ns {
    fn new(tag: &str) -> Result<Ns, String> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("fbs-{tag}-{}-{n}", std::process::id());
        let guard = netns_tests::Netns::create(&name).map_err(|e| e.to_string())?;
        Ok(Ns {
            name,
            _guard: guard,
        })
    }

    fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
}

/// A child process, killed and reaped on drop.
struct Proc {
    child: Child,
    what: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sh(prog: &str, args: &[&str]) -> Result<String, String> {
    netns_tests::cmd::run(prog, args).map_err(|e| e.to_string())
}

/// Enters namespace `path` on the calling thread.
fn setns(path: &str) -> Result<(), String> {
    let f = fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    netns_tests::netns::enter_file(&f, path).map_err(|e| e.to_string())
}

/// Runs `f` on a new thread inside namespace `ns` (`f` is not run when entering fails).
fn in_ns<T: Send + 'static>(
    ns: &Ns,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<Result<T, String>> {
    let path = ns.path();
    std::thread::spawn(move || {
        setns(&path)?;
        Ok(f())
    })
}

/// Starts `cmd` (built to run inside a namespace: `ip netns exec` execs the program, so the
/// child's pid is the program's) with its output in `log`.
fn spawn_logged(mut cmd: Command, log: &Path, what: &str) -> Result<Proc, String> {
    let logf = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(logf.try_clone().map_err(|e| e.to_string())?)
        .stderr(logf)
        .spawn()
        .map_err(|e| format!("starting {what}: {e}"))?;
    Ok(Proc {
        child,
        what: what.to_string(),
    })
}

fn veth(a: &Ns, a_dev: &str, b: &Ns, b_dev: &str) -> Result<(), String> {
    let tmp = format!("fbsv{}", COUNTER.fetch_add(1, Ordering::SeqCst));
    sh(
        "ip",
        &[
            "link", "add", &tmp, "netns", &a.name, "type", "veth", "peer", "name", b_dev, "netns",
            &b.name,
        ],
    )?;
    a.ip(&["link", "set", &tmp, "name", a_dev])?;
    a.ip(&["link", "set", a_dev, "up"])?;
    b.ip(&["link", "set", b_dev, "up"])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// etcd over its JSON gateway (no client library needed)

struct Etcd {
    _proc: Proc,
    ns_path: String,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<TempDir, String> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("fbs-{tag}-{}-{n}", std::process::id()));
        fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        s.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    s
}

impl Etcd {
    /// Starts etcd in `ns` on `ETCD_IP` (which `ns` must have).
    fn start(ns: &Ns) -> Result<Etcd, String> {
        let dir = TempDir::new("etcd")?;
        let url = format!("http://{ETCD_IP}:{ETCD_PORT}");
        let mut spec =
            netns_tests::EtcdSpec::single("default", dir.0.join("data"), &url, ETCD_PEER_URL);
        spec.extra_args = [
            "--max-txn-ops",
            "1024",
            "--quota-backend-bytes",
            "1073741824",
        ]
        .map(String::from)
        .to_vec();
        let proc = spawn_logged(
            spec.command(Some(&ns.name)),
            &dir.0.join("etcd.log"),
            "etcd",
        )?;
        let etcd = Etcd {
            _proc: proc,
            ns_path: ns.path(),
            _dir: dir,
        };
        let start = Instant::now();
        loop {
            if etcd.post("/v3/kv/range", r#"{"key":"AA=="}"#).is_ok() {
                return Ok(etcd);
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err("etcd did not answer within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A TCP connection to etcd, opened from inside its namespace.
    fn connect(&self) -> Result<TcpStream, String> {
        let path = self.ns_path.clone();
        std::thread::spawn(move || {
            setns(&path)?;
            TcpStream::connect((ETCD_IP, ETCD_PORT)).map_err(|e| format!("connect etcd: {e}"))
        })
        .join()
        .map_err(|_| "connect thread panicked".to_string())?
    }

    /// One HTTP/1.1 POST on a connection of its own; returns the body.
    fn post(&self, path: &str, body: &str) -> Result<String, String> {
        let s = self.connect()?;
        Self::post_on(s, path, body)
    }

    fn post_on(mut s: TcpStream, path: &str, body: &str) -> Result<String, String> {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {ETCD_IP}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        let (head, rest) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("etcd {path}: {head} {rest}"));
        }
        Ok(rest.to_string())
    }

    fn put(&self, key: &str, value: &str) -> Result<(), String> {
        let body = json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes())});
        self.post("/v3/kv/put", &body.to_string()).map(|_| ())
    }

    /// Puts many keys, up to 500 per transaction.
    fn put_many(&self, kvs: &[(String, String)]) -> Result<(), String> {
        for chunk in kvs.chunks(500) {
            let ops: Vec<_> = chunk
                .iter()
                .map(|(k, v)| {
                    json!({"requestPut": {"key": b64(k.as_bytes()), "value": b64(v.as_bytes())}})
                })
                .collect();
            self.post("/v3/kv/txn", &json!({"success": ops}).to_string())?;
        }
        Ok(())
    }

    fn delete_prefix(&self, prefix: &str) -> Result<(), String> {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("non-empty prefix") += 1;
        let body = json!({"key": b64(prefix.as_bytes()), "range_end": b64(&end)});
        self.post("/v3/kv/deleterange", &body.to_string())
            .map(|_| ())
    }
}

// ---------------------------------------------------------------------------------------------
// A netlink monitor: when did which route (and the first permanent neighbour) appear?

#[derive(Default)]
struct Seen {
    /// First time an IPv4 /24 route to 10.0.0.0/8 appeared in the main table, by destination.
    routes: HashMap<u32, Instant>,
    first_neigh: Option<Instant>,
    overrun: bool,
}

struct Monitor {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;

impl Monitor {
    fn start(ns: &Ns) -> Result<Monitor, String> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (seen.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = in_ns(ns, move || {
            let fd = match open_monitor() {
                Ok(fd) => fd,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            read_monitor(&fd, &s2, &st2);
        });
        match ready_rx.recv() {
            Ok(r) => r?,
            // The thread ended before opening the socket: entering the namespace failed.
            Err(_) => {
                return Err(thread
                    .join()
                    .map_err(|_| "monitor thread panicked".to_string())?
                    .err()
                    .unwrap_or_else(|| "monitor thread ended".into()))
            }
        }
        Ok(Monitor {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().routes.len()
    }

    /// Waits until `n` routes were seen; returns when the n-th appeared.
    fn wait_count(&self, n: usize, timeout: Duration) -> Result<Instant, String> {
        let start = Instant::now();
        loop {
            {
                let s = self.seen.lock().unwrap();
                if s.routes.len() >= n {
                    return Ok(*s.routes.values().max().expect("n ≥ 1"));
                }
                if s.overrun {
                    return Err("netlink monitor overrun".into());
                }
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "only {} of {n} routes after {timeout:?}",
                    self.count()
                ));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    fn route_seen(&self, dst: u32) -> Option<Instant> {
        self.seen.lock().unwrap().routes.get(&dst).copied()
    }
}

fn open_monitor() -> Result<OwnedFd, String> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, NetlinkAddr, SockFlag, SockProtocol,
        SockType,
    };
    use nix::sys::time::TimeVal;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(|e| format!("netlink socket: {e}"))?;
    // Best effort: a smaller buffer shows up as an overrun, which the monitor reports.
    let _ = setsockopt(&fd, sockopt::RcvBufForce, &(32 << 20));
    // Wakes the reader to look at its stop flag.
    let _ = setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 50_000));
    let groups = NetlinkAddr::new(0, RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE);
    bind(fd.as_raw_fd(), &groups).map_err(|e| format!("bind netlink monitor: {e}"))?;
    Ok(fd)
}

fn read_monitor(fd: &OwnedFd, seen: &Mutex<Seen>, stop: &AtomicBool) {
    use nix::sys::socket::{recv, MsgFlags};
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::SeqCst) {
        let received = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty());
        let now = Instant::now();
        match received {
            Ok(n) => parse_messages(&buf[..n], now, &mut seen.lock().unwrap()),
            Err(nix::errno::Errno::ENOBUFS) => seen.lock().unwrap().overrun = true,
            Err(_) => {}
        }
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn parse_messages(mut b: &[u8], now: Instant, s: &mut Seen) {
    const RTM_NEWROUTE: u16 = 24;
    const RTM_NEWNEIGH: u16 = 28;
    const NUD_PERMANENT: u16 = 0x80;
    while b.len() >= 16 {
        let len = u32_at(b, 0) as usize;
        if len < 16 || len > b.len() {
            return;
        }
        let kind = u16_at(b, 4);
        let body = &b[16..len];
        match kind {
            RTM_NEWROUTE if body.len() >= 12 => {
                let (family, dst_len, table) = (body[0], body[1], body[4]);
                if family == libc::AF_INET as u8 && dst_len == 24 && table == 254 {
                    let mut attrs = &body[12..];
                    while attrs.len() >= 4 {
                        let alen = u16_at(attrs, 0) as usize;
                        if alen < 4 || alen > attrs.len() {
                            break;
                        }
                        if u16_at(attrs, 2) == 1 && alen >= 8 {
                            let dst = u32::from_be_bytes([attrs[4], attrs[5], attrs[6], attrs[7]]);
                            if dst >> 24 == 10 {
                                s.routes.entry(dst).or_insert(now);
                            }
                        }
                        let step = (alen + 3) & !3;
                        attrs = &attrs[step.min(attrs.len())..];
                    }
                }
            }
            RTM_NEWNEIGH if body.len() >= 12 => {
                let state = u16_at(body, 8);
                if body[0] == libc::AF_INET as u8 && state & NUD_PERMANENT != 0 {
                    s.first_neigh.get_or_insert(now);
                }
            }
            _ => {}
        }
        let step = (len + 3) & !3;
        b = &b[step.min(b.len())..];
    }
}

// ---------------------------------------------------------------------------------------------
// The pieces of the benchmark

fn peer_subnet(i: usize) -> Ipv4Addr {
    // 10.1.0.0/24, 10.1.1.0/24, ...: away from 10.0.x (ours may land anywhere else, it avoids
    // taken ones).
    Ipv4Addr::new(10, 1 + (i / 256) as u8, (i % 256) as u8, 0)
}

fn peer_mac(i: usize) -> String {
    format!("02:00:00:00:{:02x}:{:02x}", i / 256, i % 256)
}

fn peer_public(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// `ip -batch` + `bridge -batch` for `peers` peers on a hand-made `flannel.1`; returns seconds.
fn ip_batch_round(peers: usize, dir: &Path) -> Result<f64, String> {
    let ns = Ns::new("ipb")?;
    let peer = Ns::new("ipbp")?;
    veth(&ns, "e0", &peer, "e1")?;
    ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "e0"])?;
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        "198.18.0.1",
        "dev",
        "e0",
        "dstport",
        "8472",
        "nolearning",
    ])?;
    ns.ip(&["link", "set", "flannel.1", "mtu", "1450", "up"])?;
    ns.ip(&["addr", "add", "10.0.0.0/32", "dev", "flannel.1"])?;
    let mut ipf = String::new();
    let mut brf = String::new();
    for i in 0..peers {
        let s = peer_subnet(i);
        ipf.push_str(&format!(
            "neigh replace {s} lladdr {} dev flannel.1 nud permanent\n",
            peer_mac(i)
        ));
        brf.push_str(&format!(
            "fdb replace {} dev flannel.1 dst {} self permanent\n",
            peer_mac(i),
            peer_public(i)
        ));
    }
    for i in 0..peers {
        let s = peer_subnet(i);
        ipf.push_str(&format!(
            "route replace {s}/24 via {s} dev flannel.1 onlink\n"
        ));
    }
    let (ipp, brp) = (dir.join("ip.batch"), dir.join("bridge.batch"));
    fs::write(&ipp, ipf).map_err(|e| e.to_string())?;
    fs::write(&brp, brf).map_err(|e| e.to_string())?;
    let t = Instant::now();
    sh("ip", &["-n", &ns.name, "-batch", &ipp.to_string_lossy()])?;
    sh(
        "bridge",
        &["-n", &ns.name, "-batch", &brp.to_string_lossy()],
    )?;
    let secs = t.elapsed().as_secs_f64();
    let routes = ns.ip(&["-4", "route", "show", "dev", "flannel.1"])?;
    if routes.lines().count() != peers {
        return Err(format!(
            "ip -batch made {} routes, not {peers}",
            routes.lines().count()
        ));
    }
    Ok(secs)
}

struct StartResult {
    start_to_last_route: f64,
    programming: f64,
    hwm_kb: u64,
    rss_kb: u64,
}

fn status_kb(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// flanneld in `ns` on `iface`, its subnet file in `dir`, no health server.
fn flanneld(opts: &Opts, ns: &Ns, iface: &str, dir: &Path) -> Command {
    let mut f = netns_tests::FlanneldCommand::new(&opts.flanneld);
    f.netns = Some(ns.name.clone());
    f.args = vec![
        format!("--etcd-endpoints=http://{ETCD_IP}:{ETCD_PORT}"),
        format!("--iface={iface}"),
        format!("--subnet-file={}", dir.join("subnet.env").display()),
        "--healthz-port=0".into(),
    ];
    if let Ok(level) = std::env::var("RUST_LOG") {
        f.rust_log = level;
    }
    f.command()
}

/// One daemon start with `peers` leases in etcd (already there); etcd lives in `etcd_ns`.
fn daemon_round(
    opts: &Opts,
    etcd_ns: &Ns,
    round: usize,
    dir: &Path,
) -> Result<StartResult, String> {
    let host = Ns::new("host")?;
    let dev = format!("eh{round}");
    veth(&host, "e0", etcd_ns, &dev)?;
    etcd_ns.ip(&["link", "set", &dev, "master", "br0"])?;
    host.ip(&[
        "addr",
        "add",
        &format!("198.18.0.{}/16", 100 + round),
        "dev",
        "e0",
    ])?;
    let mon = Monitor::start(&host)?;
    let hdir = dir.join(format!("start-{round}"));
    fs::create_dir_all(&hdir).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let proc = spawn_logged(
        flanneld(opts, &host, "e0", &hdir),
        &hdir.join("flanneld.log"),
        "flanneld",
    )?;
    let last = mon
        .wait_count(opts.peers, Duration::from_secs(120))
        .map_err(|e| format!("{e} (log: {})", hdir.join("flanneld.log").display()))?;
    let first = mon.seen.lock().unwrap().first_neigh.unwrap_or(t0);
    // Let a resync pass run, then read memory.
    std::thread::sleep(Duration::from_millis(1500));
    let pid = proc.child.id();
    let r = StartResult {
        start_to_last_route: (last - t0).as_secs_f64(),
        programming: (last.saturating_duration_since(first)).as_secs_f64(),
        hwm_kb: status_kb(pid, "VmHWM:"),
        rss_kb: status_kb(pid, "VmRSS:"),
    };
    drop(proc);
    drop(mon);
    Ok(r)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[i.clamp(1, v.len()) - 1]
}

fn lease_json(public: Ipv4Addr, mac: &str) -> String {
    json!({
        "PublicIP": public.to_string(),
        "PublicIPv6": null,
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": mac},
    })
    .to_string()
}

fn run(opts: &Opts) -> Result<(), String> {
    let dir = TempDir::new("scale")?;
    eprintln!(
        "scale: {} peers, {} rounds; join latency: {} hosts × {} joins; flanneld {}",
        opts.peers,
        opts.rounds,
        opts.hosts,
        opts.joins,
        opts.flanneld.display()
    );

    // The underlay: a bridge in the etcd namespace; hosts hang off it by veth.
    let etcd_ns = Ns::new("etcd")?;
    etcd_ns.ip(&["link", "add", "br0", "type", "bridge"])?;
    etcd_ns.ip(&["addr", "add", &format!("{ETCD_IP}/16"), "dev", "br0"])?;
    etcd_ns.ip(&["link", "set", "br0", "up"])?;
    let etcd = Etcd::start(&etcd_ns)?;
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#,
    )?;
    let leases: Vec<(String, String)> = (0..opts.peers)
        .map(|i| {
            (
                format!("{PREFIX}/subnets/{}-24", peer_subnet(i)),
                lease_json(peer_public(i), &peer_mac(i)),
            )
        })
        .collect();
    etcd.put_many(&leases)?;

    let mut ipb = Vec::new();
    let mut starts = Vec::new();
    for round in 0..opts.rounds {
        let b = ip_batch_round(opts.peers, &dir.0)?;
        eprintln!(
            "  round {round}: ip -batch + bridge -batch {:.1} ms",
            b * 1e3
        );
        ipb.push(b);
        let s = daemon_round(opts, &etcd_ns, round, &dir.0)?;
        eprintln!(
            "  round {round}: flanneld start → last route {:.1} ms, programming {:.1} ms, \
             VmHWM {} kB",
            s.start_to_last_route * 1e3,
            s.programming * 1e3,
            s.hwm_kb
        );
        starts.push(s);
        // The next round's daemon starts without a lease of its own.
        let own: Vec<String> = fs::read_to_string(dir.0.join(format!("start-{round}/subnet.env")))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
            .map(String::from)
            .collect();
        for s in own {
            if let Some((ip, len)) = s.split_once('/') {
                let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{s}: {e}"))?;
                let net = Ipv4Addr::from(
                    u32::from(ip) & !((1u32 << (32 - len.parse::<u32>().unwrap_or(24))) - 1),
                );
                etcd.delete_prefix(&format!("{PREFIX}/subnets/{net}-{len}"))?;
            }
        }
    }
    etcd.delete_prefix(&format!("{PREFIX}/subnets/"))?;

    // Join latency.
    let join = join_latency(opts, &etcd_ns, &etcd, &dir.0)?;

    let ipb_ms = median(&mut ipb.clone()) * 1e3;
    let start_ms = median(
        &mut starts
            .iter()
            .map(|s| s.start_to_last_route)
            .collect::<Vec<_>>(),
    ) * 1e3;
    let prog_ms = median(&mut starts.iter().map(|s| s.programming).collect::<Vec<_>>()) * 1e3;
    let hwm_kb = starts.iter().map(|s| s.hwm_kb).max().unwrap_or(0);
    let rss_kb = starts.iter().map(|s| s.rss_kb).max().unwrap_or(0);

    println!();
    println!(
        "scale: {} peers ({} neighbours + {} FDB entries + {} routes)",
        opts.peers, opts.peers, opts.peers, opts.peers
    );
    println!("{:<52} {:>12} {:>10}", "measure", "value", "ratio");
    println!(
        "{:<52} {:>9.1} ms {:>10}",
        "ip -batch + bridge -batch (baseline)", ipb_ms, "1.00"
    );
    println!(
        "{:<52} {:>9.1} ms {:>9.2}x",
        "flanneld programming (first neighbour → last route)",
        prog_ms,
        prog_ms / ipb_ms
    );
    println!(
        "{:<52} {:>9.1} ms {:>9.2}x",
        "flanneld process start → last route",
        start_ms,
        start_ms / ipb_ms
    );
    println!(
        "{:<52} {:>9.1} MB {:>10}",
        "flanneld peak RSS (VmHWM), limit 20 MB",
        hwm_kb as f64 / 1024.0,
        ""
    );
    println!(
        "{:<52} {:>9.1} MB {:>10}",
        "flanneld RSS after start (VmRSS)",
        rss_kb as f64 / 1024.0,
        ""
    );
    println!(
        "{:<52} {:>9.1} ms {:>10}",
        format!(
            "join → route, median ({} hosts × {} joins)",
            opts.hosts, opts.joins
        ),
        join.median_ms,
        ""
    );
    println!(
        "{:<52} {:>9.1} ms {:>10}",
        "join → route, p99", join.p99_ms, ""
    );
    println!(
        "{:<52} {:>9.1} ms {:>10}",
        "join → route on the last host, median", join.last_median_ms, ""
    );
    println!(
        "{:<52} {:>9.1} ms {:>10}",
        "join → route, max", join.max_ms, ""
    );

    let report = json!({
        "peers": opts.peers,
        "rounds": opts.rounds,
        "ip_batch_ms": {"median": ipb_ms, "rounds": ipb.iter().map(|s| s * 1e3).collect::<Vec<_>>()},
        "flanneld_programming_ms": {
            "median": prog_ms,
            "rounds": starts.iter().map(|s| s.programming * 1e3).collect::<Vec<_>>(),
        },
        "flanneld_start_to_last_route_ms": {
            "median": start_ms,
            "rounds": starts.iter().map(|s| s.start_to_last_route * 1e3).collect::<Vec<_>>(),
        },
        "ratio_programming_vs_ip_batch": prog_ms / ipb_ms,
        "ratio_start_vs_ip_batch": start_ms / ipb_ms,
        "flanneld_vmhwm_kb": hwm_kb,
        "flanneld_vmrss_kb": rss_kb,
        "join": {
            "hosts": opts.hosts,
            "joins": opts.joins,
            "samples": join.samples,
            "median_ms": join.median_ms,
            "p99_ms": join.p99_ms,
            "max_ms": join.max_ms,
            "last_host_median_ms": join.last_median_ms,
            "last_host_p99_ms": join.last_p99_ms,
            "missed": join.missed,
        },
    });
    if let Some(path) = &opts.json {
        fs::write(path, serde_json::to_string_pretty(&report).expect("JSON"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("scale: wrote {}", path.display());
    }
    Ok(())
}

struct JoinResult {
    samples: usize,
    median_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    last_median_ms: f64,
    last_p99_ms: f64,
    missed: usize,
}

fn join_latency(opts: &Opts, etcd_ns: &Ns, etcd: &Etcd, dir: &Path) -> Result<JoinResult, String> {
    let mut hosts = Vec::new();
    for i in 0..opts.hosts {
        let ns = Ns::new(&format!("j{i}"))?;
        let dev = format!("ej{i}");
        veth(&ns, "e0", etcd_ns, &dev)?;
        etcd_ns.ip(&["link", "set", &dev, "master", "br0"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("198.18.1.{}/16", 10 + i),
            "dev",
            "e0",
        ])?;
        let mon = Monitor::start(&ns)?;
        let hdir = dir.join(format!("join-h{i}"));
        fs::create_dir_all(&hdir).map_err(|e| e.to_string())?;
        let proc = spawn_logged(
            flanneld(opts, &ns, "e0", &hdir),
            &hdir.join("flanneld.log"),
            &format!("flanneld h{i}"),
        )?;
        hosts.push((ns, mon, proc));
    }
    // Every host sees every other.
    for (ns, mon, proc) in &hosts {
        mon.wait_count(opts.hosts - 1, Duration::from_secs(60))
            .map_err(|e| format!("{} ({}): {e}", ns.name, proc.what))?;
    }
    let mut all = Vec::new();
    let mut last = Vec::new();
    let mut missed = 0;
    for j in 0..opts.joins {
        let subnet = Ipv4Addr::new(10, 250, j as u8, 0);
        let key = format!("{PREFIX}/subnets/{subnet}-24");
        let value = lease_json(
            Ipv4Addr::new(198, 19, 250, (j + 1) as u8),
            &format!("02:fa:00:00:00:{:02x}", j),
        );
        let body = json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes())}).to_string();
        let conn = etcd.connect()?;
        let t = Instant::now();
        Etcd::post_on(conn, "/v3/kv/put", &body)?;
        let dst = u32::from(subnet);
        let deadline = t + Duration::from_secs(5);
        let mut times = vec![None; hosts.len()];
        loop {
            for (k, (_, mon, _)) in hosts.iter().enumerate() {
                if times[k].is_none() {
                    times[k] = mon.route_seen(dst);
                }
            }
            if times.iter().all(Option::is_some) || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let lat: Vec<f64> = times
            .iter()
            .filter_map(|x| x.map(|x| x.saturating_duration_since(t).as_secs_f64() * 1e3))
            .collect();
        missed += hosts.len() - lat.len();
        if let Some(m) = lat.iter().copied().reduce(f64::max) {
            last.push(m);
        }
        all.extend(lat);
    }
    Ok(JoinResult {
        samples: all.len(),
        median_ms: median(&mut all.clone()),
        p99_ms: percentile(&mut all.clone(), 99.0),
        max_ms: all.iter().copied().fold(0.0, f64::max),
        last_median_ms: median(&mut last.clone()),
        last_p99_ms: percentile(&mut last, 99.0),
        missed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(b64(b""), "");
        assert_eq!(b64(b"f"), "Zg==");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 99.0), 99.0);
        assert_eq!(median(&mut v), 51.0);
    }

    #[test]
    fn peers_are_distinct() {
        let n = 2000;
        let subnets: std::collections::HashSet<_> = (0..n).map(peer_subnet).collect();
        let macs: std::collections::HashSet<_> = (0..n).map(peer_mac).collect();
        let ips: std::collections::HashSet<_> = (0..n).map(peer_public).collect();
        assert_eq!((subnets.len(), macs.len(), ips.len()), (n, n, n));
    }
}
