//! The data plane loop: programs our lease, reconciles the peers, writes the subnet file.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::backend::{Backend, BackendError};
use crate::blackhole::OwnBlackholes;
use crate::config::NetworkConfig;
use crate::error_chain::Chain;
use crate::health;
use crate::metrics::Metrics;
use crate::status;
use crate::subnet::env::{SubnetEnv, SubnetEnvExt};
use crate::subnet::peers::{self, RejectionLog};
use crate::subnet::watch::LeaseView;
use crate::subnet::{Lease, SubnetKey};

/// How often the data plane is compared with the peers even when nothing changed.
const RECONCILE_EVERY: Duration = Duration::from_secs(10);
/// After the kernel reports a deletion, wait this long for the rest of a burst (a deleted
/// device takes its routes and neighbours with it) before repairing once.
const KERNEL_EVENT_SETTLE: Duration = Duration::from_millis(100);

/// Owns the backend: programs our lease and reconciles the peers, then writes the subnet file.
pub(super) struct DataPlane {
    pub(super) backend: Box<dyn Backend>,
    pub(super) config: NetworkConfig,
    /// The external interface: its changes matter to the data plane too.
    pub(super) ext_index: u32,
    pub(super) mtu: u32,
    pub(super) subnet_file: std::path::PathBuf,
    pub(super) ip_masq: bool,
    pub(super) metrics: Arc<Metrics>,
    pub(super) rejections: RejectionLog,
    pub(super) own_overruled_by: Option<SubnetKey>,
    /// `--ip-blackhole-route`'s routes, kept on every full pass (`None`: no netlink socket).
    pub(super) blackholes: Option<OwnBlackholes>,
    /// Told once, after the subnet file is first written (Kubernetes mode then clears the
    /// Node's NetworkUnavailable condition, as flannel does at that point).
    pub(super) subnet_file_written: Option<tokio::sync::oneshot::Sender<()>>,
}

impl DataPlane {
    pub(super) async fn run(
        mut self,
        mut own_rx: watch::Receiver<Lease>,
        mut view_rx: watch::Receiver<LeaseView>,
    ) {
        let kernel_changed = Arc::new(tokio::sync::Notify::new());
        // Subscribed after the first full pass: a listener makes the kernel build a
        // notification for each of the thousands of entries that pass writes on a large cluster.
        let mut kernel_watch = self.config.backend_type.has_data_plane();
        let mut own = own_rx.borrow_and_update().clone();
        let mut own_programmed = false;
        let mut notified = false;
        // Whether the next pass compares the kernel with every peer; a lease event alone only
        // applies what it changed (`Backend::update`).
        let mut full = true;
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
            let full_pass = full;
            let view = view_rx.borrow_and_update().clone();
            if view.synced {
                self.reconcile(&own, &view, std::mem::take(&mut full)).await;
                if std::mem::take(&mut kernel_watch) {
                    let (notify, ext) = (kernel_changed.clone(), self.ext_index);
                    if let Err(e) = crate::kernel_events::watch(notify, ext, self.metrics.clone()) {
                        tracing::warn!(
                            "no kernel change notifications ({e}); repairs wait for the timer"
                        );
                    }
                }
            }
            if let Some(blackholes) = self.blackholes.as_mut().filter(|_| full_pass) {
                if own_programmed {
                    blackholes.sync(&self.config, &own.key).await;
                }
            }
            tokio::select! {
                r = own_rx.changed() => {
                    if r.is_err() { return; }
                    own = own_rx.borrow_and_update().clone();
                    own_programmed = false;
                    full = true;
                }
                r = view_rx.changed() => { if r.is_err() { return; } }
                _ = tick.tick() => full = true,
                _ = kernel_changed.notified() => {
                    tokio::time::sleep(KERNEL_EVENT_SETTLE).await;
                    full = true;
                }
            }
        }
    }

    async fn program_own(&mut self, own: &Lease) -> bool {
        let backend = self.config.backend_type.to_string();
        self.metrics.status.set_lease(own, &backend);
        if let Err(e) = self.backend.lease_acquired(own).await {
            tracing::error!(
                "programming our lease {} failed, retrying: {}",
                own.key,
                Chain(&e)
            );
            return false;
        }
        let env = SubnetEnv::from_lease(&self.config, &own.key, self.mtu, self.ip_masq);
        match env.write_atomic(&self.subnet_file) {
            Ok(()) => {
                tracing::info!("wrote {}", self.subnet_file.display());
                self.metrics.ready.store(true, Ordering::Relaxed);
                if let Some(tell) = self.subnet_file_written.take() {
                    let _ = tell.send(());
                }
                true
            }
            Err(e) => {
                tracing::error!("{e}");
                false
            }
        }
    }

    /// `full`: compare the kernel with every peer; else apply what changed since the last pass.
    async fn reconcile(&mut self, own: &Lease, view: &LeaseView, full: bool) {
        let filtered = peers::filter(&view.leases, &self.config, own);
        self.report_rejections(own, &filtered);
        let board = &self.metrics.status;
        board.set_peers(&filtered, &view.leases, status::unix_now());
        let started = std::time::Instant::now();
        let peers = filtered.accepted;
        self.metrics
            .peers
            .store(peers.len() as u64, Ordering::Relaxed);
        Metrics::inc(&self.metrics.reconciles);
        let result = if full {
            self.backend.reconcile(&peers).await
        } else {
            self.backend.update(&peers).await
        };
        if full {
            let (report, error) = match &result {
                Ok(report) => (report.clone(), None),
                Err(BackendError::Changes { report, .. }) => (
                    report.clone(),
                    result.as_ref().err().map(|e| Chain(e).to_string()),
                ),
                Err(e) => (Default::default(), Some(Chain(e).to_string())),
            };
            let at = status::unix_now();
            board.set_full_pass(at, started.elapsed(), &report, error);
        } else {
            match &result {
                Ok(report) => board.set_update(report, false),
                Err(BackendError::Changes { report, .. }) => board.set_update(report, true),
                Err(_) => board.set_update(&Default::default(), true),
            }
        }
        match result {
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
                tracing::error!("reconciling the data plane failed: {}", Chain(&e));
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
