//! The Kubernetes registry behind [`LeaseRegistry`] (`--kube-subnet-mgr`): our lease is our
//! Node's podCIDR(s), held for as long as the Node exists; peers are the Nodes flannel
//! annotated; the network config is a file. Drop-in compatible with flannel's
//! `pkg/subnet/kube`: same annotations, same patch, same condition.

pub mod annotations;
pub mod client;
pub mod lean_node;
pub mod node_lease;
pub mod patch;
pub mod view;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;

use self::annotations::AnnotationKeys;
use self::client::{ClientError, NodeIdentity};
use self::lean_node::LeanNode;
use self::node_lease::{contains, node_name, Families, NodeError};
use self::view::NodeTable;
use super::acquire::{AcquireRequest, Renewal};
use super::lease::{Lease, LeaseAttrs, SubnetKey};
use super::registry::{AcquireFailure, ConfigRead, LeaseRegistry};
use super::watch::LeaseView;
use crate::backoff::Backoff;
use crate::config::NetworkConfig;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(transparent)]
    Setup(#[from] ClientError),
    #[error("{what}: {err}")]
    Api {
        what: String,
        #[source]
        err: kube::Error,
    },
    #[error(
        "{what}: forbidden ({why}); flanneld's ClusterRole needs nodes get/list/watch, \
         nodes/status patch and pods get"
    )]
    Forbidden { what: String, why: String },
    #[error("reading the network config {path}: {err}")]
    NetConf {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("Pod {namespace}/{name} has no spec.nodeName yet")]
    PodNotScheduled { namespace: String, name: String },
}

impl KubeError {
    fn api(what: impl Into<String>, err: kube::Error) -> Self {
        let what = what.into();
        match &err {
            kube::Error::Api(status) if status.code == 403 => KubeError::Forbidden {
                what,
                why: status.message.clone(),
            },
            _ => KubeError::Api { what, err },
        }
    }

    fn is_not_found(&self) -> bool {
        matches!(self, KubeError::Api { err: kube::Error::Api(s), .. } if s.code == 404)
    }
}

/// What Kubernetes mode is started with (flags and environment).
#[derive(Debug, Clone)]
pub struct KubeOptions {
    pub api_url: String,
    pub kubeconfig: String,
    pub keys: AnnotationKeys,
    pub net_config_path: PathBuf,
}

/// What our Node said when we started: `node-public-ip[v6]` and the VTEP MACs it published.
#[derive(Debug, Clone, Default)]
pub struct NodeAtStart {
    pub public_ip: Option<std::net::Ipv4Addr>,
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    pub vtep_mac: Option<String>,
    pub vtep_mac_v6: Option<String>,
}

pub struct KubeRegistry {
    nodes: Api<Node>,
    node: String,
    keys: AnnotationKeys,
    net_config_path: PathBuf,
    metrics: Arc<Metrics>,
    /// Set by `acquire`: the attributes our Node must carry (put back when changed), and the
    /// families peers need; `None` before the first lease.
    ours: Mutex<Option<Published>>,
}

#[derive(Debug, Clone)]
struct Published {
    attrs: LeaseAttrs,
    families: Families,
    /// `alloc` needs no peers: no Node watch (flannel #1617).
    watch_nodes: bool,
}

/// Retries `f` with backoff while the API server cannot be reached, logging a clear line
/// once per distinct error; fatal errors (`give_up`) are returned.
async fn until_answered<T, F, Fut>(what: &str, mut f: F) -> Result<T, KubeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, KubeError>>,
{
    let mut backoff = Backoff::new();
    let mut last = String::new();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e @ KubeError::Setup(_)) => return Err(e),
            Err(e) => {
                let msg = e.to_string();
                if msg != last {
                    tracing::warn!("{what}: waiting for the Kubernetes API server: {msg}");
                    last = msg;
                }
                backoff.wait().await;
            }
        }
    }
}

impl KubeRegistry {
    /// Builds the client and finds our Node's name, waiting for the API server when the name
    /// comes from our Pod (flannel exits instead).
    pub async fn connect(opts: &KubeOptions, metrics: Arc<Metrics>) -> Result<Self, KubeError> {
        client::check_flannel_tuning(|k| std::env::var(k).ok()).map_err(ClientError::Client)?;
        let identity = client::node_identity(|k| std::env::var(k).ok())?;
        let config = client::client_config(&opts.api_url, &opts.kubeconfig).await?;
        let url = config.cluster_url.to_string();
        let client =
            kube::Client::try_from(config).map_err(|e| ClientError::Client(e.to_string()))?;
        metrics.status.set_registry("kubernetes", &[url]);
        let node = match identity {
            NodeIdentity::Name(name) => name,
            NodeIdentity::Pod { namespace, name } => {
                let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
                until_answered("finding our Node from our Pod", || async {
                    let pod = pods
                        .get(&name)
                        .await
                        .map_err(|e| KubeError::api(format!("GET Pod {namespace}/{name}"), e))?;
                    pod.spec
                        .and_then(|s| s.node_name)
                        .filter(|n| !n.is_empty())
                        .ok_or_else(|| KubeError::PodNotScheduled {
                            namespace: namespace.clone(),
                            name: name.clone(),
                        })
                })
                .await?
            }
        };
        tracing::info!("Kubernetes mode: this is Node {node:?}");
        metrics.status.set_lease_holder(&format!("Node {node}"));
        Ok(KubeRegistry {
            nodes: Api::all(client),
            node,
            keys: opts.keys.clone(),
            net_config_path: opts.net_config_path.clone(),
            metrics,
            ours: Mutex::new(None),
        })
    }

    pub fn node_name(&self) -> &str {
        &self.node
    }

    async fn get_own(&self) -> Result<Node, KubeError> {
        let r = self.nodes.get(&self.node).await;
        self.observe(&r);
        r.map_err(|e| KubeError::api(format!("GET Node {}", self.node), e))
    }

    fn observe<T>(&self, r: &Result<T, kube::Error>) {
        match r {
            Ok(_) => self.metrics.set_etcd_up(true),
            Err(kube::Error::Api(_)) => self.metrics.set_etcd_up(true),
            Err(e) => self.metrics.etcd_error(e),
        }
    }

    /// Our Node's `node-public-ip[v6]` and published VTEP MACs, waiting for the API server; a
    /// Node that does not exist yet says nothing.
    pub async fn node_at_start(&self) -> Result<NodeAtStart, KubeError> {
        let node = until_answered("reading our Node", || async {
            match self.get_own().await {
                Ok(n) => Ok(Some(n)),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await?;
        let Some(node) = node else {
            return Ok(NodeAtStart::default());
        };
        let (public_ip, public_ipv6) = node_lease::node_public_ips(&node, &self.keys);
        let (vtep_mac, vtep_mac_v6) = node_lease::stored_vtep_macs(&node, &self.keys);
        Ok(NodeAtStart {
            public_ip,
            public_ipv6,
            vtep_mac,
            vtep_mac_v6,
        })
    }

    async fn patch_status(&self, what: &str, body: serde_json::Value) -> Result<(), KubeError> {
        let r = self
            .nodes
            .patch_status(&self.node, &PatchParams::default(), &Patch::Strategic(body))
            .await;
        self.observe(&r);
        r.map(|_| ())
            .map_err(|e| KubeError::api(format!("{what} (PATCH Node {} status)", self.node), e))
    }

    /// flannel's `CompleteLease`: NetworkUnavailable False, once the subnet file is written.
    /// Retried a few times; a failure is logged, never fatal.
    pub async fn set_network_available(&self) {
        let mut backoff = Backoff::with_max(Duration::from_secs(5));
        for attempt in 1..=5 {
            let body = patch::network_available_patch(&patch::now_rfc3339());
            match self
                .patch_status("setting NetworkUnavailable=False", body)
                .await
            {
                Ok(()) => {
                    tracing::info!("Node {}: NetworkUnavailable=False", self.node);
                    return;
                }
                Err(e) if attempt == 5 => tracing::error!("{e}; giving up"),
                Err(e) => {
                    tracing::warn!("{e}; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    /// Puts our annotations back when our Node lost or changed them (flannel only writes them
    /// at start).
    async fn restore_annotations(&self, node: &Node) {
        let Some(ours) = self.ours.lock().expect("not poisoned").clone() else {
            return;
        };
        let empty = BTreeMap::new();
        let current = node.metadata.annotations.as_ref().unwrap_or(&empty);
        let Some(body) = patch::annotation_patch(current, &self.keys, &ours.attrs) else {
            return;
        };
        tracing::info!(
            "Node {}: annotations differ from what this node publishes, writing them again: {body}",
            self.node
        );
        let sent = tokio::time::timeout(
            Duration::from_secs(10),
            self.patch_status("restoring our annotations", body),
        )
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e}"),
            Err(_) => tracing::warn!("restoring our annotations timed out"),
        }
    }
}

/// The Node watch's retry pace: 200 ms doubling to 5 s (kube-runtime's default grows to 30 s,
/// so peers that changed during an API server outage would be applied up to 30 s after it).
#[derive(Debug, Clone, Copy)]
struct WatchBackoff(Duration);

const WATCH_RETRY_FIRST: Duration = Duration::from_millis(200);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff(WATCH_RETRY_FIRST)
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.0;
        self.0 = (self.0 * 2).min(WATCH_RETRY_MAX);
        Some(now)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.0 = WATCH_RETRY_FIRST;
    }
}

/// Why there is no lease for us yet, as `acquire` reports it.
fn no_lease(e: impl std::error::Error + Send + Sync + 'static) -> AcquireFailure<KubeError> {
    AcquireFailure::NoLease(Box::new(e))
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Waiting(String);

/// Our lease from our Node: its podCIDR(s), checked against the config as flannel does.
fn own_key(node: &Node, config: &NetworkConfig) -> Result<SubnetKey, String> {
    let name = node_name(node);
    let cidrs = node_lease::pod_cidrs(node).map_err(|e| match e {
        NodeError::NoPodCidr { .. } => format!("{e}; waiting for one to be assigned"),
        e => e.to_string(),
    })?;
    let mut key = SubnetKey {
        ipv4: None,
        ipv6: None,
    };
    if let Some(f) = config.v4 {
        let cidr = cidrs.v4.ok_or(format!(
            "node {name:?} has no IPv4 podCIDR but the network config enables IPv4"
        ))?;
        if !contains(f.network, cidr) {
            return Err(format!(
                "subnet \"{}\" specified in the flannel net config doesn't contain \"{cidr}\" \
                 PodCIDR of the \"{name}\" node",
                f.network
            ));
        }
        key.ipv4 = Some(cidr);
    }
    if let Some(f) = config.v6 {
        let cidr = cidrs.v6.ok_or(format!(
            "node {name:?} has no IPv6 podCIDR but the network config enables IPv6"
        ))?;
        if !contains(f.network, cidr) {
            return Err(format!(
                "subnet \"{}\" specified in the flannel net config doesn't contain \"{cidr}\" \
                 IPv6 PodCIDR of the \"{name}\" node",
                f.network
            ));
        }
        key.ipv6 = Some(cidr);
    }
    Ok(key)
}

/// Our lease leaves the Node view when our Node is deleted or stops being a flannel peer.
fn lease_gone_message(node: &str, key: &SubnetKey) -> String {
    format!(
        "Node {node:?} with our lease {key} is gone from the Nodes flannel watches (the Node was \
         deleted, or lost its podCIDR or flannel annotations); acquiring it again"
    )
}

impl LeaseRegistry for KubeRegistry {
    type Error = KubeError;

    fn config_location(&self) -> String {
        self.net_config_path.display().to_string()
    }

    async fn read_config(&self) -> Result<ConfigRead, KubeError> {
        match tokio::fs::read(&self.net_config_path).await {
            Ok(bytes) => Ok(ConfigRead {
                value: Some(bytes),
                version: 0,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigRead::default()),
            Err(err) => Err(KubeError::NetConf {
                path: self.net_config_path.clone(),
                err,
            }),
        }
    }

    /// The file is read again every few seconds (a ConfigMap update replaces it).
    async fn config_changed(&self, _version: i64) {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }

    async fn acquire(
        &self,
        config: &NetworkConfig,
        request: &AcquireRequest,
    ) -> Result<Lease, AcquireFailure<KubeError>> {
        let node = match self.get_own().await {
            Ok(n) => n,
            Err(e) if e.is_not_found() => {
                return Err(no_lease(Waiting(format!(
                    "Node {:?} does not exist (yet); waiting for it",
                    self.node
                ))))
            }
            Err(e) => return Err(AcquireFailure::Registry(e)),
        };
        // The annotations go first, as in flannel: a podCIDR outside the network still
        // leaves them written.
        if node_lease::pod_cidrs(&node).is_ok() {
            let empty = BTreeMap::new();
            let current = node.metadata.annotations.as_ref().unwrap_or(&empty);
            if let Some(body) = patch::annotation_patch(current, &self.keys, &request.attrs) {
                tracing::info!("Node {}: writing our annotations {body}", self.node);
                self.patch_status("writing our annotations", body)
                    .await
                    .map_err(AcquireFailure::Registry)?;
            }
        }
        let key = own_key(&node, config).map_err(|e| no_lease(Waiting(e)))?;
        *self.ours.lock().expect("not poisoned") = Some(Published {
            attrs: request.attrs.clone(),
            families: Families {
                v4: config.v4.is_some(),
                v6: config.v6.is_some(),
            },
            watch_nodes: config.backend_type.to_string() != "alloc",
        });
        Ok(Lease {
            key,
            attrs: request.attrs.clone(),
            etcd_lease: None,
            revision: 0,
            create_revision: node
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or_default(),
        })
    }

    fn lease_gone_message(&self, lease: &Lease) -> String {
        lease_gone_message(&self.node, &lease.key)
    }

    /// A Node's podCIDR is ours for as long as the Node exists: nothing to renew.
    async fn keep(&self, _lease: &Lease) -> Result<Renewal, KubeError> {
        Ok(Renewal::NotNeeded)
    }

    async fn watch_leases(&self, tx: watch::Sender<LeaseView>) {
        let ours = self.ours.lock().expect("not poisoned").clone();
        let Some(ours) = ours.filter(|o| o.watch_nodes) else {
            tracing::info!("backend alloc: not watching Nodes");
            tx.send_replace(LeaseView {
                synced: true,
                ..LeaseView::default()
            });
            return std::future::pending().await;
        };
        let mut table = NodeTable::new(self.keys.clone(), ours.families);
        // Nodes are parsed as LeanNode: only the fields flannel reads are allocated.
        let nodes: Api<LeanNode> = Api::all(self.nodes.clone().into_client());
        let stream = watcher(nodes, watcher::Config::default()).backoff(WatchBackoff::default());
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(ev) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("watching Nodes again");
                    }
                    self.metrics.set_etcd_up(true);
                    ev
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(
                            "watching Nodes failed, retrying (the data plane stays): {e}"
                        );
                    }
                    self.metrics.etcd_error(&e);
                    continue;
                }
            };
            let changed = match event {
                watcher::Event::Init => {
                    table.init();
                    false
                }
                watcher::Event::InitApply(LeanNode(node)) => {
                    if node_name(&node) == self.node {
                        self.restore_annotations(&node).await;
                    }
                    table.init_apply(&node);
                    false
                }
                watcher::Event::InitDone => table.init_done(),
                watcher::Event::Apply(LeanNode(node)) => {
                    if node_name(&node) == self.node {
                        self.restore_annotations(&node).await;
                    }
                    table.apply(&node)
                }
                watcher::Event::Delete(LeanNode(node)) => table.delete(&node),
            };
            if changed {
                tx.send_replace(table.view());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet::kube::node_lease::tests::node;

    fn config(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn the_watch_retries_within_five_seconds_and_starts_over_after_a_reset() {
        use kube::runtime::utils::Backoff;
        let mut b = WatchBackoff::default();
        let waits: Vec<u64> = b.by_ref().take(7).map(|d| d.as_millis() as u64).collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_millis(200)));
    }

    #[test]
    fn own_key_is_the_podcidr_inside_the_network() {
        let c = config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
        let key = own_key(&node("n1", &["10.244.3.0/24"], &[]), &c).unwrap();
        assert_eq!(key.to_string(), "10.244.3.0-24");
        let err = own_key(&node("n1", &["10.9.3.0/24"], &[]), &c).unwrap_err();
        assert_eq!(
            err,
            "subnet \"10.244.0.0/16\" specified in the flannel net config doesn't contain \
             \"10.9.3.0/24\" PodCIDR of the \"n1\" node"
        );
        let err = own_key(&node("n1", &[], &[]), &c).unwrap_err();
        assert!(
            err.contains("no podCIDR yet") && err.contains("waiting"),
            "{err}"
        );
    }

    #[test]
    fn a_lost_lease_is_told_in_terms_of_the_node() {
        let msg = lease_gone_message("n1", &"10.244.3.0-24".parse().unwrap());
        assert!(
            msg.contains("Node \"n1\"") && msg.contains("10.244.3.0-24") && msg.contains("deleted"),
            "{msg}"
        );
        assert!(!msg.contains("etcd"), "{msg}");
    }

    #[test]
    fn own_key_in_dual_stack_needs_both_families() {
        let c = config(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/56","Backend":{"Type":"vxlan"}}"#,
        );
        let key = own_key(&node("n1", &["10.244.3.0/24", "fd00:10:0:3::/64"], &[]), &c).unwrap();
        assert_eq!(key.to_string(), "10.244.3.0-24&fd00:10:0:3::-64");
        let err = own_key(&node("n1", &["10.244.3.0/24"], &[]), &c).unwrap_err();
        assert!(err.contains("no IPv6 podCIDR"), "{err}");
    }
}
