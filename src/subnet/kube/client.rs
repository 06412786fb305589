//! The client configuration (`--kube-api-url`, `--kubeconfig-file`, in-cluster) and which
//! Node we are (`NODE_NAME`, or `POD_NAME` + `POD_NAMESPACE` and the Pod's `spec.nodeName`).

use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--kubeconfig-file {path}: {why}")]
    Kubeconfig { path: String, why: String },
    #[error("--kube-api-url {url:?}: {why}")]
    Url { url: String, why: String },
    #[error(
        "no Kubernetes client configuration: --kube-api-url and --kubeconfig-file are empty \
         and the in-cluster config failed: {0}"
    )]
    NoConfig(String),
    #[error(
        "which Node is this? Set NODE_NAME, or POD_NAME and POD_NAMESPACE (missing: {missing})"
    )]
    NoIdentity { missing: &'static str },
    #[error("building the Kubernetes client: {0}")]
    Client(String),
}

/// flannel's `clientcmd.BuildConfigFromFlags(url, kubeconfig)`, with the in-cluster config when
/// both are empty.
pub async fn client_config(url: &str, kubeconfig: &str) -> Result<kube::Config, ClientError> {
    let bad_url = |why: String| ClientError::Url {
        url: url.to_string(),
        why,
    };
    if kubeconfig.is_empty() {
        if url.is_empty() {
            return kube::Config::incluster().map_err(|e| ClientError::NoConfig(e.to_string()));
        }
        return Ok(kube::Config::new(
            url.parse().map_err(|e| bad_url(format!("{e}")))?,
        ));
    }
    let bad_file = |why: String| ClientError::Kubeconfig {
        path: kubeconfig.to_string(),
        why,
    };
    let file = Kubeconfig::read_from(kubeconfig).map_err(|e| bad_file(e.to_string()))?;
    let mut config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .map_err(|e| bad_file(e.to_string()))?;
    if !url.is_empty() {
        config.cluster_url = url.parse().map_err(|e| bad_url(format!("{e}")))?;
    }
    Ok(config)
}

/// How we learn our Node's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeIdentity {
    /// `NODE_NAME`.
    Name(String),
    /// `POD_NAMESPACE`/`POD_NAME`: the Node is the Pod's `spec.nodeName`.
    Pod { namespace: String, name: String },
}

/// From the environment, as flannel reads it (`env` looks a variable up; empty is unset).
pub fn node_identity(env: impl Fn(&str) -> Option<String>) -> Result<NodeIdentity, ClientError> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(name) = var("NODE_NAME") {
        return Ok(NodeIdentity::Name(name));
    }
    match (var("POD_NAMESPACE"), var("POD_NAME")) {
        (Some(namespace), Some(name)) => Ok(NodeIdentity::Pod { namespace, name }),
        (None, Some(_)) => Err(ClientError::NoIdentity {
            missing: "NODE_NAME, POD_NAMESPACE",
        }),
        (Some(_), None) => Err(ClientError::NoIdentity {
            missing: "NODE_NAME, POD_NAME",
        }),
        (None, None) => Err(ClientError::NoIdentity {
            missing: "NODE_NAME, POD_NAME, POD_NAMESPACE",
        }),
    }
}

/// `EVENT_QUEUE_DEPTH` and `CONT_WHEN_CACHE_NOT_READY` are accepted for flannel's manifests;
/// there is no event queue to size or cache to give up on here. flannel exits on a depth that
/// is not a number, and so do we, naming it.
pub fn check_flannel_tuning(env: impl Fn(&str) -> Option<String>) -> Result<(), String> {
    if let Some(depth) = env("EVENT_QUEUE_DEPTH").filter(|v| !v.is_empty()) {
        depth
            .parse::<i64>()
            .map_err(|_| format!("EVENT_QUEUE_DEPTH={depth:?} is not a number"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn node_name_wins_over_the_pod() {
        let id = node_identity(env(&[
            ("NODE_NAME", "n1"),
            ("POD_NAME", "p"),
            ("POD_NAMESPACE", "kube-flannel"),
        ]));
        assert_eq!(id.unwrap(), NodeIdentity::Name("n1".into()));
    }

    #[test]
    fn the_pod_needs_both_variables() {
        let id = node_identity(env(&[("POD_NAME", "p"), ("POD_NAMESPACE", "ns")])).unwrap();
        assert_eq!(
            id,
            NodeIdentity::Pod {
                namespace: "ns".into(),
                name: "p".into()
            }
        );
        let err = node_identity(env(&[("POD_NAME", "p")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("POD_NAMESPACE") && err.contains("NODE_NAME"),
            "{err}"
        );
        let err = node_identity(env(&[("NODE_NAME", "")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("NODE_NAME"), "{err}");
    }

    #[test]
    fn event_queue_depth_must_be_a_number() {
        assert!(check_flannel_tuning(env(&[("EVENT_QUEUE_DEPTH", "5000")])).is_ok());
        assert!(check_flannel_tuning(env(&[("EVENT_QUEUE_DEPTH", "-1")])).is_ok());
        let err = check_flannel_tuning(env(&[("EVENT_QUEUE_DEPTH", "lots")])).unwrap_err();
        assert!(
            err.contains("EVENT_QUEUE_DEPTH") && err.contains("lots"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_names_the_flag_and_path() {
        let err = client_config("", "/nonexistent/kubeconfig")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--kubeconfig-file") && err.contains("/nonexistent/kubeconfig"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_url_alone_gives_an_unauthenticated_config_for_it() {
        let c = client_config("https://198.18.0.2:6443", "").await.unwrap();
        assert_eq!(c.cluster_url.to_string(), "https://198.18.0.2:6443/");
        assert!(client_config("not a url", "").await.is_err());
    }
}
