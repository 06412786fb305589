//! The subnet file flanneld writes (`/run/flannel/subnet.env`).

use std::path::Path;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use crate::spec::{code, CniError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The whole overlay network(s) (`FLANNEL_NETWORK`, `FLANNEL_IPV6_NETWORK`).
    pub network: Option<Ipv4Network>,
    pub ipv6_network: Option<Ipv6Network>,
    /// This host's lease, as written: first usable address with the lease's prefix.
    pub subnet: Option<Ipv4Network>,
    pub ipv6_subnet: Option<Ipv6Network>,
    pub mtu: u32,
    pub ipmasq: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("subnet file {path} cannot be read: {err} (is flanneld running on this node?)")]
    Read { path: String, err: std::io::Error },
    #[error("subnet file {path}: line {line}: {msg}")]
    Invalid {
        path: String,
        line: usize,
        msg: String,
    },
    #[error("subnet file {path} is missing {missing} (flanneld not ready on this node)")]
    Incomplete { path: String, missing: String },
}

impl From<SubnetEnvError> for CniError {
    fn from(e: SubnetEnvError) -> CniError {
        CniError::new(code::TRY_AGAIN_LATER, e.to_string())
    }
}

impl SubnetEnv {
    pub fn load(path: &Path) -> Result<SubnetEnv, SubnetEnvError> {
        let text = std::fs::read_to_string(path).map_err(|err| SubnetEnvError::Read {
            path: path.display().to_string(),
            err,
        })?;
        SubnetEnv::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, path: &str) -> Result<SubnetEnv, SubnetEnvError> {
        let mut network = None;
        let mut ipv6_network = None;
        let mut subnet = None;
        let mut ipv6_subnet = None;
        let mut mtu = None;
        let mut ipmasq = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let invalid = |msg: String| SubnetEnvError::Invalid {
                path: path.to_string(),
                line: i + 1,
                msg,
            };
            let Some((key, value)) = line.split_once('=') else {
                return Err(invalid(format!("expected KEY=VALUE, got {line:?}")));
            };
            let (key, value) = (key.trim(), value.trim());
            // An empty value is as good as absent (flanneld writes `FLANNEL_IPV6_NETWORK=`).
            if value.is_empty() {
                continue;
            }
            let net = |v: &str| -> Result<IpNetwork, SubnetEnvError> {
                v.parse::<IpNetwork>()
                    .map_err(|e| invalid(format!("{key}: {v:?} is not a CIDR: {e}")))
            };
            match key {
                "FLANNEL_NETWORK" | "FLANNEL_SUBNET" => match net(value)? {
                    IpNetwork::V4(n) if key == "FLANNEL_NETWORK" => network = Some(n),
                    IpNetwork::V4(n) => subnet = Some(n),
                    _ => return Err(invalid(format!("{key}: {value} is not IPv4"))),
                },
                "FLANNEL_IPV6_NETWORK" | "FLANNEL_IPV6_SUBNET" => match net(value)? {
                    IpNetwork::V6(n) if key == "FLANNEL_IPV6_NETWORK" => ipv6_network = Some(n),
                    IpNetwork::V6(n) => ipv6_subnet = Some(n),
                    _ => return Err(invalid(format!("{key}: {value} is not IPv6"))),
                },
                "FLANNEL_MTU" => {
                    let m: u32 = value
                        .parse()
                        .map_err(|_| invalid(format!("FLANNEL_MTU: {value:?} is not a number")))?;
                    if !(68..=65535).contains(&m) {
                        return Err(invalid(format!("FLANNEL_MTU: {m} out of range 68-65535")));
                    }
                    mtu = Some(m);
                }
                "FLANNEL_IPMASQ" => {
                    ipmasq = Some(match value {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(invalid(format!(
                                "FLANNEL_IPMASQ: {value:?} is not true or false"
                            )))
                        }
                    })
                }
                _ => {} // unknown keys are ignored, as flannel does
            }
        }
        let mut missing = Vec::new();
        if network.is_none() && ipv6_network.is_none() {
            missing.push("FLANNEL_NETWORK");
        }
        if subnet.is_none() && ipv6_subnet.is_none() {
            missing.push("FLANNEL_SUBNET");
        }
        if network.is_some() && subnet.is_none() {
            missing.push("FLANNEL_SUBNET");
        }
        if ipv6_network.is_some() && ipv6_subnet.is_none() {
            missing.push("FLANNEL_IPV6_SUBNET");
        }
        if mtu.is_none() {
            missing.push("FLANNEL_MTU");
        }
        if ipmasq.is_none() {
            missing.push("FLANNEL_IPMASQ");
        }
        missing.dedup();
        if !missing.is_empty() {
            return Err(SubnetEnvError::Incomplete {
                path: path.to_string(),
                missing: missing.join(", "),
            });
        }
        Ok(SubnetEnv {
            network,
            ipv6_network,
            subnet,
            ipv6_subnet,
            mtu: mtu.unwrap_or(1500),
            ipmasq: ipmasq.unwrap_or(false),
        })
    }

    /// The lease subnets in network form (10.5.72.0/24), IPv4 first.
    pub fn lease_networks(&self) -> Vec<IpNetwork> {
        let mut out = Vec::new();
        if let Some(s) = self.subnet {
            out.push(IpNetwork::V4(
                Ipv4Network::new(s.network(), s.prefix()).expect("prefix is valid"),
            ));
        }
        if let Some(s) = self.ipv6_subnet {
            out.push(IpNetwork::V6(
                Ipv6Network::new(s.network(), s.prefix()).expect("prefix is valid"),
            ));
        }
        out
    }

    /// The overlay network(s), IPv4 first.
    pub fn networks(&self) -> Vec<IpNetwork> {
        let mut out = Vec::new();
        if let Some(n) = self.network {
            out.push(IpNetwork::V4(n));
        }
        if let Some(n) = self.ipv6_network {
            out.push(IpNetwork::V6(n));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flanneld_output() {
        let env = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\nFLANNEL_IPV6_NETWORK=\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
            "x",
        )
        .unwrap();
        assert_eq!(env.network.unwrap().to_string(), "10.5.0.0/16");
        assert_eq!(env.subnet.unwrap().to_string(), "10.5.72.1/24");
        assert_eq!(env.lease_networks()[0].to_string(), "10.5.72.0/24");
        assert_eq!(env.mtu, 1450);
        assert!(env.ipmasq);
        assert!(env.ipv6_network.is_none());
    }

    #[test]
    fn dual_stack() {
        let env = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n\
             FLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_IPV6_SUBNET=fd00:0:0:48::1/64\n\
             FLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n",
            "x",
        )
        .unwrap();
        let nets: Vec<String> = env.lease_networks().iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, vec!["10.5.72.0/24", "fd00:0:0:48::/64"]);
        assert_eq!(env.networks().len(), 2);
        assert!(!env.ipmasq);
    }

    #[test]
    fn incomplete_names_what_is_missing() {
        let e =
            SubnetEnv::parse("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_MTU=1450\n", "/f").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("/f") && msg.contains("FLANNEL_SUBNET"),
            "{msg}"
        );
        assert!(msg.contains("FLANNEL_IPMASQ"), "{msg}");
        let c: CniError = e.into();
        assert_eq!(c.code, 11);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(SubnetEnv::parse("FLANNEL_SUBNET=banana\n", "x").is_err());
        assert!(SubnetEnv::parse("just words\n", "x").is_err());
        assert!(SubnetEnv::parse("FLANNEL_MTU=9\n", "x").is_err());
        let e = SubnetEnv::load(Path::new("/nonexistent/subnet.env")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/subnet.env"));
    }
}
