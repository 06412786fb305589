//! The bodies we send: our annotations (flannel's keys, values and write rules) and the
//! NetworkUnavailable condition, both as strategic-merge patches on `nodes/status`.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::annotations::AnnotationKeys;
use crate::subnet::lease::LeaseAttrs;

fn data_text(raw: &Option<Box<serde_json::value::RawValue>>) -> String {
    raw.as_deref()
        .map(|r| r.get().to_string())
        .unwrap_or_else(|| "null".into())
}

/// The annotation values flannel's `AcquireLease` writes for `attrs`, given the Node's current
/// annotations (for the `*-overwrite` ones).
pub fn wanted_annotations(
    current: &BTreeMap<String, String>,
    keys: &AnnotationKeys,
    attrs: &LeaseAttrs,
) -> BTreeMap<String, String> {
    let ty = attrs.backend_type.as_str();
    let bd = data_text(&attrs.backend_data);
    let v6bd = data_text(&attrs.backend_v6_data);
    let has_v6 = attrs.public_ipv6.is_some();
    let overwrite = |key: &str| current.get(key).filter(|v| !v.is_empty()).cloned();
    let mut want = BTreeMap::new();
    want.insert(keys.backend_type.clone(), ty.to_string());
    // flannel's condition `(vxlan && bd != null) || (wireguard && bd != null) || !vxlan`
    // comes down to: always, except vxlan without v4 data (IPv6 only).
    let write_v4 = ty != "vxlan" || bd != "null";
    if write_v4 {
        want.insert(keys.backend_data.clone(), bd);
        let own = attrs
            .public_ip
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED)
            .to_string();
        want.insert(
            keys.public_ip.clone(),
            overwrite(&keys.public_ip_overwrite).unwrap_or(own),
        );
    }
    let write_v6 = (ty == "vxlan" && v6bd != "null")
        || (ty == "wireguard" && v6bd != "null" && has_v6)
        || ((ty == "host-gw" || ty == "extension") && has_v6);
    if write_v6 {
        want.insert(keys.backend_v6_data.clone(), v6bd);
        let own = attrs.public_ipv6.map(|a| a.to_string()).unwrap_or_default();
        want.insert(
            keys.public_ipv6.clone(),
            overwrite(&keys.public_ipv6_overwrite).unwrap_or(own),
        );
    }
    want.insert(keys.kube_subnet_manager.clone(), "true".into());
    want
}

/// `{"metadata":{"annotations":{…}}}` with the annotations that differ from what the Node has,
/// or `None` when it already carries them all (what flannel's two-way merge patch holds).
pub fn annotation_patch(
    current: &BTreeMap<String, String>,
    keys: &AnnotationKeys,
    attrs: &LeaseAttrs,
) -> Option<Value> {
    let changed: Map<String, Value> = wanted_annotations(current, keys, attrs)
        .into_iter()
        .filter(|(k, v)| current.get(k) != Some(v))
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    (!changed.is_empty()).then(|| json!({"metadata": {"annotations": changed}}))
}

/// flannel's condition after the subnet file is written (`CompleteLease`); `now` as RFC 3339
/// seconds, as Kubernetes writes times. Conditions merge by `type`.
pub fn network_available_patch(now: &str) -> Value {
    json!({"status": {"conditions": [{
        "type": "NetworkUnavailable",
        "status": "False",
        "reason": "FlannelIsUp",
        "message": "Flannel is running on this node",
        "lastTransitionTime": now,
        "lastHeartbeatTime": now,
    }]}})
}

/// The current time as Kubernetes writes it: `2026-12-01T13:45:07Z`.
pub fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn attrs(ty: &str, data: Option<&str>, v6: Option<(&str, &str)>) -> LeaseAttrs {
        let raw = |s: &str| RawValue::from_string(s.to_string()).unwrap();
        LeaseAttrs {
            public_ip: Some("198.18.0.10".parse().unwrap()),
            public_ipv6: v6.map(|(ip, _)| ip.parse().unwrap()),
            backend_type: ty.into(),
            backend_data: data.map(raw),
            backend_v6_data: v6.map(|(_, d)| raw(d)),
        }
    }

    fn current(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("flannel.alpha.coreos.com/{k}"), v.to_string()))
            .collect()
    }

    const VXLAN_DATA: &str = r#"{"VNI":1,"VtepMAC":"0e:11:22:33:44:55"}"#;

    #[test]
    fn a_fresh_vxlan_node_gets_flannels_four_annotations() {
        let patch = annotation_patch(
            &BTreeMap::new(),
            &AnnotationKeys::default(),
            &attrs("vxlan", Some(VXLAN_DATA), None),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&patch).unwrap(),
            r#"{"metadata":{"annotations":{"flannel.alpha.coreos.com/backend-data":"{\"VNI\":1,\"VtepMAC\":\"0e:11:22:33:44:55\"}","flannel.alpha.coreos.com/backend-type":"vxlan","flannel.alpha.coreos.com/kube-subnet-manager":"true","flannel.alpha.coreos.com/public-ip":"198.18.0.10"}}}"#
        );
    }

    #[test]
    fn host_gw_writes_null_data() {
        let want = wanted_annotations(
            &BTreeMap::new(),
            &AnnotationKeys::default(),
            &attrs("host-gw", None, None),
        );
        assert_eq!(want["flannel.alpha.coreos.com/backend-data"], "null");
        assert!(!want.contains_key("flannel.alpha.coreos.com/public-ipv6"));
    }

    #[test]
    fn nothing_to_send_when_the_node_already_carries_them() {
        let have = current(&[
            ("backend-data", VXLAN_DATA),
            ("backend-type", "vxlan"),
            ("kube-subnet-manager", "true"),
            ("public-ip", "198.18.0.10"),
        ]);
        let a = attrs("vxlan", Some(VXLAN_DATA), None);
        assert_eq!(
            annotation_patch(&have, &AnnotationKeys::default(), &a),
            None
        );
    }

    #[test]
    fn only_what_differs_is_sent() {
        let have = current(&[
            ("backend-data", VXLAN_DATA),
            ("backend-type", "vxlan"),
            ("public-ip", "198.18.0.99"),
        ]);
        let a = attrs("vxlan", Some(VXLAN_DATA), None);
        let patch = annotation_patch(&have, &AnnotationKeys::default(), &a).unwrap();
        assert_eq!(
            patch,
            json!({"metadata": {"annotations": {
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                "flannel.alpha.coreos.com/public-ip": "198.18.0.10",
            }}})
        );
    }

    #[test]
    fn an_overwrite_is_published_as_the_public_ip() {
        let have = current(&[
            ("public-ip-overwrite", "203.0.113.5"),
            ("public-ipv6-overwrite", "2001:db8::5"),
        ]);
        let a = attrs("vxlan", Some(VXLAN_DATA), Some(("fd18::10", VXLAN_DATA)));
        let want = wanted_annotations(&have, &AnnotationKeys::default(), &a);
        assert_eq!(want["flannel.alpha.coreos.com/public-ip"], "203.0.113.5");
        assert_eq!(want["flannel.alpha.coreos.com/public-ipv6"], "2001:db8::5");
    }

    #[test]
    fn v6_only_vxlan_writes_no_v4_half() {
        let mut a = attrs("vxlan", None, Some(("fd18::10", VXLAN_DATA)));
        a.public_ip = None;
        let want = wanted_annotations(&BTreeMap::new(), &AnnotationKeys::default(), &a);
        assert!(!want.contains_key("flannel.alpha.coreos.com/public-ip"));
        assert!(!want.contains_key("flannel.alpha.coreos.com/backend-data"));
        assert_eq!(want["flannel.alpha.coreos.com/public-ipv6"], "fd18::10");
        assert_eq!(want["flannel.alpha.coreos.com/backend-v6-data"], VXLAN_DATA);
    }

    #[test]
    fn host_gw_dual_stack_writes_the_v6_half() {
        let a = attrs("host-gw", None, Some(("fd18::10", "null")));
        let want = wanted_annotations(&BTreeMap::new(), &AnnotationKeys::default(), &a);
        assert_eq!(want["flannel.alpha.coreos.com/backend-v6-data"], "null");
        assert_eq!(want["flannel.alpha.coreos.com/public-ipv6"], "fd18::10");
    }

    #[test]
    fn the_condition_is_flannels() {
        assert_eq!(
            serde_json::to_string(&network_available_patch("2026-12-01T13:45:07Z")).unwrap(),
            r#"{"status":{"conditions":[{"lastHeartbeatTime":"2026-12-01T13:45:07Z","lastTransitionTime":"2026-12-01T13:45:07Z","message":"Flannel is running on this node","reason":"FlannelIsUp","status":"False","type":"NetworkUnavailable"}]}}"#
        );
        let now = now_rfc3339();
        assert!(
            now.len() == 20 && now.ends_with('Z') && now.as_bytes()[10] == b'T',
            "{now}"
        );
    }
}
