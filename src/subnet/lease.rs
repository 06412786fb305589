//! Leases as flannel stores them: the subnet key codec and the JSON value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::{FamilyConfig, NetworkConfig};
use crate::netlink::Net;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("subnet key {key:?}: {why}")]
    BadKey { key: String, why: String },
    #[error("lease value at {key}: {why}")]
    BadValue { key: String, why: String },
}

/// Characters of a key or an error kept in a [`LeaseError`]: entries under the prefix come from
/// anyone with write access, and a megabyte value must not become a megabyte log line.
const MAX_SHOWN: usize = 160;

/// `s`, cut to [`MAX_SHOWN`] characters with its full length noted when longer.
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(MAX_SHOWN) {
        None => s.to_string(),
        Some((cut, _)) => format!("{}… ({} bytes)", &s[..cut], s.len()),
    }
}

/// The subnet(s) a lease covers; the etcd key is `<prefix>/subnets/<SubnetKey>`.
///
/// IPv4-only leases look like `10.5.52.0-24`, dual-stack ones `10.5.52.0-24&fc00::-64`, and
/// IPv6-only ones `fc00::-64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubnetKey {
    pub ipv4: Option<Ipv4Network>,
    pub ipv6: Option<Ipv6Network>,
}

impl SubnetKey {
    pub fn v4(net: Ipv4Network) -> Self {
        SubnetKey {
            ipv4: Some(net),
            ipv6: None,
        }
    }

    /// Whether a lease with this key may be kept under `config` (inside the network, the
    /// configured length, between min and max).
    ///
    /// Only enabled families are checked, each must be present in the key; a subnet of a
    /// disabled family is tolerated so that turning a family off does not orphan every lease.
    pub fn fits(&self, config: &NetworkConfig) -> bool {
        fn half<N: Net>(family: Option<FamilyConfig<N>>, subnet: Option<N>) -> bool {
            family.is_none_or(|f| subnet.is_some_and(|n| f.fits(n)))
        }
        (config.v4.is_some() || config.v6.is_some())
            && half(config.v4, self.ipv4)
            && half(config.v6, self.ipv6)
    }
}

impl fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ipv4, self.ipv6) {
            (Some(v4), Some(v6)) => write!(
                f,
                "{}-{}&{}-{}",
                v4.network(),
                v4.prefix(),
                v6.network(),
                v6.prefix()
            ),
            (Some(v4), None) => write!(f, "{}-{}", v4.network(), v4.prefix()),
            (None, Some(v6)) => write!(f, "{}-{}", v6.network(), v6.prefix()),
            (None, None) => write!(f, "<empty>"),
        }
    }
}

impl FromStr for SubnetKey {
    type Err = LeaseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| LeaseError::BadKey {
            key: clip(s),
            why: why.to_string(),
        };
        let mut key = SubnetKey {
            ipv4: None,
            ipv6: None,
        };
        let parts: Vec<&str> = s.split('&').collect();
        if parts.len() > 2 {
            return Err(bad("more than two subnets"));
        }
        for part in parts {
            let (ip, len) = part
                .rsplit_once('-')
                .ok_or_else(|| bad("expected <ip>-<prefix length>"))?;
            let len: u8 = len
                .parse()
                .map_err(|_| bad("prefix length is not a number"))?;
            if let Ok(ip) = ip.parse::<Ipv4Addr>() {
                key.ipv4 = Some(key_half(key.ipv4, ip, len).map_err(|why| bad(&why))?);
            } else if let Ok(ip) = ip.parse::<Ipv6Addr>() {
                key.ipv6 = Some(key_half(key.ipv6, ip, len).map_err(|why| bad(&why))?);
            } else {
                return Err(bad("not an IP address"));
            }
        }
        Ok(key)
    }
}

/// One family's subnet of a key, `<ip>-<len>`; `already` is what an earlier part gave for it.
fn key_half<N: Net>(already: Option<N>, ip: N::Addr, len: u8) -> Result<N, String> {
    if already.is_some() {
        return Err(format!("two {} subnets", N::NAME));
    }
    let net = N::with_prefix(ip, len)
        .ok_or_else(|| format!("{} prefix length > {}", N::NAME, N::HOST_PREFIX))?;
    if net.net_addr() != ip {
        return Err(format!(
            "{} address is not the subnet's network address",
            N::NAME
        ));
    }
    Ok(net)
}

/// The JSON value of a lease, exactly as flannel writes and reads it.
///
/// `PublicIPv6` is always written (as `null` when absent); the backend fields are omitted when
/// empty. Backend data is kept as raw JSON so that a peer's bytes round-trip untouched.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP", default, with = "opt_v4")]
    pub public_ip: Option<Ipv4Addr>,
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_type: String,
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<Box<RawValue>>,
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<Box<RawValue>>,
}

impl PartialEq for LeaseAttrs {
    fn eq(&self, other: &Self) -> bool {
        fn raw(v: &Option<Box<RawValue>>) -> Option<&str> {
            v.as_deref().map(RawValue::get)
        }
        self.public_ip == other.public_ip
            && self.public_ipv6 == other.public_ipv6
            && self.backend_type == other.backend_type
            && raw(&self.backend_data) == raw(&other.backend_data)
            && raw(&self.backend_v6_data) == raw(&other.backend_v6_data)
    }
}
impl Eq for LeaseAttrs {}

/// flannel writes an IPv4-only host's `PublicIP` as a string, and an IPv6-only host's as
/// `"0.0.0.0"`; both read back here, `0.0.0.0` as "none".
mod opt_v4 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::net::Ipv4Addr;

    pub fn serialize<S: Serializer>(v: &Option<Ipv4Addr>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&v.unwrap_or(Ipv4Addr::UNSPECIFIED))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Addr>, D::Error> {
        let v: Option<Ipv4Addr> = Option::deserialize(d)?;
        Ok(v.filter(|ip| !ip.is_unspecified()))
    }
}

impl LeaseAttrs {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("lease attributes always serialize")
    }

    pub fn from_json(key: &str, value: &[u8]) -> Result<Self, LeaseError> {
        serde_json::from_slice(value).map_err(|e| LeaseError::BadValue {
            key: clip(key),
            why: clip(&e.to_string()),
        })
    }

    /// The backend a lease belongs to; flannel's udp backend writes no `BackendType`.
    pub fn effective_backend_type(&self) -> &str {
        if self.backend_type.is_empty() {
            "udp"
        } else {
            &self.backend_type
        }
    }

    /// Backend data parsed as JSON (`Null` when absent).
    pub fn backend_data_value(&self) -> serde_json::Value {
        self.backend_data
            .as_deref()
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

/// One host's lease as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: SubnetKey,
    pub attrs: LeaseAttrs,
    /// The etcd lease attached to the key; `None` marks a reservation.
    pub etcd_lease: Option<i64>,
    /// etcd's mod_revision of the key.
    pub revision: i64,
    /// etcd's create_revision of the key: of two overlapping leases the older one wins.
    pub create_revision: i64,
}

impl Lease {
    pub fn is_reservation(&self) -> bool {
        self.etcd_lease.is_none()
    }
}

/// The desired set of peers: every lease under the prefix except our own.
pub type PeerSet = BTreeMap<SubnetKey, Lease>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_codec_round_trips_flannel_forms() {
        for s in ["10.5.52.0-24", "10.5.52.0-24&fc00::-64", "fc00:0:0:1::-64"] {
            let k: SubnetKey = s.parse().unwrap();
            assert_eq!(k.to_string(), s);
        }
    }

    #[test]
    fn key_codec_rejects_garbage() {
        for s in [
            "",
            "10.5.52.0",
            "10.5.52.1-24",
            "10.5.52.0-33",
            "x-24",
            "a-1&b-2&c-3",
        ] {
            assert!(s.parse::<SubnetKey>().is_err(), "{s} parsed");
        }
    }

    #[test]
    fn key_codec_names_what_is_wrong() {
        for (s, why) in [
            ("10.5.1.0-24&10.5.2.0-24", "two IPv4 subnets"),
            ("fc00::-64&fc00:1::-64", "two IPv6 subnets"),
            ("10.5.52.0-33", "IPv4 prefix length > 32"),
            ("fc00::-129", "IPv6 prefix length > 128"),
            (
                "10.5.52.1-24",
                "IPv4 address is not the subnet's network address",
            ),
            (
                "fc00::1-64",
                "IPv6 address is not the subnet's network address",
            ),
            ("x-24", "not an IP address"),
        ] {
            let err = s.parse::<SubnetKey>().unwrap_err();
            assert_eq!(err.to_string(), format!("subnet key {s:?}: {why}"));
        }
    }

    #[test]
    fn lease_json_matches_flannel() {
        let flannel = r#"{"PublicIP":"192.0.2.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:aa:01:02:03"}}"#;
        let attrs = LeaseAttrs::from_json("k", flannel.as_bytes()).unwrap();
        assert_eq!(attrs.public_ip, Some(Ipv4Addr::new(192, 0, 2, 3)));
        assert_eq!(attrs.public_ipv6, None);
        assert_eq!(attrs.backend_type, "vxlan");
        assert_eq!(attrs.backend_data_value()["VtepMAC"], "c6:d2:aa:01:02:03");
        assert_eq!(attrs.to_json(), flannel);
    }

    #[test]
    fn lease_without_backend_type_is_udp() {
        let udp = r#"{"PublicIP":"192.0.2.9","PublicIPv6":null}"#;
        let attrs = LeaseAttrs::from_json("k", udp.as_bytes()).unwrap();
        assert_eq!(attrs.effective_backend_type(), "udp");
        assert_eq!(attrs.to_json(), udp);
    }

    #[test]
    fn lease_with_ipv6_round_trips() {
        let v = r#"{"PublicIP":"192.0.2.3","PublicIPv6":"2001:db8::3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:aa:01:02:03"},"BackendV6Data":{"VNI":1,"VtepMAC":"c6:d2:aa:01:02:04"}}"#;
        let attrs = LeaseAttrs::from_json("k", v.as_bytes()).unwrap();
        assert_eq!(attrs.public_ipv6, Some("2001:db8::3".parse().unwrap()));
        assert_eq!(attrs.to_json(), v);
    }

    #[test]
    fn huge_keys_and_values_are_cut_in_errors() {
        let junk = format!("\"{}\"", "x".repeat(1_400_000));
        let err = LeaseAttrs::from_json("/coreos.com/network/subnets/10.5.1.0-24", junk.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("10.5.1.0-24"), "{err}");
        assert!(err.len() < 1000, "error of {} bytes", err.len());
        let long_key = format!("{}-24", "9".repeat(1_000_000));
        let err = long_key.parse::<SubnetKey>().unwrap_err().to_string();
        assert!(err.len() < 1000, "error of {} bytes", err.len());
        assert!(err.contains("1000003 bytes"), "{err}");
    }

    #[test]
    fn garbage_lease_value_is_an_error_naming_the_key() {
        let err =
            LeaseAttrs::from_json("/coreos.com/network/subnets/10.5.1.0-24", b"{nope").unwrap_err();
        assert!(err.to_string().contains("10.5.1.0-24"), "{err}");
    }

    fn key(s: &str) -> SubnetKey {
        s.parse().unwrap()
    }

    #[test]
    fn fits_v4() {
        let c =
            NetworkConfig::parse(br#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.200.0"}"#).unwrap();
        assert!(key("10.5.1.0-24").fits(&c));
        assert!(key("10.5.200.0-24").fits(&c));
        assert!(!key("10.5.0.0-24").fits(&c), "below SubnetMin");
        assert!(!key("10.5.201.0-24").fits(&c), "above SubnetMax");
        assert!(!key("10.5.1.0-25").fits(&c), "wrong length");
        assert!(!key("10.6.1.0-24").fits(&c), "outside Network");
        assert!(!key("fc00::-64").fits(&c), "no IPv4 subnet");
        assert!(
            key("10.5.1.0-24&fc00::-64").fits(&c),
            "extra family tolerated"
        );
        let unaligned = SubnetKey::v4(Ipv4Network::new("10.5.1.1".parse().unwrap(), 24).unwrap());
        assert!(!unaligned.fits(&c));
    }

    #[test]
    fn fits_dual_stack_and_v6_only() {
        let c = NetworkConfig::parse(
            br#"{"EnableIPv6":true,"Network":"10.5.0.0/16","IPv6Network":"fc00::/48"}"#,
        )
        .unwrap();
        assert!(key("10.5.1.0-24&fc00:0:0:1::-64").fits(&c));
        assert!(!key("10.5.1.0-24").fits(&c), "IPv6 subnet missing");
        assert!(!key("10.5.1.0-24&fc00::-64").fits(&c), "first IPv6 subnet");
        assert!(
            !key("10.5.1.0-24&fc00:1::-64").fits(&c),
            "outside IPv6Network"
        );
        let c = NetworkConfig::parse(
            br#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48"}"#,
        )
        .unwrap();
        assert!(key("fc00:0:0:ffff::-64").fits(&c));
        assert!(!key("fc00:0:0:ffff::-65").fits(&c));
        assert!(!key("10.5.1.0-24").fits(&c));
    }
}
