//! The network configuration JSON at `<prefix>/config`: parsing and flannel's validation rules.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::subnet::SubnetKey;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The text is not a JSON object.
    #[error("network config is not valid JSON: {0}")]
    Json(String),
    /// A field is missing, of the wrong type or out of range; names the field and the value.
    #[error("network config: {field} {value}: {why}")]
    Field {
        field: &'static str,
        value: String,
        why: String,
    },
}

/// A validated network configuration, with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
    /// `Some` exactly when IPv4 is enabled.
    pub network: Option<Ipv4Network>,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    /// `Some` exactly when IPv6 is enabled.
    pub ipv6_network: Option<Ipv6Network>,
    pub ipv6_subnet_len: u8,
    pub ipv6_subnet_min: Ipv6Addr,
    pub ipv6_subnet_max: Ipv6Addr,
    pub enable_nftables: bool,
    /// `Backend.Type`, lower-cased; `udp` when `Backend` is absent (as flannel's code does).
    pub backend_type: String,
    /// The whole `Backend` object, for the backend to read its options from.
    pub backend: serde_json::Map<String, serde_json::Value>,
}

impl NetworkConfig {
    pub fn parse(_json: &[u8]) -> Result<Self, ConfigError> {
        todo!("config parsing")
    }

    /// Whether a lease with this key may be kept under this config (inside the network, the
    /// configured length, between min and max).
    pub fn fits(&self, _key: &SubnetKey) -> bool {
        todo!("config fits")
    }
}
