//! Acquiring our lease, renewing it, and taking it again when it is lost.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::NetworkConfig;
use crate::metrics::Metrics;
use crate::subnet::acquire::{AcquireRequest, Renewal};
use crate::subnet::registry::{AcquireFailure, LeaseRegistry};
use crate::subnet::watch::LeaseView;
use crate::subnet::Lease;

/// Acquires a lease, retrying registry failures and a full network until it succeeds.
pub(super) async fn acquire_until_done<R: LeaseRegistry>(
    reg: &R,
    config: &NetworkConfig,
    request: &AcquireRequest,
    metrics: &Metrics,
) -> Lease {
    let mut backoff = Backoff::new();
    loop {
        match reg.acquire(config, request).await {
            Ok(lease) => {
                Metrics::inc(&metrics.acquisitions);
                set_expiry(metrics, &lease, request.ttl.as_secs() as i64);
                tracing::info!(
                    "lease acquired: {} (public IP {:?}, etcd lease {:?})",
                    lease.key,
                    lease.attrs.public_ip,
                    lease.etcd_lease
                );
                return lease;
            }
            Err(AcquireFailure::Registry(e)) => {
                tracing::warn!("acquiring a lease failed, retrying: {e}");
                backoff.wait().await;
            }
            Err(e @ AcquireFailure::NoLease(_)) => {
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
    metrics
        .lease_expiry_seconds
        .store(expiry_at(lease, ttl_secs, unix_now()), Ordering::Relaxed);
}

/// When `lease` expires, in Unix seconds, if renewed at `now`; 0 for one that never expires.
fn expiry_at(lease: &Lease, ttl_secs: i64, now: i64) -> i64 {
    if lease.is_reservation() {
        0
    } else {
        now + ttl_secs
    }
}

/// Whether the watched view proves our lease gone: only a complete view at least as new as our
/// lease can, since an older one may simply not have seen it yet.
fn lease_gone(view: &LeaseView, lease: &Lease) -> bool {
    view.synced && view.revision >= lease.revision && !view.leases.contains_key(&lease.key)
}

/// Renews our lease before it expires (or only holds it, when the registry says it needs no
/// renewal) and takes it again when it is lost: expired, or gone from the watched view.
pub(super) struct LeaseKeeper<R> {
    pub(super) reg: Arc<R>,
    pub(super) config: NetworkConfig,
    pub(super) request: AcquireRequest,
    pub(super) renew_after: Duration,
    pub(super) metrics: Arc<Metrics>,
}

impl<R: LeaseRegistry> LeaseKeeper<R> {
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
                    match self.reg.keep(&lease).await {
                        Ok(Renewal::Renewed { ttl_secs }) => {
                            Metrics::inc(&self.metrics.renewals);
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
                    let gone = lease_gone(&view_rx.borrow_and_update(), &lease);
                    if gone {
                        tracing::warn!("{}", self.reg.lease_gone_message(&lease));
                    }
                    gone
                }
            };
            if lost {
                let request = AcquireRequest {
                    prefer: Some(lease.key),
                    ..self.request.clone()
                };
                lease = acquire_until_done(&*self.reg, &self.config, &request, &self.metrics).await;
                own_tx.send_replace(lease.clone());
                next_renew = Instant::now() + self.renew_after;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::memory_registry::{self, script, MemoryRegistry, Unreachable};
    use crate::subnet::PeerSet;

    fn lease(key: &str, etcd_lease: Option<i64>, revision: i64) -> Lease {
        Lease {
            etcd_lease,
            ..memory_registry::lease(key, revision)
        }
    }

    fn view(leases: &[&Lease], revision: i64, synced: bool) -> LeaseView {
        LeaseView {
            leases: leases
                .iter()
                .map(|l| (l.key, (*l).clone()))
                .collect::<PeerSet>(),
            revision,
            synced,
        }
    }

    #[test]
    fn a_lease_with_a_ttl_expires_ttl_seconds_after_its_renewal() {
        let own = lease("10.5.1.0-24", Some(7), 10);
        assert_eq!(expiry_at(&own, 86_400, 1_000_000), 1_086_400);
    }

    #[test]
    fn a_reservation_reports_no_expiry() {
        let reserved = lease("10.5.1.0-24", None, 10);
        assert_eq!(expiry_at(&reserved, 86_400, 1_000_000), 0);
    }

    #[test]
    fn a_lease_missing_from_a_complete_current_view_is_gone() {
        let own = lease("10.5.1.0-24", Some(7), 10);
        let other = lease("10.5.2.0-24", Some(8), 11);
        assert!(lease_gone(&view(&[&other], 12, true), &own));
        assert!(lease_gone(&view(&[&other], 10, true), &own));
    }

    #[test]
    fn a_lease_in_the_view_is_not_gone() {
        let own = lease("10.5.1.0-24", Some(7), 10);
        assert!(!lease_gone(&view(&[&own], 12, true), &own));
    }

    #[test]
    fn a_view_not_yet_listed_proves_nothing() {
        let own = lease("10.5.1.0-24", Some(7), 10);
        assert!(!lease_gone(&view(&[], 12, false), &own));
    }

    #[test]
    fn a_view_older_than_the_lease_proves_nothing() {
        // Re-acquired at revision 10; a view from revision 9 has not seen the new key yet.
        let own = lease("10.5.1.0-24", Some(7), 10);
        assert!(!lease_gone(&view(&[], 9, true), &own));
    }

    const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
    const WITHIN: Duration = Duration::from_secs(5);

    fn request() -> AcquireRequest {
        AcquireRequest {
            attrs: memory_registry::lease("10.5.1.0-24", 1).attrs,
            prefer: None,
            ttl: Duration::from_secs(86_400),
        }
    }

    fn keeper(reg: &Arc<MemoryRegistry>, renew_after: Duration) -> LeaseKeeper<MemoryRegistry> {
        LeaseKeeper {
            reg: reg.clone(),
            config: NetworkConfig::parse(CONFIG.as_bytes()).unwrap(),
            request: request(),
            renew_after,
            metrics: Arc::new(Metrics::default()),
        }
    }

    #[tokio::test]
    async fn acquiring_retries_an_unreachable_registry_until_it_answers() {
        let lease = memory_registry::lease("10.5.1.0-24", 10);
        let reg = MemoryRegistry {
            acquisitions: script([
                Err(AcquireFailure::Registry(Unreachable)),
                Ok(lease.clone()),
            ]),
            ..Default::default()
        };
        let metrics = Metrics::default();
        let config = NetworkConfig::parse(CONFIG.as_bytes()).unwrap();
        let got = tokio::time::timeout(
            WITHIN,
            acquire_until_done(&reg, &config, &request(), &metrics),
        )
        .await
        .expect("acquired after one retry");
        assert_eq!(got, lease);
        assert_eq!(reg.requests.lock().unwrap().len(), 2);
        assert_eq!(metrics.acquisitions.load(Ordering::Relaxed), 1);
        assert!(metrics.lease_expiry_seconds.load(Ordering::Relaxed) > unix_now());
    }

    #[tokio::test]
    async fn a_lease_deleted_from_the_registry_is_acquired_again_preferring_its_subnet() {
        let first = memory_registry::lease("10.5.1.0-24", 10);
        let again = memory_registry::lease("10.5.1.0-24", 20);
        let reg = Arc::new(MemoryRegistry {
            acquisitions: script([Ok(again.clone())]),
            renewals: script([Renewal::NotNeeded]),
            ..Default::default()
        });
        let (own_tx, mut own_rx) = watch::channel(first.clone());
        let (view_tx, view_rx) = watch::channel(LeaseView::default());
        let task = tokio::spawn(keeper(&reg, Duration::from_secs(3600)).run(
            first.clone(),
            own_tx,
            view_rx,
        ));
        view_tx.send_replace(view(&[], 11, true));
        tokio::time::timeout(WITHIN, own_rx.changed())
            .await
            .expect("acquired again in time")
            .unwrap();
        assert_eq!(*own_rx.borrow(), again);
        assert_eq!(reg.requests.lock().unwrap()[0].prefer, Some(first.key));
        task.abort();
    }

    #[tokio::test]
    async fn a_lease_that_expired_is_acquired_again() {
        let first = memory_registry::lease("10.5.1.0-24", 10);
        let again = memory_registry::lease("10.5.2.0-24", 20);
        let reg = Arc::new(MemoryRegistry {
            acquisitions: script([Ok(again.clone())]),
            renewals: script([Renewal::Expired]),
            ..Default::default()
        });
        let (own_tx, mut own_rx) = watch::channel(first.clone());
        let (_view_tx, view_rx) = watch::channel(LeaseView::default());
        let task = tokio::spawn(keeper(&reg, Duration::from_millis(10)).run(
            first.clone(),
            own_tx,
            view_rx,
        ));
        tokio::time::timeout(WITHIN, own_rx.changed())
            .await
            .expect("acquired again in time")
            .unwrap();
        assert_eq!(*own_rx.borrow(), again);
        task.abort();
    }

    #[tokio::test]
    async fn a_renewed_lease_is_counted_and_its_expiry_moves() {
        let first = memory_registry::lease("10.5.1.0-24", 10);
        let reg = Arc::new(MemoryRegistry {
            renewals: script([Renewal::Renewed { ttl_secs: 60 }]),
            ..Default::default()
        });
        let keeper = keeper(&reg, Duration::from_millis(10));
        let metrics = keeper.metrics.clone();
        let (own_tx, _own_rx) = watch::channel(first.clone());
        let (_view_tx, view_rx) = watch::channel(LeaseView::default());
        let task = tokio::spawn(keeper.run(first, own_tx, view_rx));
        let deadline = Instant::now() + WITHIN;
        while metrics.renewals.load(Ordering::Relaxed) < 2 {
            assert!(Instant::now() < deadline, "no second renewal in time");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let expiry = metrics.lease_expiry_seconds.load(Ordering::Relaxed);
        assert!(
            (unix_now() + 50..=unix_now() + 60).contains(&expiry),
            "{expiry}"
        );
        assert!(
            reg.requests.lock().unwrap().is_empty(),
            "renewed, not acquired"
        );
        task.abort();
    }
}
