//! Wiring: interface → config → backend → lease → subnet file → run loops.
//!
//! Three long-lived tasks share state through `watch` channels, so each only ever acts on the
//! latest state: the watcher (etcd → [`LeaseView`]), the lease keeper (renews, re-acquires when
//! the lease is lost) and the data plane (reconciles the kernel with the peers).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::backend::{self, Backend, BackendContext, BackendError, Publish};
use crate::cli::Opts;
use crate::config::NetworkConfig;
use crate::firewall::{self, Firewall, Rules};
use crate::health;
use crate::iface::{self, ExternalInterface, IfaceChoice, IfaceError};
use crate::metrics::Metrics;
use crate::subnet::acquire::{self, AcquireError, AcquireRequest, Renewal};
use crate::subnet::env::{SubnetEnv, SubnetEnvExt};
use crate::subnet::etcd::{EtcdError, EtcdOptions, Listing, Registry};
use crate::subnet::peers::{self, RejectionLog};
use crate::subnet::watch::{self as lease_watch, Backoff, LeaseView};
use crate::subnet::{Lease, LeaseAttrs, SubnetKey};

/// How often the data plane is compared with the peers even when nothing changed.
const RECONCILE_EVERY: Duration = Duration::from_secs(10);
/// After the kernel reports a deletion, wait this long for the rest of a burst (a deleted
/// device takes its routes and neighbours with it) before repairing once.
const KERNEL_EVENT_SETTLE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Iface(#[from] IfaceError),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("--healthz-ip/--healthz-port {addr}: {err}")]
    Health {
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error("{0}")]
    Mismatch(String),
    #[error("internal task {task} stopped ({why}); exiting so that it is restarted")]
    TaskEnded { task: &'static str, why: String },
}

pub async fn run(opts: Opts) -> Result<(), DaemonError> {
    let metrics = Arc::new(Metrics::default());
    if opts.healthz_port != 0 {
        let addr = SocketAddr::new(opts.healthz_ip, opts.healthz_port);
        let listener = health::bind(addr)
            .await
            .map_err(|err| DaemonError::Health { addr, err })?;
        tracing::info!("health server on http://{addr}/ (healthz, readyz, metrics)");
        tokio::spawn(health::serve(listener, metrics.clone()));
    }

    let ext = iface::select(&IfaceChoice {
        iface: opts.iface.clone(),
        iface_regex: opts.iface_regex.clone(),
        iface_can_reach: opts.iface_can_reach,
        public_ip: opts.public_ip,
        public_ipv6: opts.public_ipv6,
    })?;
    tracing::info!(
        "external interface {} (index {}, MTU {}), address {:?}, public IP {:?}, public IPv6 {:?}",
        ext.name,
        ext.index,
        ext.mtu,
        ext.iface_addr,
        ext.public_ip,
        ext.public_ipv6
    );

    let reg = connect_until_done(&etcd_options(&opts), &metrics).await?;
    let config = wait_for_config(&reg, &metrics).await;
    check_families(&config, &ext)?;
    tracing::info!(
        "network config: network {:?}, IPv6 network {:?}, backend {}",
        config.network,
        config.ipv6_network,
        config.backend_type
    );

    let mut backend = backend::create(BackendContext {
        config: config.clone(),
        ext: ext.clone(),
        metrics: metrics.clone(),
    })?;
    let publish = backend.prepare().await?;
    let attrs = lease_attrs(&config, &ext, &publish);

    let old_subnet = match SubnetEnv::read_lenient(&opts.subnet_file) {
        Ok(env) => env.and_then(|e| e.lease_key()),
        Err(e) => {
            tracing::warn!("ignoring the old subnet file: {e}");
            None
        }
    };
    let request = AcquireRequest {
        attrs,
        prefer: old_subnet,
        ttl: opts.subnet_lease_ttl,
    };
    let (lease, listing) = acquire_until_done(&reg, &config, &request, &metrics).await;

    let (view_tx, view_rx) = watch::channel(LeaseView::default());
    let (own_tx, own_rx) = watch::channel(lease.clone());
    let watcher = tokio::spawn(lease_watch::run(
        reg.clone(),
        LeaseView::default(),
        Some(listing),
        view_tx,
        metrics.clone(),
    ));
    let plane = DataPlane {
        backend,
        config: config.clone(),
        ext_index: ext.index,
        mtu: publish.mtu,
        subnet_file: opts.subnet_file.clone(),
        ip_masq: opts.ip_masq,
        metrics: metrics.clone(),
        rejections: RejectionLog::default(),
        own_overruled_by: None,
    };
    let plane = tokio::spawn(plane.run(own_rx.clone(), view_rx.clone()));
    let rules = RuleKeeper {
        firewall: firewall::create(config.enable_nftables),
        config: config.clone(),
        masquerade: opts.ip_masq,
        forward: opts.iptables_forward_rules,
        fully_random: !opts.ip_masq_fully_random_disable,
        every: Duration::from_secs(u64::from(opts.iptables_resync)),
        metrics: metrics.clone(),
    };
    let rules = tokio::spawn(rules.run(own_rx));
    let keeper = LeaseKeeper {
        reg,
        config,
        request,
        renew_after: opts.renew_after(),
        metrics,
    };
    let keeper = tokio::spawn(keeper.run(lease, own_tx, view_rx));
    // Each task runs for the life of the daemon. One that ends has panicked or lost its
    // channel: exit with the reason, so that the supervisor restarts a whole daemon, which
    // adopts the data plane as it is, rather than keep one that silently stopped a duty.
    let (task, end) = tokio::select! {
        r = watcher => ("lease watcher", r),
        r = plane => ("data plane", r),
        r = rules => ("rule keeper", r),
        r = keeper => ("lease keeper", r),
    };
    Err(DaemonError::TaskEnded {
        task,
        why: match end {
            Ok(()) => "returned".to_string(),
            Err(e) => e.to_string(),
        },
    })
}

/// Connects to etcd; a flag or file that can never work is fatal, an unreachable etcd is not.
async fn connect_until_done(
    opts: &EtcdOptions,
    metrics: &Metrics,
) -> Result<Registry, DaemonError> {
    let mut backoff = Backoff::new();
    loop {
        match Registry::connect(opts).await {
            Ok(reg) => return Ok(reg),
            Err(e) if e.is_fatal() => return Err(e.into()),
            Err(e) => {
                metrics.etcd_error(&e);
                tracing::warn!(
                    "connecting to etcd {:?} failed, retrying: {e}",
                    opts.endpoints
                );
                backoff.wait().await;
            }
        }
    }
}

fn etcd_options(opts: &Opts) -> EtcdOptions {
    EtcdOptions {
        endpoints: opts.endpoints(),
        prefix: opts.etcd_prefix.clone(),
        cafile: opts.etcd_cafile.clone(),
        certfile: opts.etcd_certfile.clone(),
        keyfile: opts.etcd_keyfile.clone(),
        username: opts.etcd_username.clone(),
        password: opts.etcd_password.clone(),
        insecure_password: opts.etcd_insecure_password,
    }
}

fn check_families(config: &NetworkConfig, ext: &ExternalInterface) -> Result<(), DaemonError> {
    if config.enable_ipv4 && ext.public_ip.is_none() {
        return Err(DaemonError::Mismatch(format!(
            "the network config enables IPv4 but interface {} has no IPv4 address \
             (give one, --public-ip, or choose another interface with --iface)",
            ext.name
        )));
    }
    if config.enable_ipv6 && ext.public_ipv6.is_none() {
        return Err(DaemonError::Mismatch(format!(
            "the network config enables IPv6 but interface {} has no global IPv6 address \
             (give one, --public-ipv6, or choose another interface with --iface)",
            ext.name
        )));
    }
    Ok(())
}

fn lease_attrs(config: &NetworkConfig, ext: &ExternalInterface, publish: &Publish) -> LeaseAttrs {
    let raw = |v: &Option<serde_json::Value>| {
        v.as_ref()
            .map(|v| serde_json::value::to_raw_value(v).expect("JSON values serialize"))
    };
    LeaseAttrs {
        public_ip: ext.public_ip.filter(|_| config.enable_ipv4),
        public_ipv6: ext.public_ipv6.filter(|_| config.enable_ipv6),
        backend_type: publish.backend_type.clone(),
        backend_data: raw(&publish.backend_data),
        backend_v6_data: raw(&publish.backend_v6_data),
    }
}

/// Reads the network config until a valid one is there, watching the key in between. An
/// invalid config is reported once per distinct problem; fixing it in etcd is enough.
async fn wait_for_config(reg: &Registry, metrics: &Metrics) -> NetworkConfig {
    let mut last_report = String::new();
    let mut report = |msg: String, level: tracing::Level| {
        if msg != last_report {
            match level {
                tracing::Level::ERROR => tracing::error!("{msg}"),
                tracing::Level::WARN => tracing::warn!("{msg}"),
                _ => tracing::info!("{msg}"),
            }
            last_report = msg;
        }
    };
    let mut backoff = Backoff::new();
    loop {
        let (value, revision) = match reg.get_config().await {
            Ok(r) => r,
            Err(e) => {
                metrics.etcd_error(&e);
                report(
                    format!("reading network config failed, retrying: {e}"),
                    tracing::Level::WARN,
                );
                backoff.wait().await;
                continue;
            }
        };
        metrics.set_etcd_up(true);
        backoff.reset();
        match value.map(|v| validate(&v)) {
            None => report(
                format!("waiting for the network config at {}", reg.config_key()),
                tracing::Level::INFO,
            ),
            Some(Ok(config)) => return config,
            Some(Err(why)) => report(
                format!(
                    "invalid network config at {}: {why}; waiting for a valid one",
                    reg.config_key()
                ),
                tracing::Level::ERROR,
            ),
        }
        wait_for_change(reg, revision).await;
    }
}

fn validate(raw: &[u8]) -> Result<NetworkConfig, String> {
    let config = NetworkConfig::parse(raw).map_err(|e| e.to_string())?;
    if !backend::KNOWN.contains(&config.backend_type.as_str()) {
        return Err(BackendError::UnknownType(config.backend_type).to_string());
    }
    Ok(config)
}

/// Returns when the config key changed after `revision`, the watch broke, or a minute passed.
async fn wait_for_change(reg: &Registry, revision: i64) {
    let wait = async {
        let Ok((mut stream, first)) = reg.watch_config(revision + 1).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            return;
        };
        let mut first = Some(first);
        loop {
            let next = match first.take() {
                Some(resp) => Ok(Some(resp)),
                None => stream.message().await,
            };
            match next {
                Ok(Some(resp)) if resp.events().is_empty() && !resp.canceled() => continue,
                Ok(Some(_)) => return,
                _ => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(60), wait).await;
}

/// Acquires a lease, retrying etcd failures and a full network until it succeeds.
async fn acquire_until_done(
    reg: &Registry,
    config: &NetworkConfig,
    request: &AcquireRequest,
    metrics: &Metrics,
) -> (Lease, Listing) {
    let mut backoff = Backoff::new();
    loop {
        match acquire::acquire_and_list(reg, config, request).await {
            Ok((lease, listing)) => {
                Metrics::inc(&metrics.acquisitions);
                metrics.set_etcd_up(true);
                set_expiry(metrics, &lease, request.ttl.as_secs() as i64);
                tracing::info!(
                    "lease acquired: {} (public IP {:?}, etcd lease {:?})",
                    lease.key,
                    lease.attrs.public_ip,
                    lease.etcd_lease
                );
                return (lease, listing);
            }
            Err(AcquireError::Etcd(e)) => {
                metrics.etcd_error(&e);
                tracing::warn!("acquiring a lease failed, retrying: {e}");
                backoff.wait().await;
            }
            Err(e) => {
                tracing::error!("acquiring a lease failed, retrying in 10 s: {e}");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn set_expiry(metrics: &Metrics, lease: &Lease, ttl_secs: i64) {
    let expiry = if lease.is_reservation() {
        0
    } else {
        unix_now() + ttl_secs
    };
    metrics
        .lease_expiry_seconds
        .store(expiry, Ordering::Relaxed);
}

/// Renews our lease before it expires and takes it again when it is lost.
struct LeaseKeeper {
    reg: Registry,
    config: NetworkConfig,
    request: AcquireRequest,
    renew_after: Duration,
    metrics: Arc<Metrics>,
}

impl LeaseKeeper {
    async fn run(
        self,
        mut lease: Lease,
        own_tx: watch::Sender<Lease>,
        mut view_rx: watch::Receiver<LeaseView>,
    ) {
        let far = Duration::from_secs(365 * 24 * 3600);
        let mut next_renew = Instant::now() + self.renew_after;
        // A failed renewal is retried well within what is left of the TTL (which is at least
        // the TTL minus `renew_after`), never at the 10 s cap when the TTL is short.
        let mut retry = Backoff::with_max(self.request.ttl.saturating_sub(self.renew_after) / 4);
        loop {
            let lost = tokio::select! {
                _ = tokio::time::sleep_until(next_renew) => {
                    match acquire::renew(&self.reg, &lease).await {
                        Ok(Renewal::Renewed { ttl_secs }) => {
                            Metrics::inc(&self.metrics.renewals);
                            self.metrics.set_etcd_up(true);
                            set_expiry(&self.metrics, &lease, ttl_secs);
                            tracing::info!("lease renewed: {} (TTL {ttl_secs} s)", lease.key);
                            next_renew = Instant::now() + self.renew_after;
                            retry.reset();
                            false
                        }
                        Ok(Renewal::NotNeeded) => {
                            next_renew = Instant::now() + far;
                            false
                        }
                        Ok(Renewal::Expired) => {
                            tracing::warn!("lease {} expired in etcd", lease.key);
                            true
                        }
                        Err(e) => {
                            self.metrics.etcd_error(&e);
                            tracing::warn!("renewing lease {} failed, retrying: {e}", lease.key);
                            retry.wait().await;
                            next_renew = Instant::now();
                            false
                        }
                    }
                }
                changed = view_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let view = view_rx.borrow_and_update();
                    let gone = view.synced
                        && view.revision >= lease.revision
                        && !view.leases.contains_key(&lease.key);
                    if gone {
                        tracing::warn!("lease {} was deleted from etcd", lease.key);
                    }
                    gone
                }
            };
            if lost {
                let request = AcquireRequest {
                    prefer: Some(lease.key),
                    ..self.request.clone()
                };
                (lease, _) =
                    acquire_until_done(&self.reg, &self.config, &request, &self.metrics).await;
                own_tx.send_replace(lease.clone());
                next_renew = Instant::now() + self.renew_after;
            }
        }
    }
}

/// Owns the backend: programs our lease and reconciles the peers, then writes the subnet file.
struct DataPlane {
    backend: Box<dyn Backend>,
    config: NetworkConfig,
    /// The external interface: its changes matter to the data plane too.
    ext_index: u32,
    mtu: u32,
    subnet_file: std::path::PathBuf,
    ip_masq: bool,
    metrics: Arc<Metrics>,
    rejections: RejectionLog,
    own_overruled_by: Option<SubnetKey>,
}

impl DataPlane {
    async fn run(
        mut self,
        mut own_rx: watch::Receiver<Lease>,
        mut view_rx: watch::Receiver<LeaseView>,
    ) {
        let kernel_changed = Arc::new(tokio::sync::Notify::new());
        // Subscribed after the first full pass: a listener makes the kernel build a
        // notification for each of the thousands of entries that pass writes on a large cluster.
        let mut kernel_watch = self.config.backend_type != "alloc";
        let mut own = own_rx.borrow_and_update().clone();
        let mut own_programmed = false;
        let mut notified = false;
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !own_programmed {
                own_programmed = self.program_own(&own).await;
                if own_programmed && !notified {
                    health::notify_systemd_ready();
                    notified = true;
                }
            }
            let view = view_rx.borrow_and_update().clone();
            if view.synced {
                self.reconcile(&own, &view).await;
                if std::mem::take(&mut kernel_watch) {
                    let (notify, ext) = (kernel_changed.clone(), self.ext_index);
                    if let Err(e) = crate::kernel_events::watch(notify, ext, self.metrics.clone()) {
                        tracing::warn!(
                            "no kernel change notifications ({e}); repairs wait for the timer"
                        );
                    }
                }
            }
            tokio::select! {
                r = own_rx.changed() => {
                    if r.is_err() { return; }
                    own = own_rx.borrow_and_update().clone();
                    own_programmed = false;
                }
                r = view_rx.changed() => { if r.is_err() { return; } }
                _ = tick.tick() => {}
                _ = kernel_changed.notified() => {
                    tokio::time::sleep(KERNEL_EVENT_SETTLE).await;
                }
            }
        }
    }

    async fn program_own(&mut self, own: &Lease) -> bool {
        if let Err(e) = self.backend.lease_acquired(own).await {
            tracing::error!("programming our lease {} failed, retrying: {e}", own.key);
            return false;
        }
        let env = SubnetEnv::from_lease(&self.config, &own.key, self.mtu, self.ip_masq);
        match env.write_atomic(&self.subnet_file) {
            Ok(()) => {
                tracing::info!("wrote {}", self.subnet_file.display());
                self.metrics.ready.store(true, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::error!("{e}");
                false
            }
        }
    }

    async fn reconcile(&mut self, own: &Lease, view: &LeaseView) {
        let filtered = peers::filter(&view.leases, &self.config, own);
        self.report_rejections(own, &filtered);
        let peers = filtered.accepted;
        self.metrics
            .peers
            .store(peers.len() as u64, Ordering::Relaxed);
        Metrics::inc(&self.metrics.reconciles);
        match self.backend.reconcile(&peers).await {
            Ok(report) => {
                let m = &self.metrics;
                m.dataplane_added
                    .fetch_add(report.added as u64, Ordering::Relaxed);
                m.dataplane_removed
                    .fetch_add(report.removed as u64, Ordering::Relaxed);
                m.dataplane_repaired
                    .fetch_add(report.repaired as u64, Ordering::Relaxed);
                if report != Default::default() {
                    tracing::info!(
                        "data plane: {} added, {} removed, {} repaired ({} peers)",
                        report.added,
                        report.removed,
                        report.repaired,
                        peers.len()
                    );
                }
            }
            Err(e) => {
                Metrics::inc(&self.metrics.reconcile_errors);
                tracing::error!("reconciling the data plane failed: {e}");
            }
        }
    }

    /// Logs and counts what the peer filter refused, once per key and reason.
    fn report_rejections(&mut self, own: &Lease, filtered: &peers::Filtered) {
        let news = self.rejections.update(filtered);
        for (key, rejection) in news.new {
            self.metrics.lease_rejected(rejection.reason);
            tracing::warn!("lease {key} is not a peer: {rejection}");
        }
        for (key, was) in news.accepted {
            tracing::info!("lease {key} is a peer now (was rejected: {})", was.label());
        }
        if filtered.own_overruled_by != self.own_overruled_by {
            if let Some(winner) = filtered.own_overruled_by {
                tracing::warn!(
                    "our lease {} overlaps the older lease {winner}: other hosts route the \
                     overlap to {winner}, not to us",
                    own.key
                );
            }
            self.own_overruled_by = filtered.own_overruled_by;
        }
    }
}

/// Keeps the masquerade and forward rules in place: installed for our lease, replaced when the
/// lease changes, checked every `--iptables-resync` seconds and restored when someone removed
/// them. Left in place at exit, like the data plane.
struct RuleKeeper {
    firewall: Box<dyn Firewall>,
    config: NetworkConfig,
    masquerade: bool,
    forward: bool,
    fully_random: bool,
    every: Duration,
    metrics: Arc<Metrics>,
}

impl RuleKeeper {
    fn rules_for(&self, own: &Lease) -> Rules {
        let v4 = self.config.network.zip(own.key.ipv4);
        let v6 = self.config.ipv6_network.zip(own.key.ipv6);
        Rules::new(v4, v6, self.masquerade, self.forward, self.fully_random)
    }

    async fn run(mut self, mut own_rx: watch::Receiver<Lease>) {
        let mut rules = self.rules_for(&own_rx.borrow_and_update());
        if rules.is_empty() {
            // Nothing to keep; stay alive, since the daemon treats an ended task as a failure.
            return std::future::pending().await;
        }
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut installed_once = false;
        let mut last_error = String::new();
        loop {
            tokio::select! {
                r = own_rx.changed() => {
                    if r.is_err() { return; }
                    rules = self.rules_for(&own_rx.borrow_and_update());
                }
                _ = tick.tick() => {}
            }
            let (fw, want) = (self.firewall, rules.clone());
            let (fw, result) = tokio::task::spawn_blocking(move || {
                let mut fw = fw;
                let r = fw.ensure(&want);
                (fw, r)
            })
            .await
            .expect("firewall task does not panic");
            self.firewall = fw;
            match result {
                Ok(true) if installed_once => {
                    Metrics::inc(&self.metrics.firewall_restores);
                    tracing::warn!("masquerade/forward rules were missing or changed: restored");
                }
                Ok(true) => {
                    installed_once = true;
                    tracing::info!("masquerade/forward rules installed");
                }
                Ok(false) => installed_once = true,
                Err(e) => {
                    let msg = e.to_string();
                    if msg != last_error {
                        tracing::error!("installing masquerade/forward rules: {msg}");
                        last_error = msg;
                    }
                }
            }
        }
    }
}
