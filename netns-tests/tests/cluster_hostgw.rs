//! 3 hosts with the host-gw backend (root only).

mod common;

use netns_tests::Backend;

#[test]
fn hostgw_every_pod_reaches_every_pod() {
    netns_tests::require_test_bed!();
    common::every_pod_reaches_every_pod(Backend::HostGw, 1500);
}

#[test]
fn hostgw_full_mtu_df_ping_passes_one_byte_more_fails() {
    netns_tests::require_test_bed!();
    common::full_mtu_passes_one_more_fails(Backend::HostGw, 1500);
}
