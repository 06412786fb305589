//! The etcd registry behind [`LeaseRegistry`]: flannel's layout under `<prefix>/config` and
//! `<prefix>/subnets/`, leases that expire unless renewed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::acquire::{self, AcquireError, AcquireRequest, Renewal};
use super::etcd::{EtcdError, EtcdOptions, Listing, Registry};
use super::lease::Lease;
use super::registry::{AcquireFailure, ConfigRead, LeaseRegistry};
use super::watch::{self as lease_watch, LeaseView};
use crate::backoff::Backoff;
use crate::config::NetworkConfig;
use crate::metrics::Metrics;

/// The etcd client with what the daemon's registry needs around it: the metrics that track
/// etcd's health, and the listing the first lease was chosen from.
pub struct EtcdRegistry {
    reg: Registry,
    metrics: Arc<Metrics>,
    first_listing: Mutex<FirstListing>,
}

/// The listing our first lease was chosen from (every lease but ours), handed to the watcher,
/// which starts from it instead of listing again. Later acquisitions keep none.
enum FirstListing {
    NotYet,
    Ready(Listing),
    Watching,
}

impl EtcdRegistry {
    pub fn new(reg: Registry, metrics: Arc<Metrics>) -> Self {
        EtcdRegistry {
            reg,
            metrics,
            first_listing: Mutex::new(FirstListing::NotYet),
        }
    }

    /// Connects to etcd; a flag or file that can never work is fatal, an unreachable etcd is
    /// not.
    pub async fn connect_until_done(
        opts: &EtcdOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EtcdError> {
        let mut backoff = Backoff::new();
        metrics.status.set_registry("etcd", &opts.endpoints);
        loop {
            match Registry::connect_reporting(opts, Some(metrics.clone())).await {
                Ok(reg) => return Ok(Self::new(reg, metrics)),
                Err(e) if e.is_fatal() => return Err(e),
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

    /// Counts a failed call and marks etcd down, or marks it up after a successful one.
    fn observe<T>(&self, result: Result<T, EtcdError>) -> Result<T, EtcdError> {
        match &result {
            Ok(_) => self.metrics.set_etcd_up(true),
            Err(e) => self.metrics.etcd_error(e),
        }
        result
    }
}

impl LeaseRegistry for EtcdRegistry {
    type Error = EtcdError;

    fn config_location(&self) -> String {
        self.reg.config_key()
    }

    async fn read_config(&self) -> Result<ConfigRead, EtcdError> {
        let (value, version) = self.observe(self.reg.get_config().await)?;
        Ok(ConfigRead { value, version })
    }

    /// Returns when the config key changed after `revision`, the watch broke, or a minute passed.
    async fn config_changed(&self, revision: i64) {
        let wait = async {
            let Ok((mut stream, first)) = self.reg.watch_config(revision + 1).await else {
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

    async fn acquire(
        &self,
        config: &NetworkConfig,
        request: &AcquireRequest,
    ) -> Result<Lease, AcquireFailure<EtcdError>> {
        match acquire::acquire_and_list(&self.reg, config, request).await {
            Ok((lease, listing)) => {
                self.metrics.set_etcd_up(true);
                let mut first = self.first_listing.lock().expect("not poisoned");
                if !matches!(*first, FirstListing::Watching) {
                    *first = FirstListing::Ready(listing);
                }
                Ok(lease)
            }
            Err(AcquireError::Etcd(e)) => {
                self.metrics.etcd_error(&e);
                Err(AcquireFailure::Registry(e))
            }
            Err(e) => Err(AcquireFailure::NoLease(Box::new(e))),
        }
    }

    async fn keep(&self, lease: &Lease) -> Result<Renewal, EtcdError> {
        let renewal = acquire::renew(&self.reg, lease).await;
        match &renewal {
            Ok(Renewal::Renewed { .. }) => self.metrics.set_etcd_up(true),
            Ok(_) => {}
            Err(e) => self.metrics.etcd_error(e),
        }
        renewal
    }

    async fn watch_leases(&self, tx: watch::Sender<LeaseView>) {
        let first = match std::mem::replace(
            &mut *self.first_listing.lock().expect("not poisoned"),
            FirstListing::Watching,
        ) {
            FirstListing::Ready(listing) => Some(listing),
            FirstListing::NotYet | FirstListing::Watching => None,
        };
        lease_watch::run(
            self.reg.clone(),
            LeaseView::default(),
            first,
            tx,
            self.metrics.clone(),
        )
        .await
    }
}
