//! CNI ADD/DEL latency: the native `flannel` plugin versus the reference chain, Debian's
//! `bridge` + `host-local` (`/usr/lib/cni`) with the same settings, in one run.
//!
//! Everything happens in namespaces made here: one "host" namespace both run in (the bench
//! process enters it, so the plugins are spawned directly, without `ip netns exec`), and pod
//! namespaces. Native and reference use their own bridge, subnet and store. Each pair of
//! operations is interleaved (native, reference) so drift hits both alike.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde_json::json;

const REF_DIR: &str = "/usr/lib/cni";

struct Opts {
    json: Option<PathBuf>,
    plugin: PathBuf,
    n: usize,
    rounds: usize,
    parallel: usize,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let default_plugin = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("flannel")))
        .unwrap_or_else(|| PathBuf::from("flannel"));
    let mut o = Opts {
        json: None,
        plugin: default_plugin,
        n: 50,
        rounds: 5,
        parallel: 16,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--json" => o.json = Some(val("--json")?.into()),
            "--plugin" => o.plugin = val("--plugin")?.into(),
            "-n" => o.n = val("-n")?.parse().map_err(|e| format!("-n: {e}"))?,
            "--rounds" => {
                o.rounds = val("--rounds")?
                    .parse()
                    .map_err(|e| format!("--rounds: {e}"))?
            }
            "--parallel" => {
                o.parallel = val("--parallel")?
                    .parse()
                    .map_err(|e| format!("--parallel: {e}"))?
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(o)
}

/// A named network namespace, deleted on drop (by the test bed's guard).
struct Netns(netns_tests::Netns);

impl Netns {
    fn new(name: String) -> Result<Netns, String> {
        netns_tests::Netns::create(&name)
            .map(Netns)
            .map_err(|e| e.to_string())
    }
    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0.name())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Impl {
    Native,
    Reference,
}

struct Setup {
    plugin: PathBuf,
    native_conf: Vec<u8>,
    ref_conf: Vec<u8>,
}

impl Setup {
    fn run(&self, which: Impl, cmd: &str, id: &str, netns: &str) -> Result<Duration, String> {
        let (bin, conf) = match which {
            Impl::Native => (self.plugin.as_path(), &self.native_conf),
            Impl::Reference => (Path::new("/usr/lib/cni/bridge"), &self.ref_conf),
        };
        let start = Instant::now();
        let mut child = Command::new(bin)
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", REF_DIR)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf)
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let took = start.elapsed();
        if !out.status.success() {
            return Err(format!(
                "{which:?} {cmd} {id}: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(took)
    }
}

#[derive(Default)]
struct Samples {
    ms: Vec<f64>,
}

impl Samples {
    fn push(&mut self, d: Duration) {
        self.ms.push(d.as_secs_f64() * 1e3);
    }
    fn quantile(&self, q: f64) -> f64 {
        let mut v = self.ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            return f64::NAN;
        }
        let idx = ((v.len() - 1) as f64 * q).round() as usize;
        v[idx]
    }
    fn mean(&self) -> f64 {
        self.ms.iter().sum::<f64>() / self.ms.len().max(1) as f64
    }
}

pub fn main(args: &[String]) -> i32 {
    let opts = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("flannel-bench cni: {e}");
            return 2;
        }
    };
    if !netns_tests::privileges::is_root() {
        eprintln!("flannel-bench cni: needs root (network namespaces); skipped");
        return 0;
    }
    for need in [opts.plugin.as_path(), Path::new("/usr/lib/cni/bridge")] {
        if !need.exists() {
            eprintln!(
                "flannel-bench cni: {} not found (build it: cargo build --release -p flannel-cni; \
                 reference: apt-get install containernetworking-plugins)",
                need.display()
            );
            return 1;
        }
    }
    match bench(&opts) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("flannel-bench cni: {e}");
            1
        }
    }
}

fn bench(opts: &Opts) -> Result<(), String> {
    let tag = std::process::id() % 100_000;
    let dir = std::env::temp_dir().join(format!("flannel-bench-cni-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let _cleanup_dir = DirGuard(dir.clone());
    std::fs::write(
        dir.join("subnet.env"),
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\nFLANNEL_MTU=1450\n\
         FLANNEL_IPMASQ=true\n",
    )
    .map_err(|e| e.to_string())?;
    let native_conf = json!({
        "cniVersion": "1.0.0", "name": "bench-native", "type": "flannel",
        "subnetFile": dir.join("subnet.env"), "dataDir": dir.join("flannel"),
        "ipam": { "dataDir": dir.join("networks") },
        "delegate": { "bridge": "fbnat0", "hairpinMode": true, "isDefaultGateway": true },
    });
    // What flannel's plugin hands to bridge, on a subnet of its own.
    let ref_conf = json!({
        "cniVersion": "1.0.0", "name": "bench-ref", "type": "bridge", "bridge": "fbref0",
        "hairpinMode": true, "isDefaultGateway": true, "isGateway": true, "ipMasq": false,
        "mtu": 1450,
        "ipam": { "type": "host-local", "dataDir": dir.join("networks"),
                  "ranges": [[{ "subnet": "10.5.73.0/24" }]], "routes": [{ "dst": "10.5.0.0/16" }] },
    });
    let setup = Setup {
        plugin: opts.plugin.clone(),
        native_conf: serde_json::to_vec(&native_conf).unwrap(),
        ref_conf: serde_json::to_vec(&ref_conf).unwrap(),
    };

    let host = Netns::new(format!("fbh{tag}"))?;
    let pods_needed = opts.n.max(opts.parallel);
    let mut pods: Vec<(Netns, Netns)> = Vec::new();
    for i in 0..pods_needed {
        pods.push((
            Netns::new(format!("fbn{tag}x{i}"))?,
            Netns::new(format!("fbr{tag}x{i}"))?,
        ));
    }
    // The bench inside the host namespace from here on; the workers spawned later inherit it.
    let _inside = netns_tests::netns::enter_scoped(host.0.name()).map_err(|e| e.to_string())?;

    // Warm-up: creates the bridges, fills caches.
    for (i, (n, r)) in pods.iter().take(3).enumerate() {
        let id = format!("warm{i}");
        setup.run(Impl::Native, "ADD", &id, &n.path())?;
        setup.run(Impl::Reference, "ADD", &id, &r.path())?;
        setup.run(Impl::Native, "DEL", &id, &n.path())?;
        setup.run(Impl::Reference, "DEL", &id, &r.path())?;
    }

    let mut s: std::collections::BTreeMap<(&str, &str, &str), Samples> = Default::default();
    let keys = |m: &str, op: &'static str, w: Impl| -> (&'static str, &'static str, &'static str) {
        let mode = if m == "seq" { "sequential" } else { "parallel" };
        let which = match w {
            Impl::Native => "native",
            Impl::Reference => "reference",
        };
        (mode, op, which)
    };

    // One at a time: N ADDs, then N DELs, native and reference interleaved.
    for (i, (n, r)) in pods.iter().take(opts.n).enumerate() {
        let id = format!("seq{i}");
        let d = setup.run(Impl::Native, "ADD", &id, &n.path())?;
        s.entry(keys("seq", "ADD", Impl::Native))
            .or_default()
            .push(d);
        let d = setup.run(Impl::Reference, "ADD", &id, &r.path())?;
        s.entry(keys("seq", "ADD", Impl::Reference))
            .or_default()
            .push(d);
    }
    for (i, (n, r)) in pods.iter().take(opts.n).enumerate() {
        let id = format!("seq{i}");
        let d = setup.run(Impl::Native, "DEL", &id, &n.path())?;
        s.entry(keys("seq", "DEL", Impl::Native))
            .or_default()
            .push(d);
        let d = setup.run(Impl::Reference, "DEL", &id, &r.path())?;
        s.entry(keys("seq", "DEL", Impl::Reference))
            .or_default()
            .push(d);
    }

    // `parallel` at once, `rounds` times, per implementation.
    let mut wall: std::collections::BTreeMap<(&str, &str), Vec<f64>> = Default::default();
    for round in 0..opts.rounds {
        for which in [Impl::Native, Impl::Reference] {
            for op in ["ADD", "DEL"] {
                let barrier = Barrier::new(opts.parallel);
                let start = Instant::now();
                let results: Vec<Result<Duration, String>> = std::thread::scope(|sc| {
                    let hs: Vec<_> = pods
                        .iter()
                        .take(opts.parallel)
                        .enumerate()
                        .map(|(i, (n, r))| {
                            let (setup, barrier) = (&setup, &barrier);
                            let ns = if which == Impl::Native {
                                n.path()
                            } else {
                                r.path()
                            };
                            sc.spawn(move || {
                                barrier.wait();
                                setup.run(which, op, &format!("par{round}x{i}"), &ns)
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                let total = start.elapsed().as_secs_f64() * 1e3;
                let op_static: &'static str = if op == "ADD" { "ADD" } else { "DEL" };
                let k = keys("par", op_static, which);
                wall.entry((op_static, k.2)).or_default().push(total);
                for r in results {
                    s.entry(k).or_default().push(r?);
                }
            }
        }
    }
    drop(_inside);

    // Report.
    println!(
        "CNI latency, native flannel plugin vs bridge + host-local ({}), ms",
        REF_DIR
    );
    println!(
        "{:<11} {:<4} {:<10} {:>5} {:>8} {:>8} {:>8}",
        "mode", "op", "impl", "n", "median", "p90", "mean"
    );
    let mut rows = Vec::new();
    for ((mode, op, which), v) in &s {
        println!(
            "{:<11} {:<4} {:<10} {:>5} {:>8.2} {:>8.2} {:>8.2}",
            mode,
            op,
            which,
            v.ms.len(),
            v.quantile(0.5),
            v.quantile(0.9),
            v.mean()
        );
        rows.push(json!({
            "mode": mode, "op": op, "impl": which, "n": v.ms.len(),
            "median_ms": v.quantile(0.5), "p90_ms": v.quantile(0.9), "mean_ms": v.mean(),
        }));
    }
    let mut ratios = Vec::new();
    println!("\nratio native/reference (median; target for ADD: <= 0.25)");
    for mode in ["sequential", "parallel"] {
        for op in ["ADD", "DEL"] {
            let (Some(n), Some(r)) = (
                s.get(&(mode, op, "native")),
                s.get(&(mode, op, "reference")),
            ) else {
                continue;
            };
            let ratio = n.quantile(0.5) / r.quantile(0.5);
            println!("{mode:<11} {op:<4} {ratio:>6.3}");
            ratios.push(json!({ "mode": mode, "op": op, "ratio_median": ratio }));
        }
    }
    let mut walls = Vec::new();
    println!(
        "\nparallel batches of {}: wall time per batch (median, ms)",
        opts.parallel
    );
    for ((op, which), v) in &wall {
        let smp = Samples { ms: v.clone() };
        println!("{op:<4} {which:<10} {:>8.2}", smp.quantile(0.5));
        walls.push(json!({ "op": op, "impl": which, "batch_wall_median_ms": smp.quantile(0.5) }));
    }
    if let Some(path) = &opts.json {
        let doc = json!({
            "bench": "cni",
            "plugin": opts.plugin,
            "reference": "/usr/lib/cni/bridge + host-local",
            "sequential_n": opts.n, "parallel": opts.parallel, "rounds": opts.rounds,
            "results": rows, "ratios": ratios, "parallel_batches": walls,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap())
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
