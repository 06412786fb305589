//! The subnet file (`/run/flannel/subnet.env`) as flanneld uses it. The codec is the
//! `flannel-subnet-env` crate, shared with the CNI plugin; here is only what needs flanneld's
//! own types (the network config and lease keys).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};

pub use flannel_subnet_env::{EnvError, EnvProblem, SubnetEnv};

use crate::config::NetworkConfig;
use crate::subnet::SubnetKey;

/// The subnet file in terms of leases.
pub trait SubnetEnvExt {
    /// The file for a lease under a config: each enabled family's network and the lease's
    /// first usable address in it.
    fn from_lease(cfg: &NetworkConfig, key: &SubnetKey, mtu: u32, ipmasq: bool) -> Self;

    /// The lease subnet this file names (FLANNEL_SUBNET's network), for "prefer my old subnet".
    fn lease_key(&self) -> Option<SubnetKey>;
}

impl SubnetEnvExt for SubnetEnv {
    fn from_lease(cfg: &NetworkConfig, key: &SubnetKey, mtu: u32, ipmasq: bool) -> Self {
        let network = cfg.v4.map(|f| f.network);
        let ipv6_network = cfg.v6.map(|f| f.network);
        SubnetEnv {
            network,
            subnet: key.ipv4.filter(|_| network.is_some()).map(first_usable_v4),
            ipv6_network,
            ipv6_subnet: key
                .ipv6
                .filter(|_| ipv6_network.is_some())
                .map(first_usable_v6),
            mtu,
            ipmasq,
        }
    }

    fn lease_key(&self) -> Option<SubnetKey> {
        let (ipv4, ipv6) = (self.lease_v4(), self.lease_v6());
        (ipv4.is_some() || ipv6.is_some()).then_some(SubnetKey { ipv4, ipv6 })
    }
}

/// The lease's first address is its network address; hosts start one above it.
fn first_usable_v4(n: Ipv4Network) -> Ipv4Network {
    let ip = u32::from(n.network())
        .checked_add(1)
        .map_or(n.network(), Ipv4Addr::from);
    Ipv4Network::new(ip, n.prefix()).unwrap_or(n)
}

fn first_usable_v6(n: Ipv6Network) -> Ipv6Network {
    let ip = u128::from(n.network())
        .checked_add(1)
        .map_or(n.network(), Ipv6Addr::from);
    Ipv6Network::new(ip, n.prefix()).unwrap_or(n)
}

#[cfg(test)]
mod tests {
    //! Only what this file adds over the codec crate: a file from a lease, a lease from a file.
    use super::*;

    const DUAL: &[u8] = br#"{"EnableIPv6":true,"Network":"10.5.0.0/16","IPv6Network":"fc00::/48"}"#;
    const DUAL_KEY: &str = "10.5.72.0-24&fc00:0:0:7::-64";

    fn from_lease(config: &[u8], key: &str, ipmasq: bool) -> SubnetEnv {
        let cfg = NetworkConfig::parse(config).unwrap();
        SubnetEnv::from_lease(&cfg, &key.parse().unwrap(), 1450, ipmasq)
    }

    #[test]
    fn lease_key_is_the_subnets_network() {
        for (config, key) in [
            (&br#"{"Network":"10.5.0.0/16"}"#[..], "10.5.72.0-24"),
            (DUAL, DUAL_KEY),
            (
                br#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48"}"#,
                "fc00:0:0:7::-64",
            ),
        ] {
            let env = from_lease(config, key, true);
            assert_eq!(env.lease_key(), Some(key.parse().unwrap()), "{env:?}");
        }
    }

    #[test]
    fn from_lease_uses_first_usable_addresses() {
        let env = from_lease(DUAL, DUAL_KEY, false);
        assert_eq!(env.network, Some("10.5.0.0/16".parse().unwrap()));
        assert_eq!(env.subnet, Some("10.5.72.1/24".parse().unwrap()));
        assert_eq!(env.ipv6_network, Some("fc00::/48".parse().unwrap()));
        assert_eq!(env.ipv6_subnet, Some("fc00:0:0:7::1/64".parse().unwrap()));
        assert_eq!((env.mtu, env.ipmasq), (1450, false));
        let env = from_lease(br#"{"Network":"10.5.0.0/16"}"#, DUAL_KEY, true);
        assert_eq!(
            (env.ipv6_network, env.ipv6_subnet),
            (None, None),
            "a disabled family is not written"
        );
        assert_eq!(env.subnet, Some("10.5.72.1/24".parse().unwrap()));
    }

    /// flanneld prefers the subnet named in a file it wrote before, whatever reader rules apply.
    #[test]
    fn the_old_file_gives_back_its_lease() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        from_lease(DUAL, DUAL_KEY, false)
            .write_atomic(&path)
            .unwrap();
        let old = SubnetEnv::read_lenient(&path).unwrap().unwrap();
        assert_eq!(old.lease_key(), Some(DUAL_KEY.parse().unwrap()));
    }
}
