//! A Node as a lease: its podCIDR(s) are the subnet, its flannel annotations the attributes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use k8s_openapi::api::core::v1::Node;
use serde_json::value::RawValue;

use super::annotations::AnnotationKeys;
use crate::subnet::lease::{Lease, LeaseAttrs, SubnetKey};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeError {
    #[error("node {node:?} has no podCIDR yet (spec.podCIDR is empty)")]
    NoPodCidr { node: String },
    #[error(
        "node {node:?}: spec.podCIDRs {cidrs:?} should be IPv4/IPv6 only or dual stack \
         (at most one of each)"
    )]
    TooManyPodCidrs { node: String, cidrs: Vec<String> },
    #[error("node {node:?}: {field} {value:?} is not a CIDR")]
    BadCidr {
        node: String,
        field: &'static str,
        value: String,
    },
    #[error("node {node:?}: missing {family} address in spec.podCIDRs")]
    MissingFamily { node: String, family: &'static str },
    #[error("node {node:?}: annotation {key} {value:?} is not an {family} address")]
    BadPublicIp {
        node: String,
        key: String,
        value: String,
        family: &'static str,
    },
    #[error("node {node:?}: annotation {key} is not valid JSON: {why}")]
    BadBackendData {
        node: String,
        key: String,
        why: String,
    },
}

/// The families of the network config that are enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Families {
    pub v4: bool,
    pub v6: bool,
}

/// A Node's pod CIDRs, one per family at most.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodCidrs {
    pub v4: Option<Ipv4Network>,
    pub v6: Option<Ipv6Network>,
}

pub fn node_name(node: &Node) -> &str {
    node.metadata.name.as_deref().unwrap_or("")
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// `spec.podCIDRs` (dual stack) or else `spec.podCIDR`, split by family as flannel does.
pub fn pod_cidrs(node: &Node) -> Result<PodCidrs, NodeError> {
    let name = node_name(node).to_string();
    let spec = node.spec.as_ref();
    let single = spec.and_then(|s| s.pod_cidr.clone()).unwrap_or_default();
    let many = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    let (texts, field) = match many.len() {
        0 if single.is_empty() => return Err(NodeError::NoPodCidr { node: name }),
        0 => (vec![single], "spec.podCIDR"),
        1 | 2 => (many, "spec.podCIDRs"),
        _ => {
            return Err(NodeError::TooManyPodCidrs {
                node: name,
                cidrs: many,
            })
        }
    };
    let mut cidrs = PodCidrs::default();
    for text in texts {
        let bad = || NodeError::BadCidr {
            node: name.clone(),
            field,
            value: text.clone(),
        };
        // Go's ParseCIDR masks the address: 10.244.1.5/24 is 10.244.1.0/24.
        match text.parse::<IpNetwork>().map_err(|_| bad())? {
            IpNetwork::V4(n) => {
                let net = Ipv4Network::new(n.network(), n.prefix()).map_err(|_| bad())?;
                cidrs.v4 = cidrs.v4.or(Some(net));
            }
            IpNetwork::V6(n) => {
                let net = Ipv6Network::new(n.network(), n.prefix()).map_err(|_| bad())?;
                cidrs.v6 = cidrs.v6.or(Some(net));
            }
        }
    }
    Ok(cidrs)
}

/// Whether the Node says it runs flannel's Kubernetes subnet manager (ours or flannel's).
pub fn is_flannel_node(node: &Node, keys: &AnnotationKeys) -> bool {
    annotation(node, &keys.kube_subnet_manager) == Some("true")
}

fn raw_json(node: &Node, key: &str) -> Result<Option<Box<RawValue>>, NodeError> {
    match annotation(node, key) {
        None | Some("") => Ok(None),
        Some(text) => RawValue::from_string(text.to_string())
            .map(Some)
            .map_err(|e| NodeError::BadBackendData {
                node: node_name(node).to_string(),
                key: key.to_string(),
                why: e.to_string(),
            }),
    }
}

fn public_ip<A: std::str::FromStr>(
    node: &Node,
    key: &str,
    family: &'static str,
) -> Result<A, NodeError> {
    let value = annotation(node, key).unwrap_or("");
    value.parse().map_err(|_| NodeError::BadPublicIp {
        node: node_name(node).to_string(),
        key: key.to_string(),
        value: value.to_string(),
        family,
    })
}

/// The peer lease a flannel Node stands for, or `None` for a Node that is not flannel's.
/// Each enabled family needs its public IP annotation and its podCIDR, as in flannel.
pub fn node_to_lease(
    node: &Node,
    keys: &AnnotationKeys,
    families: Families,
) -> Result<Option<Lease>, NodeError> {
    if !is_flannel_node(node, keys) {
        return Ok(None);
    }
    let cidrs = pod_cidrs(node)?;
    let name = node_name(node).to_string();
    let mut key = SubnetKey {
        ipv4: None,
        ipv6: None,
    };
    let mut attrs = LeaseAttrs {
        public_ip: None,
        public_ipv6: None,
        backend_type: annotation(node, &keys.backend_type)
            .unwrap_or("")
            .to_string(),
        backend_data: None,
        backend_v6_data: None,
    };
    if families.v4 {
        attrs.public_ip = Some(public_ip::<Ipv4Addr>(node, &keys.public_ip, "IPv4")?);
        attrs.backend_data = raw_json(node, &keys.backend_data)?;
        key.ipv4 = Some(cidrs.v4.ok_or(NodeError::MissingFamily {
            node: name.clone(),
            family: "IPv4",
        })?);
    }
    if families.v6 {
        attrs.public_ipv6 = Some(public_ip::<Ipv6Addr>(node, &keys.public_ipv6, "IPv6")?);
        attrs.backend_v6_data = raw_json(node, &keys.backend_v6_data)?;
        key.ipv6 = Some(cidrs.v6.ok_or(NodeError::MissingFamily {
            node: name,
            family: "IPv6",
        })?);
    }
    let created = node
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or_default();
    Ok(Some(Lease {
        key,
        attrs,
        etcd_lease: None,
        revision: 0,
        create_revision: created,
    }))
}

/// `node-public-ip` / `node-public-ipv6`: the local addresses flannel then uses as
/// `--public-ip` / `--public-ipv6`. A value that is not an address of its family is ignored.
pub fn node_public_ips(node: &Node, keys: &AnnotationKeys) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let ip = |key: &str| annotation(node, key).and_then(|v| v.parse::<IpAddr>().ok());
    let v4 = match ip(&keys.node_public_ip) {
        Some(IpAddr::V4(a)) => Some(a),
        _ => None,
    };
    let v6 = match ip(&keys.node_public_ipv6) {
        Some(IpAddr::V6(a)) => Some(a),
        _ => None,
    };
    (v4, v6)
}

/// The `VtepMAC` of our Node's `backend-data` / `backend-v6-data`, so that a restarted vxlan
/// backend keeps the MAC its peers know.
pub fn stored_vtep_macs(node: &Node, keys: &AnnotationKeys) -> (Option<String>, Option<String>) {
    let mac = |key: &str| {
        let data: serde_json::Value = serde_json::from_str(annotation(node, key)?).ok()?;
        Some(data.get("VtepMAC")?.as_str()?.to_string())
    };
    (mac(&keys.backend_data), mac(&keys.backend_v6_data))
}

/// flannel's check that the net-conf's network holds the Node's podCIDR.
pub fn contains<N: ipnetwork_like::Net>(network: N, cidr: N) -> bool {
    network.prefix_len() <= cidr.prefix_len() && network.holds(cidr.first())
}

/// The little of a network [`contains`] needs, for both families.
pub mod ipnetwork_like {
    use ipnetwork::{Ipv4Network, Ipv6Network};

    pub trait Net: Copy {
        type Addr;
        fn prefix_len(&self) -> u8;
        fn first(&self) -> Self::Addr;
        fn holds(&self, a: Self::Addr) -> bool;
    }
    impl Net for Ipv4Network {
        type Addr = std::net::Ipv4Addr;
        fn prefix_len(&self) -> u8 {
            self.prefix()
        }
        fn first(&self) -> Self::Addr {
            self.network()
        }
        fn holds(&self, a: Self::Addr) -> bool {
            self.contains(a)
        }
    }
    impl Net for Ipv6Network {
        type Addr = std::net::Ipv6Addr;
        fn prefix_len(&self) -> u8 {
            self.prefix()
        }
        fn first(&self) -> Self::Addr {
            self.network()
        }
        fn holds(&self, a: Self::Addr) -> bool {
            self.contains(a)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    pub(crate) fn node(name: &str, cidrs: &[&str], annotations: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (format!("flannel.alpha.coreos.com/{k}"), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        );
        let spec = n.spec.get_or_insert_with(Default::default);
        spec.pod_cidr = cidrs.first().map(|c| c.to_string());
        if !cidrs.is_empty() {
            spec.pod_cidrs = Some(cidrs.iter().map(|c| c.to_string()).collect());
        }
        n
    }

    const V4: Families = Families {
        v4: true,
        v6: false,
    };
    const DUAL: Families = Families { v4: true, v6: true };

    fn vxlan_node(name: &str, cidrs: &[&str]) -> Node {
        node(
            name,
            cidrs,
            &[
                ("kube-subnet-manager", "true"),
                ("backend-type", "vxlan"),
                ("backend-data", r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}"#),
                ("public-ip", "198.18.0.11"),
                (
                    "backend-v6-data",
                    r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}"#,
                ),
                ("public-ipv6", "fd18::11"),
            ],
        )
    }

    #[test]
    fn an_ipv4_node_becomes_its_podcidr_with_its_annotations() {
        let lease = node_to_lease(
            &vxlan_node("n1", &["10.244.1.0/24"]),
            &Default::default(),
            V4,
        )
        .unwrap()
        .unwrap();
        assert_eq!(lease.key.to_string(), "10.244.1.0-24");
        assert_eq!(lease.attrs.public_ip, Some("198.18.0.11".parse().unwrap()));
        assert_eq!(lease.attrs.public_ipv6, None);
        assert_eq!(lease.attrs.backend_type, "vxlan");
        assert_eq!(
            lease.attrs.backend_data.as_ref().map(|r| r.get()),
            Some(r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}"#)
        );
    }

    #[test]
    fn a_dual_stack_node_gives_both_halves() {
        let n = vxlan_node("n1", &["10.244.1.0/24", "fd00:10:244:1::/64"]);
        let lease = node_to_lease(&n, &Default::default(), DUAL)
            .unwrap()
            .unwrap();
        assert_eq!(lease.key.to_string(), "10.244.1.0-24&fd00:10:244:1::-64");
        assert_eq!(lease.attrs.public_ipv6, Some("fd18::11".parse().unwrap()));
        assert_eq!(
            lease.attrs.backend_v6_data.as_ref().map(|r| r.get()),
            Some(r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}"#)
        );
    }

    #[test]
    fn a_node_without_the_manager_annotation_is_no_peer() {
        let n = node("n1", &["10.244.1.0/24"], &[("public-ip", "198.18.0.11")]);
        assert_eq!(node_to_lease(&n, &Default::default(), V4), Ok(None));
    }

    #[test]
    fn a_node_lacking_an_enabled_family_is_an_error_naming_it() {
        let n = vxlan_node("n1", &["10.244.1.0/24"]);
        assert_eq!(
            node_to_lease(&n, &Default::default(), DUAL),
            Err(NodeError::MissingFamily {
                node: "n1".into(),
                family: "IPv6"
            })
        );
    }

    #[test]
    fn a_missing_or_bad_public_ip_is_an_error_naming_the_annotation() {
        let n = node(
            "n1",
            &["10.244.1.0/24"],
            &[("kube-subnet-manager", "true"), ("public-ip", "fd18::1")],
        );
        let err = node_to_lease(&n, &Default::default(), V4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("flannel.alpha.coreos.com/public-ip") && err.contains("fd18::1"),
            "{err}"
        );
        let n = node("n1", &["10.244.1.0/24"], &[("kube-subnet-manager", "true")]);
        assert!(matches!(
            node_to_lease(&n, &Default::default(), V4),
            Err(NodeError::BadPublicIp { .. })
        ));
    }

    #[test]
    fn podcidr_errors() {
        let none = node("n1", &[], &[]);
        assert_eq!(
            pod_cidrs(&none),
            Err(NodeError::NoPodCidr { node: "n1".into() })
        );
        let three = node("n1", &["10.244.1.0/24", "fd00::/64", "10.244.2.0/24"], &[]);
        assert!(matches!(
            pod_cidrs(&three),
            Err(NodeError::TooManyPodCidrs { .. })
        ));
        let bad = node("n1", &["10.244.1.0/33"], &[]);
        let err = pod_cidrs(&bad).unwrap_err().to_string();
        assert!(err.contains("10.244.1.0/33"), "{err}");
    }

    #[test]
    fn podcidr_alone_is_classified_and_masked() {
        let mut n = node("n1", &[], &[]);
        n.spec.as_mut().unwrap().pod_cidr = Some("fd00:1::5/64".into());
        assert_eq!(
            pod_cidrs(&n).unwrap(),
            PodCidrs {
                v4: None,
                v6: Some("fd00:1::/64".parse().unwrap())
            }
        );
    }

    #[test]
    fn bad_backend_data_is_an_error() {
        let n = node(
            "n1",
            &["10.244.1.0/24"],
            &[
                ("kube-subnet-manager", "true"),
                ("public-ip", "198.18.0.1"),
                ("backend-data", "{not json"),
            ],
        );
        assert!(matches!(
            node_to_lease(&n, &Default::default(), V4),
            Err(NodeError::BadBackendData { .. })
        ));
    }

    #[test]
    fn stored_macs_and_node_public_ips_are_read() {
        let mut n = vxlan_node("n1", &["10.244.1.0/24"]);
        let keys = AnnotationKeys::default();
        assert_eq!(
            stored_vtep_macs(&n, &keys),
            (
                Some("0e:00:00:00:00:01".into()),
                Some("0e:00:00:00:00:02".into())
            )
        );
        let a = n.metadata.annotations.as_mut().unwrap();
        a.insert(keys.node_public_ip.clone(), "192.0.2.7".into());
        a.insert(keys.node_public_ipv6.clone(), "192.0.2.8".into());
        assert_eq!(
            node_public_ips(&n, &keys),
            (Some("192.0.2.7".parse().unwrap()), None)
        );
    }

    #[test]
    fn containment_as_flannel_checks_it() {
        let net: Ipv4Network = "10.244.0.0/16".parse().unwrap();
        assert!(contains(net, "10.244.3.0/24".parse().unwrap()));
        assert!(!contains(net, "10.245.3.0/24".parse().unwrap()));
        assert!(!contains(net, "10.0.0.0/8".parse().unwrap()));
    }
}
