//! Choosing the external interface and the public IP.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The interface inter-host traffic leaves through, and the addresses advertised to peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalInterface {
    pub name: String,
    pub index: u32,
    pub iface_addr: Option<Ipv4Addr>,
    pub iface_v6_addr: Option<Ipv6Addr>,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
    pub mtu: u32,
}

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};

use crate::netlink;

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("--iface {0}: no interface has this name or address (interfaces: {1})")]
    NoSuchIface(String, String),
    #[error("--iface-regex {0:?}: {1}")]
    BadRegex(String, String),
    #[error("--iface-regex: no interface name or address matches {0:?} (interfaces: {1})")]
    NoRegexMatch(String, String),
    #[error("--iface-can-reach {0}: the kernel has no route to it: {1}")]
    Unreachable(IpAddr, String),
    #[error(
        "no default route: pass --iface, --iface-regex or --iface-can-reach (interfaces: {0})"
    )]
    NoDefaultRoute(String),
    #[error("interface {0} has no IP address: give it one or choose another with --iface")]
    NoAddress(String),
    #[error("reading interfaces: {0}")]
    Os(String),
}

/// How the operator asked for the interface (flags of the same names).
#[derive(Debug, Clone, Default)]
pub struct IfaceChoice {
    pub iface: Vec<String>,
    pub iface_regex: Vec<String>,
    pub iface_can_reach: Option<IpAddr>,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
}

#[derive(Debug, Default, Clone)]
struct IfaceAddrs {
    v4: Vec<Ipv4Addr>,
    v6: Vec<Ipv6Addr>,
}

/// Picks the external interface: `--iface` entries in order, then `--iface-regex`, then
/// `--iface-can-reach`, else the interface of the default route.
///
/// Must be called from within a tokio runtime (the device's index and MTU come from netlink).
pub async fn select(choice: &IfaceChoice) -> Result<ExternalInterface, IfaceError> {
    // A bad pattern is an operator error even when --iface makes it unused.
    let patterns = compile_patterns(&choice.iface_regex)?;
    let all = list_interfaces()?;
    let names = || all.keys().cloned().collect::<Vec<_>>().join(", ");
    let (name, preferred) = if !choice.iface.is_empty() {
        choice
            .iface
            .iter()
            .find_map(|want| find_by_name_or_ip(&all, want))
            .ok_or_else(|| IfaceError::NoSuchIface(choice.iface.join(","), names()))?
    } else if !choice.iface_regex.is_empty() {
        find_by_regex(&all, &patterns)
            .ok_or_else(|| IfaceError::NoRegexMatch(choice.iface_regex.join(","), names()))?
    } else if let Some(target) = choice.iface_can_reach {
        let local = local_addr_towards(target)?;
        let name = all
            .iter()
            .find(|(_, a)| has_ip(a, local))
            .map(|(n, _)| n.clone())
            .ok_or_else(|| {
                IfaceError::Unreachable(target, format!("{local} is on no interface"))
            })?;
        (name, Some(local))
    } else {
        let name = default_route_iface().ok_or_else(|| IfaceError::NoDefaultRoute(names()))?;
        (name, None)
    };
    let addrs = all.get(&name).cloned().unwrap_or_default();
    let iface_addr = match preferred {
        Some(IpAddr::V4(ip)) => Some(ip),
        _ => addrs.v4.first().copied(),
    };
    let iface_v6_addr = match preferred {
        Some(IpAddr::V6(ip)) => Some(ip),
        _ => addrs.v6.first().copied(),
    };
    if iface_addr.is_none() && iface_v6_addr.is_none() {
        return Err(IfaceError::NoAddress(name));
    }
    let (index, mtu) = index_and_mtu(&name).await?;
    Ok(ExternalInterface {
        public_ip: choice.public_ip.or(iface_addr),
        public_ipv6: choice.public_ipv6.or(iface_v6_addr),
        name,
        index,
        iface_addr,
        iface_v6_addr,
        mtu,
    })
}

/// The device's index and MTU, as the kernel reports them over netlink.
async fn index_and_mtu(name: &str) -> Result<(u32, u32), IfaceError> {
    let os = |e: &dyn std::fmt::Display| IfaceError::Os(format!("MTU of {name}: {e}"));
    let handle = netlink::connect().map_err(|e| os(&e))?;
    let link = netlink::link_by_name(&handle, name)
        .await
        .map_err(|e| os(&e))?
        .ok_or_else(|| os(&"no such device"))?;
    let mtu = link.mtu.ok_or_else(|| os(&"the kernel reported none"))?;
    Ok((link.index, mtu))
}

fn has_ip(a: &IfaceAddrs, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => a.v4.contains(&v4),
        IpAddr::V6(v6) => a.v6.contains(&v6),
    }
}

fn find_by_name_or_ip(
    all: &BTreeMap<String, IfaceAddrs>,
    want: &str,
) -> Option<(String, Option<IpAddr>)> {
    if let Ok(ip) = want.parse::<IpAddr>() {
        return all
            .iter()
            .find(|(_, a)| has_ip(a, ip))
            .map(|(n, _)| (n.clone(), Some(ip)));
    }
    all.contains_key(want).then(|| (want.to_string(), None))
}

fn compile_patterns(patterns: &[String]) -> Result<Vec<regex::Regex>, IfaceError> {
    patterns
        .iter()
        .map(|p| regex::Regex::new(p).map_err(|e| IfaceError::BadRegex(p.clone(), e.to_string())))
        .collect()
}

fn find_by_regex(
    all: &BTreeMap<String, IfaceAddrs>,
    patterns: &[regex::Regex],
) -> Option<(String, Option<IpAddr>)> {
    for re in patterns {
        for (name, addrs) in all {
            let ips = addrs
                .v4
                .iter()
                .map(|ip| IpAddr::V4(*ip))
                .chain(addrs.v6.iter().map(|ip| IpAddr::V6(*ip)));
            if let Some(ip) = ips.clone().find(|ip| re.is_match(&ip.to_string())) {
                return Some((name.clone(), Some(ip)));
            }
            if re.is_match(name) {
                return Some((name.clone(), None));
            }
        }
    }
    None
}

/// Addresses per interface, link-local ones left out. Loopback addresses are kept only for an
/// interface that has nothing else: that is `lo`, usable when named explicitly (tests, alloc).
fn list_interfaces() -> Result<BTreeMap<String, IfaceAddrs>, IfaceError> {
    let mut out: BTreeMap<String, IfaceAddrs> = BTreeMap::new();
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| IfaceError::Os(e.to_string()))?;
    for ifa in addrs {
        let entry = out.entry(ifa.interface_name.clone()).or_default();
        let Some(addr) = ifa.address else { continue };
        if let Some(sin) = addr.as_sockaddr_in() {
            let ip = sin.ip();
            if !ip.is_link_local() {
                entry.v4.push(ip);
            }
        } else if let Some(sin6) = addr.as_sockaddr_in6() {
            let ip = sin6.ip();
            let link_local = (ip.segments()[0] & 0xffc0) == 0xfe80;
            if !link_local {
                entry.v6.push(ip);
            }
        }
    }
    for addrs in out.values_mut() {
        if addrs.v4.iter().any(|ip| !ip.is_loopback()) {
            addrs.v4.retain(|ip| !ip.is_loopback());
        }
        if addrs.v6.iter().any(|ip| !ip.is_loopback()) {
            addrs.v6.retain(|ip| !ip.is_loopback());
        }
    }
    Ok(out)
}

/// The source address the kernel would use towards `target`: connecting a UDP socket sends
/// nothing, it only runs the route lookup.
fn local_addr_towards(target: IpAddr) -> Result<IpAddr, IfaceError> {
    let bind: SocketAddr = match target {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(bind).map_err(|e| IfaceError::Unreachable(target, e.to_string()))?;
    sock.connect((target, 9))
        .map_err(|e| IfaceError::Unreachable(target, e.to_string()))?;
    sock.local_addr()
        .map(|a| a.ip())
        .map_err(|e| IfaceError::Unreachable(target, e.to_string()))
}

/// The interface of the IPv4 default route (lowest metric), else of the IPv6 one.
fn default_route_iface() -> Option<String> {
    let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let best = v4
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000")
                .then(|| (f[6].parse::<u32>().unwrap_or(u32::MAX), f[0].to_string()))
        })
        .min();
    if let Some((_, name)) = best {
        return Some(name);
    }
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    v6.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // dest destlen src srclen nexthop metric refcnt use flags iface
            (f.len() > 9 && f[0].chars().all(|c| c == '0') && f[1] == "00" && f[9] != "lo").then(
                || {
                    (
                        u32::from_str_radix(f[5], 16).unwrap_or(u32::MAX),
                        f[9].to_string(),
                    )
                },
            )
        })
        .min()
        .map(|(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--iface` entries, as the flag gives them.
    async fn select_iface(iface: &[&str]) -> Result<ExternalInterface, IfaceError> {
        select(&IfaceChoice {
            iface: iface.iter().map(|i| i.to_string()).collect(),
            ..Default::default()
        })
        .await
    }

    #[tokio::test]
    async fn loopback_by_name_with_public_ip() {
        let ext = select(&IfaceChoice {
            iface: vec!["lo".into()],
            public_ip: Some(Ipv4Addr::new(198, 18, 9, 1)),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(ext.name, "lo");
        assert_eq!(ext.iface_addr, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(ext.public_ip, Some(Ipv4Addr::new(198, 18, 9, 1)));
        let by_ip = select_iface(&["127.0.0.1"]).await.unwrap();
        assert_eq!(by_ip.name, "lo");
    }

    #[tokio::test]
    async fn unknown_iface_is_named() {
        let err = select_iface(&["nosuch0"]).await.unwrap_err();
        assert!(err.to_string().contains("--iface nosuch0"), "{err}");
    }

    #[tokio::test]
    async fn bad_regex_is_named() {
        let err = select(&IfaceChoice {
            iface_regex: vec!["(".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("--iface-regex \"(\""), "{err}");
    }

    #[tokio::test]
    async fn index_and_mtu_are_the_kernels() {
        let ext = select_iface(&["lo"]).await.unwrap();
        // This test runs in the namespace sysfs was mounted for.
        let sysfs = |attr: &str| {
            std::fs::read_to_string(format!("/sys/class/net/lo/{attr}"))
                .unwrap()
                .trim()
                .parse::<u32>()
                .unwrap()
        };
        assert_eq!((ext.index, ext.mtu), (sysfs("ifindex"), sysfs("mtu")));
    }
}
