//! 3 hosts with the vxlan backend (root only).

mod common;

use netns_tests::{require_root, Backend};

#[test]
fn vxlan_every_pod_reaches_every_pod() {
    if !require_root("vxlan_every_pod_reaches_every_pod") {
        return;
    }
    common::every_pod_reaches_every_pod(Backend::Vxlan, 1450);
}

#[test]
fn vxlan_full_mtu_df_ping_passes_one_byte_more_fails() {
    if !require_root("vxlan_full_mtu_df_ping_passes_one_byte_more_fails") {
        return;
    }
    common::full_mtu_passes_one_more_fails(Backend::Vxlan, 1450);
}
