//! The Node watch's object: a [`Node`] holding only what flannel reads from a Node (name,
//! resourceVersion, annotations, podCIDR(s)).
//!
//! A Node as the API server sends it also carries its status (images, conditions, addresses,
//! nodeInfo) and metadata.managedFields, several kilobytes each on a real node; a list page
//! of 500 such Nodes parsed in full dominated flanneld's peak memory in a large cluster. This
//! type skips them while parsing, so they are never allocated.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

/// A Node with only the fields flannel uses; the rest are `None`.
#[derive(Clone, Debug, Default)]
pub struct LeanNode(pub Node);

impl k8s_openapi::Resource for LeanNode {
    const API_VERSION: &'static str = <Node as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Node as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Node as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Node as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Node as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <Node as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::Metadata for LeanNode {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.0.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct WireMeta {
    name: Option<String>,
    resource_version: Option<String>,
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct WireSpec {
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Option<Vec<String>>,
}

/// Unknown and unread fields (status, managedFields, labels, …) are skipped by the parser.
#[derive(Deserialize)]
struct WireNode {
    #[serde(default)]
    metadata: WireMeta,
    spec: Option<WireSpec>,
}

impl<'de> Deserialize<'de> for LeanNode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = WireNode::deserialize(d)?;
        Ok(LeanNode(Node {
            metadata: ObjectMeta {
                name: w.metadata.name,
                resource_version: w.metadata.resource_version,
                annotations: w.metadata.annotations,
                ..ObjectMeta::default()
            },
            spec: w.spec.map(|s| NodeSpec {
                pod_cidr: s.pod_cidr,
                pod_cidrs: s.pod_cidrs,
                ..NodeSpec::default()
            }),
            status: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_what_flannel_reads_and_drops_the_rest() {
        let full = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": "n1", "resourceVersion": "42", "uid": "u-1",
                "labels": {"kubernetes.io/os": "linux"},
                "annotations": {"flannel.alpha.coreos.com/public-ip": "198.18.0.1"},
                "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:metadata": {}}}],
            },
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00::/64"],
                     "providerID": "x"},
            "status": {"images": [{"names": ["a"], "sizeBytes": 1}],
                       "addresses": [{"type": "InternalIP", "address": "198.18.0.1"}]},
        });
        let LeanNode(n) = serde_json::from_value(full).unwrap();
        assert_eq!(n.metadata.name.as_deref(), Some("n1"));
        assert_eq!(n.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(
            n.metadata.annotations.unwrap()["flannel.alpha.coreos.com/public-ip"],
            "198.18.0.1"
        );
        assert!(n.metadata.managed_fields.is_none() && n.metadata.labels.is_none());
        let spec = n.spec.unwrap();
        assert_eq!(spec.pod_cidr.as_deref(), Some("10.244.1.0/24"));
        assert_eq!(spec.pod_cidrs.unwrap().len(), 2);
        assert!(spec.provider_id.is_none());
        assert!(n.status.is_none());
    }

    #[test]
    fn a_node_without_spec_or_annotations_parses() {
        let LeanNode(n) = serde_json::from_value(json!({"metadata": {"name": "n2"}})).unwrap();
        assert_eq!(n.metadata.name.as_deref(), Some("n2"));
        assert!(n.spec.is_none() && n.metadata.annotations.is_none());
    }
}
