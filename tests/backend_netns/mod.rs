//! Shared helpers of the backend tests: throw-away network namespaces with a veth "external
//! interface", a way to run async code inside one, and `ip`/`bridge` JSON readers.

#![allow(dead_code)]

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use flannel::backend::{self, Backend, BackendContext, BackendType, Publish, ReconcileReport};
use flannel::config::{FamilyConfig, NetworkConfig};
use flannel::iface::ExternalInterface;
use flannel::subnet::{Lease, LeaseAttrs, PeerSet, SubnetKey};
use serde_json::Value;

/// The name of a namespace, usable from any thread.
#[derive(Debug, Clone)]
pub struct Ns {
    pub name: String,
}

/// Owns a namespace and deletes it when dropped, also when the test panics.
#[derive(Debug)]
pub struct NetnsGuard {
    pub ns: Ns,
    _guard: netns_tests::Netns,
}

impl NetnsGuard {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("flb-{tag}-{}-{n}", std::process::id());
        let guard = netns_tests::Netns::create(&name).unwrap();
        NetnsGuard {
            ns: Ns { name },
            _guard: guard,
        }
    }
}

fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

impl Ns {
    /// `ip -n NS` with the words of `line` (`"-6 route add fc00::/64 via fd00::1 dev e0"`),
    /// panicking on failure.
    pub fn ip_line(&self, line: &str) -> String {
        self.ip(&line.split_whitespace().collect::<Vec<_>>())
    }

    /// The destinations of the routes of `family` (`-4`, `-6`) carrying flanneld's protocol
    /// number (`ip route show proto 102`), sorted.
    pub fn routes_of_flanneld(&self, family: &str) -> Vec<String> {
        let mut dsts: Vec<String> = array(self.ip_json(&[family, "route", "show", "proto", "102"]))
            .iter()
            .map(|r| r["dst"].as_str().unwrap().to_string())
            .collect();
        dsts.sort();
        dsts
    }

    /// `ip -n NS ARGS`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip -n NS -j ARGS`, parsed.
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-n", &self.name, "-j"];
        all.extend_from_slice(args);
        parse(&run("ip", &all))
    }

    /// `bridge -n NS -j ARGS`, parsed.
    pub fn bridge_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-n", &self.name, "-j"];
        all.extend_from_slice(args);
        parse(&run("bridge", &all))
    }

    /// `bridge -n NS ARGS`.
    pub fn bridge(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("bridge", &all)
    }

    /// `ip -d link show DEV`, or `None` when there is no such device.
    pub fn link(&self, dev: &str) -> Option<Value> {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-j", "-d", "link", "show", dev])
            .output()
            .expect("running ip");
        if !out.status.success() {
            return None;
        }
        parse(&String::from_utf8_lossy(&out.stdout))
            .as_array()
            .and_then(|a| a.first().cloned())
    }

    /// The IPv4 routes of the main table on `dev`.
    pub fn routes(&self, dev: &str) -> Vec<Value> {
        array(self.ip_json(&["-4", "route", "show", "dev", dev]))
    }

    /// The IPv4 neighbours on `dev`.
    pub fn neighbours(&self, dev: &str) -> Vec<Value> {
        array(self.ip_json(&["-4", "neigh", "show", "dev", dev]))
    }

    /// The IPv6 routes of the main table on `dev`.
    pub fn routes6(&self, dev: &str) -> Vec<Value> {
        array(self.ip_json(&["-6", "route", "show", "dev", dev]))
    }

    /// The IPv6 neighbours on `dev`.
    pub fn neighbours6(&self, dev: &str) -> Vec<Value> {
        array(self.ip_json(&["-6", "neigh", "show", "dev", dev]))
    }

    /// The FDB entries on `dev`.
    pub fn fdb(&self, dev: &str) -> Vec<Value> {
        array(self.bridge_json(&["fdb", "show", "dev", dev]))
    }

    /// Makes a veth pair `e0`/`e1`, gives `e0` `addr` (CIDR) and brings both up; returns
    /// `e0` as the external interface, with `public_ip` as given or the interface address.
    pub fn underlay(&self, addr: &str, public_ip: Option<Ipv4Addr>) -> ExternalInterface {
        self.ip(&["link", "add", "e0", "type", "veth", "peer", "name", "e1"]);
        self.ip(&["addr", "add", addr, "dev", "e0"]);
        self.ip(&["link", "set", "e0", "up"]);
        self.ip(&["link", "set", "e1", "up"]);
        let link = self.link("e0").expect("e0 exists");
        let iface_addr: Ipv4Addr = addr.split('/').next().unwrap().parse().unwrap();
        ExternalInterface {
            name: "e0".into(),
            index: link["ifindex"].as_u64().unwrap() as u32,
            iface_addr: Some(iface_addr),
            iface_v6_addr: None,
            public_ip: Some(public_ip.unwrap_or(iface_addr)),
            public_ipv6: None,
            mtu: link["mtu"].as_u64().unwrap() as u32,
        }
    }

    /// Like [`Ns::underlay`], with an IPv6 address `addr6` (CIDR, added without DAD) as well;
    /// `addr4` `None` makes an IPv6-only interface.
    pub fn underlay_dual(&self, addr4: Option<&str>, addr6: &str) -> ExternalInterface {
        self.ip(&["link", "add", "e0", "type", "veth", "peer", "name", "e1"]);
        if let Some(a) = addr4 {
            self.ip(&["addr", "add", a, "dev", "e0"]);
        }
        self.ip(&["addr", "add", addr6, "dev", "e0", "nodad"]);
        self.ip(&["link", "set", "e0", "up"]);
        self.ip(&["link", "set", "e1", "up"]);
        let link = self.link("e0").expect("e0 exists");
        let ip = |a: &str| a.split('/').next().unwrap().to_string();
        let v4: Option<Ipv4Addr> = addr4.map(|a| ip(a).parse().unwrap());
        let v6: Ipv6Addr = ip(addr6).parse().unwrap();
        ExternalInterface {
            name: "e0".into(),
            index: link["ifindex"].as_u64().unwrap() as u32,
            iface_addr: v4,
            iface_v6_addr: Some(v6),
            public_ip: v4,
            public_ipv6: Some(v6),
            mtu: link["mtu"].as_u64().unwrap() as u32,
        }
    }

    /// Runs `f` on a thread that has entered this namespace, on a current-thread runtime, so
    /// that netlink sockets opened by `f` live in the namespace. Panics propagate.
    pub fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let name = self.name.clone();
        let thread = std::thread::spawn(move || {
            netns_tests::netns::enter(&name).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(f())
        });
        thread
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

fn parse(s: &str) -> Value {
    if s.trim().is_empty() {
        return Value::Array(Vec::new());
    }
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON from ip/bridge ({e}): {s}"))
}

fn array(v: Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

/// A validated-looking IPv4 network config, built directly (not parsed).
pub fn config(network: &str, backend: Value) -> NetworkConfig {
    let backend = backend.as_object().cloned().expect("Backend is an object");
    let network: ipnetwork::Ipv4Network = network.parse().unwrap();
    NetworkConfig {
        v4: Some(FamilyConfig {
            network,
            subnet_len: 24,
            subnet_min: Ipv4Addr::from(u32::from(network.network()) + 256),
            subnet_max: Ipv4Addr::from(u32::from(network.broadcast()) - 255),
        }),
        v6: None,
        enable_nftables: false,
        backend_type: BackendType::from_name(backend["Type"].as_str().unwrap()).unwrap(),
        backend,
    }
}

/// A dual-stack config (`network4` `None`: IPv6 only, `EnableIPv4: false`) with /24 and /64
/// subnets.
pub fn config_v6(network4: Option<&str>, network6: &str, backend: Value) -> NetworkConfig {
    let mut cfg = config(network4.unwrap_or("10.255.0.0/16"), backend);
    if network4.is_none() {
        cfg.v4 = None;
    }
    let net6: ipnetwork::Ipv6Network = network6.parse().unwrap();
    let base = u128::from(net6.network());
    let size = 1u128 << (64 - net6.prefix());
    cfg.v6 = Some(FamilyConfig {
        network: net6,
        subnet_len: 64,
        subnet_min: Ipv6Addr::from(base + (1u128 << 64)),
        subnet_max: Ipv6Addr::from(base + ((size - 1) << 64)),
    });
    cfg
}

pub fn context(config: NetworkConfig, ext: ExternalInterface) -> BackendContext {
    BackendContext::new(config, ext)
}

/// A lease as read from etcd: `key` like `10.5.2.0-24`, `value` flannel's JSON.
pub fn lease(key: &str, value: &str) -> Lease {
    let subnet: SubnetKey = key.parse().unwrap();
    Lease {
        key: subnet,
        attrs: LeaseAttrs::from_json(key, value.as_bytes()).unwrap(),
        etcd_lease: Some(1),
        revision: 1,
        create_revision: 1,
    }
}

pub fn peer_set(leases: impl IntoIterator<Item = Lease>) -> PeerSet {
    leases.into_iter().map(|l| (l.key, l)).collect()
}

/// A route of `routes` to `dst`.
pub fn route_to<'a>(routes: &'a [Value], dst: &str) -> Option<&'a Value> {
    routes.iter().find(|r| r["dst"] == dst)
}

/// Shows the backends' log lines in test output (`RUST_LOG` to change the level).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// What a reconcile did.
pub fn report(added: usize, removed: usize, repaired: usize) -> ReconcileReport {
    ReconcileReport {
        added,
        removed,
        repaired,
        ..Default::default()
    }
}

/// An external interface `e0` that no kernel holds, for checks made before any netlink call.
pub fn external_interface(
    iface_addr: &str,
    public_ip: &str,
    v6: Option<(&str, &str)>,
) -> ExternalInterface {
    ExternalInterface {
        name: "e0".into(),
        index: 1,
        iface_addr: Some(iface_addr.parse().unwrap()),
        iface_v6_addr: v6.map(|(iface, _)| iface.parse().unwrap()),
        public_ip: Some(public_ip.parse().unwrap()),
        public_ipv6: v6.map(|(_, public)| public.parse().unwrap()),
        mtu: 1500,
    }
}

/// The backend's refusal to prepare under `ctx` (a panic when it prepares), as text that
/// must name each of `parts`.
pub fn assert_prepare_refused(ctx: BackendContext, parts: &[&str]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(async move { backend::create(ctx).unwrap().prepare().await })
        .expect_err("prepare must be refused");
    let msg = err.to_string();
    for part in parts {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
}

/// Asserts the three entries of a vxlan peer on `dev` for `family` (`-4`, `-6`): a permanent
/// neighbour `vtep` → `mac`, a permanent FDB entry `mac` → `public_ip` of the device itself,
/// and an onlink route to `subnet` via `vtep`.
pub fn assert_vxlan_peer(
    ns: &Ns,
    family: &str,
    dev: &str,
    subnet: &str,
    (vtep, mac, public_ip): (&str, &str, &str),
) {
    let neigh = array(ns.ip_json(&[family, "neigh", "show", "dev", dev]));
    let n = neigh
        .iter()
        .find(|n| n["dst"] == vtep)
        .unwrap_or_else(|| panic!("no neighbour {vtep} on {dev}: {neigh:?}"));
    assert_eq!(n["lladdr"], mac, "{n}");
    assert_eq!(n["state"], serde_json::json!(["PERMANENT"]), "{n}");

    let fdb = ns.fdb(dev);
    let f = fdb
        .iter()
        .find(|f| f["mac"] == mac)
        .unwrap_or_else(|| panic!("no FDB entry {mac} on {dev}: {fdb:?}"));
    assert_eq!(f["dst"], public_ip, "{f}");
    assert_eq!(f["state"], "permanent", "{f}");
    assert!(
        f["flags"].as_array().unwrap().contains(&"self".into()),
        "{f}"
    );

    let routes = array(ns.ip_json(&[family, "route", "show", "dev", dev]));
    let r = route_to(&routes, subnet).unwrap_or_else(|| panic!("no route {subnet}: {routes:?}"));
    assert_eq!(r["gateway"], vtep, "{r}");
    assert!(
        r["flags"].as_array().unwrap().contains(&"onlink".into()),
        "{r}"
    );
}

/// Asserts that none of a vxlan peer's three entries is on `dev` (see [`assert_vxlan_peer`]).
pub fn assert_no_vxlan_peer(ns: &Ns, family: &str, dev: &str, subnet: &str, vtep: &str, mac: &str) {
    assert!(
        !array(ns.ip_json(&[family, "neigh", "show", "dev", dev]))
            .iter()
            .any(|n| n["dst"] == vtep),
        "neighbour {vtep} still there"
    );
    assert!(
        !ns.fdb(dev).iter().any(|f| f["mac"] == mac),
        "FDB entry {mac} still there"
    );
    let routes = array(ns.ip_json(&[family, "route", "show", "dev", dev]));
    assert!(
        route_to(&routes, subnet).is_none(),
        "route {subnet} still there"
    );
}

/// A namespace, a backend context, the own lease and the peers to program: each test of one
/// behaviour starts a fresh backend from its own bed, so that one failure does not hide the
/// others. The namespace goes when the bed is dropped.
pub struct BackendBed {
    pub ns: Ns,
    pub ctx: BackendContext,
    pub own: Lease,
    pub peers: Vec<Lease>,
    /// What programming `peers` on a fresh backend reports.
    pub programmed: ReconcileReport,
    /// Held by [`BackendBed::run`] until the test is over: a test body that uses only some
    /// fields of the bed must not drop the namespace with the rest.
    guard: Option<NetnsGuard>,
}

impl BackendBed {
    pub fn new(
        guard: NetnsGuard,
        ctx: BackendContext,
        own: Lease,
        peers: Vec<Lease>,
        programmed: ReconcileReport,
    ) -> BackendBed {
        BackendBed {
            ns: guard.ns.clone(),
            ctx,
            own,
            peers,
            programmed,
            guard: Some(guard),
        }
    }

    /// A backend that has prepared and acquired the own lease.
    pub async fn started(&self) -> (Box<dyn Backend>, Publish) {
        let mut be = backend::create(self.ctx.clone()).expect("backend");
        let publish = be.prepare().await.expect("prepare");
        be.lease_acquired(&self.own).await.expect("lease_acquired");
        (be, publish)
    }

    /// [`BackendBed::started`], with the peers programmed.
    pub async fn with_peers(&self) -> (Box<dyn Backend>, Publish, PeerSet) {
        let (mut be, publish) = self.started().await;
        let peers = peer_set(self.peers.iter().cloned());
        assert_eq!(be.reconcile(&peers).await.unwrap(), self.programmed);
        (be, publish, peers)
    }

    /// Runs `test` inside the bed's namespace (see [`Ns::run`]).
    pub fn run<F, Fut>(mut self, test: F)
    where
        F: FnOnce(BackendBed) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let _guard = self.guard.take();
        let ns = self.ns.clone();
        ns.run(move || test(self))
    }

    /// [`BackendBed::run`] with a backend that has programmed the peers.
    pub fn run_with_peers<F, Fut>(self, test: F)
    where
        F: FnOnce(BackendBed, Box<dyn Backend>, PeerSet) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        self.run(|bed| async move {
            let (be, _, peers) = bed.with_peers().await;
            test(bed, be, peers).await
        })
    }
}
