//! The reading rules. Both readers share the line format, the value grammar and "a later line
//! for a key wins"; they differ only where flannel's own two readers differ (see [`Rules`]).

use std::str::FromStr;

use crate::{EnvProblem, SubnetEnv, IPMASQ, IPV6_NETWORK, IPV6_SUBNET, MTU, NETWORK, SUBNET};

/// The smallest MTU an IPv4 link may have (RFC 791) and the largest the kernel gives a veth
/// or bridge: an MTU outside them would fail later, far from this file.
const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;

/// Where flannel's two readers of this file differ.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    /// flanneld reads its old file with godotenv, which removes quotes; flannel's CNI plugin
    /// takes the value as written, so a quoted CIDR is an error there.
    unquote: bool,
    /// flannel's plugin refuses a file without a network or without `FLANNEL_IPMASQ`;
    /// flanneld only wants its old subnet back.
    require_network_and_ipmasq: bool,
    /// flanneld reads back only its subnets (flannel's `ReadCIDRsFromSubnetFile`): a missing or
    /// odd `FLANNEL_MTU` must not cost it its old subnet, so there the MTU is kept only when valid.
    strict_mtu: bool,
}

impl Rules {
    pub(crate) const PLUGIN: Rules = Rules {
        unquote: false,
        require_network_and_ipmasq: true,
        strict_mtu: true,
    };
    pub(crate) const FLANNELD: Rules = Rules {
        unquote: true,
        require_network_and_ipmasq: false,
        strict_mtu: false,
    };
}

pub(crate) fn parse(text: &str, rules: Rules) -> Result<SubnetEnv, EnvProblem> {
    let mut env = SubnetEnv {
        network: None,
        subnet: None,
        ipv6_network: None,
        ipv6_subnet: None,
        mtu: 0,
        ipmasq: false,
    };
    let mut mtu = None;
    let mut ipmasq = None;
    for entry in entries(text, rules) {
        let (key, set) = entry?;
        match key {
            NETWORK => env.network = set.map(|v| cidr(NETWORK, v)).transpose()?,
            SUBNET => env.subnet = set.map(|v| cidr(SUBNET, v)).transpose()?,
            IPV6_NETWORK => env.ipv6_network = set.map(|v| cidr(IPV6_NETWORK, v)).transpose()?,
            IPV6_SUBNET => env.ipv6_subnet = set.map(|v| cidr(IPV6_SUBNET, v)).transpose()?,
            MTU => {
                mtu = match set.map(parse_mtu).transpose() {
                    Err(e) if rules.strict_mtu => return Err(e),
                    read => read.unwrap_or(None),
                }
            }
            IPMASQ => ipmasq = set.map(parse_ipmasq),
            _ => {} // other keys belong to other tools, as for flannel
        }
    }
    let missing = missing_keys(&env, mtu.is_some(), ipmasq.is_some(), rules);
    if !missing.is_empty() {
        return Err(EnvProblem::Missing { keys: missing });
    }
    env.mtu = mtu.unwrap_or_default();
    env.ipmasq = ipmasq.unwrap_or(false);
    Ok(env)
}

/// The `KEY=VALUE` lines of `text` in order, as `rules` read them: key and value trimmed, the
/// value unquoted for flanneld, an empty value as `None` ("not set", as when a shell sources
/// the file). Blank lines and `#` comments are skipped; any other line without `=` is an error.
pub(crate) fn entries(
    text: &str,
    rules: Rules,
) -> impl Iterator<Item = Result<(&str, Option<&str>), EnvProblem>> {
    text.lines().enumerate().filter_map(move |(i, raw)| {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Some(Err(EnvProblem::NotKeyValue {
                line: i + 1,
                text: raw.to_string(),
            }));
        };
        let value = value.trim();
        let value = if rules.unquote { unquote(value) } else { value };
        Some(Ok((key.trim(), (!value.is_empty()).then_some(value))))
    })
}

/// In the order and grouping of flannel's plugin: a family-less key is missing only when
/// neither family has it.
fn missing_keys(env: &SubnetEnv, mtu: bool, ipmasq: bool, rules: Rules) -> Vec<&'static str> {
    let strict = rules.require_network_and_ipmasq;
    let mut keys = Vec::new();
    if strict && env.network.is_none() && env.ipv6_network.is_none() {
        keys.extend([NETWORK, IPV6_NETWORK]);
    }
    if env.subnet.is_none() && env.ipv6_subnet.is_none() {
        keys.extend([SUBNET, IPV6_SUBNET]);
    }
    if rules.strict_mtu && !mtu {
        keys.push(MTU);
    }
    if strict && !ipmasq {
        keys.push(IPMASQ);
    }
    keys
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

fn bad(key: &'static str, value: &str, why: &'static str) -> EnvProblem {
    EnvProblem::BadValue {
        key,
        value: value.to_string(),
        why,
    }
}

/// `<address>/<length>` of the key's family. A bare address is refused, as Go's
/// `net.ParseCIDR` refuses it, rather than read as a host route.
fn cidr<N: FromStr>(key: &'static str, value: &str) -> Result<N, EnvProblem> {
    let why = "expected <address>/<prefix length> of the right family";
    if !value.contains('/') {
        return Err(bad(key, value, why));
    }
    value.parse().map_err(|_| bad(key, value, why))
}

/// Decimal digits only, as Go's `strconv.ParseUint(v, 10, 32)` in flannel's plugin (Rust's
/// own parser would also take a leading `+`).
fn parse_mtu(value: &str) -> Result<u32, EnvProblem> {
    let why = "expected a whole number of bytes from 68 to 65535";
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(MTU, value, why));
    }
    match value.parse::<u32>() {
        Ok(mtu) if MTU_RANGE.contains(&mtu) => Ok(mtu),
        _ => Err(bad(MTU, value, why)),
    }
}

/// flannel's plugin reads `parts[1] == "true"`: any other value, `1` and `TRUE` included, is
/// false and not an error. flanneld itself only ever writes `true` or `false`.
fn parse_ipmasq(value: &str) -> bool {
    value == "true"
}
