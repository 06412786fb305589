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
//! Rounds build a fresh cluster each; the table shows every round and the JSON holds all figures.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use netns_tests::{heavy_lock, par_map, Backend, Cluster, PodMode, ProcStats};
use serde_json::json;

struct Opts {
    hosts: usize,
    rounds: usize,
    backend: Backend,
    json: Option<PathBuf>,
    flanneld: PathBuf,
}

fn usage() -> i32 {
    eprintln!(
        "usage: flannel-bench mesh50 [--hosts N] [--rounds R] [--backend vxlan|host-gw] \
         [--json FILE] [--flanneld PATH]\n\
         defaults: --hosts 50 --rounds 3 --backend vxlan; flanneld: $FLANNELD_BIN, else \
         flanneld next to this binary"
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
    // The test bed takes the binary from here.
    std::env::set_var("FLANNELD_BIN", &flanneld);
    match run(&opts) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mesh50: {e}");
            1
        }
    }
}

/// Figures of one round.
struct Round {
    hosts: usize,
    /// Per host: burst start → its last peer route, seconds (index = host).
    host_mesh_s: Vec<f64>,
    leases_s: f64,
    mesh_s: f64,
    converged_s: f64,
    stats: Vec<ProcStats>,
    etcd_rss_kb: Vec<u64>,
}

fn round(opts: &Opts) -> Result<Round, String> {
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
            h.check_alive()?;
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
    Ok(Round {
        hosts: n,
        host_mesh_s,
        leases_s: leases_s.unwrap_or_default(),
        mesh_s,
        converged_s,
        stats,
        etcd_rss_kb,
    })
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

fn run(opts: &Opts) -> Result<(), String> {
    let _heavy = heavy_lock();
    let mut rounds = Vec::new();
    for r in 0..opts.rounds {
        eprintln!(
            "mesh50: round {}/{}: {} hosts, 3 etcd members, {}",
            r + 1,
            opts.rounds,
            opts.hosts,
            opts.backend.type_name()
        );
        rounds.push(round(opts)?);
    }
    println!(
        "\n{:<6} {:>6} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "round",
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
        "run max s"
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
        println!(
            "{:<6} {:>6} {:>9.3} {:>9.3} {:>10.3} {:>10.3} {:>10} {:>10} {:>10} {:>10} {:>10.3} {:>10.3} {:>10.4} {:>10.4}",
            i + 1,
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
            max(&run)
        );
        json_rounds.push(json!({
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
        }));
    }
    let meshes: Vec<f64> = rounds.iter().map(|r| r.mesh_s).collect();
    let converged: Vec<f64> = rounds.iter().map(|r| r.converged_s).collect();
    println!(
        "\nmesh programmed (all {} hosts, every peer route): median {:.3} s over {} round(s); \
         fully converged: median {:.3} s",
        opts.hosts,
        median(&meshes),
        rounds.len(),
        median(&converged)
    );
    if let Some(path) = &opts.json {
        let doc = json!({
            "bench": "mesh50",
            "hosts": opts.hosts,
            "backend": opts.backend.type_name(),
            "etcd_members": 3,
            "rounds": json_rounds,
            "mesh_programmed_s_median": median(&meshes),
            "converged_s_median": median(&converged),
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        eprintln!("mesh50: wrote {}", path.display());
    }
    Ok(())
}
