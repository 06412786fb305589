//! Pieces the kernel backends share: option lookup in the `Backend` object, the tally of one
//! reconciliation pass, and the route diff.

use std::collections::BTreeMap;

use ipnetwork::Ipv4Network;
use netlink_packet_route::route::RouteProtocol;
use rtnetlink::Handle;
use serde_json::{Map, Value};

use super::{BackendError, ReconcileReport};
use crate::netlink::{self, NetlinkError, Route4, RT_TABLE_MAIN};

/// Looks `key` up the way flannel (Go's `encoding/json`) does: an exact match first, then
/// case-insensitively.
pub(super) fn lookup<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// An unsigned integer option no larger than `max`; `None` when absent or `null`.
pub(super) fn uint_option(
    backend: &'static str,
    map: &Map<String, Value>,
    option: &'static str,
    max: u64,
) -> Result<Option<u64>, BackendError> {
    match lookup(map, option) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            Some(_) => Err(BackendError::BadOption {
                backend,
                option,
                value: v.to_string(),
                why: format!("must be at most {max}"),
            }),
            None => Err(BackendError::BadOption {
                backend,
                option,
                value: v.to_string(),
                why: "must be a non-negative integer".into(),
            }),
        },
    }
}

/// A boolean option; `false` when absent or `null`.
pub(super) fn bool_option(
    backend: &'static str,
    map: &Map<String, Value>,
    option: &'static str,
) -> Result<bool, BackendError> {
    match lookup(map, option) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(BackendError::BadOption {
            backend,
            option,
            value: v.to_string(),
            why: "must be true or false".into(),
        }),
    }
}

/// Whether `inner` lies inside `outer` (same or longer prefix).
pub(super) fn within(inner: &Ipv4Network, outer: &Ipv4Network) -> bool {
    inner.prefix() >= outer.prefix() && outer.contains(inner.network())
}

/// What one reconciliation pass did, and which changes failed.
#[derive(Debug)]
pub(super) struct Tally {
    pub backend: &'static str,
    pub report: ReconcileReport,
    pub errors: Vec<String>,
}

impl Tally {
    pub fn new(backend: &'static str) -> Self {
        Tally {
            backend,
            report: ReconcileReport::default(),
            errors: Vec::new(),
        }
    }

    /// Records a failed change; the pass goes on with the others.
    pub fn failed(&mut self, context: &str, err: NetlinkError) {
        tracing::warn!("{}: {context}: {err}", self.backend);
        self.errors.push(format!("{context}: {err}"));
    }

    /// The report, or an error listing every change that failed.
    pub fn finish(self) -> Result<ReconcileReport, BackendError> {
        if self.errors.is_empty() {
            Ok(self.report)
        } else {
            Err(BackendError::Netlink {
                backend: self.backend,
                why: format!(
                    "{} change(s) failed (the others were applied): {}",
                    self.errors.len(),
                    self.errors.join("; ")
                ),
            })
        }
    }
}

/// Wraps a netlink error of a step the pass cannot go on without.
pub(super) fn fatal(backend: &'static str, context: &str) -> impl Fn(NetlinkError) -> BackendError {
    let context = context.to_string();
    move |e| BackendError::Netlink {
        backend,
        why: format!("{context}: {e}"),
    }
}

/// The routes a backend owns: in the main table, inside `network` but not inside our own
/// subnet, not the kernel's connected routes, and either on `device` or — with a gateway and
/// for a part of the network — on the external interface.
pub(super) fn owned_route(
    route: &Route4,
    network: &Ipv4Network,
    own: Option<&Ipv4Network>,
    device: Option<u32>,
    ext_index: u32,
) -> bool {
    if route.table != RT_TABLE_MAIN
        || route.protocol == RouteProtocol::Kernel
        || !within(&route.dst, network)
        || own.is_some_and(|own| within(&route.dst, own))
    {
        return false;
    }
    match route.oif {
        Some(oif) if Some(oif) == device => true,
        Some(oif) if oif == ext_index => {
            route.gateway.is_some() && route.dst.prefix() > network.prefix()
        }
        _ => false,
    }
}

/// Makes the owned routes equal `desired` (keyed by destination, all metric 0): replaces
/// missing or wrong ones, deletes the rest, leaves correct ones untouched.
pub(super) async fn sync_routes(
    h: &Handle,
    desired: &BTreeMap<Ipv4Network, Route4>,
    owned: impl Fn(&Route4) -> bool,
    tally: &mut Tally,
) -> Result<(), BackendError> {
    let backend = tally.backend;
    let actual: Vec<Route4> = netlink::routes_v4(h, RT_TABLE_MAIN)
        .await
        .map_err(fatal(backend, "reading routes"))?
        .into_iter()
        .filter(|r| owned(r))
        .collect();

    for (dst, want) in desired {
        let have = actual.iter().find(|r| r.dst == *dst && r.priority == 0);
        if have.is_some_and(|have| have.same_path(want)) {
            continue;
        }
        match netlink::replace_route_v4(h, want).await {
            Ok(()) => match have {
                Some(have) => {
                    tracing::info!("{backend}: route {have} corrected to {want}");
                    tally.report.repaired += 1;
                }
                None => {
                    tracing::info!("{backend}: route {want} added");
                    tally.report.added += 1;
                }
            },
            Err(e) => tally.failed(&format!("peer {dst}"), e),
        }
    }

    for have in &actual {
        if have.priority == 0 && desired.contains_key(&have.dst) {
            continue;
        }
        match netlink::delete_route_v4(h, have).await {
            Ok(()) => {
                tracing::info!("{backend}: stale route {have} removed");
                tally.report.removed += 1;
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => tally.failed(&format!("stale route {}", have.dst), e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn options_are_case_insensitive() {
        let m = obj(json!({"Type": "vxlan", "vni": 4, "directrouting": true}));
        assert_eq!(uint_option("vxlan", &m, "VNI", 100).unwrap(), Some(4));
        assert!(bool_option("vxlan", &m, "DirectRouting").unwrap());
        assert!(!bool_option("vxlan", &m, "GBP").unwrap());
    }

    #[test]
    fn bad_option_names_option_and_value() {
        let m = obj(json!({"Port": "x"}));
        let e = uint_option("vxlan", &m, "Port", 65535)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Port") && e.contains("\"x\""), "{e}");
        let m = obj(json!({"Port": 70000}));
        let e = uint_option("vxlan", &m, "Port", 65535)
            .unwrap_err()
            .to_string();
        assert!(e.contains("70000") && e.contains("65535"), "{e}");
    }

    #[test]
    fn ownership_of_routes() {
        let net: Ipv4Network = "10.5.0.0/16".parse().unwrap();
        let own: Ipv4Network = "10.5.1.0/24".parse().unwrap();
        let r = |dst: &str, gw: Option<&str>, oif| {
            Route4::new(
                dst.parse().unwrap(),
                gw.map(|g| g.parse().unwrap()),
                oif,
                false,
            )
        };
        let owned = |route: &Route4| owned_route(route, &net, Some(&own), Some(7), 2);
        assert!(owned(&r("10.5.2.0/24", Some("10.5.2.0"), 7)));
        assert!(owned(&r("10.5.0.0/16", None, 7)));
        assert!(owned(&r("10.5.2.0/24", Some("192.0.2.2"), 2)));
        assert!(!owned(&r("10.5.0.0/16", Some("192.0.2.2"), 2)));
        assert!(!owned(&r("10.5.2.0/24", None, 2)));
        assert!(!owned(&r("10.5.1.0/24", None, 7)));
        assert!(!owned(&r("10.6.2.0/24", Some("10.6.2.0"), 7)));
        assert!(!owned(&r("10.5.2.0/24", Some("10.5.2.0"), 9)));
    }
}
