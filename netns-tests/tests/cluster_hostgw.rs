//! 3 hosts with the host-gw backend (root only).

mod common;

use netns_tests::{require_root, Backend};

#[test]
fn hostgw_every_pod_reaches_every_pod() {
    if !require_root("hostgw_every_pod_reaches_every_pod") {
        return;
    }
    common::every_pod_reaches_every_pod(Backend::HostGw, 1500);
}

#[test]
fn hostgw_full_mtu_df_ping_passes_one_byte_more_fails() {
    if !require_root("hostgw_full_mtu_df_ping_passes_one_byte_more_fails") {
        return;
    }
    common::full_mtu_passes_one_more_fails(Backend::HostGw, 1500);
}
