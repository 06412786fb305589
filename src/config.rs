//! The network configuration JSON at `<prefix>/config`: parsing and flannel's validation rules.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::backend::BackendType;
use crate::netlink::Net;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The text is not a JSON object.
    #[error("network config is not valid JSON")]
    Json(#[source] serde_json::Error),
    /// A field is missing, of the wrong type or out of range; names the field and the value.
    #[error("network config: {field} {value}: {why}")]
    Field {
        field: &'static str,
        value: String,
        why: String,
    },
}

impl ConfigError {
    /// Whether the config names no backend this build has (`Backend.Type` unknown, empty or
    /// not a string). Waiting cannot help: flannel exits on it too ("Error fetching backend").
    pub fn names_no_backend(&self) -> bool {
        matches!(self, ConfigError::Field { field, .. } if *field == "Backend.Type")
    }
}

/// A validated network configuration, with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    /// The IPv4 half: `Some` exactly when IPv4 is enabled.
    pub v4: Option<FamilyConfig<Ipv4Network>>,
    /// The IPv6 half: `Some` exactly when IPv6 is enabled.
    pub v6: Option<FamilyConfig<Ipv6Network>>,
    pub enable_nftables: bool,
    /// `Backend.Type`, looked up case-insensitively; `udp` when `Backend` is absent (as
    /// flannel's code does).
    pub backend_type: BackendType,
    /// The whole `Backend` object, for the backend to read its options from.
    pub backend: serde_json::Map<String, serde_json::Value>,
}

/// One address family's validated part of the config: the overlay network, the length of the
/// subnets handed out, and the first and last subnet that may be handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyConfig<N: Net> {
    pub network: N,
    pub subnet_len: u8,
    pub subnet_min: N::Addr,
    pub subnet_max: N::Addr,
}

impl<N: Net> FamilyConfig<N> {
    /// Whether a lease may hold this subnet: inside the network, the configured length, on a
    /// subnet boundary, between min and max.
    pub fn fits(&self, subnet: N) -> bool {
        let ip = subnet.ip_addr();
        subnet.prefix_len() == self.subnet_len
            && ip == subnet.net_addr()
            && self.network.has(ip)
            && (self.subnet_min..=self.subnet_max).contains(&ip)
    }

    /// How many subnets lie between min and max, both included.
    pub fn subnet_count(&self) -> u128 {
        let (min, max) = (bits(self.subnet_min.into()), bits(self.subnet_max.into()));
        subnet_count(min, max, N::HOST_PREFIX, self.subnet_len)
    }
}

/// An address as a number, IPv4 in the low 32 bits.
fn bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

impl NetworkConfig {
    /// Parses and validates the JSON, filling in flannel's defaults; the error names the first
    /// offending field and its value.
    pub fn parse(json: &[u8]) -> Result<Self, ConfigError> {
        let entries: Entries = serde_json::from_slice(json).map_err(ConfigError::Json)?;
        let enable_ipv4 = entries.bool_or("EnableIPv4", true)?;
        let enable_ipv6 = entries.bool_or("EnableIPv6", false)?;
        let enable_nftables = entries.bool_or("EnableNFTables", false)?;
        // Every field is type-checked even when its family is disabled, as flannel's JSON
        // decoding does before any rule runs.
        let v4 = V4.given(&entries)?;
        let v6 = V6.given(&entries)?;
        let (backend_type, backend) = backend(&entries)?;
        if !enable_ipv4 && !enable_ipv6 {
            return Err(field_err(
                "EnableIPv4",
                "false".into(),
                "no address family enabled (EnableIPv6 is false too)",
            ));
        }
        Ok(NetworkConfig {
            v4: enable_ipv4
                .then(|| V4.validate(v4).map(Ranged::v4))
                .transpose()?,
            v6: enable_ipv6
                .then(|| V6.validate(v6).map(Ranged::v6))
                .transpose()?,
            enable_nftables,
            backend_type,
            backend,
        })
    }
}

fn subnet_count(min: u128, max: u128, bits: u8, len: u8) -> u128 {
    if min > max || len > bits {
        return 0;
    }
    ((max - min) >> (bits - len)) + 1
}

fn field_err(field: &'static str, value: String, why: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        value,
        why: why.into(),
    }
}

/// The value as it appeared in the JSON, cut short so that a huge value cannot flood a log line.
fn shown(v: &Value) -> String {
    const LIMIT: usize = 80;
    let s = v.to_string();
    match s.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s,
    }
}

/// The top-level object's members in document order (serde_json's own map would sort them and
/// lose which of two differently-cased duplicates came last).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(EntriesVisitor)
    }
}

impl Entries {
    /// The member named `name`, ignoring ASCII case. As with Go's decoder, which flannel uses,
    /// the last duplicate wins and `null` leaves the field at its default.
    fn get(&self, name: &str) -> Option<&Value> {
        self.0
            .iter()
            .rev()
            .find(|(k, v)| k.eq_ignore_ascii_case(name) && !v.is_null())
            .map(|(_, v)| v)
    }

    fn bool_or(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(field_err(name, shown(v), "must be true or false")),
        }
    }

    /// A prefix length; 0 means "not given", as flannel treats its zero value.
    fn len(&self, name: &'static str) -> Result<Option<u64>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(0) => Ok(None),
                Some(n) => Ok(Some(n)),
                None => Err(field_err(name, shown(v), "must be a whole number")),
            },
        }
    }

    fn string(&self, name: &'static str) -> Result<Option<&str>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(field_err(name, shown(v), "must be a string")),
        }
    }
}

/// What differs between the IPv4 and the IPv6 rules; addresses are held as `u128` either way.
struct FamilyRules {
    bits: u8,
    network_field: &'static str,
    len_field: &'static str,
    min_field: &'static str,
    max_field: &'static str,
    /// Longest subnet length allowed: a host needs room for a tunnel and a bridge address.
    max_len: u8,
    /// Longest network prefix when the subnet length is left to its default.
    max_default_prefix: u8,
    /// Networks with a prefix up to this one get `big_len` subnets by default.
    big_prefix: u8,
    big_len: u8,
    parse_addr: fn(&str) -> Option<u128>,
    show: fn(u128) -> String,
}

const V4: FamilyRules = FamilyRules {
    bits: 32,
    network_field: "Network",
    len_field: "SubnetLen",
    min_field: "SubnetMin",
    max_field: "SubnetMax",
    max_len: 30,
    max_default_prefix: 28,
    big_prefix: 22,
    big_len: 24,
    parse_addr: |s| s.parse::<Ipv4Addr>().ok().map(|a| u32::from(a).into()),
    show: |a| Ipv4Addr::from(a as u32).to_string(),
};

const V6: FamilyRules = FamilyRules {
    bits: 128,
    network_field: "IPv6Network",
    len_field: "IPv6SubnetLen",
    min_field: "IPv6SubnetMin",
    max_field: "IPv6SubnetMax",
    max_len: 126,
    max_default_prefix: 124,
    big_prefix: 62,
    big_len: 64,
    parse_addr: |s| s.parse::<Ipv6Addr>().ok().map(u128::from),
    show: |a| Ipv6Addr::from(a).to_string(),
};

/// One family's fields, type-checked but not yet validated against each other.
struct Given {
    network: Option<(u128, u8)>,
    len: Option<u64>,
    min: Option<u128>,
    max: Option<u128>,
}

/// One family's validated range.
struct Ranged {
    network: u128,
    prefix: u8,
    len: u8,
    min: u128,
    max: u128,
}

impl Ranged {
    // `validate` returned a prefix and values that fit the family, so these conversions are exact.
    fn v4(self) -> FamilyConfig<Ipv4Network> {
        let addr = |a: u128| Ipv4Addr::from(a as u32);
        FamilyConfig {
            network: Ipv4Network::new(addr(self.network), self.prefix).expect("prefix ≤ 32"),
            subnet_len: self.len,
            subnet_min: addr(self.min),
            subnet_max: addr(self.max),
        }
    }

    fn v6(self) -> FamilyConfig<Ipv6Network> {
        FamilyConfig {
            network: Ipv6Network::new(self.network.into(), self.prefix).expect("prefix ≤ 128"),
            subnet_len: self.len,
            subnet_min: self.min.into(),
            subnet_max: self.max.into(),
        }
    }
}

impl FamilyRules {
    fn given(&self, e: &Entries) -> Result<Given, ConfigError> {
        Ok(Given {
            network: self.cidr(e, self.network_field)?,
            len: e.len(self.len_field)?,
            min: self.bound(e, self.min_field)?,
            max: self.bound(e, self.max_field)?,
        })
    }

    /// `<address>/<length>`, strictly: Go's CIDR parser, which flannel uses, takes neither a bare
    /// address nor a dotted netmask.
    fn cidr(&self, e: &Entries, name: &'static str) -> Result<Option<(u128, u8)>, ConfigError> {
        let Some(s) = e.string(name)? else {
            return Ok(None);
        };
        let parsed = s.split_once('/').and_then(|(addr, len)| {
            let addr = (self.parse_addr)(addr)?;
            let all_digits = !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit());
            let len: u8 = len.parse().ok().filter(|l| all_digits && *l <= self.bits)?;
            Some((addr, len))
        });
        match parsed {
            Some(net) => Ok(Some(net)),
            None => Err(field_err(
                name,
                format!("{s:?}"),
                format!("not a CIDR network (expected e.g. {})", self.example()),
            )),
        }
    }

    fn bound(&self, e: &Entries, name: &'static str) -> Result<Option<u128>, ConfigError> {
        let Some(s) = e.string(name)? else {
            return Ok(None);
        };
        match (self.parse_addr)(s) {
            // flannel cannot tell an all-zero IPv4 bound from an absent one, so neither do we.
            Some(0) if self.bits == 32 => Ok(None),
            Some(a) => Ok(Some(a)),
            None => Err(field_err(name, format!("{s:?}"), "not an IP address")),
        }
    }

    fn example(&self) -> &'static str {
        if self.bits == 32 {
            "10.5.0.0/16"
        } else {
            "fc00::/48"
        }
    }

    fn validate(&self, g: Given) -> Result<Ranged, ConfigError> {
        let (network, prefix) = self.network(g.network)?;
        let len = self.subnet_len(network, prefix, g.len)?;
        let mut r = Ranged {
            network,
            prefix,
            len,
            min: 0,
            max: 0,
        };
        let size = self.size(&r);
        r.min = match g.min {
            None => network + size,
            Some(a) => self.check_bound(self.min_field, a, &r)?,
        };
        r.max = match g.max {
            None => self.last(&r) - (size - 1),
            Some(a) => self.check_bound(self.max_field, a, &r)?,
        };
        if r.min > r.max {
            return Err(field_err(
                self.min_field,
                (self.show)(r.min),
                format!("greater than {} {}", self.max_field, (self.show)(r.max)),
            ));
        }
        Ok(r)
    }

    fn network(&self, given: Option<(u128, u8)>) -> Result<(u128, u8), ConfigError> {
        let (network, prefix) = given.ok_or_else(|| {
            field_err(
                self.network_field,
                "missing".into(),
                format!(
                    "required when the family is enabled (e.g. {})",
                    self.example()
                ),
            )
        })?;
        let host = self.host_mask(prefix);
        if network & host != 0 {
            return Err(field_err(
                self.network_field,
                self.show_net(network, prefix),
                format!(
                    "host bits set; did you mean {}?",
                    self.show_net(network & !host, prefix)
                ),
            ));
        }
        Ok((network, prefix))
    }

    fn size(&self, r: &Ranged) -> u128 {
        1u128 << (self.bits - r.len)
    }

    /// The network's last address.
    fn last(&self, r: &Ranged) -> u128 {
        r.network | self.host_mask(r.prefix)
    }

    fn host_mask(&self, prefix: u8) -> u128 {
        let all = u128::MAX >> (128 - u32::from(self.bits));
        all.checked_shr(prefix.into()).unwrap_or(0)
    }

    fn show_net(&self, addr: u128, prefix: u8) -> String {
        format!("{}/{}", (self.show)(addr), prefix)
    }

    fn subnet_len(&self, network: u128, prefix: u8, given: Option<u64>) -> Result<u8, ConfigError> {
        let Some(len) = given else {
            return self.default_len(network, prefix);
        };
        if len > self.max_len.into() {
            return Err(field_err(
                self.len_field,
                len.to_string(),
                format!("must be ≤ {}", self.max_len),
            ));
        }
        // The first subnet is never handed out, so fewer than four would leave too few hosts.
        let least = u64::from(prefix) + 2;
        if len < least {
            return Err(field_err(
                self.len_field,
                len.to_string(),
                format!(
                    "must be ≥ {least} so that {} {} holds at least 4 subnets",
                    self.network_field,
                    self.show_net(network, prefix)
                ),
            ));
        }
        Ok(len as u8)
    }

    fn default_len(&self, network: u128, prefix: u8) -> Result<u8, ConfigError> {
        if prefix > self.max_default_prefix {
            return Err(field_err(
                self.network_field,
                self.show_net(network, prefix),
                format!(
                    "too small: the prefix must be ≤ /{} to hold 4 subnets of /{}",
                    self.max_default_prefix, self.max_len
                ),
            ));
        }
        Ok(if prefix <= self.big_prefix {
            self.big_len
        } else {
            prefix + 2
        })
    }

    /// An explicit SubnetMin or SubnetMax: inside the network and on a subnet boundary.
    fn check_bound(
        &self,
        field: &'static str,
        addr: u128,
        r: &Ranged,
    ) -> Result<u128, ConfigError> {
        if addr < r.network || addr > self.last(r) {
            return Err(field_err(
                field,
                (self.show)(addr),
                format!(
                    "outside {} {}",
                    self.network_field,
                    self.show_net(r.network, r.prefix)
                ),
            ));
        }
        let offset = self.size(r) - 1;
        if addr & offset != 0 {
            return Err(field_err(
                field,
                (self.show)(addr),
                format!(
                    "not aligned to {} {} (e.g. {})",
                    self.len_field,
                    r.len,
                    (self.show)(addr & !offset)
                ),
            ));
        }
        Ok(addr)
    }
}

/// `Backend.Type` (lower-cased) and the whole `Backend` object.
fn backend(e: &Entries) -> Result<(BackendType, Map<String, Value>), ConfigError> {
    let obj = match e.get("Backend") {
        None => return Ok((BackendType::Udp, Map::new())),
        Some(Value::Object(obj)) => obj,
        Some(v) => return Err(field_err("Backend", shown(v), "must be an object")),
    };
    let ty = obj
        .iter()
        .rev()
        .find(|(k, v)| k.eq_ignore_ascii_case("Type") && !v.is_null())
        .map(|(_, v)| v);
    match ty {
        Some(v @ Value::String(s)) if !s.is_empty() => match BackendType::from_name(s) {
            Some(t) => Ok((t, obj.clone())),
            None => Err(field_err(
                "Backend.Type",
                shown(v),
                format!(
                    "unknown backend type (known: {})",
                    BackendType::known_names()
                ),
            )),
        },
        Some(v) => Err(field_err(
            "Backend.Type",
            shown(v),
            "must be a non-empty string naming the backend",
        )),
        None => Err(field_err(
            "Backend.Type",
            "missing".into(),
            r#"the Backend object must name its type, e.g. {"Type":"vxlan"}"#,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse(s.as_bytes())
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn field_of(r: Result<NetworkConfig, ConfigError>) -> (&'static str, String, String) {
        match r {
            Err(ConfigError::Field { field, value, why }) => (field, value, why),
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    /// The error names `field` and its message contains `value`.
    fn assert_field_err(json: &str, field: &str, value: &str) {
        let err = parse(json).unwrap_err();
        let msg = err.to_string();
        let (f, v, _) = field_of(Err(err));
        assert_eq!(f, field, "{msg}");
        assert!(
            v.contains(value),
            "value {v:?} should contain {value:?}: {msg}"
        );
        assert!(msg.contains(field) && msg.contains(value), "{msg}");
    }

    #[test]
    fn flannel_shaped_vxlan_config() {
        let c = parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":1}}"#).unwrap();
        assert!(c.v4.is_some() && c.v6.is_none() && !c.enable_nftables);
        assert_eq!(c.v4.unwrap().network, "10.5.0.0/16".parse().unwrap());
        assert_eq!(c.v4.unwrap().subnet_len, 24);
        assert_eq!(c.v4.unwrap().subnet_min, v4("10.5.1.0"));
        assert_eq!(c.v4.unwrap().subnet_max, v4("10.5.255.0"));
        assert_eq!(c.backend_type, BackendType::Vxlan);
        assert_eq!(c.backend["VNI"], 1);
        assert_eq!(c.backend["Type"], "vxlan");
        assert_eq!(c.v4.unwrap().subnet_count(), 255);
    }

    #[test]
    fn dual_stack_config() {
        let c = parse(
            r#"{"EnableIPv6":true,"Network":"10.42.0.0/16","IPv6Network":"fc00:42::/48",
                "IPv6SubnetLen":64,"EnableNFTables":true,"Backend":{"Type":"VXLAN"}}"#,
        )
        .unwrap();
        assert!(c.v4.is_some() && c.v6.is_some() && c.enable_nftables);
        assert_eq!(c.v6.unwrap().network, "fc00:42::/48".parse().unwrap());
        assert_eq!(c.v6.unwrap().subnet_len, 64);
        assert_eq!(c.v6.unwrap().subnet_min, v6("fc00:42:0:1::"));
        assert_eq!(c.v6.unwrap().subnet_max, v6("fc00:42:0:ffff::"));
        assert_eq!(c.v6.unwrap().subnet_count(), 65535);
        assert_eq!(c.backend_type, BackendType::Vxlan);
    }

    #[test]
    fn ipv6_only_config_has_no_ipv4_half() {
        let c =
            parse(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/60"}"#).unwrap();
        assert_eq!(c.v4, None);
        assert_eq!(c.v6.unwrap().subnet_len, 64);
        assert_eq!(c.v6.unwrap().subnet_count(), 15);
    }

    #[test]
    fn keys_are_case_insensitive_and_unknown_keys_ignored() {
        let c = parse(
            r#"{"network":"10.5.0.0/16","SUBNETLEN":26,"subnetmin":"10.5.0.64",
                "whatever":[1,2],"backend":{"type":"Host-GW"}}"#,
        )
        .unwrap();
        assert_eq!(c.v4.unwrap().subnet_len, 26);
        assert_eq!(c.v4.unwrap().subnet_min, v4("10.5.0.64"));
        assert_eq!(c.backend_type, BackendType::HostGw);
    }

    #[test]
    fn later_duplicate_key_wins_and_null_is_default() {
        let c =
            parse(r#"{"Network":"10.1.0.0/16","network":"10.2.0.0/16","SubnetLen":null}"#).unwrap();
        assert_eq!(c.v4.unwrap().network, "10.2.0.0/16".parse().unwrap());
        assert_eq!(c.v4.unwrap().subnet_len, 24);
    }

    #[test]
    fn not_json_or_not_an_object() {
        assert!(matches!(parse("{"), Err(ConfigError::Json(_))));
        assert!(matches!(parse("[1]"), Err(ConfigError::Json(_))));
        assert!(matches!(parse(""), Err(ConfigError::Json(_))));
        let err = parse("{").unwrap_err();
        assert_eq!(
            crate::error_chain::Chain(&err).to_string(),
            "network config is not valid JSON: EOF while parsing an object at line 1 column 1"
        );
    }

    #[test]
    fn wrong_json_types_name_field_and_value() {
        let net = r#""Network":"10.5.0.0/16""#;
        assert_field_err(
            &format!(r#"{{{net},"SubnetLen":"24"}}"#),
            "SubnetLen",
            "\"24\"",
        );
        assert_field_err(&format!(r#"{{{net},"SubnetLen":-1}}"#), "SubnetLen", "-1");
        assert_field_err(
            &format!(r#"{{{net},"SubnetLen":24.5}}"#),
            "SubnetLen",
            "24.5",
        );
        assert_field_err(
            &format!(r#"{{{net},"EnableIPv4":"yes"}}"#),
            "EnableIPv4",
            "yes",
        );
        assert_field_err(&format!(r#"{{{net},"EnableIPv6":1}}"#), "EnableIPv6", "1");
        assert_field_err(
            &format!(r#"{{{net},"EnableNFTables":0}}"#),
            "EnableNFTables",
            "0",
        );
        assert_field_err(r#"{"Network":17}"#, "Network", "17");
        assert_field_err(&format!(r#"{{{net},"SubnetMin":5}}"#), "SubnetMin", "5");
        // Type-checked even when the family is disabled, like flannel's decoder.
        assert_field_err(
            &format!(r#"{{{net},"IPv6Network":"nope"}}"#),
            "IPv6Network",
            "nope",
        );
    }

    #[test]
    fn subnet_len_30_ok_31_error() {
        let c = parse(r#"{"Network":"10.5.0.0/16","SubnetLen":30}"#).unwrap();
        assert_eq!(c.v4.unwrap().subnet_len, 30);
        assert_eq!(c.v4.unwrap().subnet_min, v4("10.5.0.4"));
        assert_eq!(c.v4.unwrap().subnet_max, v4("10.5.255.252"));
        let (f, v, why) = field_of(parse(r#"{"Network":"10.5.0.0/16","SubnetLen":31}"#));
        assert_eq!((f, v.as_str()), ("SubnetLen", "31"));
        assert!(why.contains("≤ 30"), "{why}");
        assert_eq!(
            parse(r#"{"Network":"10.5.0.0/16","SubnetLen":31}"#)
                .unwrap_err()
                .to_string(),
            "network config: SubnetLen 31: must be ≤ 30"
        );
    }

    #[test]
    fn subnet_len_must_leave_four_subnets() {
        let c = parse(r#"{"Network":"10.5.0.0/16","SubnetLen":18}"#).unwrap();
        assert_eq!(c.v4.unwrap().subnet_len, 18);
        assert_eq!(c.v4.unwrap().subnet_count(), 3);
        assert_field_err(
            r#"{"Network":"10.5.0.0/16","SubnetLen":17}"#,
            "SubnetLen",
            "17",
        );
    }

    #[test]
    fn subnet_len_zero_means_default() {
        let c = parse(r#"{"Network":"10.5.0.0/16","SubnetLen":0}"#).unwrap();
        assert_eq!(c.v4.unwrap().subnet_len, 24);
    }

    #[test]
    fn default_subnet_len_boundaries() {
        let len = |net: &str| {
            parse(&format!(r#"{{"Network":"{net}"}}"#))
                .ok()
                .map(|c| c.v4.unwrap().subnet_len)
        };
        assert_eq!(len("10.0.0.0/8"), Some(24));
        assert_eq!(len("10.5.0.0/22"), Some(24));
        assert_eq!(len("10.5.0.0/23"), Some(25));
        assert_eq!(len("10.5.0.0/28"), Some(30));
        assert_field_err(r#"{"Network":"10.5.0.0/29"}"#, "Network", "10.5.0.0/29");
    }

    #[test]
    fn network_rules() {
        assert_field_err(r#"{"SubnetLen":24}"#, "Network", "missing");
        assert_field_err(r#"{"Network":"10.5.0.0"}"#, "Network", "10.5.0.0");
        assert_field_err(r#"{"Network":"10.5.0.0/33"}"#, "Network", "10.5.0.0/33");
        assert_field_err(
            r#"{"Network":"10.5.0.0/255.255.0.0"}"#,
            "Network",
            "255.255",
        );
        assert_field_err(r#"{"Network":"fc00::/48"}"#, "Network", "fc00::/48");
        assert_field_err(r#"{"Network":"banana"}"#, "Network", "banana");
        let (_, v, why) = field_of(parse(r#"{"Network":"10.5.0.1/16"}"#));
        assert_eq!(v, "10.5.0.1/16");
        assert!(why.contains("10.5.0.0/16"), "{why}");
    }

    #[test]
    fn explicit_min_max_rules() {
        let base = r#""Network":"10.5.0.0/16""#;
        let c = parse(&format!(
            r#"{{{base},"SubnetMin":"10.5.0.0","SubnetMax":"10.5.0.0"}}"#
        ))
        .unwrap();
        assert_eq!(
            (c.v4.unwrap().subnet_min, c.v4.unwrap().subnet_max),
            (v4("10.5.0.0"), v4("10.5.0.0"))
        );
        assert_eq!(c.v4.unwrap().subnet_count(), 1);
        let c = parse(&format!(
            r#"{{{base},"SubnetMin":"10.5.10.0","SubnetMax":"10.5.19.0"}}"#
        ))
        .unwrap();
        assert_eq!(c.v4.unwrap().subnet_count(), 10);
        assert_field_err(
            &format!(r#"{{{base},"SubnetMin":"10.5.1.1"}}"#),
            "SubnetMin",
            "10.5.1.1",
        );
        assert_field_err(
            &format!(r#"{{{base},"SubnetMax":"10.5.3.128"}}"#),
            "SubnetMax",
            "10.5.3.128",
        );
        assert_field_err(
            &format!(r#"{{{base},"SubnetMin":"10.6.0.0"}}"#),
            "SubnetMin",
            "10.6.0.0",
        );
        assert_field_err(
            &format!(r#"{{{base},"SubnetMax":"10.4.255.0"}}"#),
            "SubnetMax",
            "10.4.255.0",
        );
        assert_field_err(
            &format!(r#"{{{base},"SubnetMin":"10.5.9.0","SubnetMax":"10.5.8.0"}}"#),
            "SubnetMin",
            "10.5.9.0",
        );
        assert_field_err(
            &format!(r#"{{{base},"SubnetMin":"10.5.1"}}"#),
            "SubnetMin",
            "10.5.1",
        );
    }

    #[test]
    fn zero_ipv4_bound_means_default_as_in_flannel() {
        let c = parse(r#"{"Network":"10.5.0.0/16","SubnetMin":"0.0.0.0"}"#).unwrap();
        assert_eq!(c.v4.unwrap().subnet_min, v4("10.5.1.0"));
    }

    #[test]
    fn whole_ipv4_space() {
        let c = parse(r#"{"Network":"0.0.0.0/0"}"#).unwrap();
        assert_eq!(c.v4.unwrap().subnet_len, 24);
        assert_eq!(c.v4.unwrap().subnet_min, v4("0.0.1.0"));
        assert_eq!(c.v4.unwrap().subnet_max, v4("255.255.255.0"));
        assert_eq!(c.v4.unwrap().subnet_count(), (1 << 24) - 1);
    }

    #[test]
    fn no_address_family_enabled() {
        let err = parse(r#"{"EnableIPv4":false,"Network":"10.5.0.0/16"}"#).unwrap_err();
        assert!(
            err.to_string().contains("no address family enabled"),
            "{err}"
        );
    }

    #[test]
    fn disabled_family_is_not_validated() {
        let c = parse(r#"{"Network":"10.5.0.0/16","IPv6Network":"fc00::/127"}"#).unwrap();
        assert_eq!(c.v6, None);
        let c = parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/64","SubnetLen":31}"#,
        )
        .unwrap();
        assert_eq!(c.v4, None);
    }

    #[test]
    fn ipv6_len_rules() {
        let six = |extra: &str| format!(r#"{{"EnableIPv4":false,"EnableIPv6":true{extra}}}"#);
        let len = |net: &str| {
            parse(&six(&format!(r#","IPv6Network":"{net}""#)))
                .ok()
                .map(|c| c.v6.unwrap().subnet_len)
        };
        assert_eq!(len("fc00::/48"), Some(64));
        assert_eq!(len("fc00::/62"), Some(64));
        assert_eq!(len("fc00::/63"), Some(65));
        assert_eq!(len("fc00::/124"), Some(126));
        assert_field_err(
            &six(r#","IPv6Network":"fc00::/125""#),
            "IPv6Network",
            "fc00::/125",
        );
        let c = parse(&six(r#","IPv6Network":"fc00::/64","IPv6SubnetLen":126"#)).unwrap();
        assert_eq!(c.v6.unwrap().subnet_len, 126);
        assert_field_err(
            &six(r#","IPv6Network":"fc00::/64","IPv6SubnetLen":127"#),
            "IPv6SubnetLen",
            "127",
        );
        assert_field_err(
            &six(r#","IPv6Network":"fc00::/64","IPv6SubnetLen":65"#),
            "IPv6SubnetLen",
            "65",
        );
        assert_field_err(&six(""), "IPv6Network", "missing");
        assert_field_err(
            &six(r#","IPv6Network":"fc00::1/64""#),
            "IPv6Network",
            "fc00::1/64",
        );
    }

    #[test]
    fn ipv6_min_max_rules() {
        let six = |extra: &str| {
            format!(r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48"{extra}}}"#)
        };
        let c = parse(&six(
            r#","IPv6SubnetMin":"fc00:0:0:10::","IPv6SubnetMax":"fc00:0:0:1f::""#,
        ))
        .unwrap();
        assert_eq!(c.v6.unwrap().subnet_count(), 16);
        assert_field_err(
            &six(r#","IPv6SubnetMin":"fc00::1""#),
            "IPv6SubnetMin",
            "fc00::1",
        );
        assert_field_err(
            &six(r#","IPv6SubnetMax":"fc01::""#),
            "IPv6SubnetMax",
            "fc01::",
        );
        assert_field_err(&six(r#","IPv6SubnetMin":"::""#), "IPv6SubnetMin", "::");
        assert_field_err(
            &six(r#","IPv6SubnetMin":"fc00:0:0:20::","IPv6SubnetMax":"fc00:0:0:1f::""#),
            "IPv6SubnetMin",
            "fc00:0:0:20::",
        );
        // The whole space: the count does not overflow.
        let c = parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"::/0","IPv6SubnetLen":126}"#,
        )
        .unwrap();
        assert_eq!(c.v6.unwrap().subnet_count(), (1u128 << 126) - 1);
    }

    #[test]
    fn backend_rules() {
        let net = r#""Network":"10.5.0.0/16""#;
        let c = parse(&format!("{{{net}}}")).unwrap();
        assert_eq!(c.backend_type, BackendType::Udp);
        assert!(c.backend.is_empty());
        let c = parse(&format!(
            r#"{{{net},"Backend":{{"TYPE":"UDP","Port":8285}}}}"#
        ))
        .unwrap();
        assert_eq!(c.backend_type, BackendType::Udp);
        assert_eq!(c.backend["Port"], 8285);
        assert_eq!(c.backend["TYPE"], "UDP");
        assert_field_err(
            &format!(r#"{{{net},"Backend":"vxlan"}}"#),
            "Backend",
            "vxlan",
        );
        let err = parse(&format!(r#"{{{net},"Backend":{{"VNI":1}}}}"#)).unwrap_err();
        assert!(err.to_string().contains("Backend.Type missing"), "{err}");
        assert_field_err(
            &format!(r#"{{{net},"Backend":{{"Type":7}}}}"#),
            "Backend.Type",
            "7",
        );
        assert_field_err(
            &format!(r#"{{{net},"Backend":{{"Type":""}}}}"#),
            "Backend.Type",
            "\"\"",
        );
        let (_, value, why) = field_of(parse(&format!(r#"{{{net},"Backend":{{"Type":"GCE"}}}}"#)));
        assert_eq!(value, "\"GCE\"");
        assert!(why.contains("unknown backend type"), "{why}");
        assert!(why.contains("host-gw"), "{why}");
    }

    #[test]
    fn long_values_are_cut_short_in_errors() {
        let long = "x".repeat(500);
        let err = parse(&format!(
            r#"{{"Network":"10.5.0.0/16","Backend":"{long}"}}"#
        ))
        .unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }
}
