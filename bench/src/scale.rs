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
//!
//! With `--daemons flanneld,go-flanneld` (the default) flannel's own Go flanneld runs 2 and 3
//! right after ours in every round, against the same etcd content with the same flags, and 4 after
//! ours on fresh hosts; a side-by-side table gives the Rust/Go ratios and the issue's targets.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::side_by_side::{self, Daemon, Row, Want};

const ETCD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const ETCD_PORT: u16 = 2379;
const PREFIX: &str = "/coreos.com/network";

struct Opts {
    peers: usize,
    joins: usize,
    hosts: usize,
    rounds: usize,
    json: Option<PathBuf>,
    flanneld: PathBuf,
    daemons: Vec<Daemon>,
    go_flanneld: Option<PathBuf>,
}

fn usage() -> i32 {
    eprintln!(
        "usage: flannel-bench scale [--peers N] [--joins N] [--hosts N] [--rounds R] \
         [--json FILE] [--flanneld PATH] [--daemons flanneld,go-flanneld] [--go-flanneld PATH]\n\
         defaults: --peers 2000 --joins 200 --hosts 10 --rounds 3, both daemons; flanneld: \
         $FLANNELD_BIN, else target/release/flanneld next to this binary; go-flanneld: \
         $GO_PEERS_DIR/flanneld, else what scripts/go-peers.sh builds"
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
        daemons: Daemon::BOTH.to_vec(),
        go_flanneld: None,
    };
    crate::common::each_option(args, |flag, val| {
        match flag {
            "--peers" => o.peers = crate::common::count(flag, val()?)?,
            "--joins" => o.joins = crate::common::count(flag, val()?)?,
            "--hosts" => o.hosts = crate::common::count(flag, val()?)?,
            "--rounds" => o.rounds = crate::common::count(flag, val()?)?.max(1),
            "--json" => o.json = Some(PathBuf::from(val()?)),
            "--flanneld" => o.flanneld = PathBuf::from(val()?),
            "--daemons" => o.daemons = Daemon::parse_list(&val()?)?,
            "--go-flanneld" => o.go_flanneld = Some(PathBuf::from(val()?)),
            other => return Err(format!("unknown option {other:?}")),
        }
        Ok(())
    })?;
    if o.peers == 0 || o.peers > 60_000 {
        return Err("--peers must be between 1 and 60000".into());
    }
    if o.rounds * o.daemons.len() > 150 {
        return Err("--rounds: at most 150 daemon starts (rounds × daemons)".into());
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
    let go = if opts.daemons.contains(&Daemon::Go) {
        match side_by_side::resolve_go(opts.go_flanneld.as_deref(), "scale") {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("scale: {e}");
                return 1;
            }
        }
    } else {
        None
    };
    match run(&opts, go.as_deref()) {
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
pub(crate) struct Ns {
    pub(crate) name: String,
    _guard: netns_tests::Netns,
}

impl Ns {
    pub(crate) fn new(tag: &str) -> Result<Ns, String> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("fbs-{tag}-{}-{n}", std::process::id());
        let guard = netns_tests::Netns::create(&name).map_err(|e| e.to_string())?;
        Ok(Ns {
            name,
            _guard: guard,
        })
    }

    pub(crate) fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    pub(crate) fn netns(&self) -> &netns_tests::Netns {
        &self._guard
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
/// child's pid is the program's) with its output in `log`; killed when dropped.
pub(crate) fn spawn_logged(
    cmd: Command,
    log: &Path,
    what: &str,
) -> Result<netns_tests::Daemon, String> {
    let process = netns_tests::Daemon::new(what, log, 0);
    process.start(cmd).map_err(|e| e.to_string())?;
    Ok(process)
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

/// etcd, started by the test bed, and its JSON gateway.
struct Etcd {
    _etcd: netns_tests::Etcd,
    ns_path: String,
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
        let etcd = netns_tests::Etcd::start_local(netns_tests::LocalEtcd {
            netns: Some(ns.name.clone()),
            ip: Some(ETCD_IP),
            client_port: Some(ETCD_PORT),
            extra_args: [
                "--max-txn-ops",
                "1024",
                "--quota-backend-bytes",
                "1073741824",
            ]
            .map(String::from)
            .to_vec(),
            ..Default::default()
        })
        .map_err(|e| e.to_string())?;
        Ok(Etcd {
            _etcd: etcd,
            ns_path: ns.path(),
        })
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
pub(crate) struct Seen {
    /// First time an IPv4 /24 route to 10.0.0.0/8 appeared in the main table, by destination.
    routes: HashMap<u32, Instant>,
    pub(crate) first_neigh: Option<Instant>,
    overrun: bool,
}

pub(crate) struct Monitor {
    pub(crate) seen: Arc<Mutex<Seen>>,
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
    pub(crate) fn start(ns: &Ns) -> Result<Monitor, String> {
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
    pub(crate) fn wait_count(&self, n: usize, timeout: Duration) -> Result<Instant, String> {
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

pub(crate) fn peer_subnet(i: usize) -> Ipv4Addr {
    // 10.1.0.0/24, 10.1.1.0/24, ...: away from 10.0.x (ours may land anywhere else, it avoids
    // taken ones).
    Ipv4Addr::new(10, 1 + (i / 256) as u8, (i % 256) as u8, 0)
}

pub(crate) fn peer_mac(i: usize) -> String {
    format!("02:00:00:00:{:02x}:{:02x}", i / 256, i % 256)
}

pub(crate) fn peer_public(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// `ip -batch` + `bridge -batch` for `peers` peers on a hand-made `flannel.1`; returns seconds.
pub(crate) fn ip_batch_round(peers: usize, dir: &Path) -> Result<f64, String> {
    let ns = Ns::new("ipb")?;
    let peer = Ns::new("ipbp")?;
    veth(&ns, "e0", &peer, "e1")?;
    ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "e0"])?;
    ns.ip(&crate::common::vxlan_link_args("198.18.0.1", "e0"))?;
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

#[derive(Clone, Copy)]
struct StartResult {
    start_to_last_route: f64,
    programming: f64,
    hwm_kb: u64,
    rss_kb: u64,
}

/// flanneld `bin` (ours or flannel's: both take these flags) in `ns` on `iface`, its subnet
/// file in `dir`, no health server.
fn flanneld(bin: &Path, ns: &Ns, iface: &str, dir: &Path) -> Command {
    let mut f = netns_tests::FlanneldCommand::new(bin);
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

/// One start of daemon `bin` with `peers` leases in etcd (already there); etcd lives in
/// `etcd_ns`. `slot` numbers the start (its host address and link); `hdir` gets the log and
/// subnet file.
fn daemon_round(
    opts: &Opts,
    bin: &Path,
    etcd_ns: &Ns,
    slot: usize,
    hdir: &Path,
) -> Result<StartResult, String> {
    let host = Ns::new("host")?;
    let dev = format!("eh{slot}");
    veth(&host, "e0", etcd_ns, &dev)?;
    etcd_ns.ip(&["link", "set", &dev, "master", "br0"])?;
    host.ip(&[
        "addr",
        "add",
        &format!("198.18.0.{}/16", 100 + slot),
        "dev",
        "e0",
    ])?;
    let mon = Monitor::start(&host)?;
    fs::create_dir_all(hdir).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let proc = spawn_logged(
        flanneld(bin, &host, "e0", hdir),
        &hdir.join("flanneld.log"),
        "flanneld",
    )?;
    let last = mon
        .wait_count(opts.peers, Duration::from_secs(120))
        .map_err(|e| format!("{e} (log: {})", hdir.join("flanneld.log").display()))?;
    let first = mon.seen.lock().unwrap().first_neigh.unwrap_or(t0);
    // Let a resync pass run, then read memory.
    std::thread::sleep(Duration::from_millis(1500));
    let stats = proc
        .pid()
        .and_then(|pid| netns_tests::ProcStats::read(pid).ok());
    let r = StartResult {
        start_to_last_route: (last - t0).as_secs_f64(),
        programming: (last.saturating_duration_since(first)).as_secs_f64(),
        hwm_kb: stats.map_or(0, |s| s.hwm_kb),
        rss_kb: stats.map_or(0, |s| s.rss_kb),
    };
    drop(proc);
    drop(mon);
    Ok(r)
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
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

/// One daemon's figures in this run.
struct Figures {
    daemon: Daemon,
    starts: Vec<StartResult>,
    join: JoinResult,
}

impl Figures {
    fn start_ms(&self) -> f64 {
        median(
            &mut self
                .starts
                .iter()
                .map(|s| s.start_to_last_route)
                .collect::<Vec<_>>(),
        ) * 1e3
    }

    fn prog_ms(&self) -> f64 {
        median(
            &mut self
                .starts
                .iter()
                .map(|s| s.programming)
                .collect::<Vec<_>>(),
        ) * 1e3
    }

    fn hwm_kb(&self) -> u64 {
        self.starts.iter().map(|s| s.hwm_kb).max().unwrap_or(0)
    }

    fn rss_kb(&self) -> u64 {
        self.starts.iter().map(|s| s.rss_kb).max().unwrap_or(0)
    }
}

/// Deletes the lease the daemon whose subnet file is in `hdir` took, so that the next start
/// finds the same etcd content.
fn delete_own_lease(etcd: &Etcd, hdir: &Path) -> Result<(), String> {
    let own: Vec<String> = fs::read_to_string(hdir.join("subnet.env"))
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
    Ok(())
}

fn run(opts: &Opts, go: Option<&Path>) -> Result<(), String> {
    let dir = TempDir::new("scale")?;
    let bin_of = |d: Daemon| match d {
        Daemon::Rust => opts.flanneld.as_path(),
        Daemon::Go => go.expect("main resolves go-flanneld when it runs"),
    };
    eprintln!(
        "scale: {} peers, {} rounds; join latency: {} hosts × {} joins; {}",
        opts.peers,
        opts.rounds,
        opts.hosts,
        opts.joins,
        opts.daemons
            .iter()
            .map(|&d| format!("{} {}", d.name(), bin_of(d).display()))
            .collect::<Vec<_>>()
            .join(", ")
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
    let mut starts: Vec<(Daemon, StartResult)> = Vec::new();
    let mut slot = 0;
    for round in 0..opts.rounds {
        let b = ip_batch_round(opts.peers, &dir.0)?;
        eprintln!(
            "  round {round}: ip -batch + bridge -batch {:.1} ms",
            b * 1e3
        );
        ipb.push(b);
        for &d in &opts.daemons {
            let hdir = dir.0.join(format!("start-{}-{round}", d.name()));
            let s = daemon_round(opts, bin_of(d), &etcd_ns, slot, &hdir)?;
            slot += 1;
            eprintln!(
                "  round {round}: {} start → last route {:.1} ms, programming {:.1} ms, \
                 VmHWM {} kB",
                d.name(),
                s.start_to_last_route * 1e3,
                s.programming * 1e3,
                s.hwm_kb
            );
            starts.push((d, s));
            // The next daemon starts without a lease of its own.
            delete_own_lease(&etcd, &hdir)?;
        }
    }
    etcd.delete_prefix(&format!("{PREFIX}/subnets/"))?;

    // Join latency, one daemon's hosts after the other's, each from an empty subnets prefix.
    let mut figures = Vec::new();
    for &d in &opts.daemons {
        let join = join_latency(opts, d, bin_of(d), &etcd_ns, &etcd, &dir.0)?;
        etcd.delete_prefix(&format!("{PREFIX}/subnets/"))?;
        let mine = starts
            .iter()
            .filter(|(x, _)| *x == d)
            .map(|(_, s)| *s)
            .collect();
        figures.push(Figures {
            daemon: d,
            starts: mine,
            join,
        });
    }

    let ipb_ms = median(&mut ipb.clone()) * 1e3;
    let mut by_daemon = serde_json::Map::new();
    for f in &figures {
        print_daemon_table(opts, f, ipb_ms);
        by_daemon.insert(f.daemon.name().into(), daemon_json(opts, f, ipb_ms));
    }
    // The top-level figures stay ours (or the only daemon's), as before the side by side.
    let main = figures
        .iter()
        .find(|f| f.daemon == Daemon::Rust)
        .unwrap_or(&figures[0]);
    let mut report = daemon_json(opts, main, ipb_ms);
    report["peers"] = json!(opts.peers);
    report["rounds"] = json!(opts.rounds);
    report["ip_batch_ms"] =
        json!({"median": ipb_ms, "rounds": ipb.iter().map(|s| s * 1e3).collect::<Vec<_>>()});
    report["daemons"] = serde_json::Value::Object(by_daemon);
    let rust = figures.iter().find(|f| f.daemon == Daemon::Rust);
    let go = figures.iter().find(|f| f.daemon == Daemon::Go);
    if let (Some(r), Some(g)) = (rust, go) {
        report["side_by_side"] = side_by_side_table(opts, r, g);
    }
    if let Some(path) = &opts.json {
        fs::write(path, serde_json::to_string_pretty(&report).expect("JSON"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("scale: wrote {}", path.display());
    }
    Ok(())
}

fn print_daemon_table(opts: &Opts, f: &Figures, ipb_ms: f64) {
    let (start_ms, prog_ms) = (f.start_ms(), f.prog_ms());
    let name = f.daemon.name();
    let join = &f.join;
    println!();
    println!(
        "scale, {name}: {} peers ({} neighbours + {} FDB entries + {} routes)",
        opts.peers, opts.peers, opts.peers, opts.peers
    );
    println!("{:<52} {:>12} {:>10}", "measure", "value", "ratio");
    println!(
        "{:<52} {:>9.1} ms {:>10}",
        "ip -batch + bridge -batch (baseline)", ipb_ms, "1.00"
    );
    println!(
        "{:<52} {:>9.1} ms {:>9.2}x",
        format!("{name} programming (first neighbour → last route)"),
        prog_ms,
        prog_ms / ipb_ms
    );
    println!(
        "{:<52} {:>9.1} ms {:>9.2}x",
        format!("{name} process start → last route"),
        start_ms,
        start_ms / ipb_ms
    );
    println!(
        "{:<52} {:>9.1} MB {:>10}",
        if f.daemon == Daemon::Rust {
            format!("{name} peak RSS (VmHWM), limit 20 MB")
        } else {
            format!("{name} peak RSS (VmHWM)")
        },
        f.hwm_kb() as f64 / 1024.0,
        ""
    );
    println!(
        "{:<52} {:>9.1} MB {:>10}",
        format!("{name} RSS after start (VmRSS)"),
        f.rss_kb() as f64 / 1024.0,
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
}

/// One daemon's figures as JSON (the keys the report had before the side by side).
fn daemon_json(opts: &Opts, f: &Figures, ipb_ms: f64) -> serde_json::Value {
    let (start_ms, prog_ms) = (f.start_ms(), f.prog_ms());
    let join = &f.join;
    json!({
        "flanneld_programming_ms": {
            "median": prog_ms,
            "rounds": f.starts.iter().map(|s| s.programming * 1e3).collect::<Vec<_>>(),
        },
        "flanneld_start_to_last_route_ms": {
            "median": start_ms,
            "rounds": f.starts.iter().map(|s| s.start_to_last_route * 1e3).collect::<Vec<_>>(),
        },
        "ratio_programming_vs_ip_batch": prog_ms / ipb_ms,
        "ratio_start_vs_ip_batch": start_ms / ipb_ms,
        "flanneld_vmhwm_kb": f.hwm_kb(),
        "flanneld_vmrss_kb": f.rss_kb(),
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
            "cpu_ms_per_join_and_host": join.cpu_ms_per_join,
            "per_join_ms": join.per_join_ms,
        },
    })
}

/// Ours against flannel's Go flanneld, with the targets of issue #13.
fn side_by_side_table(opts: &Opts, r: &Figures, g: &Figures) -> serde_json::Value {
    let mb = |kb: u64| kb as f64 / 1024.0;
    let rows = [
        Row {
            name: "start-up: process start → last route",
            unit: "ms",
            rust: r.start_ms(),
            go: g.start_ms(),
            want: Some(Want::AtMost(0.5)),
        },
        Row {
            name: "programming: first neighbour → last route",
            unit: "ms",
            rust: r.prog_ms(),
            go: g.prog_ms(),
            want: None,
        },
        Row {
            name: "peak RSS (VmHWM)",
            unit: "MB",
            rust: mb(r.hwm_kb()),
            go: mb(g.hwm_kb()),
            want: Some(Want::AtMost(0.5)),
        },
        Row {
            name: "RSS after start (VmRSS)",
            unit: "MB",
            rust: mb(r.rss_kb()),
            go: mb(g.rss_kb()),
            want: None,
        },
        Row {
            name: "join → route, p50",
            unit: "ms",
            rust: r.join.median_ms,
            go: g.join.median_ms,
            want: None,
        },
        Row {
            name: "join → route, p99",
            unit: "ms",
            rust: r.join.p99_ms,
            go: g.join.p99_ms,
            want: Some(Want::AtMost(1.0)),
        },
        Row {
            name: "join: watcher CPU per join (incl. children)",
            unit: "ms",
            rust: r.join.cpu_ms_per_join,
            go: g.join.cpu_ms_per_join,
            want: None,
        },
        Row {
            name: "join → route, max",
            unit: "ms",
            rust: r.join.max_ms,
            go: g.join.max_ms,
            want: None,
        },
    ];
    side_by_side::table(
        &format!(
            "scale side by side: {} peers, median of {} starts each (alternating); join: {} \
             hosts × {} joins each",
            opts.peers, opts.rounds, opts.hosts, opts.joins
        ),
        &rows,
    )
}

struct JoinResult {
    samples: usize,
    median_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    last_median_ms: f64,
    last_p99_ms: f64,
    missed: usize,
    /// The hosts' daemons' CPU time (with waited-for children) over all joins, per join and
    /// host: what each watcher spends to program one new peer.
    cpu_ms_per_join: f64,
    /// Per join, per host: put → route, ms (`None`: not seen within 5 s). Kept in the JSON
    /// to see whether a slow join was slow everywhere (etcd, the machine) or on one host.
    per_join_ms: Vec<Vec<Option<f64>>>,
}

fn join_latency(
    opts: &Opts,
    daemon: Daemon,
    bin: &Path,
    etcd_ns: &Ns,
    etcd: &Etcd,
    dir: &Path,
) -> Result<JoinResult, String> {
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
        let hdir = dir.join(format!("join-{}-h{i}", daemon.name()));
        fs::create_dir_all(&hdir).map_err(|e| e.to_string())?;
        let proc = spawn_logged(
            flanneld(bin, &ns, "e0", &hdir),
            &hdir.join("flanneld.log"),
            &format!("{} h{i}", daemon.name()),
        )?;
        hosts.push((ns, mon, proc));
    }
    // Every host sees every other.
    for (ns, mon, proc) in &hosts {
        mon.wait_count(opts.hosts - 1, Duration::from_secs(60))
            .map_err(|e| format!("{} ({}): {e}", ns.name, proc.log_path().display()))?;
    }
    let hosts_cpu = || -> f64 {
        hosts
            .iter()
            .filter_map(|(_, _, p)| p.pid().and_then(side_by_side::cpu_with_children))
            .sum()
    };
    let cpu0 = hosts_cpu();
    let mut all = Vec::new();
    let mut last = Vec::new();
    let mut missed = 0;
    let mut per_join_ms = Vec::new();
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
        let row: Vec<Option<f64>> = times
            .iter()
            .map(|x| x.map(|x| x.saturating_duration_since(t).as_secs_f64() * 1e3))
            .collect();
        let lat: Vec<f64> = row.iter().flatten().copied().collect();
        per_join_ms.push(row);
        missed += hosts.len() - lat.len();
        if let Some(m) = lat.iter().copied().reduce(f64::max) {
            last.push(m);
        }
        all.extend(lat);
    }
    let cpu_ms_per_join =
        (hosts_cpu() - cpu0) * 1e3 / (opts.joins.max(1) * hosts.len().max(1)) as f64;
    Ok(JoinResult {
        cpu_ms_per_join,
        per_join_ms,
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
