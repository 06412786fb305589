//! flannel's subnet file (`/run/flannel/subnet.env`): flanneld writes it, the CNI plugin and
//! scripts read it. One codec, so that the writer and the readers cannot drift apart. Where
//! flannel's own two readers differ (flanneld reads its old file through godotenv, the CNI
//! plugin with its own loop), [`SubnetEnv::parse_lenient`] and [`SubnetEnv::parse`] keep that
//! difference and nothing else.

mod file;
pub mod mac;
mod parse;

use std::fmt::Display;
use std::io;
use std::path::PathBuf;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

pub const NETWORK: &str = "FLANNEL_NETWORK";
pub const SUBNET: &str = "FLANNEL_SUBNET";
pub const IPV6_NETWORK: &str = "FLANNEL_IPV6_NETWORK";
pub const IPV6_SUBNET: &str = "FLANNEL_IPV6_SUBNET";
pub const MTU: &str = "FLANNEL_MTU";
pub const IPMASQ: &str = "FLANNEL_IPMASQ";

/// The content of a subnet file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The whole overlay network (`FLANNEL_NETWORK`).
    pub network: Option<Ipv4Network>,
    /// This host's lease as written: first usable address with the lease prefix, e.g. 10.5.72.1/24.
    pub subnet: Option<Ipv4Network>,
    pub ipv6_network: Option<Ipv6Network>,
    /// First usable address with the lease prefix, e.g. fc00:0:0:1::1/64.
    pub ipv6_subnet: Option<Ipv6Network>,
    pub mtu: u32,
    pub ipmasq: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("subnet file {}: cannot {op}: {error}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        error: io::Error,
    },
    /// `path` is `None` when the text did not come from a file.
    #[error("subnet file{}: {problem}", at(.path))]
    Invalid {
        path: Option<PathBuf>,
        problem: EnvProblem,
    },
}

/// What is wrong with the text of a subnet file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvProblem {
    #[error("line {line}: {text:?} is not KEY=VALUE")]
    NotKeyValue { line: usize, text: String },
    #[error("{key}={value}: {why}")]
    BadValue {
        key: &'static str,
        value: String,
        why: &'static str,
    },
    /// Alternatives are listed together, as flannel's plugin does ("FLANNEL_SUBNET,
    /// FLANNEL_IPV6_SUBNET" when neither family has a subnet).
    #[error("missing {}", keys.join(", "))]
    Missing { keys: Vec<&'static str> },
}

fn at(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" {}", p.display()))
        .unwrap_or_default()
}

impl SubnetEnv {
    /// Reads the file as flannel's CNI plugin does: values are taken as written (no quotes
    /// removed), and a network, a subnet, `FLANNEL_MTU` and `FLANNEL_IPMASQ` must all be there.
    pub fn parse(text: &str) -> Result<Self, EnvError> {
        parse::parse(text, parse::Rules::PLUGIN).map_err(|problem| EnvError::Invalid {
            path: None,
            problem,
        })
    }

    /// Reads the file as flanneld reads its old one back (through godotenv): quoted values are
    /// unquoted, and only `FLANNEL_MTU` and a subnet are required.
    pub fn parse_lenient(text: &str) -> Result<Self, EnvError> {
        parse::parse(text, parse::Rules::FLANNELD).map_err(|problem| EnvError::Invalid {
            path: None,
            problem,
        })
    }

    /// The value of `key` as [`SubnetEnv::parse_lenient`] reads it (unquoted; the last line for
    /// the key wins; empty is `None`), as written: for tools that pass values on as text, such
    /// as `flanneld mk-docker-opts`, which must tell an absent `FLANNEL_IPMASQ` from `false`.
    pub fn raw_value_lenient<'a>(text: &'a str, key: &str) -> Result<Option<&'a str>, EnvError> {
        let mut found = None;
        for entry in parse::entries(text, parse::Rules::FLANNELD) {
            let (k, v) = entry.map_err(|problem| EnvError::Invalid {
                path: None,
                problem,
            })?;
            if k == key {
                found = v;
            }
        }
        Ok(found)
    }

    /// `KEY=VALUE` lines in flannel's order and spelling; the IPv4 and IPv6 lines only when
    /// present.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |key: &str, value: &dyn Display| {
            out.push_str(&format!("{key}={value}\n"));
        };
        if let Some(n) = &self.network {
            line(NETWORK, n);
        }
        if let Some(n) = &self.subnet {
            line(SUBNET, n);
        }
        if let Some(n) = &self.ipv6_network {
            line(IPV6_NETWORK, n);
        }
        if let Some(n) = &self.ipv6_subnet {
            line(IPV6_SUBNET, n);
        }
        line(MTU, &self.mtu);
        line(IPMASQ, &self.ipmasq);
        out
    }

    /// The IPv4 lease in network form (10.5.72.0/24).
    pub fn lease_v4(&self) -> Option<Ipv4Network> {
        self.subnet
            .and_then(|s| Ipv4Network::new(s.network(), s.prefix()).ok())
    }

    /// The IPv6 lease in network form (fc00:0:0:7::/64).
    pub fn lease_v6(&self) -> Option<Ipv6Network> {
        self.ipv6_subnet
            .and_then(|s| Ipv6Network::new(s.network(), s.prefix()).ok())
    }

    /// The lease subnets in network form, IPv4 first.
    pub fn lease_networks(&self) -> Vec<IpNetwork> {
        let v4 = self.lease_v4().map(IpNetwork::V4);
        v4.into_iter()
            .chain(self.lease_v6().map(IpNetwork::V6))
            .collect()
    }

    /// The overlay network(s), IPv4 first.
    pub fn networks(&self) -> Vec<IpNetwork> {
        let v4 = self.network.map(IpNetwork::V4);
        v4.into_iter()
            .chain(self.ipv6_network.map(IpNetwork::V6))
            .collect()
    }
}

#[cfg(test)]
mod tests;
