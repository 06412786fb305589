//! What `/v1/status` answers and `flanneld status` prints: our lease, the registry, every peer
//! with the state of its data plane, the last reconciliation, the rejected leases and the udp
//! counters.
//!
//! The daemon's tasks write their parts into the [`Board`] (held by `Metrics`, which every task
//! already shares) as they learn them; the health server puts one [`Status`] together from it
//! per request, so a request never touches the kernel or etcd.

pub mod client;
pub mod table;

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backend::{Effect, KernelChange, ReconcileReport};
use crate::subnet::peers::Filtered;
use crate::subnet::{Lease, PeerSet, SubnetKey};

/// The whole answer of `/v1/status`. Times are seconds since the Unix epoch; `now` is the
/// daemon's clock when it answered, so that ages can be computed without trusting the
/// reader's clock.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub now: u64,
    /// Our lease; `None` until one is acquired.
    pub lease: Option<OwnLease>,
    pub registry: RegistryStatus,
    pub peers: Vec<PeerStatus>,
    /// The last full pass (the kernel compared with every peer).
    pub last_reconcile: Option<ReconcileStatus>,
    /// The last full pass that changed or failed to change anything: it stays when later passes
    /// find nothing to do.
    pub last_repair: Option<ReconcileStatus>,
    pub rejected: Vec<RejectedLease>,
    /// The udp backend's data-path counters; `None` for other backends.
    pub udp: Option<UdpStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OwnLease {
    /// The lease key (`10.5.7.0-24`, `10.5.7.0-24&fd00:5:0:7::-64`).
    pub key: String,
    pub subnet: Option<String>,
    pub ipv6_subnet: Option<String>,
    pub public_ip: Option<String>,
    pub public_ipv6: Option<String>,
    pub backend: String,
    /// When the lease expires unless renewed; `None` for a reservation (never expires) or a
    /// lease held by something else (see `held_by`).
    pub expires: Option<u64>,
    /// Who holds the lease when it is not an expiring etcd lease (in Kubernetes mode: `Node
    /// <name>`); `None` in etcd mode.
    pub held_by: Option<String>,
}

/// Where leases are kept and whether it answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegistryStatus {
    /// `etcd` (later also `kubernetes`).
    pub kind: String,
    /// Whether the last call to the registry succeeded.
    pub up: bool,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub endpoint: String,
    /// From the member probe (every 2 s when there are several members); for a single
    /// endpoint, whether the last call succeeded; `None` before the first probe.
    pub answers: Option<bool>,
}

/// The data plane for one peer, as the last full pass found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlaneState {
    /// Every entry of the peer is in the kernel as wanted.
    Programmed,
    /// An entry was missing and adding it failed.
    Missing,
    /// An entry differs from what the peer wants and correcting it failed.
    Differs,
    /// No full pass has covered this peer yet.
    Unknown,
}

impl PlaneState {
    pub fn is_ok(self) -> bool {
        self == PlaneState::Programmed
    }

    /// As in the JSON.
    pub fn label(self) -> &'static str {
        match self {
            PlaneState::Programmed => "programmed",
            PlaneState::Missing => "missing",
            PlaneState::Differs => "differs",
            PlaneState::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub key: String,
    pub subnet: Option<String>,
    pub ipv6_subnet: Option<String>,
    pub public_ip: Option<String>,
    pub public_ipv6: Option<String>,
    pub backend: String,
    pub backend_data: Option<serde_json::Value>,
    pub backend_v6_data: Option<serde_json::Value>,
    /// When this daemon first saw the lease, and when its value last changed.
    pub first_seen: u64,
    pub changed: u64,
    pub data_plane: PlaneState,
    /// The changes the kernel refused for this peer (what is missing or differs).
    pub differs: Vec<Change>,
    /// What the last full pass found wrong for this peer and fixed.
    pub fixed: Vec<Change>,
}

/// One kernel change, as the status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// `peer` key, or `None` for a stale entry / a device's own route.
    pub peer: Option<String>,
    /// `added` (was missing), `corrected` (differed), `removed` (stale).
    pub effect: String,
    pub what: String,
    pub error: Option<String>,
}

impl From<&KernelChange> for Change {
    fn from(c: &KernelChange) -> Self {
        Change {
            peer: c.peer.map(|k| k.to_string()),
            effect: match c.effect {
                Effect::Added => "added",
                Effect::Repaired => "corrected",
                Effect::Removed => "removed",
            }
            .to_string(),
            what: c.what.clone(),
            error: c.error.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReconcileStatus {
    pub at: u64,
    pub duration_ms: u64,
    pub added: usize,
    pub removed: usize,
    pub repaired: usize,
    /// The pass's changes, the first [`CHANGES_LISTED`] of them (a start on a large cluster
    /// makes thousands; each peer lists its own).
    pub changes: Vec<Change>,
    /// Changes beyond those listed.
    #[serde(default)]
    pub more_changes: usize,
    /// Why the pass failed, when it did.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedLease {
    pub key: String,
    pub public_ip: Option<String>,
    /// The reason's label (`overlaps_older_lease`, ...), as on the metric.
    pub reason: String,
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UdpStatus {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
}

/// Changes listed per pass in `last_reconcile` and `last_repair`.
pub const CHANGES_LISTED: usize = 100;

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the daemon's tasks know, kept for `/v1/status`.
#[derive(Debug, Default)]
pub struct Board {
    inner: Mutex<BoardState>,
}

#[derive(Debug, Default, Clone)]
struct BoardState {
    lease: Option<OwnLease>,
    endpoints: Vec<EndpointStatus>,
    registry_kind: String,
    /// Who holds our lease when it is no expiring etcd lease (`Node <name>`).
    lease_holder: Option<String>,
    plane: PlaneRecord,
}

/// The data plane's part: per peer, when it was seen and what the last full pass found.
#[derive(Debug, Default, Clone)]
pub struct PlaneRecord {
    pub peers: BTreeMap<SubnetKey, PeerStatus>,
    pub last_reconcile: Option<ReconcileStatus>,
    pub last_repair: Option<ReconcileStatus>,
    pub rejected: Vec<RejectedLease>,
}

impl Board {
    fn with<T>(&self, f: impl FnOnce(&mut BoardState) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Our lease, run by `backend` (the lease itself may not say: flannel's udp leases carry
    /// no type).
    pub fn set_lease(&self, lease: &Lease, backend: &str) {
        let own = OwnLease {
            key: lease.key.to_string(),
            subnet: lease.key.ipv4.map(|n| n.to_string()),
            ipv6_subnet: lease.key.ipv6.map(|n| n.to_string()),
            public_ip: lease.attrs.public_ip.map(|a| a.to_string()),
            public_ipv6: lease.attrs.public_ipv6.map(|a| a.to_string()),
            backend: backend.to_string(),
            expires: None,
            held_by: None,
        };
        self.with(|s| {
            s.lease = Some(OwnLease {
                held_by: s.lease_holder.clone(),
                ..own
            })
        });
    }

    /// Who holds our lease, shown as `held_by` (Kubernetes mode: our Node).
    pub fn set_lease_holder(&self, holder: &str) {
        self.with(|s| s.lease_holder = Some(holder.to_string()));
    }

    /// The registry and its endpoints, before any probe has answered.
    pub fn set_registry(&self, kind: &str, endpoints: &[String]) {
        self.with(|s| {
            s.registry_kind = kind.to_string();
            s.endpoints = endpoints
                .iter()
                .map(|e| EndpointStatus {
                    endpoint: e.clone(),
                    answers: None,
                })
                .collect();
        });
    }

    /// What the last member probe found.
    pub fn set_endpoint_answers(&self, answers: &[(String, bool)]) {
        self.with(|s| {
            for (endpoint, ok) in answers {
                match s.endpoints.iter_mut().find(|e| &e.endpoint == endpoint) {
                    Some(e) => e.answers = Some(*ok),
                    None => s.endpoints.push(EndpointStatus {
                        endpoint: endpoint.clone(),
                        answers: Some(*ok),
                    }),
                }
            }
        });
    }

    /// Updates the peers (first seen, changed) and the rejected leases from one filtering.
    pub fn set_peers(&self, filtered: &Filtered, all: &PeerSet, now: u64) {
        self.with(|s| s.plane.observe(&filtered.accepted, now));
        let rejected = filtered
            .rejected
            .iter()
            .map(|(key, r)| RejectedLease {
                key: key.to_string(),
                public_ip: all
                    .get(key)
                    .and_then(|l| l.attrs.public_ip)
                    .map(|a| a.to_string()),
                reason: r.reason.label().to_string(),
                detail: r.detail.clone(),
            })
            .collect();
        self.with(|s| s.plane.rejected = rejected);
    }

    /// Records a full pass: its report (also from a pass some changes of which failed).
    pub fn set_full_pass(
        &self,
        at: u64,
        took: Duration,
        report: &ReconcileReport,
        error: Option<String>,
    ) {
        self.with(|s| s.plane.full_pass(at, took, report, error));
    }

    /// Records an incremental pass (a lease event applied without reading the kernel back).
    pub fn set_update(&self, report: &ReconcileReport, failed: bool) {
        self.with(|s| s.plane.update(report, failed));
    }

    /// Puts the answer together; `up`, `expires` and `udp` come from the metrics.
    pub fn snapshot(&self, up: bool, expires: Option<u64>, udp: Option<UdpStatus>) -> Status {
        let mut s = self.with(|s| s.clone());
        // One endpoint is not probed: the last call through it is its answer.
        if let [only] = s.endpoints.as_mut_slice() {
            only.answers = only.answers.or(Some(up));
        }
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            now: unix_now(),
            lease: s.lease.map(|mut l| {
                l.expires = expires;
                l
            }),
            registry: RegistryStatus {
                kind: s.registry_kind,
                up,
                endpoints: s.endpoints,
            },
            peers: s.plane.peers.into_values().collect(),
            last_reconcile: s.plane.last_reconcile,
            last_repair: s.plane.last_repair,
            rejected: s.plane.rejected,
            udp,
        }
    }
}

impl PlaneRecord {
    /// Keeps the peers in `accepted`: new ones are first seen `now`, changed ones changed `now`.
    pub fn observe(&mut self, accepted: &PeerSet, now: u64) {
        self.peers.retain(|k, _| accepted.contains_key(k));
        for (key, lease) in accepted {
            let fresh = peer_status(lease, now);
            match self.peers.get_mut(key) {
                Some(known) => {
                    let same = known.public_ip == fresh.public_ip
                        && known.public_ipv6 == fresh.public_ipv6
                        && known.backend == fresh.backend
                        && known.backend_data == fresh.backend_data
                        && known.backend_v6_data == fresh.backend_v6_data;
                    if !same {
                        let PeerStatus {
                            first_seen,
                            data_plane,
                            differs,
                            fixed,
                            ..
                        } = known.clone();
                        *known = PeerStatus {
                            first_seen,
                            data_plane,
                            differs,
                            fixed,
                            ..fresh
                        };
                    }
                }
                None => {
                    self.peers.insert(*key, fresh);
                }
            }
        }
    }

    /// An incremental pass programs the peers that are new since the last full pass: when it
    /// succeeded they are programmed; a refused change marks its peer as in a full pass.
    pub fn update(&mut self, report: &ReconcileReport, failed: bool) {
        if !failed {
            for peer in self.peers.values_mut() {
                if peer.data_plane == PlaneState::Unknown {
                    peer.data_plane = PlaneState::Programmed;
                }
            }
        }
        for change in report.changes.iter().filter(|c| c.error.is_some()) {
            if let Some(peer) = change.peer.and_then(|k| self.peers.get_mut(&k)) {
                peer.differs.push(change.into());
                peer.data_plane = match change.effect {
                    Effect::Added => PlaneState::Missing,
                    _ if peer.data_plane == PlaneState::Missing => PlaneState::Missing,
                    _ => PlaneState::Differs,
                };
            }
        }
    }

    /// What a full pass found per peer: refused changes make the peer missing or differing,
    /// applied ones are what it fixed.
    pub fn full_pass(
        &mut self,
        at: u64,
        took: Duration,
        report: &ReconcileReport,
        error: Option<String>,
    ) {
        for peer in self.peers.values_mut() {
            peer.data_plane = PlaneState::Programmed;
            peer.differs.clear();
            peer.fixed.clear();
        }
        for change in &report.changes {
            let Some(peer) = change.peer.and_then(|k| self.peers.get_mut(&k)) else {
                continue;
            };
            if change.error.is_some() {
                peer.differs.push(change.into());
                let state = match change.effect {
                    Effect::Added => PlaneState::Missing,
                    _ => PlaneState::Differs,
                };
                // Missing outranks differs: nothing of it may be there.
                if peer.data_plane != PlaneState::Missing {
                    peer.data_plane = state;
                }
            } else {
                peer.fixed.push(change.into());
            }
        }
        let pass = ReconcileStatus {
            at,
            duration_ms: took.as_millis().try_into().unwrap_or(u64::MAX),
            added: report.added,
            removed: report.removed,
            repaired: report.repaired,
            changes: report
                .changes
                .iter()
                .take(CHANGES_LISTED)
                .map(Change::from)
                .collect(),
            more_changes: report.changes.len().saturating_sub(CHANGES_LISTED),
            error,
        };
        if !pass.changes.is_empty() || pass.error.is_some() {
            self.last_repair = Some(pass.clone());
        }
        self.last_reconcile = Some(pass);
    }
}

fn raw_json(raw: &Option<Box<serde_json::value::RawValue>>) -> Option<serde_json::Value> {
    raw.as_deref()
        .and_then(|r| serde_json::from_str(r.get()).ok())
}

fn peer_status(lease: &Lease, now: u64) -> PeerStatus {
    PeerStatus {
        key: lease.key.to_string(),
        subnet: lease.key.ipv4.map(|n| n.to_string()),
        ipv6_subnet: lease.key.ipv6.map(|n| n.to_string()),
        public_ip: lease.attrs.public_ip.map(|a| a.to_string()),
        public_ipv6: lease.attrs.public_ipv6.map(|a| a.to_string()),
        backend: lease.attrs.backend_type.clone(),
        backend_data: raw_json(&lease.attrs.backend_data),
        backend_v6_data: raw_json(&lease.attrs.backend_v6_data),
        first_seen: now,
        changed: now,
        data_plane: PlaneState::Unknown,
        differs: Vec::new(),
        fixed: Vec::new(),
    }
}

impl Status {
    /// What is wrong, one line each: a peer whose data plane is missing or differs, a failed
    /// last pass, a registry that does not answer, no lease. Empty when all is well.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.lease.is_none() {
            out.push("no lease yet".to_string());
        }
        if !self.registry.up {
            out.push(format!("registry ({}) does not answer", self.registry.kind));
        }
        // A single endpoint's answer is `up`, already reported above.
        for e in self.registry.endpoints.iter().filter(|_| self.registry.up) {
            if e.answers == Some(false) {
                out.push(format!("etcd member {} does not answer", e.endpoint));
            }
        }
        for p in &self.peers {
            if !p.data_plane.is_ok() {
                out.push(format!(
                    "peer {}: data plane {}",
                    p.key,
                    p.data_plane.label()
                ));
            }
        }
        if let Some(err) = self.last_reconcile.as_ref().and_then(|r| r.error.as_ref()) {
            out.push(format!("last reconcile failed: {err}"));
        }
        out
    }
}

/// The JSON body of `/v1/status` (pretty: people read it with curl too).
pub fn to_json(status: &Status) -> String {
    let mut body = serde_json::to_string_pretty(status).expect("the status serializes");
    body.push('\n');
    body
}

#[cfg(test)]
mod tests;
