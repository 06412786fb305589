//! `netns-demo`: a flannel cluster in network namespaces, pods pinging across hosts.
//!
//! Run it through `scripts/demo.sh`, which installs what is missing and builds the release
//! binaries first. Needs root.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use netns_tests::netns::sweep_prefix;
use netns_tests::{Backend, Cluster, Pod};

const NAME: &str = "fldemo";
const WORKDIR: &str = "/tmp/flannel-demo";

const USAGE: &str = "\
usage: netns-demo [--backend vxlan|host-gw|udp|alloc] [--hosts N] [--keep] [--down] [--name P]

  --backend B   data plane (default vxlan; alloc only hands out leases, so no cross-host pings)
  --hosts N     number of hosts (default 3)
  --keep        leave the cluster running to explore; remove it later with --down
  --down        remove a cluster left by --keep (namespaces fldemo-*, /tmp/flannel-demo)
  --name P      name prefix of the namespaces (default fldemo; the work directory is then
                /tmp/P), so that demos (the tests run one per backend) do not meet

Needs root. FLANNELD_BIN and FLANNEL_CNI_BIN name the binaries (default: the workspace's
release builds); NETNS_TESTS_CNI=0 makes pods without the CNI plugin.";

struct Args {
    backend: Backend,
    hosts: usize,
    keep: bool,
    down: bool,
    name: String,
    workdir: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        backend: Backend::Vxlan,
        hosts: 3,
        keep: false,
        down: false,
        name: NAME.to_string(),
        workdir: WORKDIR.to_string(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--backend" => {
                let b = value("--backend")?;
                a.backend = Backend::from_type(&b).ok_or_else(|| {
                    format!("--backend: unknown backend {b:?} (vxlan, host-gw, udp, alloc)")
                })?;
            }
            "--hosts" => {
                a.hosts = value("--hosts")?
                    .parse()
                    .ok()
                    .filter(|n| (1..=50).contains(n))
                    .ok_or("--hosts takes a number from 1 to 50")?;
            }
            "--name" => {
                let n = value("--name")?;
                if n.is_empty() || n.len() > 6 || !n.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return Err(format!("--name {n:?}: 1 to 6 letters or digits"));
                }
                a.workdir = format!("/tmp/{n}");
                a.name = n;
            }
            "--keep" => a.keep = true,
            "--down" => a.down = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(a)
}

fn down(args: &Args) -> usize {
    let removed = sweep_prefix(&format!("{}-", args.name));
    let _ = std::fs::remove_dir_all(&args.workdir);
    removed.len()
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if !netns_tests::privileges::is_root() {
        eprintln!("netns-demo needs root (it creates network namespaces)");
        return ExitCode::from(2);
    }
    if args.down {
        let n = down(&args);
        println!(
            "removed {n} namespaces ({}-*) and {}",
            args.name, args.workdir
        );
        return ExitCode::SUCCESS;
    }
    let n = down(&args);
    if n > 0 {
        println!("removed {n} namespaces left by an earlier demo");
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<bool, Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    println!(
        "== {} hosts, backend {}, underlay 198.18.0.0/24, etcd at 198.18.0.2:2379 (all in network namespaces)",
        args.hosts,
        args.backend.type_name()
    );
    let cluster = Cluster::builder()
        .hosts(args.hosts)
        .backend(args.backend)
        .name(&args.name)
        .workdir(Path::new(&args.workdir))
        .build()?;
    println!(
        "   etcd and {} flanneld ready in {:.1?}; network config: {}",
        args.hosts,
        t0.elapsed(),
        cluster.config()
    );
    let took = cluster.wait_converged(Duration::from_secs(30))?;
    if args.backend.has_data_plane() {
        println!("   every host has a route to every other host's subnet ({took:.1?} after ready)");
    } else {
        println!("   every host holds a lease");
    }

    let pods: Vec<Pod> = (0..args.hosts)
        .map(|i| cluster.add_pod(i))
        .collect::<Result<_, _>>()?;
    let made_by = if pods.iter().any(Pod::via_cni) {
        "the flannel CNI plugin"
    } else {
        "the test bed (NETNS_TESTS_CNI=0)"
    };
    println!("\n== pods, one per host, made by {made_by}");
    for p in &pods {
        println!(
            "   {:<12} {:<11} on {:<10} gateway {:<10} mtu {}",
            p.name(),
            p.ip(),
            cluster.host(p.host_index()).name(),
            p.gateway(),
            p.mtu()
        );
    }

    let mut ok = true;
    if args.backend.has_data_plane() {
        if args.backend == Backend::Udp {
            // The udp peer table lives in flanneld, not in the kernel: wait until the leases
            // reached it (a pod answers) rather than lose the first pings.
            for a in &pods {
                for b in pods.iter().filter(|b| b.host_index() != a.host_index()) {
                    a.wait_reaches(b.ip(), Duration::from_secs(20))?;
                }
            }
        }
        println!("\n== pings between pods on different hosts (3 each)");
        for a in &pods {
            for b in &pods {
                if a.host_index() == b.host_index() {
                    continue;
                }
                let st = a.ping(b.ip(), 3)?;
                let rtt = st
                    .avg_rtt_ms
                    .map(|r| format!("avg {r:.3} ms"))
                    .unwrap_or_default();
                let mark = if st.all_received() { "ok  " } else { "FAIL" };
                ok &= st.all_received();
                println!(
                    "   {mark} {:<11} -> {:<11} {}/{} replies {rtt}",
                    a.ip(),
                    b.ip(),
                    st.received,
                    st.transmitted
                );
            }
        }
    } else {
        println!(
            "\n== backend {} hands out leases only: no data plane, so no cross-host pings",
            args.backend.type_name()
        );
    }

    println!("\n== leases in etcd ({})", cluster.subnets_prefix());
    print!("{}", indent(&cluster.table()?));
    if args.backend == Backend::Vxlan {
        let h = cluster.host(0);
        println!("\n== what flanneld programmed on {} (flannel.1)", h.name());
        for (what, out) in [
            (
                "routes",
                h.netns().ip(&["route", "show", "dev", "flannel.1"]),
            ),
            (
                "neighbours",
                h.netns().ip(&["neigh", "show", "dev", "flannel.1"]),
            ),
            (
                "fdb",
                netns_tests::cmd::run(
                    "bridge",
                    &["-netns", h.name(), "fdb", "show", "dev", "flannel.1"],
                ),
            ),
        ] {
            println!("   {what}:");
            print!("{}", indent(&indent(&out?)));
        }
    }

    let h0 = cluster.host(0);
    println!("\n== flanneld status on {}", h0.name());
    let (code, table, err) = h0.flanneld_status(&[])?;
    print!("{}{}", indent(&table), indent(&err));
    if code != 0 {
        println!("   flanneld status exited {code}");
        ok = false;
    }

    if args.keep {
        let name = &args.name;
        let h0 = cluster.host(0).name().to_string();
        let p0 = pods[0].name().to_string();
        let dst = pods.last().map(|p| p.ip().to_string()).unwrap_or_default();
        let healthz = cluster.host(0).healthz_url();
        let dir = cluster.dir().display().to_string();
        for p in pods {
            std::mem::forget(p);
        }
        cluster.leak();
        println!(
            "\n== left running (--keep). Explore:
   ip netns list | grep {name}
   ip netns exec {p0} ping {dst}
   ip -n {h0} route; ip -n {h0} -d link show flannel.1; bridge -netns {h0} fdb show dev flannel.1
   ip netns exec {h0} curl -s {healthz}/metrics; ip netns exec {h0} curl -s {healthz}/v1/status
   ip netns exec {name}-etcd env ETCDCTL_API=3 etcdctl --endpoints=http://198.18.0.2:2379 get --prefix /coreos.com/network
   cat {dir}/h0/subnet.env; tail {dir}/h0/flanneld.log
   Tear down: scripts/demo.sh --down"
        );
    } else {
        drop(pods);
        drop(cluster);
        let _ = std::fs::remove_dir_all(&args.workdir);
        println!("\n== cleaned up: every namespace, process and file of the demo removed");
    }
    println!(
        "{} ({:.1?})",
        if ok { "demo OK" } else { "demo FAILED" },
        t0.elapsed()
    );
    Ok(ok)
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("   {l}\n")).collect()
}
