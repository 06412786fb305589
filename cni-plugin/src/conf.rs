//! The network configuration on stdin, and the options the native path takes from it.

use std::collections::HashSet;
use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::spec::{self, code, CniError, CniResult};
use flannel_subnet_env::SubnetEnv;

pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";
pub const DEFAULT_IPAM_DATA_DIR: &str = "/var/lib/cni/networks";
pub const DEFAULT_BRIDGE: &str = "cni0";

/// Delegate keys the native path implements; any other key sends the request to the real
/// `bridge` plugin so nothing a user configured is silently ignored.
const NATIVE_DELEGATE_KEYS: &[&str] = &[
    "type",
    "cniVersion",
    "bridge",
    "isGateway",
    "isDefaultGateway",
    "hairpinMode",
    "ipMasq",
    "mtu",
    "forceAddress",
];

/// The plugin's configuration, as given on stdin.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    pub delegate: Map<String, Value>,
    pub ipam: Option<Map<String, Value>>,
    pub runtime_config: Option<Value>,
    pub prev_result: Option<Value>,
    /// GC: the attachments that are still valid (`cni.dev/valid-attachments`).
    pub valid_attachments: Option<HashSet<(String, String)>>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

fn opt_str(obj: &Map<String, Value>, key: &str) -> CniResult<Option<String>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!("{key} must be a string, got {other}"))),
    }
}

fn opt_obj(obj: &Map<String, Value>, key: &str) -> CniResult<Option<Map<String, Value>>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m.clone())),
        Some(other) => Err(invalid(format!("{key} must be an object, got {other}"))),
    }
}

/// The version a document claims, for error messages, even when it is otherwise broken.
pub fn sniff_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_string)
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> CniResult<NetConf> {
        let doc: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE,
                format!("failed to decode network config: {e}"),
            )
        })?;
        let Value::Object(raw) = doc else {
            return Err(CniError::new(
                code::DECODE,
                "failed to decode network config: not a JSON object",
            ));
        };
        // skel's rule: no version means 0.1.0, which nobody speaks any more.
        let cni_version = opt_str(&raw, "cniVersion")?.unwrap_or_else(|| "0.1.0".to_string());
        let name = opt_str(&raw, "name")?
            .ok_or_else(|| invalid("network config: \"name\" is required"))?;
        spec::validate_network_name(&name)?;
        let subnet_file = opt_str(&raw, "subnetFile")?
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_SUBNET_FILE.to_string())
            .into();
        let data_dir = opt_str(&raw, "dataDir")?
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_DATA_DIR.to_string())
            .into();
        let delegate = opt_obj(&raw, "delegate")?.unwrap_or_default();
        for key in ["name", "ipam"] {
            if delegate.contains_key(key) {
                return Err(invalid(format!("\"delegate\" must not contain {key:?}")));
            }
        }
        if let Some(t) = delegate.get("type") {
            if !t.is_string() {
                return Err(invalid("delegate.type must be a string"));
            }
        }
        let ipam = opt_obj(&raw, "ipam")?;
        if let Some(ipam) = &ipam {
            opt_str(ipam, "type")?;
            opt_str(ipam, "dataDir")?;
        }
        let runtime_config = raw.get("runtimeConfig").cloned().filter(|v| !v.is_null());
        let prev_result = raw.get("prevResult").cloned().filter(|v| !v.is_null());
        let valid_attachments = match raw.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => {
                let mut set = HashSet::new();
                for item in items {
                    let id = item.get("containerID").and_then(Value::as_str);
                    let ifname = item.get("ifname").and_then(Value::as_str);
                    match (id, ifname) {
                        (Some(id), Some(ifname)) => {
                            set.insert((id.to_string(), ifname.to_string()));
                        }
                        _ => return Err(invalid(
                            "cni.dev/valid-attachments: each entry needs containerID and ifname",
                        )),
                    }
                }
                Some(set)
            }
            Some(_) => return Err(invalid("cni.dev/valid-attachments must be an array")),
        };
        Ok(NetConf {
            cni_version,
            name,
            subnet_file,
            data_dir,
            delegate,
            ipam,
            runtime_config,
            prev_result,
            valid_attachments,
        })
    }

    /// Which plugin does the work: `None` for the built-in bridge, else the plugin to exec.
    pub fn delegate_plugin(&self) -> Option<String> {
        if let Some(t) = self.delegate.get("type").and_then(Value::as_str) {
            return Some(t.to_string());
        }
        let foreign_ipam = self
            .ipam
            .as_ref()
            .and_then(|i| i.get("type"))
            .and_then(Value::as_str)
            .is_some_and(|t| t != "host-local");
        let foreign_key = self
            .delegate
            .keys()
            .any(|k| !NATIVE_DELEGATE_KEYS.contains(&k.as_str()));
        if foreign_ipam || foreign_key {
            Some("bridge".to_string())
        } else {
            None
        }
    }

    /// The host-local store directory (`ipam.dataDir`, default /var/lib/cni/networks).
    pub fn ipam_data_dir(&self) -> PathBuf {
        self.ipam
            .as_ref()
            .and_then(|i| i.get("dataDir"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(DEFAULT_IPAM_DATA_DIR)
            .into()
    }

    /// Extra routes from `ipam.routes` (`[{"dst": "..."}]`).
    pub fn ipam_routes(&self) -> CniResult<Vec<ipnetwork::IpNetwork>> {
        let Some(routes) = self.ipam.as_ref().and_then(|i| i.get("routes")) else {
            return Ok(Vec::new());
        };
        let Some(routes) = routes.as_array() else {
            return Err(invalid("ipam.routes must be an array"));
        };
        routes
            .iter()
            .map(|r| {
                r.get("dst")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| invalid(format!("ipam.routes: invalid route {r}")))
            })
            .collect()
    }
}

/// What the native path does, from `delegate` and the subnet file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeOpts {
    pub bridge: String,
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    pub hairpin: bool,
    pub ip_masq: bool,
    pub mtu: u32,
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> CniResult<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(invalid(format!(
            "delegate.{key} must be a boolean, got {other}"
        ))),
    }
}

impl BridgeOpts {
    /// flannel's defaults: bridge `cni0`, `isGateway` true, `ipMasq` = !FLANNEL_IPMASQ,
    /// `mtu` = FLANNEL_MTU; `isDefaultGateway` implies `isGateway` (as in `bridge`).
    pub fn resolve(
        delegate: &Map<String, Value>,
        env: Option<&SubnetEnv>,
    ) -> CniResult<BridgeOpts> {
        let bridge = opt_str(delegate, "bridge")?
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        spec::validate_ifname(&bridge).map_err(|_| {
            invalid(format!(
                "delegate.bridge {bridge:?} is not a valid link name"
            ))
        })?;
        let is_default_gateway = opt_bool(delegate, "isDefaultGateway")?.unwrap_or(false);
        let is_gateway = opt_bool(delegate, "isGateway")?.unwrap_or(true) || is_default_gateway;
        let hairpin = opt_bool(delegate, "hairpinMode")?.unwrap_or(false);
        let ip_masq = match opt_bool(delegate, "ipMasq")? {
            Some(b) => b,
            None => env.map(|e| !e.ipmasq).unwrap_or(false),
        };
        let mtu = match delegate.get("mtu") {
            None | Some(Value::Null) => env.map(|e| e.mtu).unwrap_or(1500),
            Some(v) => match v.as_u64() {
                Some(m) if (68..=65535).contains(&m) => m as u32,
                _ => {
                    return Err(invalid(format!(
                        "delegate.mtu {v} is not an MTU (68-65535)"
                    )))
                }
            },
        };
        Ok(BridgeOpts {
            bridge,
            is_gateway,
            is_default_gateway,
            hairpin,
            ip_masq,
            mtu,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> SubnetEnv {
        SubnetEnv::parse(
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\nFLANNEL_MTU=1450\n\
             FLANNEL_IPMASQ=true\n",
        )
        .unwrap()
    }

    #[test]
    fn the_usual_conflist_entry() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"cbr0","type":"flannel",
                 "delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_file, PathBuf::from(DEFAULT_SUBNET_FILE));
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.ipam_data_dir(), PathBuf::from(DEFAULT_IPAM_DATA_DIR));
        assert_eq!(c.delegate_plugin(), None);
        let o = BridgeOpts::resolve(&c.delegate, Some(&env())).unwrap();
        assert_eq!(
            o,
            BridgeOpts {
                bridge: "cni0".into(),
                is_gateway: true,
                is_default_gateway: true,
                hairpin: true,
                ip_masq: false,
                mtu: 1450
            }
        );
    }

    #[test]
    fn delegate_selection() {
        let c =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","delegate":{"type":"bridge"}}"#)
                .unwrap();
        assert_eq!(c.delegate_plugin().as_deref(), Some("bridge"));
        let c =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","delegate":{"vlan":5}}"#).unwrap();
        assert_eq!(c.delegate_plugin().as_deref(), Some("bridge"));
        let c =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"dhcp"}}"#).unwrap();
        assert_eq!(c.delegate_plugin().as_deref(), Some("bridge"));
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"host-local","dataDir":"/x"}}"#,
        )
        .unwrap();
        assert_eq!(c.delegate_plugin(), None);
        assert_eq!(c.ipam_data_dir(), PathBuf::from("/x"));
    }

    #[test]
    fn errors_have_codes() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, code::DECODE);
        assert_eq!(NetConf::parse(b"[1]").unwrap_err().code, code::DECODE);
        for bad in [
            r#"{"cniVersion":"1.0.0"}"#,
            r#"{"cniVersion":"1.0.0","name":"../etc"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","delegate":{"name":"x"}}"#,
            r#"{"cniVersion":"1.0.0","name":"n","delegate":{"ipam":{}}}"#,
            r#"{"cniVersion":"1.0.0","name":"n","delegate":"x"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","subnetFile":5}"#,
            r#"{"cniVersion":"1.0.0","name":"n","cni.dev/valid-attachments":[{"x":1}]}"#,
        ] {
            assert_eq!(
                NetConf::parse(bad.as_bytes()).unwrap_err().code,
                code::INVALID_CONFIG,
                "{bad}"
            );
        }
        let c =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","delegate":{"mtu":"x"}}"#).unwrap();
        assert_eq!(
            BridgeOpts::resolve(&c.delegate, None).unwrap_err().code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            sniff_version(br#"{"cniVersion":"0.4.0"}"#).as_deref(),
            Some("0.4.0")
        );
    }

    #[test]
    fn gc_attachments() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":
                 [{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .unwrap();
        let v = c.valid_attachments.unwrap();
        assert!(v.contains(&("a".to_string(), "eth0".to_string())));
    }

    #[test]
    fn explicit_options_win() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","delegate":{"bridge":"br9","mtu":1400,
                 "ipMasq":true,"isGateway":false}}"#,
        )
        .unwrap();
        let o = BridgeOpts::resolve(&c.delegate, Some(&env())).unwrap();
        assert_eq!(o.bridge, "br9");
        assert_eq!(o.mtu, 1400);
        assert!(o.ip_masq);
        assert!(!o.is_gateway);
    }
}
