//! List-then-watch over `<prefix>/subnets/`: keeps a complete view of every lease in etcd.
//!
//! The view is level-triggered state, not an event log: after a compaction or a broken stream
//! the watcher lists again and diffs, so no add or remove is lost even when events were.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::EventType;
use tokio::sync::watch;

use super::etcd::{EtcdError, Listing, Registry};
use super::lease::{Lease, PeerSet, SubnetKey};
use super::malformed::MalformedTracker;
use crate::backoff::Backoff;
use crate::metrics::Metrics;

/// Every lease under the prefix (ours included) as of `revision`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseView {
    pub leases: PeerSet,
    pub revision: i64,
    /// False until the first listing arrived.
    pub synced: bool,
}

/// What changed between two states of the view.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<SubnetKey>,
    pub changed: Vec<SubnetKey>,
    pub removed: Vec<SubnetKey>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

impl LeaseView {
    /// Replaces the view with a full listing; returns the difference to what was known.
    pub fn replace_all(&mut self, leases: Vec<Lease>, revision: i64) -> Changes {
        let new: PeerSet = leases.into_iter().map(|l| (l.key, l)).collect();
        let mut changes = Changes::default();
        for (key, lease) in &new {
            match self.leases.get(key) {
                None => changes.added.push(*key),
                Some(old) if old.attrs != lease.attrs || old.etcd_lease != lease.etcd_lease => {
                    changes.changed.push(*key)
                }
                Some(_) => {}
            }
        }
        changes.removed = self
            .leases
            .keys()
            .filter(|k| !new.contains_key(k))
            .copied()
            .collect();
        self.leases = new;
        self.revision = revision;
        self.synced = true;
        changes
    }

    pub fn apply_put(&mut self, lease: Lease) -> Changes {
        self.revision = self.revision.max(lease.revision);
        let key = lease.key;
        match self.leases.insert(key, lease) {
            None => Changes {
                added: vec![key],
                ..Default::default()
            },
            Some(old) if old != self.leases[&key] => Changes {
                changed: vec![key],
                ..Default::default()
            },
            Some(_) => Changes::default(),
        }
    }

    pub fn apply_delete(&mut self, key: SubnetKey, revision: i64) -> Changes {
        self.revision = self.revision.max(revision);
        match self.leases.remove(&key) {
            Some(_) => Changes {
                removed: vec![key],
                ..Default::default()
            },
            None => Changes::default(),
        }
    }
}

/// Runs list-then-watch forever, publishing the view after every change. Starts from `view`
/// (normally empty; a saved view resumes watching at its revision), or from `first`, a listing
/// already made (the one our lease was chosen from), instead of listing again.
pub async fn run(
    reg: Registry,
    mut view: LeaseView,
    mut first: Option<Listing>,
    tx: watch::Sender<LeaseView>,
    metrics: Arc<Metrics>,
) {
    let mut malformed = MalformedTracker::new();
    // Re-listing is one range request: retry it often, so that peers that joined while etcd
    // was unreachable are programmed within seconds of etcd's return, not up to 10 s later.
    let mut backoff = Backoff::with_max(Duration::from_secs(2));
    loop {
        if !view.synced {
            let listed = match first.take() {
                Some(listing) => Ok(listing),
                None => reg.list_subnets().await,
            };
            match listed {
                Ok(listing) => {
                    Metrics::inc(&metrics.watch_relists);
                    metrics.set_etcd_up(true);
                    count_malformed(&listing, &mut malformed, &metrics);
                    let changes = view.replace_all(listing.leases, listing.revision);
                    log_changes("list", &changes);
                    tx.send_replace(view.clone());
                    backoff.reset();
                }
                Err(e) => {
                    metrics.etcd_error(&e);
                    tracing::warn!("listing subnets failed, retrying: {e}");
                    backoff.wait().await;
                    continue;
                }
            }
        }
        match watch_from(&reg, &mut view, &tx, &metrics, &mut malformed).await {
            WatchEnd::Compacted(rev) => {
                tracing::info!("watch revision compacted (at {rev}): listing again");
                view.synced = false;
            }
            WatchEnd::Failed(e) => {
                metrics.etcd_error(&e);
                tracing::warn!("watch of subnets broke, listing again: {e}");
                view.synced = false;
                backoff.wait().await;
            }
        }
    }
}

enum WatchEnd {
    Compacted(i64),
    Failed(EtcdError),
}

async fn watch_from(
    reg: &Registry,
    view: &mut LeaseView,
    tx: &watch::Sender<LeaseView>,
    metrics: &Metrics,
    malformed: &mut MalformedTracker,
) -> WatchEnd {
    let (mut stream, first) = match reg.watch_subnets(view.revision + 1).await {
        Ok(s) => s,
        Err(e) => return WatchEnd::Failed(e),
    };
    let mut first = Some(first);
    loop {
        let next = match first.take() {
            Some(resp) => Ok(Some(resp)),
            None => stream.message().await,
        };
        let resp = match next {
            Ok(Some(resp)) => resp,
            Ok(None) => return WatchEnd::Failed(EtcdError::Other("watch stream ended".into())),
            Err(e) => return WatchEnd::Failed(e.into()),
        };
        metrics.set_etcd_up(true);
        if resp.compact_revision() > 0 {
            return WatchEnd::Compacted(resp.compact_revision());
        }
        if resp.canceled() {
            return WatchEnd::Failed(EtcdError::Other(format!(
                "watch canceled: {}",
                resp.cancel_reason()
            )));
        }
        let mut changes = Changes::default();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let c = match ev.event_type() {
                EventType::Put => match reg.parse_kv(kv) {
                    Ok(lease) => {
                        malformed.forget(kv.key());
                        view.apply_put(lease)
                    }
                    Err(e) => {
                        malformed.note(kv.key(), kv.mod_revision(), &e, metrics);
                        // A lease replaced by garbage is no longer a usable peer.
                        match reg.parse_deleted_key(kv) {
                            Some(key) => view.apply_delete(key, kv.mod_revision()),
                            None => Changes::default(),
                        }
                    }
                },
                EventType::Delete => {
                    malformed.forget(kv.key());
                    match reg.parse_deleted_key(kv) {
                        Some(key) => view.apply_delete(key, kv.mod_revision()),
                        None => Changes::default(),
                    }
                }
            };
            changes.added.extend(c.added);
            changes.changed.extend(c.changed);
            changes.removed.extend(c.removed);
        }
        if let Some(h) = resp.header() {
            view.revision = view.revision.max(h.revision());
        }
        if !changes.is_empty() {
            log_changes("watch", &changes);
            tx.send_replace(view.clone());
        }
    }
}

fn count_malformed(listing: &Listing, malformed: &mut MalformedTracker, metrics: &Metrics) {
    malformed.retain_listed(listing.malformed.iter().map(|(key, _, _)| key.as_bytes()));
    for (key, rev, err) in &listing.malformed {
        malformed.note(key.as_bytes(), *rev, err, metrics);
    }
}

fn log_changes(source: &str, c: &Changes) {
    for k in &c.added {
        tracing::info!(source, "lease added: {k}");
    }
    for k in &c.changed {
        tracing::info!(source, "lease changed: {k}");
    }
    for k in &c.removed {
        tracing::info!(source, "lease removed: {k}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet::LeaseAttrs;

    fn lease(key: &str, ip: &str, rev: i64) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            attrs: LeaseAttrs::from_json(
                "k",
                format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null}}"#).as_bytes(),
            )
            .unwrap(),
            etcd_lease: Some(7),
            revision: rev,
            create_revision: rev,
        }
    }

    #[test]
    fn relist_diffs_against_known_state() {
        let mut v = LeaseView::default();
        let c = v.replace_all(
            vec![
                lease("10.5.1.0-24", "1.1.1.1", 2),
                lease("10.5.2.0-24", "1.1.1.2", 3),
            ],
            3,
        );
        assert_eq!(c.added.len(), 2);
        let c = v.replace_all(
            vec![
                lease("10.5.2.0-24", "9.9.9.9", 5),
                lease("10.5.3.0-24", "1.1.1.3", 4),
            ],
            5,
        );
        assert_eq!(c.added, vec!["10.5.3.0-24".parse().unwrap()]);
        assert_eq!(c.changed, vec!["10.5.2.0-24".parse().unwrap()]);
        assert_eq!(c.removed, vec!["10.5.1.0-24".parse().unwrap()]);
        assert_eq!(v.revision, 5);
    }

    #[test]
    fn put_and_delete_events() {
        let mut v = LeaseView::default();
        assert_eq!(
            v.apply_put(lease("10.5.1.0-24", "1.1.1.1", 2)).added.len(),
            1
        );
        assert!(v.apply_put(lease("10.5.1.0-24", "1.1.1.1", 2)).is_empty());
        assert_eq!(
            v.apply_put(lease("10.5.1.0-24", "1.1.1.9", 3))
                .changed
                .len(),
            1
        );
        assert_eq!(
            v.apply_delete("10.5.1.0-24".parse().unwrap(), 4)
                .removed
                .len(),
            1
        );
        assert!(v.apply_delete("10.5.1.0-24".parse().unwrap(), 5).is_empty());
        assert_eq!(v.revision, 5);
    }
}
