//! A whole cluster: underlay + etcd + N flanneld hosts, and what it should look like.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde_json::{json, Value};

use crate::netns::sweep_stale;
use crate::{
    flanneld_bin, unique_prefix, wait_for, wait_until, Error, Etcd, Host, HostOptions, Pod,
    PodMode, Result, Underlay, Wait,
};

/// The data planes the test bed knows how to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Alloc,
    Vxlan,
    HostGw,
    Udp,
}

impl Backend {
    /// The `Backend.Type` string.
    pub fn type_name(self) -> &'static str {
        match self {
            Backend::Alloc => "alloc",
            Backend::Vxlan => "vxlan",
            Backend::HostGw => "host-gw",
            Backend::Udp => "udp",
        }
    }

    /// Parses a `Backend.Type` (case-insensitive).
    pub fn from_type(s: &str) -> Option<Backend> {
        Some(match s.to_ascii_lowercase().as_str() {
            "alloc" => Backend::Alloc,
            "vxlan" => Backend::Vxlan,
            "host-gw" => Backend::HostGw,
            "udp" => Backend::Udp,
            _ => return None,
        })
    }

    /// Whether pods on different hosts can talk.
    pub fn has_data_plane(self) -> bool {
        self != Backend::Alloc
    }
}

/// One lease as read from etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseInfo {
    pub key: String,
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    /// The IPv6 half of a dual-stack lease: the subnet after `&` in the key, and `PublicIPv6`.
    pub subnet_v6: Option<Ipv6Network>,
    pub public_ipv6: Option<Ipv6Addr>,
    pub backend_type: Option<String>,
    pub vtep_mac: Option<String>,
    pub value: Value,
}

impl LeaseInfo {
    /// Parses `<prefix>/subnets/10.5.3.0-24` + its JSON value.
    pub fn parse(key: &str, value: &str) -> Result<LeaseInfo> {
        let bad = |why: &str| Error::Other(format!("lease {key}: {why}: {value}"));
        let tail = key.rsplit('/').next().unwrap_or_default();
        let (v4, v6) = match tail.split_once('&') {
            Some((v4, v6)) => (v4, Some(v6)),
            None => (tail, None),
        };
        let (ip, len) = v4
            .split_once('-')
            .ok_or_else(|| bad("key is not <ip>-<len>"))?;
        let subnet = Ipv4Network::new(
            ip.parse().map_err(|_| bad("bad IP in key"))?,
            len.parse().map_err(|_| bad("bad length in key"))?,
        )
        .map_err(|_| bad("bad subnet in key"))?;
        let subnet_v6 = v6
            .map(|v6| {
                let (ip, len) = v6
                    .split_once('-')
                    .ok_or_else(|| bad("IPv6 half of the key is not <ip>-<len>"))?;
                Ipv6Network::new(
                    ip.parse().map_err(|_| bad("bad IPv6 address in key"))?,
                    len.parse().map_err(|_| bad("bad IPv6 length in key"))?,
                )
                .map_err(|_| bad("bad IPv6 subnet in key"))
            })
            .transpose()?;
        let value: Value = serde_json::from_str(value).map_err(|_| bad("not JSON"))?;
        let public_ip = value["PublicIP"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no PublicIP"))?;
        Ok(LeaseInfo {
            key: key.to_string(),
            subnet,
            public_ip,
            subnet_v6,
            public_ipv6: value["PublicIPv6"].as_str().and_then(|s| s.parse().ok()),
            backend_type: value["BackendType"].as_str().map(String::from),
            vtep_mac: value["BackendData"]["VtepMAC"]
                .as_str()
                .map(str::to_lowercase),
            value,
        })
    }
}

/// Directory for logs, subnet files, etcd data: a temp dir (removed) or a fixed path (left).
#[derive(Debug)]
enum WorkDir {
    Temp(Option<tempfile::TempDir>),
    Fixed(PathBuf),
}

impl WorkDir {
    /// Keep a temp dir when dropped (logs of a failed build).
    fn keep(&mut self) {
        if let WorkDir::Temp(t) = self {
            if let Some(t) = t.take() {
                eprintln!("netns-tests: logs kept in {}", t.keep().display());
            }
        }
    }

    fn path(&self) -> &Path {
        match self {
            WorkDir::Temp(Some(t)) => t.path(),
            WorkDir::Temp(None) => Path::new("/nonexistent"),
            WorkDir::Fixed(p) => p,
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("NETNS_TESTS_KEEP_LOGS").is_some() {
            self.keep();
        }
    }
}

/// Builder of a [`Cluster`]. Defaults: 3 hosts, `10.5.0.0/16`, `/24` subnets, vxlan,
/// prefix `/coreos.com/network`, names from [`unique_prefix`], a temp work dir, pods from
/// [`PodMode::from_env`] (the CNI plugin unless `NETNS_TESTS_CNI=0`).
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    hosts: usize,
    network: String,
    subnet_len: u8,
    backend: Value,
    config: Option<String>,
    etcd_prefix: String,
    host_opts: HostOptions,
    name: Option<String>,
    workdir: Option<PathBuf>,
    pod_mode: Option<PodMode>,
    ready_timeout: Duration,
    start: bool,
    etcd_members: usize,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        ClusterBuilder {
            hosts: 3,
            network: "10.5.0.0/16".to_string(),
            subnet_len: 24,
            backend: json!({"Type": "vxlan"}),
            config: None,
            etcd_prefix: "/coreos.com/network".to_string(),
            host_opts: HostOptions::default(),
            name: None,
            workdir: None,
            pod_mode: None,
            ready_timeout: Duration::from_secs(30),
            start: true,
            etcd_members: 1,
        }
    }
}

impl ClusterBuilder {
    pub fn hosts(mut self, n: usize) -> Self {
        self.hosts = n;
        self
    }

    pub fn backend(mut self, b: Backend) -> Self {
        self.backend = json!({"Type": b.type_name()});
        self
    }

    /// The whole `Backend` object, e.g. `{"Type":"vxlan","VNI":4}`.
    pub fn backend_json(mut self, v: Value) -> Self {
        self.backend = v;
        self
    }

    pub fn network(mut self, cidr: &str, subnet_len: u8) -> Self {
        self.network = cidr.to_string();
        self.subnet_len = subnet_len;
        self
    }

    /// The exact config JSON to put at `<prefix>/config` (overrides network and backend).
    pub fn config_json(mut self, raw: &str) -> Self {
        self.config = Some(raw.to_string());
        self
    }

    pub fn etcd_prefix(mut self, p: &str) -> Self {
        self.etcd_prefix = p.to_string();
        self
    }

    /// One more flanneld flag on every host.
    pub fn flanneld_arg(mut self, a: &str) -> Self {
        self.host_opts.extra_args.push(a.to_string());
        self
    }

    pub fn host_options(mut self, o: HostOptions) -> Self {
        self.host_opts = o;
        self
    }

    /// Fixed name prefix (namespaces `<name>-br`, `<name>-etcd`, `<name>-h0`, ...).
    pub fn name(mut self, n: &str) -> Self {
        self.name = Some(n.to_string());
        self
    }

    /// Fixed work directory (not removed); default is a temp dir that is removed.
    pub fn workdir(mut self, p: &Path) -> Self {
        self.workdir = Some(p.to_path_buf());
        self
    }

    pub fn pod_mode(mut self, m: PodMode) -> Self {
        self.pod_mode = Some(m);
        self
    }

    pub fn ready_timeout(mut self, t: Duration) -> Self {
        self.ready_timeout = t;
        self
    }

    /// An etcd cluster of `n` members (1..=8) instead of a single etcd; every flanneld gets all
    /// client URLs in `--etcd-endpoints`. See [`Etcd::start_cluster`].
    pub fn etcd_members(mut self, n: usize) -> Self {
        self.etcd_members = n;
        self
    }

    /// Build the hosts but do not start flanneld (start them with [`Host::start`]).
    pub fn no_start(mut self) -> Self {
        self.start = false;
        self
    }

    /// The config JSON that will be put in etcd.
    pub fn config_string(&self) -> String {
        self.config.clone().unwrap_or_else(|| {
            json!({
                "Network": self.network,
                "SubnetLen": self.subnet_len,
                "Backend": self.backend,
            })
            .to_string()
        })
    }

    /// Brings the cluster up: underlay, etcd, config, hosts; waits until every flanneld is ready.
    pub fn build(self) -> Result<Cluster> {
        sweep_stale();
        let bin = flanneld_bin()?;
        let prefix = self.name.clone().unwrap_or_else(unique_prefix);
        let dir = match &self.workdir {
            Some(p) => {
                std::fs::create_dir_all(p)
                    .map_err(|e| Error::io(format!("mkdir {}", p.display()), e))?;
                WorkDir::Fixed(p.clone())
            }
            None => WorkDir::Temp(Some(
                tempfile::Builder::new()
                    .prefix(&format!("{prefix}-"))
                    .tempdir()
                    .map_err(|e| Error::io("making a temp dir", e))?,
            )),
        };
        let config = self.config_string();
        let cfg: Value = serde_json::from_str(&config)
            .map_err(|e| Error::Other(format!("config is not JSON ({e}): {config}")))?;
        let backend_type = cfg["Backend"]["Type"]
            .as_str()
            .unwrap_or("udp")
            .to_ascii_lowercase();
        let vni = cfg["Backend"]["VNI"].as_u64().unwrap_or(1);
        let underlay = Underlay::new(&prefix)?;
        let etcd = if self.etcd_members <= 1 {
            vec![Etcd::start_on(
                &underlay,
                &prefix,
                &dir.path().join("etcd"),
            )?]
        } else {
            Etcd::start_cluster(
                &underlay,
                &prefix,
                &dir.path().join("etcd"),
                self.etcd_members,
            )?
        };
        let mut cluster = Cluster {
            hosts: Vec::new(),
            etcd,
            underlay,
            dir,
            prefix,
            etcd_prefix: self.etcd_prefix.trim_end_matches('/').to_string(),
            config,
            backend: Backend::from_type(&backend_type),
            vni,
            bin,
            host_opts: self.host_opts.clone(),
            pod_mode: match self.pod_mode.clone() {
                Some(m) => m,
                None => PodMode::from_env()?,
            },
            ready_timeout: self.ready_timeout,
        };
        match cluster.bring_up(self.hosts, self.start) {
            Ok(()) => Ok(cluster),
            Err(e) => {
                cluster.dir.keep();
                Err(e)
            }
        }
    }
}

/// A running cluster. Dropping it stops everything and removes every namespace, in the order
/// hosts → etcd → underlay → work dir (pods are separate guards; drop them first or let the
/// host namespaces take their veths with them).
#[derive(Debug)]
pub struct Cluster {
    hosts: Vec<Host>,
    etcd: Vec<Etcd>,
    underlay: Underlay,
    dir: WorkDir,
    prefix: String,
    etcd_prefix: String,
    config: String,
    backend: Option<Backend>,
    vni: u64,
    bin: PathBuf,
    host_opts: HostOptions,
    pod_mode: PodMode,
    ready_timeout: Duration,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// `n` hosts with `backend` and the defaults of [`ClusterBuilder`].
    pub fn new(n: usize, backend: Backend) -> Result<Cluster> {
        Cluster::builder().hosts(n).backend(backend).build()
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The etcd member the test bed talks to: the first one that runs (member 0 when none
    /// does, so that a single etcd can be stopped and started again through it).
    pub fn etcd(&self) -> &Etcd {
        self.etcd
            .iter()
            .find(|e| e.is_running())
            .unwrap_or(&self.etcd[0])
    }

    /// Member `i` of the etcd cluster.
    pub fn etcd_member(&self, i: usize) -> &Etcd {
        &self.etcd[i]
    }

    /// Every etcd member (one unless [`ClusterBuilder::etcd_members`] asked for more).
    pub fn etcd_members(&self) -> &[Etcd] {
        &self.etcd
    }

    /// The client URLs of all members, comma-separated (flanneld's `--etcd-endpoints`).
    pub fn etcd_endpoints(&self) -> String {
        self.etcd
            .iter()
            .map(Etcd::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn underlay(&self) -> &Underlay {
        &self.underlay
    }

    /// The name prefix of every namespace of this cluster.
    pub fn name(&self) -> &str {
        &self.prefix
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn backend(&self) -> Option<Backend> {
        self.backend
    }

    /// The config JSON in etcd.
    pub fn config(&self) -> &str {
        &self.config
    }

    pub fn config_key(&self) -> String {
        format!("{}/config", self.etcd_prefix)
    }

    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.etcd_prefix)
    }

    /// The vxlan device name, `flannel.<VNI>`.
    pub fn vxlan_dev(&self) -> String {
        format!("flannel.{}", self.vni)
    }

    fn bring_up(&mut self, hosts: usize, start: bool) -> Result<()> {
        self.etcd().put(&self.config_key(), &self.config)?;
        self.new_hosts(hosts)?;
        if start {
            for h in &self.hosts {
                h.start()?;
            }
            self.wait_all_ready(0..self.hosts.len())?;
        }
        Ok(())
    }

    /// Waits until the hosts in `range` are ready, polling them concurrently.
    pub fn wait_all_ready(&self, range: std::ops::Range<usize>) -> Result<()> {
        let hosts = &self.hosts[range];
        let results = par_map(hosts, PAR, |h| h.wait_ready(self.ready_timeout));
        results.into_iter().collect()
    }

    fn make_host(&self, i: usize) -> Result<Host> {
        Host::new(
            i,
            &self.underlay,
            &self.prefix,
            &self.dir.path().join(format!("h{i}")),
            &self.etcd_endpoints(),
            &self.etcd_prefix,
            &self.bin,
            self.host_opts.clone(),
            self.pod_mode.clone(),
        )
    }

    fn new_host(&mut self) -> Result<usize> {
        let i = self.hosts.len();
        let h = self.make_host(i)?;
        self.hosts.push(h);
        Ok(i)
    }

    /// Makes `n` more hosts (namespaces, underlay ports; flanneld not started) concurrently;
    /// returns their indices.
    fn new_hosts(&mut self, n: usize) -> Result<std::ops::Range<usize>> {
        let first = self.hosts.len();
        let indices: Vec<usize> = (first..first + n).collect();
        let made = par_map(&indices, PAR, |&i| self.make_host(i));
        // Keep every host that was made (its guard cleans up) even when another failed.
        let mut err = None;
        for h in made {
            match h {
                Ok(h) => self.hosts.push(h),
                Err(e) => {
                    err.get_or_insert(e);
                }
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(first..first + n),
        }
    }

    /// Adds a host, starts flanneld on it and waits until it is ready; returns its index.
    pub fn add_host(&mut self) -> Result<usize> {
        let i = self.new_host()?;
        self.hosts[i].start()?;
        self.hosts[i].wait_ready(self.ready_timeout)?;
        Ok(i)
    }

    /// Adds `n` hosts at once: made concurrently, every flanneld started before any is waited
    /// for, then all waited for until ready. Returns their indices.
    pub fn add_hosts(&mut self, n: usize) -> Result<std::ops::Range<usize>> {
        let range = self.new_hosts(n)?;
        for h in &self.hosts[range.clone()] {
            h.start()?;
        }
        self.wait_all_ready(range.clone())?;
        Ok(range)
    }

    /// Makes host `i` (not started) without starting flanneld; returns its index. Start it with
    /// [`Host::start`].
    pub fn add_host_stopped(&mut self) -> Result<usize> {
        self.new_host()
    }

    /// Cuts host `i` off the underlay (its bridge port drops everything; see
    /// [`Underlay::cut`]). Its namespace, links, routes and flanneld stay as they are.
    pub fn partition(&self, i: usize) -> Result<()> {
        self.underlay.cut(&format!("h{i}"))
    }

    /// Plugs host `i` back in after [`Cluster::partition`].
    pub fn heal(&self, i: usize) -> Result<()> {
        self.underlay.heal(&format!("h{i}"))
    }

    /// Pods on the given hosts, made concurrently (one each, in the order given).
    pub fn add_pods(&self, hosts: &[usize]) -> Result<Vec<Pod>> {
        par_map(hosts, PAR, |&i| self.hosts[i].add_pod())
            .into_iter()
            .collect()
    }

    /// A pod on host `i`.
    pub fn add_pod(&self, i: usize) -> Result<Pod> {
        self.hosts[i].add_pod()
    }

    /// All leases in etcd, sorted by key.
    pub fn leases(&self) -> Result<Vec<LeaseInfo>> {
        self.etcd()
            .get_prefix(&self.subnets_prefix())?
            .iter()
            .map(|(k, v)| LeaseInfo::parse(k, v))
            .collect()
    }

    /// The lease whose `PublicIP` is host `i`'s.
    pub fn lease_of(&self, i: usize) -> Result<Option<LeaseInfo>> {
        let ip = self.hosts[i].public_ip();
        Ok(self.leases()?.into_iter().find(|l| l.public_ip == ip))
    }

    /// What the backend programs on host `h`, read with one command per table (routes, and
    /// for vxlan the neighbours and FDB of the vxlan device).
    pub fn kernel_state(&self, h: &Host) -> Result<KernelState, String> {
        let routes = h.routes().map_err(|e| e.to_string())?;
        let (neighbours, fdb) = if self.backend == Some(Backend::Vxlan) {
            let dev = self.vxlan_dev();
            (
                h.neighbours(&dev).map_err(|e| e.to_string())?,
                h.fdb(&dev).map_err(|e| e.to_string())?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(KernelState {
            host: h.name().to_string(),
            routes,
            neighbours,
            fdb,
        })
    }

    /// What host `h` must have in its kernel for the peer `lease` ("" when all is there).
    pub fn check_peer(&self, h: &Host, lease: &LeaseInfo) -> Result<(), String> {
        if self.backend == Some(Backend::Udp) {
            // Only that the device exists: a plain TUN device (Go flanneld's) has no link-layer
            // address to read.
            return match h.netns().ip(&["link", "show", "dev", "flannel0"]) {
                Ok(_) => Ok(()),
                Err(Error::Command { .. }) => Err(format!("{}: no flannel0", h.name())),
                Err(e) => Err(e.to_string()),
            };
        }
        let state = self.kernel_state(h)?;
        self.check_peer_in(&state, lease)
    }

    /// [`Cluster::check_peer`] against a [`KernelState`] read before (no commands run, except
    /// for the udp backend).
    pub fn check_peer_in(&self, state: &KernelState, lease: &LeaseInfo) -> Result<(), String> {
        let subnet = lease.subnet.to_string();
        let routes = &state.routes;
        let route = routes.iter().find(|r| r["dst"].as_str() == Some(&subnet));
        let h = state;
        match self.backend {
            Some(Backend::Vxlan) => {
                let dev = self.vxlan_dev();
                let gw = lease.subnet.network().to_string();
                let mac = lease
                    .vtep_mac
                    .clone()
                    .ok_or_else(|| format!("lease {} has no VtepMAC", lease.key))?;
                match route {
                    Some(r) if r["dev"] == dev.as_str() && r["gateway"] == gw.as_str() => {}
                    other => {
                        return Err(format!(
                            "{}: route to {subnet}: want via {gw} dev {dev}, have {other:?}",
                            h.name()
                        ))
                    }
                }
                let neighs = &state.neighbours;
                if !neighs.iter().any(|n| {
                    n["dst"] == gw.as_str()
                        && n["lladdr"].as_str().map(str::to_lowercase).as_deref()
                            == Some(mac.as_str())
                }) {
                    return Err(format!(
                        "{}: no neighbour {gw} lladdr {mac} on {dev}: {neighs:?}",
                        h.name()
                    ));
                }
                let fdb = &state.fdb;
                let ip = lease.public_ip.to_string();
                if !fdb.iter().any(|f| {
                    f["mac"].as_str().map(str::to_lowercase).as_deref() == Some(mac.as_str())
                        && f["dst"] == ip.as_str()
                }) {
                    return Err(format!(
                        "{}: no fdb {mac} dst {ip} on {dev}: {fdb:?}",
                        h.name()
                    ));
                }
                Ok(())
            }
            Some(Backend::HostGw) => {
                let ip = lease.public_ip.to_string();
                match route {
                    Some(r) if r["gateway"] == ip.as_str() => Ok(()),
                    other => Err(format!(
                        "{}: route to {subnet}: want via {ip}, have {other:?}",
                        h.name()
                    )),
                }
            }
            Some(Backend::Udp) | Some(Backend::Alloc) | None => Ok(()),
        }
    }

    /// `Ok` when host `h` has nothing left for the peer `lease` (route, neighbour, FDB entry).
    pub fn check_peer_gone(&self, h: &Host, lease: &LeaseInfo) -> Result<(), String> {
        let subnet = lease.subnet.to_string();
        let routes = h.routes().map_err(|e| e.to_string())?;
        if let Some(r) = routes.iter().find(|r| r["dst"].as_str() == Some(&subnet)) {
            return Err(format!("{}: route to {subnet} still there: {r}", h.name()));
        }
        if self.backend == Some(Backend::Vxlan) {
            let dev = self.vxlan_dev();
            let gw = lease.subnet.network().to_string();
            let neighs = h.neighbours(&dev).map_err(|e| e.to_string())?;
            if let Some(n) = neighs.iter().find(|n| n["dst"] == gw.as_str()) {
                return Err(format!("{}: neighbour {gw} still there: {n}", h.name()));
            }
            if let Some(mac) = &lease.vtep_mac {
                let fdb = h.fdb(&dev).map_err(|e| e.to_string())?;
                if let Some(f) = fdb
                    .iter()
                    .find(|f| f["mac"].as_str().map(str::to_lowercase).as_deref() == Some(mac))
                {
                    return Err(format!("{}: fdb entry {mac} still there: {f}", h.name()));
                }
            }
        }
        Ok(())
    }

    /// One look at the whole cluster: every running host has a lease, and has in its kernel
    /// what the backend needs for every other lease in etcd.
    /// Each host's kernel is read once per look (hosts in parallel), so a look at 50 hosts
    /// runs about 150 commands, not one per host and peer.
    pub fn check_converged(&self) -> Result<(), String> {
        let leases = self.leases().map_err(|e| e.to_string())?;
        let running: Vec<&Host> = self.hosts.iter().filter(|h| h.pid().is_some()).collect();
        for h in &running {
            h.check_alive()?;
            if !leases.iter().any(|l| l.public_ip == h.public_ip()) {
                return Err(format!("{} has no lease in etcd", h.name()));
            }
        }
        let results = par_map(&running, PAR, |h| -> Result<(), String> {
            if self.backend == Some(Backend::Udp) {
                for l in leases.iter().filter(|l| l.public_ip != h.public_ip()) {
                    self.check_peer(h, l)?;
                }
                return Ok(());
            }
            let state = self.kernel_state(h)?;
            for l in leases.iter().filter(|l| l.public_ip != h.public_ip()) {
                self.check_peer_in(&state, l)?;
            }
            Ok(())
        });
        results.into_iter().collect()
    }

    /// Polls [`Cluster::check_converged`] until it holds; returns how long it took.
    pub fn wait_converged(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        wait_for(
            timeout,
            Duration::from_millis(100),
            "the cluster to converge",
            || {
                for h in self.hosts.iter().filter(|h| h.pid().is_some()) {
                    h.check_alive().map_err(|e| Wait::Fatal(Error::Other(e)))?;
                }
                self.check_converged().map_err(Wait::NotYet)
            },
        )?;
        Ok(start.elapsed())
    }

    /// For each of `hosts` (indices): how many of the other leases' subnets it has no route to
    /// (routes only, one `ip -j route` per host, hosts read in parallel).
    pub fn routes_missing(
        &self,
        leases: &[LeaseInfo],
        hosts: &[usize],
    ) -> Result<Vec<(usize, usize)>, String> {
        par_map(hosts, PAR, |&i| -> Result<(usize, usize), String> {
            let h = &self.hosts[i];
            let routes = h.routes().map_err(|e| e.to_string())?;
            let have: std::collections::HashSet<&str> =
                routes.iter().filter_map(|r| r["dst"].as_str()).collect();
            let missing = leases
                .iter()
                .filter(|l| l.public_ip != h.public_ip())
                .filter(|l| !have.contains(l.subnet.to_string().as_str()))
                .count();
            Ok((i, missing))
        })
        .into_iter()
        .collect()
    }

    /// Polls until every running host has a route to every other lease's subnet and there are
    /// `leases` leases; returns how long it took. Cheaper than [`Cluster::wait_converged`]
    /// (routes only), for large clusters.
    pub fn wait_routes(&self, leases: usize, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let running: Vec<usize> = (0..self.hosts.len())
            .filter(|&i| self.hosts[i].pid().is_some())
            .collect();
        wait_for(
            timeout,
            Duration::from_millis(200),
            "every host to have a route to every other subnet",
            || {
                for &i in &running {
                    self.hosts[i]
                        .check_alive()
                        .map_err(|e| Wait::Fatal(Error::Other(e)))?;
                }
                let all = self.leases().map_err(|e| Wait::NotYet(e.to_string()))?;
                if all.len() < leases {
                    return Err(Wait::NotYet(format!("{} of {leases} leases", all.len())));
                }
                let missing = self.routes_missing(&all, &running).map_err(Wait::NotYet)?;
                let short: Vec<String> = missing
                    .iter()
                    .filter(|(_, m)| *m > 0)
                    .map(|(i, m)| format!("h{i} lacks {m}"))
                    .collect();
                if short.is_empty() {
                    Ok(())
                } else {
                    Err(Wait::NotYet(short.join(", ")))
                }
            },
        )?;
        Ok(start.elapsed())
    }

    /// Polls until no running host has anything left for `lease`; returns how long it took.
    pub fn wait_peer_gone(&self, lease: &LeaseInfo, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        wait_until(
            timeout,
            &format!("every host to drop peer {}", lease.subnet),
            || {
                for h in self.hosts.iter().filter(|h| h.pid().is_some()) {
                    if h.public_ip() != lease.public_ip {
                        self.check_peer_gone(h, lease)?;
                    }
                }
                Ok(())
            },
        )?;
        Ok(start.elapsed())
    }

    /// Asserts what a user checks first: every pod pings every other (2 each), and a TCP
    /// transfer of `tcp_bytes` between every two pods on different hosts arrives whole (the
    /// checksums at both ends agree). Panics naming the pair that failed.
    pub fn assert_connected(&self, pods: &[Pod], tcp_bytes: u64) {
        let refs: Vec<&Pod> = pods.iter().collect();
        let failures = self.ping_matrix(&refs, 2).expect("ping matrix");
        assert!(failures.is_empty(), "pings lost:\n{}", failures.join("\n"));
        for a in pods {
            for b in pods {
                if a.host_index() == b.host_index() {
                    continue;
                }
                let t = crate::tcp_transfer(a, b, tcp_bytes)
                    .unwrap_or_else(|e| panic!("TCP {} → {}: {e}", a.name(), b.name()));
                eprintln!(
                    "TCP {} → {}: {} bytes in {:?} ({:.0} Mbit/s), checksum {:016x} at both ends",
                    a.ip(),
                    b.ip(),
                    t.bytes,
                    t.elapsed,
                    t.mbit_per_s(),
                    t.checksum
                );
            }
        }
    }

    /// Pings between every ordered pair of pods (`count` each); the pairs that lost anything.
    pub fn ping_matrix(&self, pods: &[&Pod], count: u32) -> Result<Vec<String>> {
        let mut failures = Vec::new();
        for a in pods {
            for b in pods {
                if a.name() == b.name() {
                    continue;
                }
                let st = a.ping(b.ip(), count)?;
                if !st.all_received() {
                    failures.push(format!(
                        "{} ({}) → {} ({}): {st}",
                        a.name(),
                        a.ip(),
                        b.name(),
                        b.ip()
                    ));
                }
            }
        }
        Ok(failures)
    }

    /// A table of hosts, subnets, public IPs and VTEP MACs (from the leases in etcd).
    pub fn table(&self) -> Result<String> {
        let leases = self.leases()?;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<16} {:<15} {:<15} {:<8} {:<17} {:<11}",
            "HOST", "SUBNET", "PUBLIC IP", "BACKEND", "VTEP MAC", "flanneld"
        );
        for h in &self.hosts {
            let lease = leases.iter().find(|l| l.public_ip == h.public_ip());
            let (subnet, backend, mac) = match lease {
                Some(l) => (
                    l.subnet.to_string(),
                    l.backend_type.clone().unwrap_or_else(|| "-".into()),
                    l.vtep_mac.clone().unwrap_or_else(|| "-".into()),
                ),
                None => ("(no lease)".into(), "-".into(), "-".into()),
            };
            let state = match h.pid() {
                Some(p) if h.is_running() => format!("pid {p}"),
                _ => "stopped".into(),
            };
            let _ = writeln!(
                s,
                "{:<16} {:<15} {:<15} {:<8} {:<17} {:<11}",
                h.name(),
                subnet,
                h.public_ip(),
                backend,
                mac,
                state
            );
        }
        Ok(s)
    }

    /// Leaves everything running (namespaces, etcd, flanneld, work dir) and forgets it.
    pub fn leak(self) {
        std::mem::forget(self);
    }
}

/// How many threads the test bed uses for per-host work (creating hosts, reading kernels).
const PAR: usize = 8;

/// `f` over `items` on up to `threads` scoped threads; results in the order of `items`.
pub fn par_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    if items.len() <= 1 || threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.min(items.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                *out[i].lock().unwrap() = Some(r);
            });
        }
    });
    out.into_iter()
        .map(|m| m.into_inner().unwrap().expect("every item was mapped"))
        .collect()
}

/// One reading of what the backend programmed on a host (see [`Cluster::kernel_state`]).
#[derive(Debug, Clone)]
pub struct KernelState {
    pub host: String,
    /// `ip -j route show` (main table).
    pub routes: Vec<Value>,
    /// `ip -j neigh show dev flannel.<VNI>` (vxlan only).
    pub neighbours: Vec<Value>,
    /// `bridge -j fdb show dev flannel.<VNI>` (vxlan only).
    pub fdb: Vec<Value>,
}

impl KernelState {
    /// The host's namespace name.
    pub fn name(&self) -> &str {
        &self.host
    }
}

/// Pings over every pair `(from, to)` (`count` each), `threads` pairs at a time; the pairs that
/// lost anything, with the statistics.
pub fn ping_pairs(pairs: &[(&Pod, &Pod)], count: u32, threads: usize) -> Vec<String> {
    par_map(pairs, threads, |(a, b)| match a.ping(b.ip(), count) {
        Ok(st) if st.all_received() => None,
        Ok(st) => Some(format!(
            "{} ({}) → {} ({}): {st}",
            a.name(),
            a.ip(),
            b.name(),
            b.ip()
        )),
        Err(e) => Some(format!("{} → {}: {e}", a.name(), b.name())),
    })
    .into_iter()
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flannel_leases() {
        let l = LeaseInfo::parse(
            "/coreos.com/network/subnets/10.5.3.0-24",
            r#"{"PublicIP":"198.18.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"C6:D2:AA:01:02:03"}}"#,
        )
        .unwrap();
        assert_eq!(l.subnet, "10.5.3.0/24".parse().unwrap());
        assert_eq!(l.public_ip, Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(l.backend_type.as_deref(), Some("vxlan"));
        assert_eq!(l.vtep_mac.as_deref(), Some("c6:d2:aa:01:02:03"));

        assert_eq!((l.subnet_v6, l.public_ipv6), (None, None));

        let dual = LeaseInfo::parse(
            "/x/subnets/10.5.4.0-24&fc00:0:0:4::-64",
            r#"{"PublicIP":"198.18.0.12","PublicIPv6":"fd00:18::12"}"#,
        )
        .unwrap();
        assert_eq!(dual.subnet, "10.5.4.0/24".parse().unwrap());
        assert_eq!(dual.subnet_v6, Some("fc00:0:0:4::/64".parse().unwrap()));
        assert_eq!(dual.public_ipv6, Some("fd00:18::12".parse().unwrap()));
        assert_eq!(dual.backend_type, None);
        let e = LeaseInfo::parse("/x/subnets/10.5.4.0-24&fc00::", "{}").unwrap_err();
        assert!(e.to_string().contains("IPv6 half"), "{e}");
        assert!(LeaseInfo::parse("/x/subnets/garbage", "{}").is_err());
    }

    #[test]
    fn default_config() {
        let c = ClusterBuilder::default()
            .backend(Backend::HostGw)
            .config_string();
        let v: Value = serde_json::from_str(&c).unwrap();
        assert_eq!(v["Network"], "10.5.0.0/16");
        assert_eq!(v["SubnetLen"], 24);
        assert_eq!(v["Backend"]["Type"], "host-gw");
    }
}
