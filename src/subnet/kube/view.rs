//! Every flannel Node as a lease, kept from the Node watcher's events.
//!
//! The table is state, not a queue: each event updates it and the daemon is handed the whole
//! view, so nothing can back up or deadlock (flannel #2252), and a change to one half of a
//! dual-stack Node is as visible as any other. kube-runtime's watcher emits no Delete for Nodes
//! that vanished while it relisted: the relist is collected apart and replaces the table at
//! `InitDone`, which drops them (flannel's informer delivers them as deletes).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;

use super::annotations::AnnotationKeys;
use super::node_lease::{node_name, node_to_lease, Families};
use crate::subnet::lease::Lease;
use crate::subnet::watch::LeaseView;

pub struct NodeTable {
    keys: AnnotationKeys,
    families: Families,
    /// The leases of the flannel Nodes, by Node name.
    nodes: BTreeMap<String, Lease>,
    /// A relist in progress (between `Init` and `InitDone`).
    relist: Option<BTreeMap<String, Lease>>,
    synced: bool,
    /// Counts the changes; the view's revision.
    version: i64,
    /// Nodes that are flannel's but cannot be a lease, with the reason (logged once each).
    refused: BTreeMap<String, String>,
}

impl NodeTable {
    pub fn new(keys: AnnotationKeys, families: Families) -> Self {
        NodeTable {
            keys,
            families,
            nodes: BTreeMap::new(),
            relist: None,
            synced: false,
            version: 0,
            refused: BTreeMap::new(),
        }
    }

    /// The Node's lease, or `None` (not flannel's, or refused with a log line once).
    fn lease_of(&mut self, node: &Node) -> Option<Lease> {
        let name = node_name(node).to_string();
        match node_to_lease(node, &self.keys, self.families) {
            Ok(lease) => {
                self.refused.remove(&name);
                lease
            }
            Err(e) => {
                let why = e.to_string();
                if self.refused.get(&name) != Some(&why) {
                    tracing::warn!("node {name:?} is no peer: {why}");
                    self.refused.insert(name, why);
                }
                None
            }
        }
    }

    fn bump(&mut self, changed: bool) -> bool {
        if changed {
            self.version += 1;
        }
        changed
    }

    /// A Node added or changed; returns whether the view changed.
    pub fn apply(&mut self, node: &Node) -> bool {
        let name = node_name(node).to_string();
        let changed = match self.lease_of(node) {
            Some(lease) => self.nodes.insert(name, lease.clone()).as_ref() != Some(&lease),
            None => self.nodes.remove(&name).is_some(),
        };
        self.bump(changed)
    }

    pub fn delete(&mut self, node: &Node) -> bool {
        let name = node_name(node);
        self.refused.remove(name);
        let changed = self.nodes.remove(name).is_some();
        self.bump(changed)
    }

    /// A relist begins; the table keeps serving the old state until it is done.
    pub fn init(&mut self) {
        self.relist = Some(BTreeMap::new());
    }

    pub fn init_apply(&mut self, node: &Node) {
        let name = node_name(node).to_string();
        if let Some(lease) = self.lease_of(node) {
            self.relist
                .get_or_insert_with(BTreeMap::new)
                .insert(name, lease);
        }
    }

    /// The relist is complete: it replaces the table, so Nodes it did not list are gone.
    /// Returns whether the view changed (always true for the first sync).
    pub fn init_done(&mut self) -> bool {
        let listed = self.relist.take().unwrap_or_default();
        self.refused.retain(|name, _| listed.contains_key(name));
        let changed = listed != self.nodes || !self.synced;
        for gone in self.nodes.keys().filter(|n| !listed.contains_key(*n)) {
            tracing::info!("node {gone:?} is gone (not in the relist)");
        }
        self.nodes = listed;
        self.synced = true;
        self.bump(changed)
    }

    pub fn view(&self) -> LeaseView {
        LeaseView {
            leases: self
                .nodes
                .values()
                .map(|l| {
                    let mut l = l.clone();
                    l.revision = self.version;
                    (l.key, l)
                })
                .collect(),
            revision: self.version,
            synced: self.synced,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet::kube::node_lease::tests::node;

    fn flannel_node(name: &str, cidr: &str, ip: &str) -> Node {
        node(
            name,
            &[cidr],
            &[
                ("kube-subnet-manager", "true"),
                ("backend-type", "host-gw"),
                ("backend-data", "null"),
                ("public-ip", ip),
            ],
        )
    }

    fn table() -> NodeTable {
        NodeTable::new(
            Default::default(),
            Families {
                v4: true,
                v6: false,
            },
        )
    }

    fn keys(t: &NodeTable) -> Vec<String> {
        t.view().leases.keys().map(|k| k.to_string()).collect()
    }

    #[test]
    fn nodes_missing_from_a_relist_are_removed_at_init_done() {
        let mut t = table();
        t.init();
        t.init_apply(&flannel_node("a", "10.244.1.0/24", "198.18.0.1"));
        t.init_apply(&flannel_node("b", "10.244.2.0/24", "198.18.0.2"));
        assert!(!t.view().synced);
        assert!(t.init_done());
        assert_eq!(keys(&t), ["10.244.1.0-24", "10.244.2.0-24"]);

        // The watch broke; b was deleted meanwhile and the relist no longer has it.
        t.init();
        t.init_apply(&flannel_node("a", "10.244.1.0/24", "198.18.0.1"));
        assert_eq!(
            keys(&t).len(),
            2,
            "the old view is served until the relist is done"
        );
        assert!(t.init_done());
        assert_eq!(keys(&t), ["10.244.1.0-24"]);
    }

    #[test]
    fn an_unchanged_relist_is_no_change() {
        let mut t = table();
        t.init();
        t.init_apply(&flannel_node("a", "10.244.1.0/24", "198.18.0.1"));
        t.init_done();
        let before = t.view();
        t.init();
        t.init_apply(&flannel_node("a", "10.244.1.0/24", "198.18.0.1"));
        assert!(!t.init_done());
        assert_eq!(t.view(), before);
    }

    #[test]
    fn apply_and_delete_change_the_view() {
        let mut t = table();
        t.init();
        t.init_done();
        assert!(t.apply(&flannel_node("a", "10.244.1.0/24", "198.18.0.1")));
        assert!(!t.apply(&flannel_node("a", "10.244.1.0/24", "198.18.0.1")));
        assert!(t.apply(&flannel_node("a", "10.244.1.0/24", "198.18.0.9")));
        assert_eq!(
            t.view().leases.values().next().unwrap().attrs.public_ip,
            Some("198.18.0.9".parse().unwrap())
        );
        assert!(t.delete(&flannel_node("a", "10.244.1.0/24", "198.18.0.9")));
        assert!(keys(&t).is_empty());
    }

    #[test]
    fn losing_the_manager_annotation_removes_the_peer() {
        let mut t = table();
        t.init();
        t.init_done();
        t.apply(&flannel_node("a", "10.244.1.0/24", "198.18.0.1"));
        assert!(t.apply(&node(
            "a",
            &["10.244.1.0/24"],
            &[("public-ip", "198.18.0.1")]
        )));
        assert!(keys(&t).is_empty());
    }

    #[test]
    fn a_change_of_the_v4_half_alone_of_a_dual_stack_node_is_seen() {
        let mut t = NodeTable::new(Default::default(), Families { v4: true, v6: true });
        let dual = |ip: &str| {
            node(
                "a",
                &["10.244.1.0/24", "fd00:1::/64"],
                &[
                    ("kube-subnet-manager", "true"),
                    ("backend-type", "vxlan"),
                    ("backend-data", r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}"#),
                    (
                        "backend-v6-data",
                        r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}"#,
                    ),
                    ("public-ip", ip),
                    ("public-ipv6", "fd18::1"),
                ],
            )
        };
        t.init();
        t.init_done();
        t.apply(&dual("198.18.0.1"));
        assert!(t.apply(&dual("198.18.0.7")), "flannel drops this change");
        assert_eq!(
            t.view().leases.values().next().unwrap().attrs.public_ip,
            Some("198.18.0.7".parse().unwrap())
        );
    }
}
