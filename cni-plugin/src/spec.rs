//! The CNI specification layer: commands, environment, versions, errors and results.
//!
//! Spec: CNI 1.1.0 (and the 0.3.0 … 1.0.0 result shapes older runtimes ask for).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use flannel_subnet_env::{EnvError, EnvProblem};
use ipnetwork::IpNetwork;
use serde_json::{json, Map, Value};

/// The versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest version, used when the conf's own version is unknown (e.g. in errors).
pub const CURRENT_VERSION: &str = "1.1.0";

/// Well-known error codes of the spec (plus this plugin's own, ≥ 100).
#[allow(dead_code)] // the full table of the spec, not all of them produced here
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const NOT_AVAILABLE_LIMITED: u32 = 51;
    /// No free address left in the subnet.
    pub const NO_ADDRESSES: u32 = 100;
    /// The delegated plugin failed without a CNI error of its own.
    pub const DELEGATE_FAILED: u32 = 101;
    /// Anything else (a kernel refusal, a CHECK mismatch, ...).
    pub const INTERNAL: u32 = 999;
}

/// A CNI error: printed as JSON on stdout, the process exits non-zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

/// Every subnet file problem is "try again later": flanneld writes the file once it holds a
/// lease, and rewrites a broken one when it starts.
impl From<EnvError> for CniError {
    fn from(e: EnvError) -> CniError {
        let hint = match &e {
            EnvError::Io { .. } => " (is flanneld running on this node?)",
            EnvError::Invalid {
                problem: EnvProblem::Missing { .. },
                ..
            } => " (flanneld not ready on this node)",
            EnvError::Invalid { .. } => "",
        };
        CniError::new(code::TRY_AGAIN_LATER, format!("{e}{hint}"))
    }
}

pub type CniResult<T> = Result<T, CniError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> CniResult<Command> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("unknown CNI_COMMAND {other:?}"),
                ))
            }
        })
    }

    /// The oldest conf version that has this command.
    pub fn min_version(self) -> &'static str {
        match self {
            Command::Check => "0.4.0",
            Command::Status | Command::Gc => "1.1.0",
            _ => "0.3.0",
        }
    }
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub container_id: String,
    pub netns: Option<String>,
    pub ifname: String,
    pub path: Vec<String>,
}

impl Env {
    /// Read and validate the variables `cmd` needs from `vars`.
    pub fn from_vars(cmd: Command, vars: &HashMap<String, String>) -> CniResult<Env> {
        let get = |k: &str| vars.get(k).filter(|v| !v.is_empty()).cloned();
        let (need_id, need_netns, need_ifname, need_path) = match cmd {
            Command::Add | Command::Check => (true, true, true, true),
            Command::Del => (true, false, true, true),
            Command::Status | Command::Gc | Command::Version => (false, false, false, false),
        };
        let mut missing = Vec::new();
        for (need, key) in [
            (need_id, "CNI_CONTAINERID"),
            (need_netns, "CNI_NETNS"),
            (need_ifname, "CNI_IFNAME"),
            (need_path, "CNI_PATH"),
        ] {
            if need && get(key).is_none() {
                missing.push(key);
            }
        }
        if !missing.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "required environment variables missing: {}",
                    missing.join(", ")
                ),
            ));
        }
        let env = Env {
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            path: get("CNI_PATH")
                .map(|p| {
                    p.split(':')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
        };
        if need_id {
            validate_container_id(&env.container_id)?;
        }
        if need_ifname {
            validate_ifname(&env.ifname)?;
        }
        Ok(env)
    }
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-'
}

/// Container ID: starts alphanumeric, then alphanumerics, `_`, `.`, `-` (spec 1.1). This also
/// keeps it from naming anything outside the store directory.
pub fn validate_container_id(id: &str) -> CniResult<()> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(is_id_char)
        && id.len() <= 255;
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "invalid CNI_CONTAINERID {id:?}: must start with a letter or digit \
                 followed by letters, digits, '_', '.' or '-'"
            ),
        ))
    }
}

/// Interface name: at most 15 bytes, not `.`/`..`, no `/`, `:` or whitespace (spec 1.1).
pub fn validate_ifname(name: &str) -> CniResult<()> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if bad {
        Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "invalid CNI_IFNAME {name:?}: 1-15 characters, not '.' or '..', \
                 without '/', ':' or whitespace"
            ),
        ))
    } else {
        Ok(())
    }
}

/// Network name: same character rules as the container ID (spec 1.1); it names the store
/// directory, so it must not be able to escape it.
pub fn validate_network_name(name: &str) -> CniResult<()> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(is_id_char)
        && name.len() <= 255;
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "invalid network name {name:?}: must start with a letter or digit \
                 followed by letters, digits, '_', '.' or '-'"
            ),
        ))
    }
}

/// Compare two dotted versions numerically.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parse = |v: &str| -> Vec<u64> { v.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(a).cmp(&parse(b))
}

/// Accept the conf's version if we speak it, and it has the command.
pub fn check_version(conf_version: &str, cmd: Command) -> CniResult<()> {
    if !SUPPORTED_VERSIONS.contains(&conf_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "incompatible CNI versions: config is {conf_version:?}, plugin supports {:?}",
                SUPPORTED_VERSIONS
            ),
        ));
    }
    if version_cmp(conf_version, cmd.min_version()).is_lt() {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "config version {conf_version} does not allow {:?} (needs {} or later)",
                cmd,
                cmd.min_version()
            ),
        ));
    }
    Ok(())
}

/// The answer to VERSION.
pub fn version_info() -> Value {
    json!({ "cniVersion": CURRENT_VERSION, "supportedVersions": SUPPORTED_VERSIONS })
}

// ---- results ----

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub mtu: Option<u32>,
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// Index into `interfaces`.
    pub interface: Option<usize>,
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
}

impl AddResult {
    /// The result JSON in the shape of `version`.
    pub fn to_json(&self, version: &str) -> Value {
        let v1 = version_cmp(version, "1.0.0").is_ge();
        let v11 = version_cmp(version, "1.1.0").is_ge();
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut o = Map::new();
                o.insert("name".into(), json!(i.name));
                o.insert("mac".into(), json!(i.mac));
                if let (true, Some(mtu)) = (v11, i.mtu) {
                    o.insert("mtu".into(), json!(mtu));
                }
                if let Some(s) = &i.sandbox {
                    o.insert("sandbox".into(), json!(s));
                }
                Value::Object(o)
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut o = Map::new();
                if !v1 {
                    let fam = if ip.address.is_ipv4() { "4" } else { "6" };
                    o.insert("version".into(), json!(fam));
                }
                if let Some(i) = ip.interface {
                    o.insert("interface".into(), json!(i));
                }
                o.insert(
                    "address".into(),
                    json!(format!("{}/{}", ip.address.ip(), ip.address.prefix())),
                );
                if let Some(gw) = ip.gateway {
                    o.insert("gateway".into(), json!(gw.to_string()));
                }
                Value::Object(o)
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut o = Map::new();
                o.insert("dst".into(), json!(r.dst.to_string()));
                if let Some(gw) = r.gw {
                    o.insert("gw".into(), json!(gw.to_string()));
                }
                Value::Object(o)
            })
            .collect();
        json!({
            "cniVersion": version,
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": {},
        })
    }

    /// Read a `prevResult` (any supported shape) back.
    pub fn from_json(v: &Value) -> CniResult<AddResult> {
        let bad = |what: &str| CniError::new(code::DECODE, format!("prevResult: invalid {what}"));
        let mut out = AddResult::default();
        for i in v["interfaces"].as_array().into_iter().flatten() {
            out.interfaces.push(Interface {
                name: i["name"]
                    .as_str()
                    .ok_or_else(|| bad("interface name"))?
                    .into(),
                mac: i["mac"].as_str().unwrap_or_default().into(),
                mtu: i["mtu"].as_u64().map(|m| m as u32),
                sandbox: i["sandbox"].as_str().map(str::to_string),
            });
        }
        for ip in v["ips"].as_array().into_iter().flatten() {
            let address = ip["address"]
                .as_str()
                .and_then(|s| s.parse::<IpNetwork>().ok())
                .ok_or_else(|| bad("ips address"))?;
            let gateway = match ip["gateway"].as_str() {
                Some(g) => Some(g.parse().map_err(|_| bad("ips gateway"))?),
                None => None,
            };
            out.ips.push(IpConfig {
                interface: ip["interface"].as_u64().map(|i| i as usize),
                address,
                gateway,
            });
        }
        for r in v["routes"].as_array().into_iter().flatten() {
            let dst = r["dst"]
                .as_str()
                .and_then(|s| s.parse::<IpNetwork>().ok())
                .ok_or_else(|| bad("route dst"))?;
            let gw = match r["gw"].as_str() {
                Some(g) => Some(g.parse().map_err(|_| bad("route gw"))?),
                None => None,
            };
            out.routes.push(Route { dst, gw });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subnet_file_problem_is_try_again_later() {
        use flannel_subnet_env::SubnetEnv;
        let incomplete = SubnetEnv::parse("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_MTU=1450\n");
        let e: CniError = incomplete.unwrap_err().into();
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.msg.contains("FLANNEL_SUBNET"), "{e}");
        assert!(e.msg.contains("FLANNEL_IPMASQ"), "{e}");
        assert!(e.msg.contains("flanneld not ready"), "{e}");
        let malformed = SubnetEnv::parse("FLANNEL_MTU=big\n");
        let e: CniError = malformed.unwrap_err().into();
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.msg.contains("FLANNEL_MTU=big"), "{e}");
        let absent = SubnetEnv::load(std::path::Path::new("/nonexistent/subnet.env"));
        let e: CniError = absent.unwrap_err().into();
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.msg.contains("/nonexistent/subnet.env"), "{e}");
        assert!(e.msg.contains("is flanneld running"), "{e}");
    }

    fn vars(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_requires_per_command() {
        let e = Env::from_vars(Command::Add, &vars(&[("CNI_CONTAINERID", "a")])).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_NETNS") && e.msg.contains("CNI_IFNAME"));
        assert!(!e.msg.contains("CNI_CONTAINERID"));
        // DEL does not need a netns.
        let env = Env::from_vars(
            Command::Del,
            &vars(&[
                ("CNI_CONTAINERID", "abc"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/a:/b"),
            ]),
        )
        .unwrap();
        assert_eq!(env.path, vec!["/a", "/b"]);
        assert!(env.netns.is_none());
        assert!(Env::from_vars(Command::Status, &vars(&[])).is_ok());
    }

    #[test]
    fn ids_that_escape_are_rejected() {
        for bad in ["", "../x", "a/b", ".", "..", "-a", "a b", "a\0"] {
            assert_eq!(
                validate_container_id(bad).unwrap_err().code,
                code::INVALID_ENV,
                "{bad}"
            );
            assert_eq!(
                validate_network_name(bad).unwrap_err().code,
                code::INVALID_CONFIG,
                "{bad}"
            );
        }
        assert!(validate_container_id("0123abc_def.g-h").is_ok());
        assert!(validate_network_name("cbr0").is_ok());
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "abcdefghijklmnop"] {
            assert!(validate_ifname(bad).is_err(), "{bad}");
        }
        assert!(validate_ifname("eth0").is_ok());
    }

    #[test]
    fn version_negotiation() {
        for v in SUPPORTED_VERSIONS {
            assert!(check_version(v, Command::Add).is_ok());
        }
        assert_eq!(
            check_version("0.2.0", Command::Add).unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            check_version("9.9.9", Command::Add).unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
        assert!(check_version("0.3.1", Command::Check).is_err());
        assert!(check_version("0.4.0", Command::Check).is_ok());
        assert!(check_version("1.0.0", Command::Gc).is_err());
        assert!(check_version("1.1.0", Command::Status).is_ok());
        assert!(version_cmp("0.10.0", "0.4.0").is_gt());
        let v = version_info();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn commands() {
        assert_eq!(Command::parse("ADD").unwrap(), Command::Add);
        assert_eq!(Command::parse("GC").unwrap(), Command::Gc);
        assert_eq!(Command::parse("add").unwrap_err().code, code::INVALID_ENV);
    }

    #[test]
    fn error_json() {
        let e = CniError::new(11, "not ready").with_details("file x");
        assert_eq!(
            e.to_json("0.4.0"),
            json!({"cniVersion":"0.4.0","code":11,"msg":"not ready","details":"file x"})
        );
    }

    fn sample() -> AddResult {
        AddResult {
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: "aa:bb:cc:dd:ee:ff".into(),
                    mtu: None,
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "aa:bb:cc:dd:ee:01".into(),
                    mtu: Some(1450),
                    sandbox: Some("/var/run/netns/x".into()),
                },
            ],
            ips: vec![IpConfig {
                interface: Some(1),
                address: "10.5.72.2/24".parse().unwrap(),
                gateway: Some("10.5.72.1".parse().unwrap()),
            }],
            routes: vec![
                Route {
                    dst: "10.5.0.0/16".parse().unwrap(),
                    gw: None,
                },
                Route {
                    dst: "0.0.0.0/0".parse().unwrap(),
                    gw: Some("10.5.72.1".parse().unwrap()),
                },
            ],
        }
    }

    #[test]
    fn result_shapes_per_version() {
        let r = sample();
        let v1 = r.to_json("1.0.0");
        assert_eq!(v1["cniVersion"], "1.0.0");
        assert!(v1["ips"][0].get("version").is_none());
        assert_eq!(v1["ips"][0]["address"], "10.5.72.2/24");
        assert_eq!(v1["ips"][0]["interface"], 1);
        assert!(v1["interfaces"][1].get("mtu").is_none());
        assert_eq!(v1["interfaces"][1]["sandbox"], "/var/run/netns/x");
        assert!(v1["interfaces"][0].get("sandbox").is_none());
        assert_eq!(v1["routes"][1]["gw"], "10.5.72.1");
        assert!(v1["routes"][0].get("gw").is_none());
        assert_eq!(v1["dns"], json!({}));
        let v03 = r.to_json("0.3.1");
        assert_eq!(v03["ips"][0]["version"], "4");
        let v04 = r.to_json("0.4.0");
        assert_eq!(v04["ips"][0]["version"], "4");
        let v11 = r.to_json("1.1.0");
        assert_eq!(v11["interfaces"][1]["mtu"], 1450);
        // And back.
        for v in SUPPORTED_VERSIONS {
            assert_eq!(AddResult::from_json(&r.to_json(v)).unwrap().ips, r.ips);
            assert_eq!(
                AddResult::from_json(&r.to_json(v)).unwrap().routes,
                r.routes
            );
        }
    }
}
