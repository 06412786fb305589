//! Acquiring our lease, renewing it, and taking it again when it is lost.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::NetworkConfig;
use crate::metrics::Metrics;
use crate::subnet::acquire::{self, AcquireError, AcquireRequest, Renewal};
use crate::subnet::etcd::{Listing, Registry};
use crate::subnet::watch::{Backoff, LeaseView};
use crate::subnet::Lease;

/// Acquires a lease, retrying etcd failures and a full network until it succeeds.
pub(super) async fn acquire_until_done(
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
pub(super) struct LeaseKeeper {
    pub(super) reg: Registry,
    pub(super) config: NetworkConfig,
    pub(super) request: AcquireRequest,
    pub(super) renew_after: Duration,
    pub(super) metrics: Arc<Metrics>,
}

impl LeaseKeeper {
    pub(super) async fn run(
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
