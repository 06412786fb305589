//! A "host": a namespace on the underlay running flanneld.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::Duration;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use crate::{
    http_get, wait_for, Daemon, Error, FlanneldCommand, Netns, Pod, PodMode, Result, Underlay, Wait,
};

/// How flanneld is run on a host.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// `--iface` value; `None` leaves it out (flanneld then uses the default-route interface,
    /// which is `eth0` here too).
    pub iface: Option<String>,
    /// Port of the health server (`--healthz-port`); it listens on 0.0.0.0 in the host namespace.
    pub healthz_port: u16,
    /// More flags, e.g. `--ip-masq`, `--subnet-lease-ttl=30s`.
    pub extra_args: Vec<String>,
    /// `RUST_LOG` for flanneld (default: `$NETNS_TESTS_RUST_LOG`, else `$RUST_LOG`, else `info`).
    pub rust_log: Option<String>,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            iface: Some("eth0".to_string()),
            healthz_port: 10260,
            extra_args: Vec::new(),
            rust_log: None,
        }
    }
}

/// Kubernetes mode for a host (see [`Host::set_kube`]): flanneld runs with
/// `--kube-subnet-mgr`, this kubeconfig and net-conf file, as Node `node_name` (`NODE_NAME`).
#[derive(Debug, Clone)]
pub struct KubeMode {
    pub kubeconfig: PathBuf,
    pub net_conf: PathBuf,
    /// Empty: no `NODE_NAME`, flanneld finds its Node from `POD_NAME` and `POD_NAMESPACE`
    /// (set with [`Host::set_env`]).
    pub node_name: String,
    /// More flags in kube mode only (e.g. `--kube-annotation-prefix=...`).
    pub extra_args: Vec<String>,
}

/// Host `index`: namespace `<prefix>-h<index>`, `eth0` = `198.18.0.(10+index)/24` on the
/// underlay, IPv4 forwarding on, flanneld with its subnet file and log in the host's directory.
/// Dropping it stops flanneld (SIGKILL) and deletes the namespace (and the pods' veths with it);
/// when the thread is panicking it prints the tail of flanneld's log first.
#[derive(Debug)]
pub struct Host {
    flanneld: Daemon,
    pods: Mutex<usize>,
    /// flannel's Go flanneld to run instead of ours (see [`Host::set_go_flanneld`]).
    go_flanneld: Mutex<Option<PathBuf>>,
    /// More environment for flanneld (see [`Host::set_env`]).
    extra_env: Mutex<Vec<(String, String)>>,
    /// A program flanneld runs under (see [`Host::set_wrapper`]).
    wrapper: Mutex<Vec<std::ffi::OsString>>,
    /// Kubernetes mode instead of etcd (see [`Host::set_kube`]).
    kube: Mutex<Option<KubeMode>>,
    index: usize,
    public_ip: Ipv4Addr,
    bin: PathBuf,
    dir: PathBuf,
    etcd_endpoint: String,
    etcd_prefix: String,
    opts: HostOptions,
    pod_mode: PodMode,
    ns: Netns,
}

impl Host {
    /// Makes the host (namespace, underlay port `h<index>`, directory `dir`); does not start
    /// flanneld.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: usize,
        underlay: &Underlay,
        prefix: &str,
        dir: &Path,
        etcd_endpoint: &str,
        etcd_prefix: &str,
        bin: &Path,
        opts: HostOptions,
        pod_mode: PodMode,
    ) -> Result<Host> {
        let ns = Netns::create(&format!("{prefix}-h{index}"))?;
        let public_ip = Underlay::host_ip(index);
        underlay.attach(&ns, &format!("h{index}"), public_ip)?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
        Ok(Host {
            flanneld: Daemon::new(
                format!("flanneld on {}", ns.name()),
                dir.join("flanneld.log"),
                40,
            ),
            pods: Mutex::new(0),
            go_flanneld: Mutex::new(None),
            extra_env: Mutex::new(Vec::new()),
            wrapper: Mutex::new(Vec::new()),
            kube: Mutex::new(None),
            index,
            public_ip,
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            etcd_endpoint: etcd_endpoint.to_string(),
            etcd_prefix: etcd_prefix.to_string(),
            opts,
            pod_mode,
            ns,
        })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    pub fn name(&self) -> &str {
        self.ns.name()
    }

    /// The underlay address (`eth0`), which flanneld publishes as `PublicIP`.
    pub fn public_ip(&self) -> Ipv4Addr {
        self.public_ip
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The wireguard backend's private key file (`WIREGUARD_KEY_FILE`), in the host's directory.
    pub fn wireguard_key_file(&self) -> PathBuf {
        self.dir.join("wgkey")
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    pub fn log_path(&self) -> PathBuf {
        self.flanneld.log_path().to_path_buf()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.flanneld.log_tail(lines)
    }

    pub(crate) fn pod_mode(&self) -> &PodMode {
        &self.pod_mode
    }

    /// From the next [`Host::start`] on, run flannel's Go flanneld at `bin` (`None`: ours again).
    /// The namespace, the subnet file and the lease in etcd stay, so stopping one daemon and
    /// starting the other replaces it in place. Go flanneld gets only the flags it has (see
    /// [`crate::go_peers::go_flanneld_args`]).
    pub fn set_go_flanneld(&self, bin: Option<&Path>) {
        *self.go_flanneld.lock().unwrap() = bin.map(Path::to_path_buf);
    }

    /// From the next [`Host::start`] on, flanneld also gets `key=value` in its environment
    /// (e.g. the VICI socket of the host's charon).
    pub fn set_env(&self, key: &str, value: &str) {
        let mut env = self.extra_env.lock().unwrap();
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.to_string()));
    }

    /// From the next [`Host::start`] on, flanneld runs as `<wrapper...> <flanneld> <flags>`
    /// inside the namespace (e.g. in a mount namespace of its own).
    pub fn set_wrapper(&self, wrapper: &[&str]) {
        *self.wrapper.lock().unwrap() = wrapper.iter().map(Into::into).collect();
    }

    /// From the next [`Host::start`] on, run flanneld in Kubernetes mode (`None`: etcd again).
    pub fn set_kube(&self, mode: Option<KubeMode>) {
        *self.kube.lock().unwrap() = mode;
    }

    /// The Kubernetes mode the host runs in, if any.
    pub fn kube(&self) -> Option<KubeMode> {
        self.kube.lock().unwrap().clone()
    }

    /// Whether [`Host::start`] runs flannel's Go flanneld.
    pub fn runs_go(&self) -> bool {
        self.go_flanneld.lock().unwrap().is_some()
    }

    /// The flanneld binary [`Host::start`] runs.
    fn daemon_bin(&self) -> PathBuf {
        self.go_flanneld
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| self.bin.clone())
    }

    /// The flags flanneld is started with.
    pub fn args(&self) -> Vec<String> {
        let a = self.our_args();
        if self.runs_go() {
            crate::go_peers::go_flanneld_args(&a)
        } else {
            a
        }
    }

    fn our_args(&self) -> Vec<String> {
        let registry = match self.kube() {
            Some(k) => {
                let mut a = vec![
                    "--kube-subnet-mgr".to_string(),
                    format!("--kubeconfig-file={}", k.kubeconfig.display()),
                    format!("--net-config-path={}", k.net_conf.display()),
                ];
                a.extend(k.extra_args);
                a
            }
            None => vec![
                format!("--etcd-endpoints={}", self.etcd_endpoint),
                format!("--etcd-prefix={}", self.etcd_prefix),
            ],
        };
        let mut a = registry;
        a.extend([
            format!("--subnet-file={}", self.subnet_file().display()),
            "--healthz-ip=0.0.0.0".to_string(),
            format!("--healthz-port={}", self.opts.healthz_port),
        ]);
        if let Some(iface) = &self.opts.iface {
            a.push(format!("--iface={iface}"));
        }
        a.extend(self.opts.extra_args.iter().cloned());
        a
    }

    /// The command line, for people who want to run it by hand.
    pub fn command_line(&self) -> String {
        format!(
            "ip netns exec {} {} {}",
            self.name(),
            self.daemon_bin().display(),
            self.args().join(" ")
        )
    }

    /// Starts flanneld (no-op when it runs). Output goes to [`Host::log_path`] (appended).
    pub fn start(&self) -> Result<()> {
        let mut flanneld = FlanneldCommand::new(self.daemon_bin());
        flanneld.netns = Some(self.ns.name().to_string());
        flanneld.args = self.args();
        flanneld.rust_log = self
            .opts
            .rust_log
            .clone()
            .or_else(|| std::env::var("NETNS_TESTS_RUST_LOG").ok())
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".to_string());
        flanneld.env = self.extra_env.lock().unwrap().clone();
        flanneld.wrapper = self.wrapper.lock().unwrap().clone();
        if let Some(k) = self.kube().filter(|k| !k.node_name.is_empty()) {
            flanneld.env.push(("NODE_NAME".into(), k.node_name));
        }
        // One WireGuard key per host (flannel's default path would be shared by all hosts).
        flanneld.env.push((
            "WIREGUARD_KEY_FILE".into(),
            self.wireguard_key_file().display().to_string(),
        ));
        let mut c = flanneld.command();
        c.process_group(0);
        self.flanneld.start(c)
    }

    /// SIGTERM and wait (SIGKILL after 10 s). Returns the exit status if it was running.
    pub fn stop(&self) -> Option<ExitStatus> {
        self.flanneld.stop(Duration::from_secs(10))
    }

    /// `kill -9` flanneld and reap it.
    pub fn kill9(&self) {
        self.flanneld.kill9()
    }

    /// Whether flanneld runs; an exit is noted in the error of [`Host::check_alive`].
    pub fn is_running(&self) -> bool {
        self.flanneld.is_running()
    }

    /// `Ok` while flanneld runs; otherwise why not (exit status and log tail).
    pub fn check_alive(&self) -> Result<(), String> {
        self.flanneld.check_alive()
    }

    pub fn pid(&self) -> Option<u32> {
        self.flanneld.pid()
    }

    /// GET `path` on the health server, from inside the host namespace: (status, body).
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.opts.healthz_port));
        self.ns
            .run_in(|| http_get(addr, path, Duration::from_secs(2)))?
    }

    /// Runs `flanneld status --healthz-port <this host's> ARGS` (our binary) inside the host
    /// namespace: (exit code, stdout, stderr).
    pub fn flanneld_status(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let port = self.opts.healthz_port.to_string();
        let out = self
            .ns
            .command(&self.bin)
            .args(["status", "--healthz-port", &port])
            .args(args)
            .env_remove("FLANNELD_HEALTHZ_IP")
            .output()
            .map_err(|e| Error::io("running flanneld status", e))?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// The health server's address as seen from inside the host namespace.
    pub fn healthz_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.opts.healthz_port)
    }

    /// Polls until `/readyz` says 200 and the subnet file can be read; fails at once when
    /// flanneld exits (with its log tail in the error).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let what = format!("flanneld on {} to be ready", self.name());
        wait_for(timeout, Duration::from_millis(100), &what, || {
            self.check_alive()
                .map_err(|e| Wait::Fatal(Error::Other(e)))?;
            match self.http_get("/readyz") {
                Ok((200, _)) => {}
                Ok((code, body)) => return Err(format!("/readyz: {code} {body}").into()),
                Err(e) => return Err(format!("/readyz: {e}").into()),
            }
            self.subnet()
                .map(drop)
                .map_err(|e| Wait::NotYet(e.to_string()))
        })
        .map_err(|e| match e {
            Error::Timeout { what, waited, last } => Error::Timeout {
                what,
                waited,
                last: format!("{last}\nflanneld log tail:\n{}", self.log_tail(25)),
            },
            e => e,
        })
    }

    /// The subnet file as `KEY -> VALUE`.
    pub fn subnet_env(&self) -> Result<BTreeMap<String, String>> {
        let path = self.subnet_file();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect())
    }

    /// The lease subnet (network address form, e.g. `10.5.3.0/24`) from `FLANNEL_SUBNET`.
    pub fn subnet(&self) -> Result<Ipv4Network> {
        match self.lease_subnet("FLANNEL_SUBNET")? {
            IpNetwork::V4(n) => Ok(n),
            n => Err(Error::Other(format!("FLANNEL_SUBNET={n} is not IPv4"))),
        }
    }

    /// The IPv6 lease subnet (network address form, e.g. `fc00:0:0:3::/64`) from
    /// `FLANNEL_IPV6_SUBNET`.
    pub fn subnet_v6(&self) -> Result<Ipv6Network> {
        match self.lease_subnet("FLANNEL_IPV6_SUBNET")? {
            IpNetwork::V6(n) => Ok(n),
            n => Err(Error::Other(format!("FLANNEL_IPV6_SUBNET={n} is not IPv6"))),
        }
    }

    /// The subnet file's `key` (the lease's first address) as the lease's network.
    fn lease_subnet(&self, key: &str) -> Result<IpNetwork> {
        let env = self.subnet_env()?;
        let s = env.get(key).ok_or_else(|| {
            Error::Other(format!(
                "{}: no {key} in {env:?}",
                self.subnet_file().display()
            ))
        })?;
        let n: IpNetwork = s
            .parse()
            .map_err(|e| Error::Other(format!("{key}={s}: {e}")))?;
        IpNetwork::new(n.network(), n.prefix()).map_err(|e| Error::Other(e.to_string()))
    }

    /// `FLANNEL_MTU` from the subnet file.
    pub fn mtu(&self) -> Result<u32> {
        let env = self.subnet_env()?;
        env.get("FLANNEL_MTU")
            .and_then(|m| m.parse().ok())
            .ok_or_else(|| {
                Error::Other(format!("{}: no FLANNEL_MTU", self.subnet_file().display()))
            })
    }

    /// MAC address of link `dev` in the host namespace, if the link exists.
    pub fn link_mac(&self, dev: &str) -> Result<Option<String>> {
        match self.ns.ip_json(&["link", "show", "dev", dev]) {
            Ok(v) => Ok(v[0]["address"].as_str().map(str::to_lowercase)),
            Err(Error::Command { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `ip -j route show` (main table).
    pub fn routes(&self) -> Result<Vec<serde_json::Value>> {
        as_vec(self.ns.ip_json(&["route", "show"])?)
    }

    /// `ip -j neigh show dev <dev>` (empty when the link does not exist).
    pub fn neighbours(&self, dev: &str) -> Result<Vec<serde_json::Value>> {
        match self.ns.ip_json(&["neigh", "show", "dev", dev]) {
            Ok(v) => as_vec(v),
            Err(Error::Command { .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// `bridge -j fdb show dev <dev>` (empty when the link does not exist).
    pub fn fdb(&self, dev: &str) -> Result<Vec<serde_json::Value>> {
        match self.ns.bridge_json(&["fdb", "show", "dev", dev]) {
            Ok(v) => as_vec(v),
            Err(Error::Command { .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// `/metrics` parsed: sample name (with labels, as written) → value.
    pub fn metrics(&self) -> Result<BTreeMap<String, f64>> {
        let (code, body) = self.http_get("/metrics")?;
        if code != 200 {
            return Err(Error::Other(format!(
                "{}: /metrics answered {code}: {body}",
                self.name()
            )));
        }
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    /// One sample of `/metrics` (e.g. `flannel_etcd_up`); an error when it is missing.
    pub fn metric(&self, name: &str) -> Result<f64> {
        self.metrics()?
            .get(name)
            .copied()
            .ok_or_else(|| Error::Other(format!("{}: /metrics has no sample {name}", self.name())))
    }

    /// The remote addresses of the established TCP connections from this host's namespace to
    /// etcd's client port (only flanneld talks to etcd from here), from `ss`.
    pub fn etcd_connections(&self) -> Result<Vec<Ipv4Addr>> {
        let out = self.ns.exec(
            "ss",
            &["-Htn", "state", "established", "dport", "=", ":2379"],
        )?;
        let mut peers: Vec<Ipv4Addr> = out
            .lines()
            .filter_map(|l| l.split_whitespace().last())
            .filter_map(|peer| peer.rsplit_once(':'))
            .filter_map(|(ip, _)| ip.parse().ok())
            .collect();
        peers.sort();
        Ok(peers)
    }

    /// flanneld's memory and CPU time from `/proc/<pid>/{status,stat}`.
    pub fn proc_stats(&self) -> Result<ProcStats> {
        let pid = self
            .pid()
            .ok_or_else(|| Error::Other(format!("flanneld on {} is not running", self.name())))?;
        ProcStats::read(pid)
    }

    /// Makes pod number `n` on this host (see [`Pod`]): needs the subnet file.
    pub fn add_pod(&self) -> Result<Pod> {
        let mut n = self.pods.lock().unwrap();
        let pod = Pod::create(self, *n)?;
        *n += 1;
        Ok(pod)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // The flanneld guard prints its log tail on a panic.
        self.kill9();
        if matches!(self.pod_mode, PodMode::Cni { .. }) {
            // host-local's store for the network named after this host.
            let _ = std::fs::remove_dir_all(Path::new("/var/lib/cni/networks").join(self.name()));
        }
    }
}

fn as_vec(v: serde_json::Value) -> Result<Vec<serde_json::Value>> {
    match v {
        serde_json::Value::Array(a) => Ok(a),
        other => Err(Error::Other(format!("expected a JSON array, got {other}"))),
    }
}

/// Resource use of one process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcStats {
    /// Resident set now (`VmRSS`), KiB.
    pub rss_kb: u64,
    /// Peak resident set (`VmHWM`), KiB.
    pub hwm_kb: u64,
    /// User + system CPU time so far, seconds (`/proc/<pid>/stat`: every thread, also exited
    /// ones, in clock ticks of usually 10 ms).
    pub cpu_secs: f64,
    /// Time on a CPU of the live threads, seconds, from `/proc/<pid>/task/*/schedstat`
    /// (nanoseconds; threads that exited are not counted). `None` without schedstats.
    pub cpu_run_secs: Option<f64>,
}

impl ProcStats {
    /// Reads `/proc/<pid>/status` and `/proc/<pid>/stat`.
    pub fn read(pid: u32) -> Result<ProcStats> {
        let status_path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&status_path)
            .map_err(|e| Error::io(format!("reading {status_path}"), e))?;
        let kb = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .ok_or_else(|| Error::Other(format!("{status_path}: no {field}")))
        };
        let stat_path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&stat_path)
            .map_err(|e| Error::io(format!("reading {stat_path}"), e))?;
        // Fields after the command name (which may hold spaces) start at field 3 (state);
        // utime and stime are fields 14 and 15.
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .ok_or_else(|| Error::Other(format!("{stat_path}: unexpected format")))?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| -> Result<u64> {
            fields
                .get(i - 3)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::Other(format!("{stat_path}: no field {i}")))
        };
        let hz = crate::clock_ticks_per_second();
        let cpu_run_secs = std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()
            .map(|tasks| {
                tasks
                    .filter_map(|t| {
                        let path = t.ok()?.path().join("schedstat");
                        let text = std::fs::read_to_string(path).ok()?;
                        text.split_whitespace().next()?.parse::<u64>().ok()
                    })
                    .sum::<u64>() as f64
                    / 1e9
            });
        Ok(ProcStats {
            rss_kb: kb("VmRSS:")?,
            hwm_kb: kb("VmHWM:")?,
            cpu_secs: (ticks(14)? + ticks(15)?) as f64 / hz,
            cpu_run_secs,
        })
    }
}
