//! The kernel WireGuard device, configured over generic netlink (the `wireguard` family, as
//! `wg` does): our private key and port once, then peers by difference.

use std::net::SocketAddr;

use futures::StreamExt;
use genetlink::GenetlinkHandle;
use ipnetwork::IpNetwork;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute,
    WireguardPeerFlags,
};

/// One peer as the kernel device is told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPeer {
    pub key: [u8; 32],
    /// `None`: leave the endpoint as it is (the peer may have roamed).
    pub endpoint: Option<SocketAddr>,
    pub allowed: Vec<IpNetwork>,
}

pub struct KernelDevice {
    handle: GenetlinkHandle,
    name: String,
}

fn failed(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("wireguard netlink: {what}: {e}"))
}

impl KernelDevice {
    /// A generic netlink connection for device `name` (the link must exist).
    pub fn connect(name: &str) -> std::io::Result<KernelDevice> {
        let (conn, handle, _) = genetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(KernelDevice {
            handle,
            name: name.to_string(),
        })
    }

    async fn set(
        &mut self,
        what: &str,
        attributes: Vec<WireguardAttribute>,
    ) -> std::io::Result<()> {
        let mut attrs = vec![WireguardAttribute::IfName(self.name.clone())];
        attrs.extend(attributes);
        let mut msg = NetlinkMessage::from(GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes: attrs,
        }));
        msg.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let mut answers = self
            .handle
            .request(msg)
            .await
            .map_err(|e| failed(what, e))?;
        while let Some(answer) = answers.next().await {
            let answer = answer.map_err(|e| failed(what, e))?;
            if let NetlinkPayload::Error(e) = answer.payload {
                if e.code.is_some() {
                    return Err(failed(what, e.to_io()));
                }
            }
        }
        Ok(())
    }

    /// Our key and port; every peer the device had is dropped (flannel's `ReplacePeers`).
    pub async fn configure(&mut self, private_key: [u8; 32], port: u16) -> std::io::Result<()> {
        self.set(
            "configuring the device",
            vec![
                WireguardAttribute::PrivateKey(private_key),
                WireguardAttribute::ListenPort(port),
                WireguardAttribute::Flags(WireguardDeviceFlags::ReplacePeers),
                WireguardAttribute::Peers(Vec::new()),
            ],
        )
        .await
    }

    /// Adds or updates `peers` (their allowed IPs replaced; a peer the kernel has keeps its
    /// session) and removes the peers with keys in `removed`.
    pub async fn update(
        &mut self,
        peers: &[KernelPeer],
        psk: Option<[u8; 32]>,
        keepalive: Option<u16>,
        removed: &[[u8; 32]],
    ) -> std::io::Result<()> {
        let mut list: Vec<WireguardPeer> = removed
            .iter()
            .map(|k| {
                WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey(*k),
                    WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
                ])
            })
            .collect();
        for p in peers {
            let mut attrs = vec![
                WireguardPeerAttribute::PublicKey(p.key),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
                WireguardPeerAttribute::PersistentKeepalive(keepalive.unwrap_or(0)),
                WireguardPeerAttribute::AllowedIps(
                    p.allowed
                        .iter()
                        .map(|n| {
                            let family = match n {
                                IpNetwork::V4(_) => WireguardAddressFamily::Ipv4,
                                IpNetwork::V6(_) => WireguardAddressFamily::Ipv6,
                            };
                            WireguardAllowedIp(vec![
                                WireguardAllowedIpAttr::Family(family),
                                WireguardAllowedIpAttr::IpAddr(n.network()),
                                WireguardAllowedIpAttr::Cidr(n.prefix()),
                            ])
                        })
                        .collect(),
                ),
            ];
            if let Some(psk) = psk {
                attrs.push(WireguardPeerAttribute::PresharedKey(psk));
            }
            if let Some(e) = p.endpoint {
                attrs.push(WireguardPeerAttribute::Endpoint(e));
            }
            list.push(WireguardPeer(attrs));
        }
        if list.is_empty() {
            return Ok(());
        }
        self.set("setting peers", vec![WireguardAttribute::Peers(list)])
            .await
    }

    /// The public keys of the device's peers (tests).
    pub async fn peer_keys(&mut self) -> std::io::Result<Vec<[u8; 32]>> {
        let mut msg = NetlinkMessage::from(GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(self.name.clone())],
        }));
        msg.header.flags = NLM_F_REQUEST | netlink_packet_core::NLM_F_DUMP;
        let mut answers = self
            .handle
            .request(msg)
            .await
            .map_err(|e| failed("reading the device", e))?;
        let mut keys = Vec::new();
        while let Some(answer) = answers.next().await {
            let answer = answer.map_err(|e| failed("reading the device", e))?;
            if let NetlinkPayload::InnerMessage(genl) = answer.payload {
                for a in &genl.payload.attributes {
                    if let WireguardAttribute::Peers(peers) = a {
                        for p in peers {
                            for pa in &p.0 {
                                if let WireguardPeerAttribute::PublicKey(k) = pa {
                                    keys.push(*k);
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(keys)
    }
}
