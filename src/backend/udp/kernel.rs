//! What the udp backend asks of rtnetlink beyond the shared requests in `crate::netlink`:
//! bringing `flannel0` up with its MTU and queue length.

use netlink_packet_route::link::LinkAttribute;
use rtnetlink::{Handle, LinkUnspec};

use crate::netlink::NetlinkError;

/// Packets the TUN device queues for the data path: more than the kernel's 500, so that a
/// reader thread kept off the CPU for a millisecond does not cost drops at small packet sizes.
pub const TUN_QUEUE_LEN: u32 = 2000;

/// Sets the MTU and queue length of device `index` and brings it up.
pub async fn set_up(h: &Handle, name: &str, index: u32, mtu: u32) -> Result<(), NetlinkError> {
    let mut msg = LinkUnspec::new_with_index(index).up().mtu(mtu).build();
    msg.attributes
        .push(LinkAttribute::TxQueueLen(TUN_QUEUE_LEN));
    h.link()
        .change(msg)
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("set {name} up with MTU {mtu}"), e))
}
