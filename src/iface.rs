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
