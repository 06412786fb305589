//! `flannel-bench udp`: the udp backend against kernel VXLAN and a raw veth, in one run.
//!
//! Two "host" namespaces joined by a veth pair (198.19.0.1 and .2), each with one "pod"
//! namespace behind a veth. For each mode, iperf3 from pod A to pod B: one TCP stream, four
//! TCP streams, and 64-byte UDP datagrams as fast as they go (receiver packets per second).
//!
//! - `veth`: iperf3 between the two hosts over the underlay veth, no overlay (the ceiling);
//! - `vxlan`: kernel VXLAN set up by hand the way flannel's vxlan backend does it (device
//!   `flannel.1`, VNI 1, port 8472, nolearning, neighbour + FDB entry + onlink route);
//! - `udp`: the real `flanneld` (release build) on each host with the udp backend, etcd in
//!   host A's namespace; its fast path;
//! - `udp-plain`: the same with `FLANNEL_UDP_PLAIN=1`, flannel's one-packet-per-syscall path;
//! - `go-udp`: flannel's own Go flanneld (`$GO_PEERS_DIR/flanneld`, or `--go-flanneld`) on each
//!   host with the udp backend (its C proxy), same flags and config: the anchor of the
//!   "≥ 8× flannel's udp" target, measured in the same run.
//!
//! The daemons' CPU use (both hosts, from /proc/<pid>/stat) and the whole machine's are
//! measured during each figure. Every link and process lives in namespaces this run creates
//! and removes; the root namespace is not touched.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netns_tests::privileges::{self, Need};
use serde_json::{json, Value};

/// flannel's C udp proxy, one TCP stream on these machines (the issue's figure, upper end).
const FLANNEL_PROXY_GBPS: f64 = 1.2;
pub(crate) const A_IP: &str = "198.19.0.1";
pub(crate) const B_IP: &str = "198.19.0.2";

struct Opts {
    json: Option<PathBuf>,
    secs: u32,
    /// Runs per figure; the median is kept.
    repeat: u32,
    flanneld: Option<PathBuf>,
    go_flanneld: Option<PathBuf>,
    modes: Vec<Mode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Veth,
    Vxlan,
    /// flanneld's own vxlan backend: must equal the hand-made device (it only programs it).
    FlannelVxlan,
    Udp,
    UdpPlain,
    /// flannel's Go flanneld with the udp backend.
    GoUdp,
}

impl Mode {
    const ALL: [Mode; 6] = [
        Mode::Veth,
        Mode::Vxlan,
        Mode::FlannelVxlan,
        Mode::Udp,
        Mode::UdpPlain,
        Mode::GoUdp,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::Veth => "veth",
            Mode::Vxlan => "vxlan",
            Mode::FlannelVxlan => "flannel-vxlan",
            Mode::Udp => "udp",
            Mode::UdpPlain => "udp-plain",
            Mode::GoUdp => "go-udp",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Veth => "raw veth",
            Mode::Vxlan => "kernel VXLAN",
            Mode::FlannelVxlan => "flanneld vxlan",
            Mode::Udp => "udp fast path",
            Mode::UdpPlain => "udp plain path",
            Mode::GoUdp => "Go flanneld udp",
        }
    }
}

fn usage() -> i32 {
    eprintln!(
        "usage: flannel-bench udp [--json FILE] [--secs N] [--repeat N] [--flanneld PATH] \
         [--go-flanneld PATH] [--modes veth,vxlan,flannel-vxlan,udp,udp-plain,go-udp]"
    );
    2
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        json: None,
        secs: 5,
        repeat: 1,
        flanneld: None,
        go_flanneld: None,
        modes: Mode::ALL.to_vec(),
    };
    crate::common::each_option(args, |flag, val| {
        match flag {
            "--json" => o.json = Some(val()?.into()),
            "--secs" => o.secs = val()?.parse().map_err(|e| format!("--secs: {e}"))?,
            "--repeat" => {
                o.repeat = val()?
                    .parse::<u32>()
                    .map_err(|e| format!("--repeat: {e}"))?
                    .max(1)
            }
            "--flanneld" => o.flanneld = Some(val()?.into()),
            "--go-flanneld" => o.go_flanneld = Some(val()?.into()),
            "--modes" => {
                o.modes = val()?
                    .split(',')
                    .map(|m| {
                        Mode::ALL
                            .into_iter()
                            .find(|x| x.name() == m)
                            .ok_or(format!("--modes: unknown mode {m:?}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown option {other:?}")),
        }
        Ok(())
    })?;
    Ok(o)
}

pub fn main(args: &[String]) -> i32 {
    let opts = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("flannel-bench udp: {e}");
            return usage();
        }
    };
    match run(&opts) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("flannel-bench udp: {e}");
            1
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes and namespaces

fn cmd(args: &[&str]) -> Result<String, String> {
    netns_tests::cmd::run(args[0], &args[1..]).map_err(|e| e.to_string())
}

fn ns_cmd(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    cmd(&full)
}

/// Namespaces and processes of the run; removed on drop.
pub(crate) struct Bed {
    p: String,
    /// etcd in host A's namespace, once a mode needs it (started by the test bed).
    pub(crate) etcd: Option<netns_tests::Etcd>,
    /// Dropped first to last (after the children are stopped): newest namespace first.
    guards: Vec<netns_tests::Netns>,
    children: Vec<Child>,
    pub(crate) dir: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for c in &mut self.children {
            netns_tests::daemon::stop_child(c, Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bed {
    pub(crate) fn new() -> Result<Bed, String> {
        let p = format!("fb{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("flannel-bench-udp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut bed = Bed {
            p,
            etcd: None,
            guards: Vec::new(),
            children: Vec::new(),
            dir,
        };
        let (a, b) = (bed.add_ns("a")?, bed.add_ns("b")?);
        cmd(&[
            "ip", "-n", &a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &b,
        ])?;
        for (ns, ip) in [(&a, A_IP), (&b, B_IP)] {
            ns_cmd(
                ns,
                &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            )?;
            ns_cmd(ns, &["ip", "link", "set", "eth0", "up"])?;
            ns_cmd(ns, &["ip", "link", "set", "lo", "up"])?;
            ns_cmd(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        }
        Ok(bed)
    }

    pub(crate) fn ns(&self, short: &str) -> String {
        format!("{}{short}", self.p)
    }

    fn add_ns(&mut self, short: &str) -> Result<String, String> {
        let n = self.ns(short);
        let _ = Command::new("ip").args(["netns", "del", &n]).output();
        let guard = netns_tests::Netns::create(&n).map_err(|e| e.to_string())?;
        self.guards.insert(0, guard);
        Ok(n)
    }

    fn del_ns(&mut self, short: &str) {
        let n = self.ns(short);
        // Dropping its guard deletes it.
        self.guards.retain(|g| g.name() != n);
    }

    /// A pod namespace behind host `h`: `<net>.2/24` via `<net>.1`, with `mtu`.
    pub(crate) fn add_pod(&mut self, h: &str, net: &str, mtu: u32) -> Result<String, String> {
        let hn = self.ns(h);
        let pn = self.add_ns(&format!("p{h}"))?;
        let mtu = mtu.to_string();
        cmd(&[
            "ip", "-n", &hn, "link", "add", "vpod", "mtu", &mtu, "type", "veth", "peer", "name",
            "eth0", "netns", &pn,
        ])?;
        ns_cmd(
            &hn,
            &["ip", "addr", "add", &format!("{net}.1/24"), "dev", "vpod"],
        )?;
        ns_cmd(&hn, &["ip", "link", "set", "vpod", "up"])?;
        ns_cmd(&pn, &["ip", "link", "set", "eth0", "mtu", &mtu])?;
        ns_cmd(
            &pn,
            &["ip", "addr", "add", &format!("{net}.2/24"), "dev", "eth0"],
        )?;
        ns_cmd(&pn, &["ip", "link", "set", "eth0", "up"])?;
        ns_cmd(&pn, &["ip", "link", "set", "lo", "up"])?;
        ns_cmd(
            &pn,
            &["ip", "route", "add", "default", "via", &format!("{net}.1")],
        )?;
        Ok(pn)
    }

    pub(crate) fn remove_pods(&mut self) {
        for h in ["a", "b"] {
            let _ = ns_cmd(&self.ns(h), &["ip", "link", "del", "vpod"]);
            self.del_ns(&format!("p{h}"));
        }
    }

    /// Starts `c` (built to run in one of this bed's namespaces) with its output in `log`
    /// (under the bed's directory); returns its pid.
    pub(crate) fn spawn_cmd(&mut self, mut c: Command, log: &str) -> Result<u32, String> {
        let log = std::fs::File::create(self.dir.join(log)).map_err(|e| e.to_string())?;
        let child = c
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{c:?}: {e}"))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Stops the process `pid` this bed started (a daemon; etcd keeps running).
    pub(crate) fn stop_pid(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut c = self.children.remove(i);
            netns_tests::daemon::stop_child(&mut c, Duration::from_secs(5));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// CPU seconds (user + system) of a process.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tck = netns_tests::clock_ticks_per_second();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / tck
}

/// (busy, total) jiffies of the whole machine.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = f.iter().sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

fn ncpus() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Figure {
    /// Gbit/s for TCP, packets/s for UDP.
    pub(crate) value: f64,
    /// The daemons' CPU, in cores (1.0 = one core busy).
    pub(crate) daemon_cpu: Option<f64>,
    /// The machine's CPU, in cores.
    pub(crate) machine_cpu: f64,
    /// UDP only: datagrams/s the data path delivered to the receiving namespace's UDP layer
    /// (taken by the socket or dropped there because the receiving iperf3 fell behind).
    delivered_pps: Option<f64>,
}

/// One mode's figures and a line on how it was set up.
struct ModeResult {
    mode: Mode,
    figures: Vec<(Load, Figure)>,
    note: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Load {
    Tcp1,
    Tcp4,
    /// 64-byte datagrams from the batching generator (`blast`): the data path's rate.
    Udp64,
    /// 64-byte datagrams from iperf3, one per system call: the endpoints' rate, for reference.
    Udp64Iperf,
}

impl Load {
    const ALL: [Load; 4] = [Load::Tcp1, Load::Tcp4, Load::Udp64, Load::Udp64Iperf];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Load::Tcp1 => "tcp_1_stream_gbps",
            Load::Tcp4 => "tcp_4_streams_gbps",
            Load::Udp64 => "udp_64b_pps",
            Load::Udp64Iperf => "udp_64b_iperf3_pps",
        }
    }

    fn is_pps(self) -> bool {
        matches!(self, Load::Udp64 | Load::Udp64Iperf)
    }
}

/// (InDatagrams, RcvbufErrors) of the UDP layer of namespace `ns`.
fn udp_counters(ns: &str) -> (f64, f64) {
    let text = ns_cmd(ns, &["cat", "/proc/net/snmp"]).unwrap_or_default();
    let line = text
        .lines()
        .filter(|l| l.starts_with("Udp:"))
        .nth(1)
        .unwrap_or("");
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    (
        f.first().copied().unwrap_or(0.0),
        f.get(4).copied().unwrap_or(0.0),
    )
}

/// One iperf3 run from `client_ns` to `server` (listening in `server_ns`).
pub(crate) fn iperf(
    bed: &mut Bed,
    client_ns: &str,
    server_ns: &str,
    server: &str,
    load: Load,
    secs: u32,
    daemons: &[u32],
) -> Result<Figure, String> {
    let port = "5301";
    let mut srv = Command::new("ip")
        .args([
            "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server, "-p", port,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("iperf3 -s: {e}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let secs_s = secs.to_string();
    let mut args = vec![
        "ip", "netns", "exec", client_ns, "iperf3", "-c", server, "-p", port, "-t", &secs_s, "-J",
    ];
    match load {
        Load::Tcp1 => {}
        Load::Tcp4 => args.extend(["-P", "4"]),
        Load::Udp64 | Load::Udp64Iperf => args.extend(["-u", "-l", "64", "-b", "0"]),
    }
    let udp0 = udp_counters(server_ns);
    let cpu0: f64 = daemons.iter().map(|p| cpu_secs(*p)).sum();
    let m0 = machine_cpu();
    let t0 = Instant::now();
    let out = Command::new(args[0]).args(&args[1..]).output();
    let wall = t0.elapsed().as_secs_f64();
    let cpu1: f64 = daemons.iter().map(|p| cpu_secs(*p)).sum();
    let m1 = machine_cpu();
    let udp1 = udp_counters(server_ns);
    let _ = srv.kill();
    let _ = srv.wait();
    let out = out.map_err(|e| format!("iperf3: {e}"))?;
    let j: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "iperf3 {load:?} in {}: no JSON ({e}): {}",
            bed.p,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(err) = j.get("error").and_then(Value::as_str) {
        return Err(format!("iperf3 {load:?} to {server}: {err}"));
    }
    let end = &j["end"];
    let value = match load {
        Load::Tcp1 | Load::Tcp4 => {
            end["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0)
                / 1e9
        }
        Load::Udp64 | Load::Udp64Iperf => {
            let s = &end["sum"];
            let got =
                s["packets"].as_f64().unwrap_or(0.0) - s["lost_packets"].as_f64().unwrap_or(0.0);
            got / s["seconds"].as_f64().unwrap_or(f64::from(secs)).max(0.001)
        }
    };
    let busy = (m1.0 - m0.0) / (m1.1 - m0.1).max(1.0) * ncpus();
    let delivered = (udp1.0 - udp0.0) + (udp1.1 - udp0.1);
    Ok(Figure {
        value,
        daemon_cpu: (!daemons.is_empty()).then(|| (cpu1 - cpu0) / wall),
        machine_cpu: busy,
        delivered_pps: load.is_pps().then(|| delivered / f64::from(secs)),
    })
}

/// One run of the batching generator from `client_ns` to `server:5302` in `server_ns`.
pub(crate) fn blast(
    client_ns: &str,
    server_ns: &str,
    server: &str,
    secs: u32,
    daemons: &[u32],
) -> Result<Figure, String> {
    let me = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let me = me.display().to_string();
    let secs_s = secs.to_string();
    let bind = format!("{server}:5302");
    let sink = Command::new("ip")
        .args([
            "netns",
            "exec",
            server_ns,
            &me,
            "blast-recv",
            "--bind",
            &bind,
        ])
        .args(["--secs", &secs_s])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("blast-recv: {e}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let udp0 = udp_counters(server_ns);
    let cpu0: f64 = daemons.iter().map(|p| cpu_secs(*p)).sum();
    let m0 = machine_cpu();
    let t0 = Instant::now();
    let sent = Command::new("ip")
        .args(["netns", "exec", client_ns, &me, "blast-send", "--to", &bind])
        .args(["--secs", &secs_s, "--len", "64"])
        .output()
        .map_err(|e| format!("blast-send: {e}"))?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu1: f64 = daemons.iter().map(|p| cpu_secs(*p)).sum();
    let m1 = machine_cpu();
    let udp1 = udp_counters(server_ns);
    let got = sink
        .wait_with_output()
        .map_err(|e| format!("blast-recv: {e}"))?;
    let count = |out: &std::process::Output, word: &str| -> Result<f64, String> {
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .strip_prefix(word)
            .and_then(|n| n.trim().parse().ok())
            .ok_or(format!(
                "blast: no count from the {}: {}",
                word.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
    };
    count(&sent, "sent")?;
    let received = count(&got, "received")?;
    let busy = (m1.0 - m0.0) / (m1.1 - m0.1).max(1.0) * ncpus();
    let delivered = (udp1.0 - udp0.0) + (udp1.1 - udp0.1);
    Ok(Figure {
        value: received / f64::from(secs),
        daemon_cpu: (!daemons.is_empty()).then(|| (cpu1 - cpu0) / wall),
        machine_cpu: busy,
        delivered_pps: Some(delivered / f64::from(secs)),
    })
}

/// Where and how to run iperf3 for one mode.
struct Target<'a> {
    mode: Mode,
    client_ns: &'a str,
    server_ns: &'a str,
    server: &'a str,
    daemons: &'a [u32],
}

fn measure_all(bed: &mut Bed, t: &Target<'_>, opts: &Opts) -> Result<Vec<(Load, Figure)>, String> {
    let mut out = Vec::new();
    for load in Load::ALL {
        let mut runs = Vec::new();
        for _ in 0..opts.repeat {
            let f = if load == Load::Udp64 {
                blast(t.client_ns, t.server_ns, t.server, opts.secs, t.daemons)?
            } else {
                iperf(
                    bed,
                    t.client_ns,
                    t.server_ns,
                    t.server,
                    load,
                    opts.secs,
                    t.daemons,
                )?
            };
            eprintln!(
                "  {:<15} {:<20} {:>12.2}  daemon CPU {}  machine CPU {:.2}{}",
                t.mode.label(),
                load.name(),
                f.value,
                f.daemon_cpu.map_or("-".into(), |c| format!("{c:.2}")),
                f.machine_cpu,
                f.delivered_pps
                    .map_or(String::new(), |d| format!("  delivered {d:.0}/s"))
            );
            runs.push(f);
        }
        runs.sort_by(|a, b| a.value.total_cmp(&b.value));
        out.push((load, runs[runs.len() / 2]));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Modes

fn mac_of(ns: &str, dev: &str) -> Result<String, String> {
    let out = ns_cmd(ns, &["cat", &format!("/sys/class/net/{dev}/address")])?;
    Ok(out.trim().to_string())
}

fn setup_vxlan(bed: &mut Bed) -> Result<(), String> {
    let hosts = [("a", A_IP, "10.5.1"), ("b", B_IP, "10.5.2")];
    for (h, ip, _) in hosts {
        let ns = bed.ns(h);
        let link = crate::common::vxlan_link_args(ip, "eth0");
        ns_cmd(&ns, &[&["ip"][..], &link].concat())?;
        ns_cmd(
            &ns,
            &["ip", "link", "set", "flannel.1", "mtu", "1450", "up"],
        )?;
    }
    for (i, (h, _, net)) in hosts.iter().enumerate() {
        let ns = bed.ns(h);
        ns_cmd(
            &ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{net}.0/32"),
                "dev",
                "flannel.1",
            ],
        )?;
        let (ph, pip, pnet) = hosts[1 - i];
        let pmac = mac_of(&bed.ns(ph), "flannel.1")?;
        let gw = format!("{pnet}.0");
        ns_cmd(
            &ns,
            &[
                "ip",
                "neigh",
                "replace",
                &gw,
                "lladdr",
                &pmac,
                "dev",
                "flannel.1",
                "nud",
                "permanent",
            ],
        )?;
        ns_cmd(
            &ns,
            &[
                "bridge",
                "fdb",
                "append",
                &pmac,
                "dev",
                "flannel.1",
                "dst",
                pip,
                "self",
                "permanent",
            ],
        )?;
        ns_cmd(
            &ns,
            &[
                "ip",
                "route",
                "add",
                &format!("{pnet}.0/24"),
                "via",
                &gw,
                "dev",
                "flannel.1",
                "onlink",
            ],
        )?;
    }
    Ok(())
}

fn teardown_vxlan(bed: &Bed) {
    for h in ["a", "b"] {
        let _ = ns_cmd(&bed.ns(h), &["ip", "link", "del", "flannel.1"]);
    }
}

/// Reads `KEY=VALUE` from a subnet file.
pub(crate) fn subnet_env(path: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
}

/// Network config for a mode that runs flanneld.
fn config_for(mode: Mode) -> &'static str {
    match mode {
        Mode::FlannelVxlan => {
            r#"{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#
        }
        _ => r#"{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}"#,
    }
}

/// Writes the network config of `mode` (see [`put_network_config`]).
fn put_config(bed: &mut Bed, mode: Mode) -> Result<(), String> {
    put_network_config(bed, config_for(mode))
}

/// Starts etcd in host A's namespace on `A_IP` when it is not running yet, and writes `config`
/// as the network config.
pub(crate) fn put_network_config(bed: &mut Bed, config: &str) -> Result<(), String> {
    if bed.etcd.is_none() {
        let etcd = netns_tests::Etcd::start_local(netns_tests::LocalEtcd {
            netns: Some(bed.ns("a")),
            ip: Some(A_IP.parse().expect("A_IP is an IPv4 address")),
            client_port: Some(2379),
            ..Default::default()
        })
        .map_err(|e| format!("etcd did not come up: {e}"))?;
        bed.etcd = Some(etcd);
    }
    let etcd = bed.etcd.as_ref().expect("etcd runs");
    etcd.put("/coreos.com/network/config", config)
        .map_err(|e| e.to_string())
}

/// Runs flanneld on both hosts; returns their pids and subnets (`10.5.x`).
fn start_flanneld(
    bed: &mut Bed,
    bin: &Path,
    mode: Mode,
) -> Result<(Vec<u32>, Vec<String>), String> {
    let mut pids = Vec::new();
    let mut nets = Vec::new();
    let plain = mode == Mode::UdpPlain;
    let tag = log_tag(mode);
    for h in ["a", "b"] {
        let ns = bed.ns(h);
        let file = bed.dir.join(format!("subnet-{h}.env"));
        let _ = std::fs::remove_file(&file);
        let mut flanneld = netns_tests::FlanneldCommand::new(bin);
        flanneld.netns = Some(ns.clone());
        flanneld.args = vec![
            format!("--etcd-endpoints=http://{A_IP}:2379"),
            "--iface=eth0".into(),
        ];
        flanneld.subnet_file = Some(file.clone());
        if plain {
            flanneld.env = vec![("FLANNEL_UDP_PLAIN".into(), "1".into())];
        }
        let pid = bed.spawn_cmd(flanneld.command(), &format!("flanneld-{h}-{tag}.log"))?;
        pids.push(pid);
        let deadline = Instant::now() + Duration::from_secs(30);
        let subnet = loop {
            if let Some(s) = subnet_env(&file, "FLANNEL_SUBNET") {
                break s;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "flanneld on {ns} wrote no {} (log: {})",
                    file.display(),
                    bed.dir.join(format!("flanneld-{h}-{tag}.log")).display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        // 10.5.7.1/24 → 10.5.7
        let net = subnet
            .split('/')
            .next()
            .and_then(|ip| ip.rsplit_once('.'))
            .map(|(n, _)| n.to_string())
            .ok_or(format!("odd FLANNEL_SUBNET {subnet:?}"))?;
        nets.push(net);
    }
    // Let each daemon see the other's lease.
    std::thread::sleep(Duration::from_secs(2));
    Ok((pids, nets))
}

/// The part of a daemon's log name that tells the modes apart.
fn log_tag(mode: Mode) -> &'static str {
    match mode {
        Mode::UdpPlain => "plain",
        Mode::GoUdp => "go",
        _ => "fast",
    }
}

fn which_path(bed: &Bed, h: &str, mode: Mode) -> String {
    let tag = log_tag(mode);
    let log = std::fs::read_to_string(bed.dir.join(format!("flanneld-{h}-{tag}.log")))
        .unwrap_or_default();
    log.lines()
        .find(|l| l.contains("udp: flannel0"))
        .and_then(|l| l.split_once("udp: ").map(|x| x.1.to_string()))
        .unwrap_or_else(|| "(path not logged)".into())
}

// ---------------------------------------------------------------------------------------------

pub(crate) fn build_flanneld() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    eprintln!("building flanneld (release)…");
    let st = Command::new("cargo")
        .args(["build", "--release", "-p", "flannel", "--bin", "flanneld"])
        .current_dir(root)
        .status()
        .map_err(|e| format!("cargo build: {e}"))?;
    if !st.success() {
        return Err("cargo build --release -p flannel failed".into());
    }
    Ok(root.join("target/release/flanneld"))
}

fn run(opts: &Opts) -> Result<(), String> {
    let missing = privileges::missing(&[
        Need::Root,
        Need::Tool("iperf3"),
        Need::Etcd,
        Need::Tool("etcdctl"),
        Need::Tool("ip"),
        Need::Tool("bridge"),
    ]);
    if !missing.is_empty() {
        return Err(format!("needs {}", missing.join(", ")));
    }
    let flanneld = match &opts.flanneld {
        Some(p) => p.clone(),
        None if opts
            .modes
            .iter()
            .any(|m| matches!(m, Mode::FlannelVxlan | Mode::Udp | Mode::UdpPlain)) =>
        {
            build_flanneld()?
        }
        None => PathBuf::new(),
    };
    let go_flanneld = if opts.modes.contains(&Mode::GoUdp) {
        crate::side_by_side::resolve_go(opts.go_flanneld.as_deref(), "flannel-bench udp")?
    } else {
        PathBuf::new()
    };
    let mut bed = Bed::new()?;
    let mut results: Vec<ModeResult> = Vec::new();
    for &mode in &opts.modes {
        eprintln!("{}:", mode.label());
        let (figs, note) = match mode {
            Mode::Veth => {
                let (a, b) = (bed.ns("a"), bed.ns("b"));
                (
                    measure_all(
                        &mut bed,
                        &Target {
                            mode,
                            client_ns: &a,
                            server_ns: &b,
                            server: B_IP,
                            daemons: &[],
                        },
                        opts,
                    )?,
                    "host to host over the veth pair".to_string(),
                )
            }
            Mode::Vxlan => {
                setup_vxlan(&mut bed)?;
                let pa = bed.add_pod("a", "10.5.1", 1450)?;
                let pb = bed.add_pod("b", "10.5.2", 1450)?;
                let target = Target {
                    mode,
                    client_ns: &pa,
                    server_ns: &pb,
                    server: "10.5.2.2",
                    daemons: &[],
                };
                let r = measure_all(&mut bed, &target, opts);
                bed.remove_pods();
                teardown_vxlan(&bed);
                (
                    r?,
                    "flannel.1: VNI 1, port 8472, nolearning, MTU 1450, neigh + fdb + onlink route"
                        .into(),
                )
            }
            Mode::FlannelVxlan | Mode::Udp | Mode::UdpPlain | Mode::GoUdp => {
                let bin = if mode == Mode::GoUdp {
                    &go_flanneld
                } else {
                    &flanneld
                };
                put_config(&mut bed, mode)?;
                let (pids, nets) = start_flanneld(&mut bed, bin, mode)?;
                let mtu = if mode == Mode::FlannelVxlan {
                    1450
                } else {
                    1472
                };
                let pa = bed.add_pod("a", &nets[0], mtu)?;
                let pb = bed.add_pod("b", &nets[1], mtu)?;
                let server = format!("{}.2", nets[1]);
                let target = Target {
                    mode,
                    client_ns: &pa,
                    server_ns: &pb,
                    server: &server,
                    daemons: &pids,
                };
                let r = measure_all(&mut bed, &target, opts);
                let note = match mode {
                    Mode::FlannelVxlan => {
                        format!("flanneld {}: vxlan backend, flannel.1", bin.display())
                    }
                    Mode::GoUdp => format!(
                        "flannel's Go flanneld {}: udp backend (its C proxy), flannel0",
                        bin.display()
                    ),
                    _ => format!(
                        "flanneld {}: {}",
                        bin.display(),
                        which_path(&bed, "a", mode)
                    ),
                };
                bed.remove_pods();
                for pid in pids {
                    bed.stop_pid(pid);
                }
                // flanneld leaves its device in place at exit; the next mode needs the hosts bare.
                teardown_vxlan(&bed);
                (r?, note)
            }
        };
        results.push(ModeResult {
            mode,
            figures: figs,
            note,
        });
    }
    report(opts, &results)
}

/// Our udp backend's fast path against flannel's Go flanneld udp backend, when both ran.
fn side_by_side(get: &dyn Fn(Mode, &str) -> Option<Figure>) -> Option<Value> {
    use crate::side_by_side::{table, Row, Want};
    let row = |name, unit, load: Load, scale: f64, want| -> Option<Row> {
        Some(Row {
            name,
            unit,
            rust: get(Mode::Udp, load.name())?.value / scale,
            go: get(Mode::GoUdp, load.name())?.value / scale,
            want,
        })
    };
    let rows: Vec<Row> = [
        row(
            "udp backend: 1 TCP stream",
            "Gb/s",
            Load::Tcp1,
            1.0,
            Some(Want::AtLeast(8.0)),
        ),
        row("udp backend: 4 TCP streams", "Gb/s", Load::Tcp4, 1.0, None),
        row(
            "udp backend: 64-byte datagrams",
            "kpps",
            Load::Udp64,
            1e3,
            None,
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    (!rows.is_empty()).then(|| table("udp side by side: pod → pod, same run", &rows))
}

fn report(opts: &Opts, results: &[ModeResult]) -> Result<(), String> {
    let get = |m: Mode, l: &str| {
        results.iter().find(|r| r.mode == m).and_then(|r| {
            r.figures
                .iter()
                .find(|(load, _)| load.name() == l)
                .map(|x| x.1)
        })
    };
    let ratio = |f: Option<Figure>, base: Option<Figure>| match (f, base) {
        (Some(f), Some(b)) if b.value > 0.0 => Some(f.value / b.value),
        _ => None,
    };
    let fmt_ratio = |r: Option<f64>| r.map_or("   -  ".to_string(), |r| format!("{r:5.2}×"));
    println!();
    println!(
        "udp backend benchmark: 2 namespaces joined by veth, pod → pod, {} s per figure, \
         median of {}; TCP by iperf3; 64B: a sendmmsg/recvmmsg generator (64 per call), \
         and iperf3 -u -l 64 (one per call)",
        opts.secs, opts.repeat
    );
    println!(
        "{:<16} {:>10} {:>7} {:>10} {:>7} {:>10} {:>7} {:>10} {:>7}   daemon CPU (cores: 1 TCP / 4 TCP / 64B / iperf3 64B)",
        "mode", "1 TCP Gb/s", "÷VXLAN", "4 TCP Gb/s", "÷VXLAN", "64B kpps", "÷VXLAN", "iperf3 64B", "÷VXLAN",
    );
    let mut json_modes = serde_json::Map::new();
    for ModeResult {
        mode,
        figures: figs,
        note,
    } in results
    {
        let mut row = format!("{:<16}", mode.label());
        let mut j = serde_json::Map::new();
        let mut cpus = Vec::new();
        for (load, f) in figs {
            let base = get(Mode::Vxlan, load.name());
            let r = ratio(Some(*f), base);
            let shown = if load.is_pps() {
                f.value / 1000.0
            } else {
                f.value
            };
            row.push_str(&format!(" {shown:>10.2} {:>7}", fmt_ratio(r)));
            cpus.push(f.daemon_cpu.map_or("-".into(), |c| format!("{c:.2}")));
            j.insert(
                load.name().into(),
                json!({
                    "value": f.value,
                    "ratio_to_vxlan": r,
                    "daemon_cpu_cores": f.daemon_cpu,
                    "machine_cpu_cores": f.machine_cpu,
                    "delivered_to_pod_pps": f.delivered_pps,
                }),
            );
        }
        row.push_str(&format!("   {}", cpus.join(" / ")));
        println!("{row}");
        j.insert("setup".into(), json!(note));
        json_modes.insert(mode.name().into(), Value::Object(j));
    }
    for r in results {
        println!("  {}: {}", r.mode.label(), r.note);
    }
    // Targets of the issue, judged within this run.
    let tcp1 = |m| get(m, Load::Tcp1.name());
    let pps = |m| get(m, Load::Udp64.name());
    let mut targets = serde_json::Map::new();
    let mut line = |name: &str, value: Option<f64>, want: Option<f64>, unit: &str| {
        let Some(v) = value else { return };
        match want {
            Some(want) => {
                let ok = v >= want;
                println!(
                    "target {name}: {v:.2}{unit} (want ≥ {want:.2}{unit}) {}",
                    if ok { "MET" } else { "NOT MET" }
                );
                targets.insert(name.into(), json!({"value": v, "want": want, "met": ok}));
            }
            None => {
                println!("{name}: {v:.2}{unit}");
                targets.insert(name.into(), json!({"value": v}));
            }
        }
    };
    line(
        "1 TCP stream vs kernel VXLAN",
        ratio(tcp1(Mode::Udp), tcp1(Mode::Vxlan)),
        Some(0.8),
        "×",
    );
    line(
        "1 TCP stream vs flannel's proxy (1.2 Gbit/s)",
        tcp1(Mode::Udp).map(|f| f.value / FLANNEL_PROXY_GBPS),
        Some(8.0),
        "×",
    );
    line(
        "1 TCP stream vs Go flanneld udp (same run)",
        ratio(tcp1(Mode::Udp), tcp1(Mode::GoUdp)),
        Some(8.0),
        "×",
    );
    line(
        "4 TCP streams vs Go flanneld udp (same run)",
        ratio(
            get(Mode::Udp, Load::Tcp4.name()),
            get(Mode::GoUdp, Load::Tcp4.name()),
        ),
        None,
        "×",
    );
    line(
        "64-byte packets/s vs Go flanneld udp (same run)",
        ratio(pps(Mode::Udp), pps(Mode::GoUdp)),
        None,
        "×",
    );
    line(
        "64-byte packets/s vs plain path",
        ratio(pps(Mode::Udp), pps(Mode::UdpPlain)),
        Some(3.0),
        "×",
    );
    let iperf_pps = |m| get(m, Load::Udp64Iperf.name());
    line(
        "64-byte packets/s with iperf3 (one datagram per call) vs plain path",
        ratio(iperf_pps(Mode::Udp), iperf_pps(Mode::UdpPlain)),
        None,
        "×",
    );
    line(
        "1 TCP stream vs plain path",
        ratio(tcp1(Mode::Udp), tcp1(Mode::UdpPlain)),
        None,
        "×",
    );
    let side = side_by_side(&get);
    if let Some(path) = &opts.json {
        let doc = json!({
            "side_by_side": side,
            "benchmark": "udp",
            "seconds_per_figure": opts.secs,
            "runs_per_figure_median_kept": opts.repeat,
            "topology": "two host namespaces joined by a veth pair; one pod namespace per host; iperf3 (TCP, and 64-byte UDP for reference) and flannel-bench blast-send/blast-recv (64-byte UDP, 64 datagrams per sendmmsg/recvmmsg) from pod A to pod B",
            "daemon": "real flanneld (release) per host, etcd in host A's namespace",
            "flannel_proxy_reference_gbps": FLANNEL_PROXY_GBPS,
            "modes": json_modes,
            "targets": targets,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
