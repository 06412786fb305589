//! `flannel-bench mesh50`: N hosts (default 50) started at once against a 3-member etcd cluster.
//!
//! Built on the `netns-tests` test bed: an underlay bridge, three etcd members in their own
//! namespaces, N host namespaces each running the real `flanneld` (vxlan unless `--backend`).
//! Every flanneld is started in one burst; from the first start on, each host's routing table is
//! read (one `ip -j route` per host, hosts in parallel, ~every 50 ms) until it routes to every
//! other host's subnet. Reported per round:
//!
//! - **mesh**: start of the burst → the last host has all N−1 routes (the whole mesh
//!   programmed), and the median host's own completion time;
//! - **converged**: → every host also has the neighbour and FDB entry of every peer (vxlan);
//! - per-host flanneld **RSS** (`VmRSS`), peak RSS (`VmHWM`) and **CPU** time after the mesh
//!   settled (2 s after convergence): utime + stime in clock ticks (`CPU`), and the live
//!   threads' run time in nanoseconds from schedstat (`run`); median and max; etcd members'
//!   RSS too.
//!
//! - **idle**: then, with nothing changing, each flanneld's CPU seconds over `--idle-secs`
//!   (60 s; a shorter window for quick runs), its own and its waited-for children's (flannel's Go
//!   daemon runs `iptables` every 5 s), and its RSS at the end.
//!
//! Rounds build a fresh cluster each; the table shows every round and the JSON holds all figures.
//! With `--daemons flanneld,go-flanneld` (the default) every round runs our cluster and then the
//! same cluster with flannel's Go flanneld (same flags, same config), and a side-by-side table
//! gives the Rust/Go ratios.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use netns_tests::{heavy_lock, par_map, Backend, Cluster, PodMode, ProcStats};
use serde_json::json;

use crate::side_by_side::{self, Daemon, Row, Want};

struct Opts {
    hosts: usize,
    rounds: usize,
    backend: Backend,
    json: Option<PathBuf>,
    flanneld: PathBuf,
    daemons: Vec<Daemon>,
    go_flanneld: Option<PathBuf>,
    idle_secs: u64,
}

fn usage() -> i32 {
    eprintln!(
        "usage: flannel-bench mesh50 [--hosts N] [--rounds R] [--backend vxlan|host-gw] \
         [--json FILE] [--flanneld PATH] [--daemons flanneld,go-flanneld] [--go-flanneld PATH] \
         [--idle-secs N]\n\
         defaults: --hosts 50 --rounds 3 --backend vxlan --idle-secs 60, both daemons; \
         flanneld: $FLANNELD_BIN, else flanneld next to this binary; go-flanneld: \
         $GO_PEERS_DIR/flanneld, else what scripts/go-peers.sh builds"
    );
    2
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        hosts: 50,
        rounds: 3,
        backend: Backend::Vxlan,
        json: None,
        flanneld: crate::common::default_flanneld(),
        daemons: Daemon::BOTH.to_vec(),
        go_flanneld: None,
        idle_secs: 60,
    };
    crate::common::each_option(args, |flag, val| {
        match flag {
            "--hosts" => o.hosts = crate::common::count(flag, val()?)?,
            "--rounds" => o.rounds = crate::common::count(flag, val()?)?.max(1),
            "--backend" => {
                let v = val()?;
                o.backend = match Backend::from_type(&v) {
                    Some(b @ (Backend::Vxlan | Backend::HostGw)) => b,
                    _ => return Err(format!("--backend {v:?}: vxlan or host-gw")),
                }
            }
            "--json" => o.json = Some(PathBuf::from(val()?)),
            "--flanneld" => o.flanneld = PathBuf::from(val()?),
            "--daemons" => o.daemons = Daemon::parse_list(&val()?)?,
            "--go-flanneld" => o.go_flanneld = Some(PathBuf::from(val()?)),
            "--idle-secs" => o.idle_secs = crate::common::count(flag, val()?)? as u64,
            other => return Err(format!("unknown option {other:?}")),
        }
        Ok(())
    })?;
    if o.hosts < 2 || o.hosts > 200 {
        return Err("--hosts must be between 2 and 200".into());
    }
    Ok(o)
}

pub fn main(args: &[String]) -> i32 {
    let opts = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mesh50: {e}");
            return usage();
        }
    };
    if !netns_tests::privileges::is_root() {
        eprintln!("mesh50: needs root (network namespaces)");
        return 1;
    }
    let flanneld = std::fs::canonicalize(&opts.flanneld).unwrap_or(opts.flanneld.clone());
    if !flanneld.is_file() {
        eprintln!(
            "mesh50: flanneld not found at {} (cargo build --release -p flannel, or --flanneld)",
            flanneld.display()
        );
        return 1;
    }
    let go = if opts.daemons.contains(&Daemon::Go) {
        match side_by_side::resolve_go(opts.go_flanneld.as_deref(), "mesh50") {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("mesh50: {e}");
                return 1;
            }
        }
    } else {
        None
    };
    let bins = Bins {
        rust: flanneld,
        go: go.unwrap_or_default(),
    };
    match run(&opts, &bins) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mesh50: {e}");
            1
        }
    }
}

/// The daemons' binaries.
struct Bins {
    rust: PathBuf,
    go: PathBuf,
}

impl Bins {
    /// Makes `daemon` the flanneld of the clusters built from now on.
    fn select(&self, daemon: Daemon) {
        let bin = match daemon {
            Daemon::Rust => &self.rust,
            Daemon::Go => &self.go,
        };
        // The test bed takes the binary from here; no other thread runs while it changes.
        std::env::set_var("FLANNELD_BIN", bin);
    }
}

/// One flanneld over the idle window.
#[derive(Debug, Clone, Copy)]
struct Idle {
    /// CPU seconds, its own and its waited-for children's.
    cpu_s: f64,
    /// Run time of its live threads (schedstat), seconds, when available.
    run_s: Option<f64>,
    /// RSS at the end of the window, KiB.
    rss_kb: u64,
}

/// Figures of one round.
struct Round {
    daemon: Daemon,
    hosts: usize,
    /// Per host: burst start → its last peer route, seconds (index = host).
    host_mesh_s: Vec<f64>,
    leases_s: f64,
    mesh_s: f64,
    converged_s: f64,
    stats: Vec<ProcStats>,
    etcd_rss_kb: Vec<u64>,
    idle: Vec<Idle>,
    /// Daemons that exited before the mesh was complete and were started again.
    restarts: usize,
}

fn round(opts: &Opts, daemon: Daemon) -> Result<Round, String> {
    let n = opts.hosts;
    let c = Cluster::builder()
        .hosts(n)
        .etcd_members(3)
        .backend(opts.backend)
        .pod_mode(PodMode::Static)
        .ready_timeout(Duration::from_secs(120))
        .no_start()
        .build()
        .map_err(|e| format!("building the cluster: {e}"))?;
    let t0 = Instant::now();
    for h in c.hosts() {
        h.start().map_err(|e| e.to_string())?;
    }
    let mut done: Vec<Option<f64>> = vec![None; n];
    let mut restarts = 0;
    let mut leases_s = None;
    let deadline = t0 + Duration::from_secs(120);
    loop {
        let now = t0.elapsed().as_secs_f64();
        let leases = c.leases().map_err(|e| e.to_string())?;
        if leases.len() >= n {
            leases_s.get_or_insert(now);
            let pending: Vec<usize> = (0..n).filter(|&i| done[i].is_none()).collect();
            for (i, missing) in c.routes_missing(&leases, &pending)? {
                if missing == 0 {
                    done[i] = Some(t0.elapsed().as_secs_f64());
                }
            }
        }
        if done.iter().all(Option::is_some) {
            break;
        }
        for h in c.hosts() {
            if let Err(e) = h.check_alive() {
                // flannel's Go flanneld exits when a host that starts at the same moment
                // creates the subnet it picked ("failed to acquire lease: subnet already
                // exists"); its supervisor (systemd, a DaemonSet) starts it again. Do that at
                // once (no back-off: the kindest supervisor) and count it; ours must not exit.
                if daemon != Daemon::Go || restarts >= 5 * n {
                    return Err(e);
                }
                let why = e.lines().rev().find(|l| l.contains("E1")).unwrap_or("");
                eprintln!("mesh50: restarting go-flanneld on {}: {why}", h.name());
                h.start().map_err(|e| e.to_string())?;
                restarts += 1;
            }
        }
        if Instant::now() > deadline {
            let left = done.iter().filter(|d| d.is_none()).count();
            return Err(format!(
                "{left} of {n} hosts still lack routes after 120 s ({} leases)",
                leases.len()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let host_mesh_s: Vec<f64> = done.into_iter().map(|d| d.unwrap_or_default()).collect();
    let mesh_s = host_mesh_s.iter().copied().fold(0.0, f64::max);
    c.wait_converged(Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    let converged_s = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let stats: Vec<ProcStats> = par_map(c.hosts(), 8, |h| h.proc_stats())
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let etcd_rss_kb = c
        .etcd_members()
        .iter()
        .filter_map(|m| m.pid())
        .filter_map(|pid| ProcStats::read(pid).ok())
        .map(|s| s.rss_kb)
        .collect();
    let idle = idle_window(&c, Duration::from_secs(opts.idle_secs))?;
    Ok(Round {
        daemon,
        hosts: n,
        host_mesh_s,
        leases_s: leases_s.unwrap_or_default(),
        mesh_s,
        converged_s,
        stats,
        etcd_rss_kb,
        idle,
        restarts,
    })
}

/// Every flanneld's CPU use over `window` with nothing changing, and its RSS at the end.
fn idle_window(c: &Cluster, window: Duration) -> Result<Vec<Idle>, String> {
    let sample = |c: &Cluster| -> Result<Vec<(f64, Option<f64>, u64)>, String> {
        c.hosts()
            .iter()
            .map(|h| {
                let pid = h.pid().ok_or(format!("flanneld on {} stopped", h.name()))?;
                let st = ProcStats::read(pid).map_err(|e| e.to_string())?;
                let cpu = side_by_side::cpu_with_children(pid)
                    .ok_or(format!("reading /proc/{pid}/stat of {}", h.name()))?;
                Ok((cpu, st.cpu_run_secs, st.rss_kb))
            })
            .collect()
    };
    let before = sample(c)?;
    std::thread::sleep(window);
    for h in c.hosts() {
        h.check_alive()?;
    }
    let after = sample(c)?;
    Ok(before
        .iter()
        .zip(&after)
        .map(|(b, a)| Idle {
            cpu_s: a.0 - b.0,
            run_s: a.1.zip(b.1).map(|(a, b)| a - b),
            rss_kb: a.2,
        })
        .collect())
}

fn median<T: Copy + PartialOrd>(v: &[T]) -> T {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn max<T: Copy + PartialOrd>(v: &[T]) -> T {
    v.iter()
        .copied()
        .fold(v[0], |m, x| if x > m { x } else { m })
}

fn run(opts: &Opts, bins: &Bins) -> Result<(), String> {
    let _heavy = heavy_lock();
    let mut rounds = Vec::new();
    for r in 0..opts.rounds {
        for &d in &opts.daemons {
            eprintln!(
                "mesh50: round {}/{}: {}, {} hosts, 3 etcd members, {}, idle {} s",
                r + 1,
                opts.rounds,
                d.name(),
                opts.hosts,
                opts.backend.type_name(),
                opts.idle_secs
            );
            bins.select(d);
            rounds.push(round(opts, d)?);
        }
    }
    println!(
        "\n{:<6} {:<12} {:>6} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>11} {:>11} {:>8}",
        "round",
        "daemon",
        "hosts",
        "leases s",
        "mesh s",
        "p50 host s",
        "converge s",
        "RSS p50 K",
        "RSS max K",
        "HWM p50 K",
        "HWM max K",
        "CPU p50 s",
        "CPU max s",
        "run p50 s",
        "run max s",
        "idle CPU50",
        "idle CPU Σ",
        "restarts"
    );
    let mut json_rounds = Vec::new();
    for (i, r) in rounds.iter().enumerate() {
        let rss: Vec<u64> = r.stats.iter().map(|s| s.rss_kb).collect();
        let hwm: Vec<u64> = r.stats.iter().map(|s| s.hwm_kb).collect();
        let cpu: Vec<f64> = r.stats.iter().map(|s| s.cpu_secs).collect();
        let run: Vec<f64> = r
            .stats
            .iter()
            .map(|s| s.cpu_run_secs.unwrap_or(s.cpu_secs))
            .collect();
        let idle_cpu: Vec<f64> = r.idle.iter().map(|x| x.cpu_s).collect();
        let idle_run: Vec<f64> = r.idle.iter().filter_map(|x| x.run_s).collect();
        let idle_rss: Vec<u64> = r.idle.iter().map(|x| x.rss_kb).collect();
        println!(
            "{:<6} {:<12} {:>6} {:>9.3} {:>9.3} {:>10.3} {:>10.3} {:>10} {:>10} {:>10} {:>10} {:>10.3} {:>10.3} {:>10.4} {:>10.4} {:>11.3} {:>11.3} {:>8}",
            i / opts.daemons.len() + 1,
            r.daemon.name(),
            r.hosts,
            r.leases_s,
            r.mesh_s,
            median(&r.host_mesh_s),
            r.converged_s,
            median(&rss),
            max(&rss),
            median(&hwm),
            max(&hwm),
            median(&cpu),
            max(&cpu),
            median(&run),
            max(&run),
            median(&idle_cpu),
            idle_cpu.iter().sum::<f64>(),
            r.restarts
        );
        json_rounds.push(json!({
            "daemon": r.daemon.name(),
            "hosts": r.hosts,
            "all_leases_s": r.leases_s,
            "mesh_programmed_s": r.mesh_s,
            "host_mesh_s": r.host_mesh_s,
            "host_mesh_median_s": median(&r.host_mesh_s),
            "converged_s": r.converged_s,
            "flanneld_rss_kb": rss,
            "flanneld_hwm_kb": hwm,
            "flanneld_cpu_s": cpu,
            "flanneld_rss_kb_median": median(&rss),
            "flanneld_rss_kb_max": max(&rss),
            "flanneld_hwm_kb_median": median(&hwm),
            "flanneld_hwm_kb_max": max(&hwm),
            "flanneld_cpu_s_median": median(&cpu),
            "flanneld_cpu_s_max": max(&cpu),
            "flanneld_cpu_run_s": run,
            "flanneld_cpu_run_s_median": median(&run),
            "flanneld_cpu_run_s_max": max(&run),
            "etcd_rss_kb": r.etcd_rss_kb,
            "restarts_before_mesh": r.restarts,
            "idle": {
                "secs": opts.idle_secs,
                "cpu_s_with_children": idle_cpu,
                "cpu_s_median": median(&idle_cpu),
                "cpu_s_sum": idle_cpu.iter().sum::<f64>(),
                "run_s": idle_run,
                "run_s_sum": idle_run.iter().sum::<f64>(),
                "rss_kb": idle_rss,
                "rss_kb_median": median(&idle_rss),
            },
        }));
    }
    let of = |d: Daemon| -> Vec<&Round> { rounds.iter().filter(|r| r.daemon == d).collect() };
    let mut summary = serde_json::Map::new();
    for &d in &opts.daemons {
        let rs = of(d);
        let meshes: Vec<f64> = rs.iter().map(|r| r.mesh_s).collect();
        let converged: Vec<f64> = rs.iter().map(|r| r.converged_s).collect();
        println!(
            "\n{}: mesh programmed (all {} hosts, every peer route): median {:.3} s over {} \
             round(s); fully converged: median {:.3} s",
            d.name(),
            opts.hosts,
            median(&meshes),
            rs.len(),
            median(&converged)
        );
        summary.insert(
            d.name().into(),
            json!({
                "mesh_programmed_s_median": median(&meshes),
                "converged_s_median": median(&converged),
            }),
        );
    }
    let side = match (of(Daemon::Rust), of(Daemon::Go)) {
        (r, g) if !r.is_empty() && !g.is_empty() => Some(side_by_side_table(opts, &r, &g)),
        _ => None,
    };
    if let Some(path) = &opts.json {
        // The top-level figures stay ours (or the only daemon's), as before the side by side.
        let main = &summary[opts
            .daemons
            .iter()
            .find(|d| **d == Daemon::Rust)
            .unwrap_or(&opts.daemons[0])
            .name()];
        let doc = json!({
            "bench": "mesh50",
            "hosts": opts.hosts,
            "backend": opts.backend.type_name(),
            "etcd_members": 3,
            "idle_secs": opts.idle_secs,
            "rounds": json_rounds,
            "mesh_programmed_s_median": main["mesh_programmed_s_median"],
            "converged_s_median": main["converged_s_median"],
            "daemons": summary,
            "side_by_side": side,
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        eprintln!("mesh50: wrote {}", path.display());
    }
    Ok(())
}

/// Ours against flannel's Go flanneld over their rounds (medians of the per-round figures).
fn side_by_side_table(opts: &Opts, r: &[&Round], g: &[&Round]) -> serde_json::Value {
    let med = |rs: &[&Round], f: &dyn Fn(&Round) -> f64| {
        median(&rs.iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    let row = |name, unit, f: &dyn Fn(&Round) -> f64, want| Row {
        name,
        unit,
        rust: med(r, f),
        go: med(g, f),
        want,
    };
    let mb = |kb: u64| kb as f64 / 1024.0;
    let rows = [
        row("time to full mesh (every route)", "s", &|x| x.mesh_s, None),
        row(
            "daemons restarted before the mesh",
            "",
            &|x| x.restarts as f64,
            None,
        ),
        row(
            "time to converged (routes, neigh, FDB)",
            "s",
            &|x| x.converged_s,
            None,
        ),
        row(
            "per-host RSS after idle, p50",
            "MB",
            &|x| mb(median(&x.idle.iter().map(|i| i.rss_kb).collect::<Vec<_>>())),
            None,
        ),
        row(
            "per-host peak RSS (VmHWM), p50",
            "MB",
            &|x| {
                mb(median(
                    &x.stats.iter().map(|s| s.hwm_kb).collect::<Vec<_>>(),
                ))
            },
            None,
        ),
        row(
            "per-host CPU to converge, p50",
            "s",
            &|x| median(&x.stats.iter().map(|s| s.cpu_secs).collect::<Vec<_>>()),
            None,
        ),
        row(
            "idle CPU, all hosts",
            "s",
            &|x| x.idle.iter().map(|i| i.cpu_s).sum(),
            Some(Want::AtMost(1.0)),
        ),
        row(
            "idle CPU per host, p50",
            "s",
            &|x| median(&x.idle.iter().map(|i| i.cpu_s).collect::<Vec<_>>()),
            None,
        ),
    ];
    side_by_side::table(
        &format!(
            "mesh50 side by side: {} hosts, 3 etcd members, {}, median of {} round(s) each; idle \
             window {} s (CPU incl. waited-for children)",
            opts.hosts,
            opts.backend.type_name(),
            r.len().min(g.len()),
            opts.idle_secs
        ),
        &rows,
    )
}
