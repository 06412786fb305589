//! Whether this kernel has WireGuard: a link of kind `wireguard` is created under a probe
//! name and deleted at once. Without the module the kernel refuses the kind (EOPNOTSUPP),
//! and the backend runs its userspace engine instead.

use netlink_packet_route::link::InfoKind;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec};

use crate::netlink::{self, NetlinkError};

/// The probe link's name: not a device name anyone else uses.
pub const PROBE_DEVICE: &str = "flannel-wgprobe";

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelWireguard {
    Available,
    /// The kernel refused the link kind; the reason as the kernel gave it.
    Unavailable(String),
}

pub async fn probe(h: &Handle) -> KernelWireguard {
    let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Wireguard)
        .name(PROBE_DEVICE.to_string())
        .build();
    match h.link().add(msg).execute().await {
        Ok(()) => {
            if let Ok(Some(link)) = netlink::link_by_name(h, PROBE_DEVICE).await {
                let _ = netlink::delete_link(h, link.index).await;
            }
            KernelWireguard::Available
        }
        Err(e) => KernelWireguard::Unavailable(
            NetlinkError::new("add link of kind wireguard", e).to_string(),
        ),
    }
}

/// Creates the link `name` of kind `wireguard`.
pub async fn create(h: &Handle, name: &str) -> Result<(), NetlinkError> {
    let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Wireguard)
        .name(name.to_string())
        .build();
    h.link()
        .add(msg)
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("add link {name} of kind wireguard"), e))
}
