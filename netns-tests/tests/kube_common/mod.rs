//! A cluster whose flanneld run in Kubernetes mode against the real kube-apiserver of the test
//! bed (`netns_tests::kube::ControlPlane`, in the cluster's etcd namespace), authenticated with
//! the token bound to `dist/kube-flannel.yml`'s ClusterRole. The tests make the Nodes and their
//! podCIDRs (there is no controller-manager).
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use netns_tests::kube::{ControlPlane, KubePeers};
use netns_tests::{Backend, Cluster, KubeMode, LeaseInfo};
use serde_json::{json, Value};

pub const PREFIX: &str = "flannel.alpha.coreos.com/";
pub const READY: Duration = Duration::from_secs(60);

/// Declared control plane first: it is dropped (killed) before the cluster's namespaces go.
pub struct KubeCluster {
    pub cp: ControlPlane,
    pub c: Cluster,
    pub kubeconfig: PathBuf,
    pub net_conf: PathBuf,
}

pub fn node_name(i: usize) -> String {
    format!("node{i}")
}

/// Host `i`'s podCIDR: `10.5.<i+1>.0/24` inside the cluster's `10.5.0.0/16`.
pub fn pod_cidr(i: usize) -> String {
    format!("10.5.{}.0/24", i + 1)
}

impl KubeCluster {
    /// `n` hosts of `backend`, not started; the control plane up, the flannel token bound, the
    /// net-conf written (the cluster's config).
    pub fn new(peers: &'static KubePeers, n: usize, backend: Backend) -> KubeCluster {
        Self::with_config(peers, Cluster::builder().hosts(n).backend(backend))
    }

    pub fn with_config(
        peers: &'static KubePeers,
        builder: netns_tests::ClusterBuilder,
    ) -> KubeCluster {
        let c = builder.no_start().build().expect("cluster");
        let cp = ControlPlane::start_in_cluster(peers, &c, false).expect("control plane");
        let kubeconfig = cp.bind_flannel_token().expect("flannel token");
        let net_conf = c.dir().join("net-conf.json");
        std::fs::write(&net_conf, c.config()).expect("net-conf.json");
        let kc = KubeCluster {
            cp,
            c,
            kubeconfig,
            net_conf,
        };
        for h in kc.c.hosts() {
            kc.set_kube(h.index(), &kc.kubeconfig.clone());
        }
        kc
    }

    /// Host `i` runs in Kubernetes mode as Node `node<i>` with `kubeconfig`.
    pub fn set_kube(&self, i: usize, kubeconfig: &std::path::Path) {
        self.c.host(i).set_kube(Some(KubeMode {
            kubeconfig: kubeconfig.to_path_buf(),
            net_conf: self.net_conf.clone(),
            node_name: node_name(i),
            extra_args: Vec::new(),
        }));
    }

    /// Creates Node `node<i>` with its podCIDR and NetworkUnavailable=True (as a kubelet
    /// would), then starts flanneld on host `i`.
    pub fn create_and_start(&self, i: usize) {
        self.create_node(i);
        self.c.host(i).start().expect("start flanneld");
    }

    pub fn create_node(&self, i: usize) {
        // The annotation a kubelet writes on every Node: flannel's Go flanneld panics on a
        // Node without any ("assignment to entry in nil map", kube.go AcquireLease).
        self.cp
            .create_node(
                &node_name(i),
                &[&pod_cidr(i)],
                &[("node.alpha.kubernetes.io/ttl", "0")],
            )
            .expect("create node");
        self.cp
            .set_network_unavailable(&node_name(i), true)
            .expect("NetworkUnavailable=True");
    }

    pub fn start_all(&self) {
        for i in 0..self.c.hosts().len() {
            self.create_and_start(i);
        }
        for h in self.c.hosts() {
            h.wait_ready(READY).expect("ready");
        }
    }

    /// Node `node<i>`'s flannel annotations (prefix cut off).
    pub fn annotations(&self, i: usize) -> serde_json::Map<String, Value> {
        self.cp
            .annotations(&node_name(i))
            .expect("annotations")
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(PREFIX)?.to_string(), v)))
            .collect()
    }

    /// Node `node<i>` as the peer other hosts must program, from its annotations.
    pub fn peer(&self, i: usize) -> LeaseInfo {
        let a = self.annotations(i);
        let data: Value = a
            .get("backend-data")
            .and_then(Value::as_str)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null);
        let value = json!({
            "PublicIP": a.get("public-ip").cloned().unwrap_or(Value::Null),
            "BackendType": a.get("backend-type").cloned().unwrap_or(Value::Null),
            "BackendData": data,
        });
        let key = format!("node/{}", pod_cidr(i).replace('/', "-"));
        LeaseInfo::parse(&key, &value.to_string()).expect("node as a lease")
    }

    /// Polls until every running host but `i` has what peer `i` needs.
    pub fn wait_peer_everywhere(&self, i: usize, timeout: Duration) -> Duration {
        let start = std::time::Instant::now();
        netns_tests::wait_until(timeout, &format!("every host to program node{i}"), || {
            let lease = self.peer(i);
            for h in self
                .c
                .hosts()
                .iter()
                .filter(|h| h.is_running() && h.index() != i)
            {
                self.c.check_peer(h, &lease)?;
            }
            Ok(())
        })
        .expect("peer programmed");
        start.elapsed()
    }
}
