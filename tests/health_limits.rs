//! The health port under abuse, against a real flanneld and etcd: a flood of idle connections
//! from another network namespace, and the open-file limit the daemon starts with.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use netns_tests::{Daemon, FlanneldCommand, ProcStats};

use common::{http_get, poll, Etcd, LocalEtcd, Netns};

const CONFIG: &str = r#"{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"alloc"}}"#;
const WAIT: Duration = Duration::from_secs(20);
/// The flood's size: more than the daemon's open-file limit.
const FLOOD: usize = 2000;
/// How long the flood's connections are opened for, at most.
const CONNECT_FOR: Duration = Duration::from_secs(10);
/// How long the flood's connections stay open; longer than the lease TTL, so the lease
/// survives it only if renewals go on.
const HOLD: Duration = Duration::from_secs(8);
const LEASE_TTL: &str = "--subnet-lease-ttl=6s";
/// CPU time flanneld may use while the idle connections are opened and held.
const CPU_BUDGET: Duration = Duration::from_millis(500);

/// flanneld started under `prlimit`, with its own subnet file and log; killed on drop.
struct LimitedFlanneld {
    dir: tempfile::TempDir,
    process: Daemon,
}

impl LimitedFlanneld {
    fn start(netns: Option<&str>, nofile: &str, args: &[String]) -> LimitedFlanneld {
        let dir = tempfile::tempdir().unwrap();
        let mut flanneld = FlanneldCommand::new(env!("CARGO_BIN_EXE_flanneld"));
        flanneld.netns = netns.map(String::from);
        // `ip netns exec` and `prlimit` both exec what follows: the child's pid is flanneld's.
        flanneld.wrapper = vec!["prlimit".into(), format!("--nofile={nofile}").into()];
        flanneld.args = args.to_vec();
        flanneld.subnet_file = Some(dir.path().join("subnet.env"));
        let process = Daemon::new("prlimit flanneld", dir.path().join("flanneld.log"), 30);
        process
            .start(flanneld.command())
            .expect("start prlimit flanneld");
        LimitedFlanneld { dir, process }
    }

    fn pid(&self) -> u32 {
        self.process.pid().expect("flanneld runs")
    }

    fn log(&self) -> String {
        self.process.log()
    }

    /// User plus system CPU time used so far.
    fn cpu_time(&self) -> Duration {
        Duration::from_secs_f64(ProcStats::read(self.pid()).unwrap().cpu_secs)
    }

    fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Runs `f` on a thread that entered `ns`: the sockets it opens live in that namespace.
fn in_namespace<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    netns_tests::netns::run_in(&ns.name, f).unwrap()
}

/// This test process must hold the whole flood open.
fn raise_own_open_file_limit(needed: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= needed,
        "this test opens {needed} sockets but the hard open-file limit is {hard}"
    );
    if soft < needed {
        setrlimit(Resource::RLIMIT_NOFILE, needed, hard).unwrap();
    }
}

fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The own lease's key and create revision: unchanged as long as the lease is renewed, new
/// once it expired and was acquired again.
fn lease_identity(etcd: &Etcd) -> Option<(String, u64)> {
    let out = etcd
        .etcdctl(&[
            "get",
            "--prefix",
            "/coreos.com/network/subnets/",
            "-w",
            "json",
        ])
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let kv = v["kvs"].as_array()?.first()?;
    Some((
        kv["key"].as_str()?.to_string(),
        kv["create_revision"].as_u64()?,
    ))
}

/// The daemon's soft and hard open-file limit is 1024 (a common default): the flood alone
/// would exhaust it, whatever the daemon raises its soft limit to, unless connections are
/// capped.
#[test]
fn idle_connection_flood_from_another_namespace_costs_little_cpu_and_probes_recover() {
    idle_connection_flood(1024);
}

/// The daemon's open-file limit is below the connection cap: accepting fails with EMFILE
/// until the server closes idle connections.
#[test]
fn idle_connection_flood_beyond_the_open_file_limit_costs_little_cpu_and_probes_recover() {
    idle_connection_flood(64);
}

fn idle_connection_flood(daemon_nofile: u64) {
    netns_tests::require!(netns_tests::Need::Root, netns_tests::Need::Etcd);
    raise_own_open_file_limit(FLOOD as u64 + 256);
    let host = Netns::new("hh");
    let client = Netns::new("hc");
    // The link is made inside the test's namespaces, so its names cannot clash with others'.
    host.run(&[
        "ip",
        "link",
        "add",
        "flood0",
        "type",
        "veth",
        "peer",
        "name",
        "flood1",
        "netns",
        &client.name,
    ])
    .unwrap();
    host.run(&["ip", "addr", "add", "198.18.41.1/30", "dev", "flood0"])
        .unwrap();
    host.run(&["ip", "link", "set", "flood0", "up"]).unwrap();
    client
        .run(&["ip", "addr", "add", "198.18.41.2/30", "dev", "flood1"])
        .unwrap();
    client.run(&["ip", "link", "set", "flood1", "up"]).unwrap();

    let etcd = Etcd::start_local(LocalEtcd {
        netns: Some(host.name.clone()),
        ..Default::default()
    })
    .unwrap();
    common::config(&etcd, CONFIG);
    let health = SocketAddr::from(([198, 18, 41, 1], common::free_port()));
    let daemon = LimitedFlanneld::start(
        Some(&host.name),
        &format!("{daemon_nofile}:{daemon_nofile}"),
        &[
            format!("--etcd-endpoints={}", etcd.endpoint()),
            "--iface=lo".to_string(),
            "--iptables-forward-rules=false".to_string(),
            "--public-ip=198.18.41.1".to_string(),
            LEASE_TTL.to_string(),
            format!("--healthz-ip={}", health.ip()),
            format!("--healthz-port={}", health.port()),
        ],
    );
    in_namespace(&client, || {
        poll("flanneld /readyz to return 200", WAIT, || {
            matches!(http_get(health, "/readyz"), Some((200, _))).then_some(())
        })
    });
    let renewals_before = in_namespace(&client, || metric(health, "flannel_lease_renewals_total"))
        .expect("the renewal counter");
    let lease_before = lease_identity(&etcd).expect("the own lease in etcd");
    eprintln!(
        "flanneld holds {} open files before the flood",
        daemon.open_files()
    );

    let cpu_before = daemon.cpu_time();
    let flood_started = Instant::now();
    // Once the daemon's descriptors and its accept queue are full, the kernel drops further
    // handshakes: connect for a bounded time and require more connections than the daemon
    // could hold.
    let flood = in_namespace(&client, || {
        let deadline = Instant::now() + CONNECT_FOR;
        let mut open = Vec::with_capacity(FLOOD);
        while open.len() < FLOOD && Instant::now() < deadline {
            if let Ok(s) = TcpStream::connect_timeout(&health, Duration::from_millis(500)) {
                open.push(s);
            }
        }
        open
    });
    assert!(
        flood.len() > daemon_nofile as usize,
        "only {} connections opened within {CONNECT_FOR:?}",
        flood.len()
    );
    std::thread::sleep(HOLD);
    let cpu_used = daemon.cpu_time() - cpu_before;
    let flood_lasted = flood_started.elapsed();
    let lease_after_hold = lease_identity(&etcd);
    eprintln!(
        "flanneld used {cpu_used:?} of CPU over {flood_lasted:?} with {} idle connections; {} open files",
        flood.len(),
        daemon.open_files()
    );
    drop(flood);

    assert!(
        cpu_used < CPU_BUDGET,
        "flanneld used {cpu_used:?} of CPU in the {flood_lasted:?} of opening and holding idle connections"
    );
    assert_eq!(
        lease_after_hold,
        Some(lease_before),
        "the lease (TTL 6 s) must be renewed during the {HOLD:?} hold, not lost and re-acquired"
    );
    in_namespace(&client, || {
        poll("/healthz to answer once the flood closed", WAIT, || {
            matches!(http_get(health, "/healthz"), Some((200, _))).then_some(())
        });
        let renewals = metric(health, "flannel_lease_renewals_total").unwrap();
        assert!(
            renewals >= renewals_before + 2.0,
            "renewals {renewals_before} before, {renewals} after the {HOLD:?} hold"
        );
    });
}

#[test]
fn soft_open_file_limit_is_raised_to_the_hard_limit_at_start() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    common::config(&etcd, CONFIG);
    let daemon = LimitedFlanneld::start(
        None,
        "256:4096",
        &[
            format!("--etcd-endpoints={}", etcd.endpoint()),
            "--iface=lo".to_string(),
            "--iptables-forward-rules=false".to_string(),
            "--public-ip=198.18.41.5".to_string(),
        ],
    );
    let limits = poll("flanneld's subnet file", WAIT, || {
        let written = daemon.dir.path().join("subnet.env").exists();
        written.then(|| std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap())
    });
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        open_files.split_whitespace().collect::<Vec<_>>()[3..5],
        ["4096", "4096"],
        "{open_files}"
    );
    assert_eq!(
        daemon
            .log()
            .matches("raised the open-file limit (RLIMIT_NOFILE) from 256 to 4096")
            .count(),
        1,
        "{}",
        daemon.log()
    );
}
