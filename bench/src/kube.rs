//! `flannel-bench kube`: flanneld in Kubernetes mode (`--kube-subnet-mgr`) starting in a cluster
//! of thousands of Nodes, against a real kube-apiserver (`netns_tests::kube`, built by
//! scripts/kube-peers.sh).
//!
//! 1. The control plane (etcd 3.6 + kube-apiserver, token auth, RBAC, an audit log at Metadata
//!    level) runs in a namespace on an underlay bridge. N Nodes (default 2,000) are created
//!    through the API, each with a podCIDR and flannel's vxlan annotations, as N running flannel
//!    nodes would have left them.
//! 2. **`ip -batch` baseline**: the same N neighbour entries, FDB entries and routes written by
//!    `ip -batch` and `bridge -batch` on a hand-made `flannel.1` (the `scale` benchmark's).
//! 3. **Daemon start**: flanneld gets a Node of its own (podCIDR, no annotations), the flannel
//!    token bound to dist/kube-flannel.yml's ClusterRole, and starts in a fresh host namespace on
//!    the underlay. A netlink monitor there timestamps the N-th peer route: reported is process
//!    start → N-th route, the peak RSS (`VmHWM`), and the apiserver requests made with the
//!    flannel token meanwhile (from the audit log: per start and per Node).
//!
//! With `--daemons flanneld,go-flanneld` (the default) flannel's own Go flanneld (kube mode,
//! `scripts/go-peers.sh`) runs the same start in every round, and the table gives the Rust/Go
//! ratios against issue #14's targets.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use netns_tests::kube::{ControlPlane, FLANNEL_USER};
use serde_json::{json, Value};

use crate::scale::{self, Monitor, Ns};
use crate::side_by_side::{self, Daemon, Row, Want};

const ANNOTATION_PREFIX: &str = "flannel.alpha.coreos.com/";
const NETWORK: &str = "10.0.0.0/8";

struct Opts {
    nodes: usize,
    rounds: usize,
    json: Option<PathBuf>,
    flanneld: PathBuf,
    daemons: Vec<Daemon>,
    go_flanneld: Option<PathBuf>,
}

fn usage() -> i32 {
    eprintln!(
        "usage: flannel-bench kube [--nodes N] [--rounds R] [--json FILE] [--flanneld PATH] \
         [--daemons flanneld,go-flanneld] [--go-flanneld PATH]\n\
         defaults: --nodes 2000 --rounds 3, both daemons; flanneld: $FLANNELD_BIN, else \
         target/release/flanneld next to this binary; go-flanneld: $GO_PEERS_DIR/flanneld, else \
         what scripts/go-peers.sh builds; the control plane: $KUBE_PEERS_DIR, else what \
         scripts/kube-peers.sh builds"
    );
    2
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        nodes: 2000,
        rounds: 3,
        json: None,
        flanneld: crate::common::default_flanneld(),
        daemons: Daemon::BOTH.to_vec(),
        go_flanneld: None,
    };
    crate::common::each_option(args, |flag, value| {
        match flag {
            "--nodes" => o.nodes = crate::common::count(flag, value()?)?,
            "--rounds" => o.rounds = crate::common::count(flag, value()?)?,
            "--json" => o.json = Some(PathBuf::from(value()?)),
            "--flanneld" => o.flanneld = PathBuf::from(value()?),
            "--daemons" => o.daemons = Daemon::parse_list(&value()?)?,
            "--go-flanneld" => o.go_flanneld = Some(PathBuf::from(value()?)),
            _ => return Err(format!("unknown option {flag:?}")),
        }
        Ok(())
    })?;
    // Peer subnets are 10.1.0.0/24 .. 10.255.255.0/24; own ones 10.0.<slot>.0/24.
    if o.nodes == 0 || o.nodes > 254 * 256 {
        return Err(format!("--nodes: {} is not in 1..={}", o.nodes, 254 * 256));
    }
    if o.rounds == 0 || o.rounds * o.daemons.len() > 250 {
        return Err(format!("--rounds: {} is not in 1..=125", o.rounds));
    }
    Ok(o)
}

pub fn main(args: &[String]) -> i32 {
    let opts = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("kube: {e}");
            return usage();
        }
    };
    let go = if opts.daemons.contains(&Daemon::Go) {
        match side_by_side::resolve_go(opts.go_flanneld.as_deref(), "kube") {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("kube: flannel's Go flanneld: {e}");
                return 1;
            }
        }
    } else {
        None
    };
    match run(&opts, go.as_deref()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kube: {e}");
            1
        }
    }
}

/// Whether `bin` has Kubernetes mode (its `--help` names `--kube-subnet-mgr`).
fn has_kube_mode(bin: &Path) -> bool {
    Command::new(bin)
        .arg("--help")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).contains("kube-subnet-mgr")
                || String::from_utf8_lossy(&o.stderr).contains("kube-subnet-mgr")
        })
        .unwrap_or(false)
}

/// The annotations a running vxlan flannel node `i` leaves on its Node.
fn peer_annotations(i: usize) -> Vec<(String, String)> {
    let a = |k: &str, v: String| (format!("{ANNOTATION_PREFIX}{k}"), v);
    vec![
        a("kube-subnet-manager", "true".into()),
        a("backend-type", "vxlan".into()),
        a(
            "backend-data",
            json!({"VNI": 1, "VtepMAC": scale::peer_mac(i)}).to_string(),
        ),
        a("public-ip", scale::peer_public(i).to_string()),
    ]
}

/// Creates the N peer Nodes through the API: a few `kubectl create` of Lists at once (each
/// creates its Nodes one request at a time).
fn create_peer_nodes(cp: &ControlPlane, n: usize) -> Result<(), String> {
    const WORKERS: usize = 4;
    let nodes: Vec<Value> = (0..n)
        .map(|i| {
            let ann = peer_annotations(i);
            let ann: Vec<(&str, &str)> =
                ann.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let cidr = format!("{}/24", scale::peer_subnet(i));
            netns_tests::kube::node_object(&format!("peer-{i:05}"), &[&cidr], &ann)
        })
        .collect();
    let chunk = n.div_ceil(WORKERS);
    std::thread::scope(|s| {
        let jobs: Vec<_> = nodes
            .chunks(chunk)
            .map(|items| {
                s.spawn(move || {
                    cp.create(&json!({"apiVersion": "v1", "kind": "List", "items": items}))
                        .map(drop)
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        jobs.into_iter().try_for_each(|j| {
            j.join()
                .map_err(|_| "a kubectl thread panicked".to_string())?
        })
    })
}

#[derive(Clone, Copy)]
struct StartResult {
    start_to_last_route: f64,
    hwm_kb: u64,
    requests: u64,
}

struct Bed<'a> {
    cp: &'a ControlPlane,
    underlay: &'a netns_tests::Underlay,
    kubeconfig: PathBuf,
    net_conf: PathBuf,
}

fn flannel_requests(cp: &ControlPlane) -> Result<u64, String> {
    let counts = cp.requests_by_user().map_err(|e| e.to_string())?;
    Ok(counts.get(FLANNEL_USER).copied().unwrap_or(0))
}

/// One start of `daemon` (`bin`) in a fresh host namespace at underlay slot `slot`, on a Node of
/// its own that is deleted afterwards.
fn daemon_round(
    opts: &Opts,
    bed: &Bed,
    daemon: Daemon,
    bin: &Path,
    slot: usize,
    hdir: &Path,
) -> Result<StartResult, String> {
    let node = format!("bench-{}-{slot}", daemon.name());
    let cidr = format!("10.0.{slot}.0/24");
    // As a kubelet registers it (the bed adds a kubelet's annotations).
    bed.cp
        .create_node(&node, &[&cidr], &[])
        .map_err(|e| e.to_string())?;
    let host = Ns::new("kh")?;
    bed.underlay
        .attach(
            host.netns(),
            &format!("kh{slot}"),
            Ipv4Addr::new(198, 18, 0, 10 + slot as u8),
        )
        .map_err(|e| e.to_string())?;
    fs::create_dir_all(hdir).map_err(|e| e.to_string())?;
    let mon = Monitor::start(&host)?;
    let before = flannel_requests(bed.cp)?;
    let mut f = netns_tests::FlanneldCommand::new(bin);
    f.netns = Some(host.name.clone());
    f.args = vec![
        "--kube-subnet-mgr".into(),
        format!("--kubeconfig-file={}", bed.kubeconfig.display()),
        format!("--net-config-path={}", bed.net_conf.display()),
        "--iface=eth0".into(),
        format!("--subnet-file={}", hdir.join("subnet.env").display()),
        "--healthz-port=0".into(),
    ];
    f.env = vec![("NODE_NAME".into(), node.clone())];
    if let Ok(level) = std::env::var("RUST_LOG") {
        f.rust_log = level;
    }
    let log = hdir.join("flanneld.log");
    let t0 = Instant::now();
    let proc = scale::spawn_logged(f.command(), &log, daemon.name())?;
    let failed = |e: String| {
        format!(
            "{}: {e}; its log's tail:\n{}",
            daemon.name(),
            netns_tests::cmd::tail(&log, 30)
        )
    };
    // Waited for in short steps, so a daemon that exits fails the round at once.
    let deadline = Instant::now() + Duration::from_secs(120);
    let last = loop {
        match mon.wait_count(opts.nodes, Duration::from_millis(500)) {
            Ok(t) => break t,
            Err(e) if Instant::now() > deadline => return Err(failed(e)),
            Err(_) => proc.check_alive().map_err(failed)?,
        }
    };
    // What the start costs in memory includes the first resync after it; let one pass run.
    std::thread::sleep(Duration::from_millis(1500));
    let stats = proc
        .pid()
        .and_then(|pid| netns_tests::ProcStats::read(pid).ok());
    drop(proc);
    drop(mon);
    let requests = flannel_requests(bed.cp)? - before;
    bed.cp.delete_node(&node).map_err(|e| e.to_string())?;
    Ok(StartResult {
        start_to_last_route: (last - t0).as_secs_f64(),
        hwm_kb: stats.map_or(0, |s| s.hwm_kb),
        requests,
    })
}

struct Figures {
    daemon: Daemon,
    starts: Vec<StartResult>,
}

impl Figures {
    fn start_ms(&self) -> f64 {
        let mut v: Vec<f64> = self.starts.iter().map(|s| s.start_to_last_route).collect();
        scale::median(&mut v) * 1e3
    }

    fn hwm_mb(&self) -> f64 {
        self.starts.iter().map(|s| s.hwm_kb).max().unwrap_or(0) as f64 / 1024.0
    }

    fn requests(&self) -> f64 {
        let mut v: Vec<f64> = self.starts.iter().map(|s| s.requests as f64).collect();
        scale::median(&mut v)
    }
}

fn run(opts: &Opts, go: Option<&Path>) -> Result<(), String> {
    let peers = netns_tests::kube::kube_peers()?;
    eprintln!("kube: control plane from {}:", peers.dir.display());
    for l in peers.versions.lines() {
        eprintln!("kube:   {l}");
    }
    let mut daemons = opts.daemons.clone();
    if daemons.contains(&Daemon::Rust) && !has_kube_mode(&opts.flanneld) {
        eprintln!(
            "kube: {} has no --kube-subnet-mgr yet: its column is left out",
            opts.flanneld.display()
        );
        daemons.retain(|d| *d != Daemon::Rust);
    }
    let bin_of = |d: Daemon| match d {
        Daemon::Rust => opts.flanneld.as_path(),
        Daemon::Go => go.expect("main resolves go-flanneld when it runs"),
    };

    let dir = tempfile::Builder::new()
        .prefix("flannel-bench-kube.")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let prefix = netns_tests::unique_prefix();
    let underlay = netns_tests::Underlay::new(&prefix).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let cp = ControlPlane::start_on(peers, &underlay, &prefix, true).map_err(|e| e.to_string())?;
    eprintln!(
        "kube: apiserver ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let kubeconfig = cp.bind_flannel_token().map_err(|e| e.to_string())?;
    let t = Instant::now();
    create_peer_nodes(&cp, opts.nodes)?;
    eprintln!(
        "kube: {} Nodes created through the API in {:.1} s",
        opts.nodes,
        t.elapsed().as_secs_f64()
    );
    let net_conf = dir.path().join("net-conf.json");
    fs::write(
        &net_conf,
        json!({"Network": NETWORK, "Backend": {"Type": "vxlan"}}).to_string(),
    )
    .map_err(|e| e.to_string())?;
    let bed = Bed {
        cp: &cp,
        underlay: &underlay,
        kubeconfig,
        net_conf,
    };

    let mut ipb = Vec::new();
    let mut figures: Vec<Figures> = daemons
        .iter()
        .map(|&d| Figures {
            daemon: d,
            starts: Vec::new(),
        })
        .collect();
    let mut slot = 0;
    for round in 0..opts.rounds {
        let b = scale::ip_batch_round(opts.nodes, dir.path())?;
        eprintln!(
            "  round {round}: ip -batch + bridge -batch {:.1} ms",
            b * 1e3
        );
        ipb.push(b);
        for f in &mut figures {
            let d = f.daemon;
            let hdir = dir.path().join(format!("start-{}-{round}", d.name()));
            let s = daemon_round(opts, &bed, d, bin_of(d), slot, &hdir)?;
            slot += 1;
            eprintln!(
                "  round {round}: {} start → {}th route {:.1} ms, VmHWM {} kB, {} apiserver requests",
                d.name(),
                opts.nodes,
                s.start_to_last_route * 1e3,
                s.hwm_kb,
                s.requests
            );
            f.starts.push(s);
        }
    }
    let ipb_ms = scale::median(&mut ipb.clone()) * 1e3;
    let report = report(opts, &figures, ipb_ms);
    if let Some(path) = &opts.json {
        fs::write(path, serde_json::to_string_pretty(&report).expect("JSON"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("kube: wrote {}", path.display());
    }
    Ok(())
}

/// Prints the per-daemon table (figures and ratios to `ip -batch`) and, with both daemons, the
/// side-by-side table; returns it all as JSON.
fn report(opts: &Opts, figures: &[Figures], ipb_ms: f64) -> Value {
    let n = opts.nodes as f64;
    println!(
        "\nflannel-bench kube: {} Nodes, {} rounds (medians; RSS: the largest VmHWM)",
        opts.nodes, opts.rounds
    );
    println!(
        "{:<44} {:>12} {:>12}  target",
        "measure", "value", "÷ ip -batch"
    );
    println!(
        "{:<44} {:>9.1} ms {:>12}",
        "ip -batch + bridge -batch (baseline)", ipb_ms, "1.00×"
    );
    let mut by_daemon = serde_json::Map::new();
    for f in figures {
        let name = f.daemon.name();
        let ours = f.daemon == Daemon::Rust;
        let verdict = |met: bool| if met { " MET" } else { " NOT MET" };
        let ratio = f.start_ms() / ipb_ms;
        println!(
            "{:<44} {:>9.1} ms {:>11.2}×  {}",
            format!("{name} start → {}th route", opts.nodes),
            f.start_ms(),
            ratio,
            if ours {
                format!("≤ 1.50×{}", verdict(ratio <= 1.5))
            } else {
                String::new()
            }
        );
        println!(
            "{:<44} {:>9.1} MB {:>12}  {}",
            format!("{name} peak RSS (VmHWM)"),
            f.hwm_mb(),
            "",
            if ours {
                format!("≤ 30 MB{}", verdict(f.hwm_mb() <= 30.0))
            } else {
                String::new()
            }
        );
        println!(
            "{:<44} {:>12.0} {:>12}",
            format!("{name} apiserver requests (start)"),
            f.requests(),
            ""
        );
        println!(
            "{:<44} {:>12.4} {:>12}",
            format!("{name} apiserver requests per Node"),
            f.requests() / n,
            ""
        );
        by_daemon.insert(
            name.into(),
            json!({
                "start_to_last_route_ms": f.start_ms(),
                "ratio_vs_ip_batch": ratio,
                "vmhwm_mb": f.hwm_mb(),
                "apiserver_requests": f.requests(),
                "apiserver_requests_per_node": f.requests() / n,
                "rounds": f.starts.iter().map(|s| json!({
                    "start_to_last_route_ms": s.start_to_last_route * 1e3,
                    "vmhwm_kb": s.hwm_kb,
                    "apiserver_requests": s.requests,
                })).collect::<Vec<_>>(),
            }),
        );
    }
    let mut report = json!({
        "nodes": opts.nodes,
        "rounds": opts.rounds,
        "ip_batch_ms": ipb_ms,
        "daemons": Value::Object(by_daemon),
    });
    let rust = figures.iter().find(|f| f.daemon == Daemon::Rust);
    let go = figures.iter().find(|f| f.daemon == Daemon::Go);
    if let (Some(r), Some(g)) = (rust, go) {
        let rows = [
            Row {
                name: "start → last route",
                unit: "ms",
                rust: r.start_ms(),
                go: g.start_ms(),
                want: Some(Want::AtMost(0.5)),
            },
            Row {
                name: "peak RSS (VmHWM)",
                unit: "MB",
                rust: r.hwm_mb(),
                go: g.hwm_mb(),
                want: Some(Want::AtMost(0.5)),
            },
            Row {
                name: "apiserver requests per Node",
                unit: "",
                rust: r.requests() / n,
                go: g.requests() / n,
                want: None,
            },
        ];
        report["side_by_side"] = side_by_side::table(
            &format!(
                "kube mode, {} Nodes: ours beside flannel's Go flanneld",
                opts.nodes
            ),
            &rows,
        );
    }
    report
}
