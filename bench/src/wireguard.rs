//! `flannel-bench wireguard`: our wireguard backend against Debian's wireguard-go and against
//! our own plaintext udp backend, in one run (issue #15's benchmark).
//!
//! The bed of `flannel-bench udp` (two host namespaces joined by a veth pair, one pod namespace
//! behind each host), and for each mode iperf3 from pod A to pod B: one TCP stream, four TCP
//! streams, and 64-byte datagrams from the batching generator (receiver packets per second),
//! with the daemons' CPU during each figure.
//!
//! - `wireguard-go`: Debian's `wireguard-go` with `wg` on each host, set up as flannel's
//!   wireguard backend sets up a node (device `flannel-wg`, MTU 1420, the Network routed into
//!   it, one peer per lease, a PSK), the test bed's [`netns_tests::WireguardGo`];
//! - `wireguard`: the real `flanneld` (release build) on each host with `Backend.Type`
//!   `wireguard` and a PSK, etcd in host A's namespace;
//! - `udp`: the same flanneld with the udp backend: our plaintext fast path.
//!
//! Targets (same run): one stream ≥ 5× wireguard-go and ≥ 0.4× our plaintext udp.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netns_tests::privileges::{self, Need};
use netns_tests::wireguard_go::{self, NodeSpec, Peer, WireguardGo};
use serde_json::{json, Value};

use crate::udp::{self, Bed, Figure, Load, A_IP, B_IP};

const NETWORK: &str = "10.5.0.0/16";
const LOADS: [Load; 3] = [Load::Tcp1, Load::Tcp4, Load::Udp64];
/// Ours over wireguard-go, one TCP stream.
const WANT_OVER_WIREGUARD_GO: f64 = 5.0;
/// Ours over our plaintext udp path, one TCP stream.
const WANT_OVER_UDP: f64 = 0.4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    WireguardGo,
    Wireguard,
    Udp,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::WireguardGo, Mode::Wireguard, Mode::Udp];

    fn name(self) -> &'static str {
        match self {
            Mode::WireguardGo => "wireguard-go",
            Mode::Wireguard => "wireguard",
            Mode::Udp => "udp",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::WireguardGo => "Debian wireguard-go",
            Mode::Wireguard => "our wireguard",
            Mode::Udp => "our udp (plaintext)",
        }
    }
}

struct Opts {
    json: Option<PathBuf>,
    secs: u32,
    repeat: u32,
    flanneld: Option<PathBuf>,
    modes: Vec<Mode>,
}

fn usage() -> i32 {
    eprintln!(
        "usage: flannel-bench wireguard [--json FILE] [--secs N] [--repeat N] [--flanneld PATH] \
         [--modes wireguard-go,wireguard,udp]"
    );
    2
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        json: None,
        secs: 5,
        repeat: 1,
        flanneld: None,
        modes: Mode::ALL.to_vec(),
    };
    crate::common::each_option(args, |flag, val| {
        match flag {
            "--json" => o.json = Some(val()?.into()),
            "--secs" => o.secs = crate::common::count(flag, val()?)? as u32,
            "--repeat" => o.repeat = (crate::common::count(flag, val()?)? as u32).max(1),
            "--flanneld" => o.flanneld = Some(val()?.into()),
            "--modes" => {
                o.modes = val()?
                    .split(',')
                    .map(|m| {
                        Mode::ALL.into_iter().find(|x| x.name() == m).ok_or(format!(
                            "--modes: unknown mode {m:?} (wireguard-go, wireguard, udp)"
                        ))
                    })
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown option {other:?}")),
        }
        Ok(())
    })?;
    if o.secs == 0 {
        return Err("--secs: 0 is not a duration to measure".into());
    }
    Ok(o)
}

pub fn main(args: &[String]) -> i32 {
    let opts = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("flannel-bench wireguard: {e}");
            return usage();
        }
    };
    match run(&opts) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("flannel-bench wireguard: {e}");
            1
        }
    }
}

/// One mode's figures and a line on how it ran.
struct ModeResult {
    mode: Mode,
    figures: Vec<(Load, Figure)>,
    note: String,
}

impl ModeResult {
    fn get(&self, load: Load) -> Option<Figure> {
        self.figures.iter().find(|(l, _)| *l == load).map(|x| x.1)
    }
}

fn run(opts: &Opts) -> Result<(), String> {
    let mut needs = vec![
        Need::Root,
        Need::Tool("iperf3"),
        Need::Etcd,
        Need::Tool("etcdctl"),
        Need::Tool("ip"),
        Need::Tool("ping"),
    ];
    needs.extend_from_slice(wireguard_go::NEEDS);
    let missing = privileges::missing(&needs);
    if !missing.is_empty() {
        return Err(format!("needs {}", missing.join(", ")));
    }
    let flanneld = match &opts.flanneld {
        Some(p) => p.clone(),
        None if opts.modes.iter().any(|m| *m != Mode::WireguardGo) => udp::build_flanneld()?,
        None => PathBuf::new(),
    };
    let psk = wireguard_go::generate_psk().map_err(|e| e.to_string())?;
    let mut bed = Bed::new()?;
    let mut results = Vec::new();
    for &mode in &opts.modes {
        eprintln!("{}:", mode.label());
        let (figures, note) = match mode {
            Mode::WireguardGo => run_wireguard_go(&mut bed, &psk, opts)?,
            Mode::Wireguard | Mode::Udp => run_flanneld(&mut bed, &flanneld, mode, &psk, opts)?,
        };
        results.push(ModeResult {
            mode,
            figures,
            note,
        });
    }
    report(opts, &results)
}

/// Polls until the pod namespace `pod_a` reaches `server` (the peers are programmed).
fn wait_pods_connected(pod_a: &str, server: &str) -> Result<Duration, String> {
    let start = Instant::now();
    netns_tests::wait_until(
        Duration::from_secs(30),
        &format!("{pod_a} to reach {server}"),
        || {
            netns_tests::cmd::run(
                "ip",
                &[
                    "netns", "exec", pod_a, "ping", "-n", "-c", "1", "-W", "1", server,
                ],
            )
            .map(drop)
            .map_err(|e| e.to_string())
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(start.elapsed())
}

/// Every load, `opts.repeat` times each; the median of each is kept.
fn measure(
    bed: &mut Bed,
    mode: Mode,
    client_ns: &str,
    server_ns: &str,
    server: &str,
    daemons: &[u32],
    opts: &Opts,
) -> Result<Vec<(Load, Figure)>, String> {
    let mut out = Vec::new();
    for load in LOADS {
        let mut runs = Vec::new();
        for _ in 0..opts.repeat {
            let f = if load == Load::Udp64 {
                udp::blast(client_ns, server_ns, server, opts.secs, daemons)?
            } else {
                udp::iperf(bed, client_ns, server_ns, server, load, opts.secs, daemons)?
            };
            eprintln!(
                "  {:<22} {:<20} {:>12.2}  daemon CPU {}  machine CPU {:.2}",
                mode.label(),
                load.name(),
                f.value,
                f.daemon_cpu.map_or("-".into(), |c| format!("{c:.2}")),
                f.machine_cpu,
            );
            runs.push(f);
        }
        runs.sort_by(|a, b| a.value.total_cmp(&b.value));
        out.push((load, runs[runs.len() / 2]));
    }
    Ok(out)
}

/// `wireguard-go --version`'s first line.
fn wireguard_go_version() -> String {
    netns_tests::cmd::run("wireguard-go", &["--version"])
        .ok()
        .and_then(|v| v.lines().next().map(str::to_string))
        .unwrap_or_else(|| "wireguard-go (version unknown)".into())
}

fn run_wireguard_go(
    bed: &mut Bed,
    psk: &str,
    opts: &Opts,
) -> Result<(Vec<(Load, Figure)>, String), String> {
    let err = |e: netns_tests::Error| e.to_string();
    let mut nodes = Vec::new();
    for (h, ip, net) in [("a", A_IP, "10.5.1.0/24"), ("b", B_IP, "10.5.2.0/24")] {
        let dir = bed.dir.join(format!("wireguard-go-{h}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        nodes.push(
            WireguardGo::start(NodeSpec {
                netns: bed.ns(h),
                dir,
                public_ip: ip.parse().expect("an IPv4 address"),
                subnet: net.parse().expect("a subnet"),
                network: NETWORK.parse().expect("a network"),
                port: wireguard_go::DEFAULT_PORT,
                mtu: 1500 - wireguard_go::OVERHEAD,
                // Verbose logging costs CPU on every handshake; the bench wants none of it.
                log_level: "error".into(),
                keys: None,
                v6: None,
            })
            .map_err(err)?,
        );
    }
    for (me, other) in [(0, 1), (1, 0)] {
        let o = &nodes[other];
        nodes[me]
            .set_peer(&Peer {
                public_key: o.public_key(),
                endpoint: o.endpoint().into(),
                allowed_ips: vec![o.spec().subnet.into()],
                psk: Some(psk.to_string()),
                keepalive: 0,
            })
            .map_err(err)?;
    }
    let pa = bed.add_pod("a", "10.5.1", 1420)?;
    let pb = bed.add_pod("b", "10.5.2", 1420)?;
    let pids: Vec<u32> = nodes.iter().filter_map(WireguardGo::pid).collect();
    let r = wait_pods_connected(&pa, "10.5.2.2")
        .and_then(|_| measure(bed, Mode::WireguardGo, &pa, &pb, "10.5.2.2", &pids, opts));
    bed.remove_pods();
    drop(nodes);
    Ok((
        r?,
        format!(
            "{}: one process per host, device flannel-wg MTU 1420, PSK",
            wireguard_go_version()
        ),
    ))
}

fn network_config(mode: Mode, psk: &str) -> String {
    let backend = match mode {
        Mode::Wireguard => json!({"Type": "wireguard", "PSK": psk}),
        _ => json!({"Type": "udp"}),
    };
    json!({"Network": NETWORK, "SubnetLen": 24, "Backend": backend}).to_string()
}

fn run_flanneld(
    bed: &mut Bed,
    bin: &Path,
    mode: Mode,
    psk: &str,
    opts: &Opts,
) -> Result<(Vec<(Load, Figure)>, String), String> {
    udp::put_network_config(bed, &network_config(mode, psk))?;
    if let Some(etcd) = &bed.etcd {
        // The other mode's leases would make each daemon wait for a peer of the wrong type.
        etcd.etcdctl(&["del", "--prefix", "/coreos.com/network/subnets/"])
            .map_err(|e| e.to_string())?;
    }
    let mut pids = Vec::new();
    let mut nets = Vec::new();
    let mut mtu = 0;
    for h in ["a", "b"] {
        let file = bed.dir.join(format!("subnet-{h}-{}.env", mode.name()));
        let _ = std::fs::remove_file(&file);
        let mut flanneld = netns_tests::FlanneldCommand::new(bin);
        flanneld.netns = Some(bed.ns(h));
        flanneld.args = vec![
            format!("--etcd-endpoints=http://{A_IP}:2379"),
            "--iface=eth0".into(),
        ];
        flanneld.subnet_file = Some(file.clone());
        // Each host its own key (the default path is shared by every namespace).
        flanneld.env = vec![(
            "WIREGUARD_KEY_FILE".into(),
            bed.dir.join(format!("wgkey-{h}")).display().to_string(),
        )];
        let log = format!("flanneld-{h}-{}.log", mode.name());
        pids.push(bed.spawn_cmd(flanneld.command(), &log)?);
        let subnet = netns_tests::wait_until(
            Duration::from_secs(30),
            &format!("flanneld on host {h} to write {}", file.display()),
            || udp::subnet_env(&file, "FLANNEL_SUBNET").ok_or_else(|| "no subnet file".into()),
        )
        .map_err(|e| format!("{e} (log: {})", bed.dir.join(&log).display()))?;
        mtu = udp::subnet_env(&file, "FLANNEL_MTU")
            .and_then(|m| m.parse().ok())
            .ok_or(format!("{}: no FLANNEL_MTU", file.display()))?;
        // 10.5.7.1/24 → 10.5.7
        let net = subnet
            .split('/')
            .next()
            .and_then(|ip| ip.rsplit_once('.'))
            .map(|(n, _)| n.to_string())
            .ok_or(format!("odd FLANNEL_SUBNET {subnet:?}"))?;
        nets.push(net);
    }
    let pa = bed.add_pod("a", &nets[0], mtu)?;
    let pb = bed.add_pod("b", &nets[1], mtu)?;
    let server = format!("{}.2", nets[1]);
    let r = wait_pods_connected(&pa, &server)
        .and_then(|_| measure(bed, mode, &pa, &pb, &server, &pids, opts));
    let log = std::fs::read_to_string(bed.dir.join(format!("flanneld-a-{}.log", mode.name())))
        .unwrap_or_default();
    let device = if mode == Mode::Wireguard {
        "flannel-wg"
    } else {
        "flannel0"
    };
    let path = log
        .lines()
        .find(|l| l.contains(device))
        // Without the time stamp, level and target: what the daemon said.
        .map(|l| l.split_once(": ").map_or(l, |x| x.1).trim().to_string())
        .unwrap_or_else(|| format!("(no log line names {device})"));
    bed.remove_pods();
    for pid in pids {
        bed.stop_pid(pid);
    }
    for h in ["a", "b"] {
        let _ = netns_tests::cmd::run("ip", &["-n", &bed.ns(h), "link", "del", device]);
    }
    Ok((r?, format!("flanneld {}, MTU {mtu}: {path}", bin.display())))
}

fn report(opts: &Opts, results: &[ModeResult]) -> Result<(), String> {
    println!();
    println!(
        "wireguard benchmark: 2 host namespaces joined by veth, pod → pod, {} s per figure, \
         median of {}; TCP by iperf3, 64B by a sendmmsg/recvmmsg generator",
        opts.secs, opts.repeat
    );
    println!(
        "{:<22} {:>11} {:>11} {:>10}   daemon CPU, cores (1 TCP / 4 TCP / 64B)",
        "mode", "1 TCP Gb/s", "4 TCP Gb/s", "64B kpps"
    );
    let mut modes = serde_json::Map::new();
    for r in results {
        let mut row = format!("{:<22}", r.mode.label());
        let mut cpus = Vec::new();
        let mut j = serde_json::Map::new();
        for load in LOADS {
            let f = r.get(load);
            let shown = f.map(|f| {
                if load == Load::Udp64 {
                    f.value / 1e3
                } else {
                    f.value
                }
            });
            let width = if load == Load::Udp64 { 10 } else { 11 };
            row.push_str(&format!(
                " {:>width$}",
                shown.map_or("-".into(), |v| format!("{v:.2}"))
            ));
            cpus.push(
                f.and_then(|f| f.daemon_cpu)
                    .map_or("-".into(), |c| format!("{c:.2}")),
            );
            if let Some(f) = f {
                j.insert(
                    load.name().into(),
                    json!({"value": f.value, "daemon_cpu_cores": f.daemon_cpu,
                           "machine_cpu_cores": f.machine_cpu}),
                );
            }
        }
        println!("{row}   {}", cpus.join(" / "));
        j.insert("setup".into(), json!(r.note));
        modes.insert(r.mode.name().into(), Value::Object(j));
    }
    for r in results {
        println!("  {}: {}", r.mode.label(), r.note);
    }
    let get = |m: Mode, l: Load| results.iter().find(|r| r.mode == m)?.get(l);
    let mut targets = serde_json::Map::new();
    for (base, want) in [
        (Mode::WireguardGo, WANT_OVER_WIREGUARD_GO),
        (Mode::Udp, WANT_OVER_UDP),
    ] {
        for load in LOADS {
            let (Some(ours), Some(b)) = (get(Mode::Wireguard, load), get(base, load)) else {
                continue;
            };
            if b.value <= 0.0 {
                continue;
            }
            let ratio = ours.value / b.value;
            let name = format!("our wireguard ÷ {}: {}", base.label(), load.name());
            if load == Load::Tcp1 {
                let met = ratio >= want;
                println!(
                    "{name}: {ratio:.2}× (target ≥ {want}×) {}",
                    if met { "MET" } else { "NOT MET" }
                );
                targets.insert(name, json!({"ratio": ratio, "want": want, "met": met}));
            } else {
                println!("{name}: {ratio:.2}×");
                targets.insert(name, json!({"ratio": ratio}));
            }
        }
    }
    println!("(one run on a machine shared with other work: compare ratios, not absolutes)");
    if let Some(path) = &opts.json {
        let doc = json!({
            "benchmark": "wireguard",
            "seconds_per_figure": opts.secs,
            "runs_per_figure_median_kept": opts.repeat,
            "topology": "two host namespaces joined by a veth pair; one pod namespace per host; iperf3 TCP and a 64-byte UDP generator from pod A to pod B",
            "modes": modes,
            "targets": targets,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn modes_parse_and_a_bad_one_is_named() {
        let o = parse(&args(&["--modes", "udp,wireguard-go", "--secs", "3"])).unwrap();
        assert_eq!(o.modes, [Mode::Udp, Mode::WireguardGo]);
        assert_eq!(o.secs, 3);
        let e = parse(&args(&["--modes", "wg"])).err().unwrap();
        assert!(e.contains("\"wg\""), "{e}");
        assert!(parse(&args(&["--secs", "0"])).is_err());
    }

    #[test]
    fn our_config_carries_the_psk_and_udp_none() {
        let wg: Value = serde_json::from_str(&network_config(Mode::Wireguard, "P=")).unwrap();
        assert_eq!(wg["Backend"], json!({"Type": "wireguard", "PSK": "P="}));
        let udp: Value = serde_json::from_str(&network_config(Mode::Udp, "P=")).unwrap();
        assert_eq!(udp["Backend"], json!({"Type": "udp"}));
        assert_eq!(udp["Network"], NETWORK);
    }
}
