//! Where leases live, as the daemon sees it. The daemon talks to its registry only through
//! [`LeaseRegistry`], so that another registry (Kubernetes Nodes: the lease is the Node's
//! podCIDR, held rather than renewed, peers come from Node annotations, the config from a file)
//! plugs in without touching the daemon or any backend. [`super::etcd_registry`] is the etcd one.

use std::future::Future;

use tokio::sync::watch;

use super::acquire::{AcquireRequest, Renewal};
use super::lease::Lease;
use super::watch::LeaseView;
use crate::config::NetworkConfig;

/// The network config as the registry holds it: the daemon parses and validates it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigRead {
    /// The raw config; `None` while there is none yet.
    pub value: Option<Vec<u8>>,
    /// What [`LeaseRegistry::config_changed`] waits from (etcd: the revision it was read at).
    pub version: i64,
}

/// Why no lease was acquired; both kinds are retried, at different paces.
#[derive(Debug, thiserror::Error)]
pub enum AcquireFailure<E: std::error::Error + 'static> {
    /// The registry failed or could not be reached: retried with backoff.
    #[error(transparent)]
    Registry(E),
    /// The registry works but has no lease for us now (a full network, races lost to other
    /// hosts, no subnet assigned yet): retried after a pause.
    #[error(transparent)]
    NoLease(Box<dyn std::error::Error + Send + Sync>),
}

/// A place where leases live. Each method's future is `Send`, so that the daemon can run it in
/// any task. Errors are for logs: a registry counts its own failures in the metrics.
pub trait LeaseRegistry: Send + Sync + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Where the network config is read from, for messages.
    fn config_location(&self) -> String;

    /// Reads the network config once.
    fn read_config(&self) -> impl Future<Output = Result<ConfigRead, Self::Error>> + Send;

    /// Returns when the config may have changed since it was read at `version`, or after a
    /// while; the caller then reads it again either way.
    fn config_changed(&self, version: i64) -> impl Future<Output = ()> + Send;

    /// Acquires our lease and publishes `request.attrs` with it (public IPs, backend type and
    /// data), where other hosts read them.
    fn acquire(
        &self,
        config: &NetworkConfig,
        request: &AcquireRequest,
    ) -> impl Future<Output = Result<Lease, AcquireFailure<Self::Error>>> + Send;

    /// Keeps `lease` ours for another term: renews it, or says it needs no renewal (held for
    /// as long as the registry keeps it), or that it expired and must be acquired again.
    fn keep(&self, lease: &Lease) -> impl Future<Output = Result<Renewal, Self::Error>> + Send;

    /// Watches every lease, ours included, for ever: publishes the complete view to `tx` after
    /// every change. A lease missing from a synced view at least as new as ours is lost.
    fn watch_leases(&self, tx: watch::Sender<LeaseView>) -> impl Future<Output = ()> + Send;

    /// What it means here that `lease` vanished from the view, for the log line.
    fn lease_gone_message(&self, lease: &Lease) -> String {
        format!("lease {} was deleted from etcd", lease.key)
    }
}
