//! Wakes the data plane when someone changes the kernel state it owns: a deleted link, route or
//! neighbour entry is repaired within a moment instead of at the next periodic pass.

use std::sync::Arc;

use futures::StreamExt;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::MulticastGroup;
use tokio::sync::Notify;

/// Subscribes to link, route and neighbour notifications of this network namespace; `notify`
/// gets a permit for every deletion (and link change) the kernel reports.
pub fn watch(notify: Arc<Notify>) -> std::io::Result<()> {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Neigh,
    ];
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&groups)?;
    tokio::spawn(conn);
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            if let NetlinkPayload::InnerMessage(m) = msg.payload {
                if is_interesting(&m) {
                    notify.notify_one();
                }
            }
        }
    });
    Ok(())
}

/// Additions are what we (or the kernel's own bookkeeping) do; deletions and link changes are
/// what breaks a data plane.
fn is_interesting(m: &RouteNetlinkMessage) -> bool {
    matches!(
        m,
        RouteNetlinkMessage::DelLink(_)
            | RouteNetlinkMessage::NewLink(_)
            | RouteNetlinkMessage::DelRoute(_)
            | RouteNetlinkMessage::DelNeighbour(_)
    )
}
