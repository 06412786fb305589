//! Data planes: the [`Backend`] trait and the registry by type name.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::NetworkConfig;
use crate::iface::ExternalInterface;
use crate::metrics::Metrics;
use crate::netlink::NetlinkError;
use crate::subnet::{Lease, PeerSet, SubnetKey};

mod alloc;
mod common;
pub use common::Effect;
mod hostgw;
mod kind;
pub mod udp;
mod vxlan;
pub mod wireguard;

pub use kind::BackendType;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend {backend}: option {option} {value}: {why}")]
    BadOption {
        backend: &'static str,
        option: &'static str,
        value: String,
        why: String,
    },
    /// The host or the lease lacks what the backend needs (an address, a subnet, a device).
    #[error("backend {backend}: {why}")]
    Setup { backend: &'static str, why: String },
    /// A system call the backend cannot go on without failed.
    #[error("backend {backend}: {context}")]
    Io {
        backend: &'static str,
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A netlink request the backend cannot go on without failed.
    #[error("backend {backend}: netlink: {context}")]
    Netlink {
        backend: &'static str,
        context: String,
        #[source]
        source: NetlinkError,
    },
    /// Some changes of a reconciliation pass failed; the others were applied.
    #[error("backend {backend}: netlink: {}", FailedChange::summary(.failed))]
    Changes {
        backend: &'static str,
        failed: Vec<FailedChange>,
        /// What the pass did and tried, failed changes included (for `/v1/status`).
        report: ReconcileReport,
    },
}

/// A kernel change a reconciliation pass could not make.
#[derive(Debug, Clone)]
pub struct FailedChange {
    /// Which change: the peer it was for, or the operation.
    pub context: String,
    pub error: NetlinkError,
}

impl FailedChange {
    /// Changes beyond this many are counted, not listed, in the error message.
    const SHOWN: usize = 10;

    fn summary(failed: &[FailedChange]) -> String {
        let listed: Vec<String> = failed
            .iter()
            .take(Self::SHOWN)
            .map(|f| format!("{}: {}", f.context, f.error))
            .collect();
        let mut why = format!(
            "{} change(s) failed (the others were applied): {}",
            failed.len(),
            listed.join("; ")
        );
        let more = failed.len().saturating_sub(Self::SHOWN);
        if more > 0 {
            why.push_str(&format!("; and {more} more"));
        }
        why
    }
}

/// What the backend publishes in our lease, and the MTU pods must use.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub backend_type: String,
    pub backend_data: Option<serde_json::Value>,
    pub backend_v6_data: Option<serde_json::Value>,
    pub mtu: u32,
}

/// What one reconciliation pass changed, for logs, metrics and `/v1/status`.
#[derive(Debug, Default, Clone)]
pub struct ReconcileReport {
    pub added: usize,
    pub removed: usize,
    pub repaired: usize,
    /// Each kernel change the pass planned, in order, with its outcome.
    pub changes: Vec<KernelChange>,
}

/// Reports are equal when they count the same: `changes` is the record behind the counts.
impl PartialEq for ReconcileReport {
    fn eq(&self, other: &Self) -> bool {
        (self.added, self.removed, self.repaired) == (other.added, other.removed, other.repaired)
    }
}

impl Eq for ReconcileReport {}

impl ReconcileReport {
    /// Both passes' counts and changes together.
    pub fn plus(&self, other: &ReconcileReport) -> ReconcileReport {
        ReconcileReport {
            added: self.added + other.added,
            removed: self.removed + other.removed,
            repaired: self.repaired + other.repaired,
            changes: self.changes.iter().chain(&other.changes).cloned().collect(),
        }
    }
}

/// One kernel change a pass planned because the kernel differed from the peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelChange {
    /// The peer it is for; `None` for a stale entry or a device's own route.
    pub peer: Option<SubnetKey>,
    pub effect: Effect,
    /// The operation, as the log shows it (`replace route 10.5.7.0/24 via ...`).
    pub what: String,
    /// Why the kernel refused it; `None` when it was applied.
    pub error: Option<String>,
}

/// A data plane. Every method is idempotent: called again after a restart or a missed event,
/// it converges on the same kernel state.
#[async_trait]
pub trait Backend: Send {
    /// Creates or adopts the backend's devices; says what to publish in the lease.
    async fn prepare(&mut self) -> Result<Publish, BackendError>;
    /// Our lease is (re)acquired: give the devices their addresses and routes.
    async fn lease_acquired(&mut self, own: &Lease) -> Result<(), BackendError>;
    /// Makes kernel state match `peers`, adding what is missing and removing what is stale.
    /// `peers` are the leases `crate::subnet::peers::filter` accepted: inside the Network,
    /// never our own subnet or public IP; each backend only picks those of its type.
    async fn reconcile(&mut self, peers: &PeerSet) -> Result<ReconcileReport, BackendError>;
    /// Applies what changed in `peers` since the last pass, as the difference to what that
    /// pass programmed, without reading the kernel back: a lease event costs what it changed,
    /// not a comparison of every peer's entries. Runs [`Backend::reconcile`] instead when the
    /// backend does not know what the kernel holds (no pass yet, a failed change), and right
    /// after a change of its own fails. Repairs of what someone else changed are the full
    /// pass's job. The default is the full pass.
    async fn update(&mut self, peers: &PeerSet) -> Result<ReconcileReport, BackendError> {
        self.reconcile(peers).await
    }
}

/// Context every backend is built from.
#[derive(Debug, Clone)]
pub struct BackendContext {
    pub config: NetworkConfig,
    pub ext: ExternalInterface,
    /// Where the backend's own counters (the udp data path's) are shown at `/metrics`.
    pub metrics: Arc<Metrics>,
}

impl BackendContext {
    /// A context whose backend counters go to a `Metrics` of its own (tests, tools).
    pub fn new(config: NetworkConfig, ext: ExternalInterface) -> Self {
        BackendContext {
            config,
            ext,
            metrics: Arc::default(),
        }
    }

    pub fn public_ip(&self) -> Option<Ipv4Addr> {
        self.ext.public_ip
    }
    pub fn public_ipv6(&self) -> Option<Ipv6Addr> {
        self.ext.public_ipv6
    }
}

/// Builds the backend named by the config's `Backend.Type`.
pub fn create(ctx: BackendContext) -> Result<Box<dyn Backend>, BackendError> {
    Ok(match ctx.config.backend_type {
        BackendType::Alloc => Box::new(alloc::AllocBackend::new(ctx)),
        BackendType::HostGw => Box::new(hostgw::HostGwBackend::new(ctx)?),
        BackendType::Udp => Box::new(udp::UdpBackend::new(ctx)?),
        BackendType::Vxlan => Box::new(vxlan::VxlanBackend::new(ctx)?),
        BackendType::Wireguard => Box::new(wireguard::WireguardBackend::new(ctx)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_chain::Chain;

    fn netlink_error(op: &str) -> NetlinkError {
        NetlinkError::new(op, rtnetlink::Error::RequestFailed)
    }

    #[test]
    fn a_netlink_failure_keeps_the_netlink_error_as_its_cause() {
        let e = common::fatal("vxlan", "creating flannel.1")(netlink_error("add link flannel.1"));
        let cause = std::error::Error::source(&e).expect("the netlink error is the cause");
        assert_eq!(
            cause.to_string(),
            "add link flannel.1: A netlink request failed"
        );
        assert_eq!(
            Chain(&e).to_string(),
            "backend vxlan: netlink: creating flannel.1: add link flannel.1: A netlink request failed"
        );
    }

    #[test]
    fn failed_changes_are_listed_up_to_ten() {
        let failed: Vec<FailedChange> = (0..12)
            .map(|i| FailedChange {
                context: format!("peer 10.5.{i}.0-24"),
                error: netlink_error("replace route"),
            })
            .collect();
        let e = BackendError::Changes {
            backend: "host-gw",
            failed,
            report: ReconcileReport::default(),
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "backend host-gw: netlink: 12 change(s) failed (the others were applied): \
                 peer 10.5.0.0-24: replace route: A netlink request failed; peer 10.5.1.0-24"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("peer 10.5.9.0-24") && !msg.contains("peer 10.5.10.0-24"),
            "{msg}"
        );
        assert!(msg.ends_with("; and 2 more"), "{msg}");
    }
}
