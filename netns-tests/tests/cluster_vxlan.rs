//! 3 hosts with the vxlan backend (root only).

mod common;

use netns_tests::Backend;

#[test]
fn vxlan_every_pod_reaches_every_pod() {
    netns_tests::require_test_bed!();
    common::every_pod_reaches_every_pod(Backend::Vxlan, 1450);
}

#[test]
fn vxlan_full_mtu_df_ping_passes_one_byte_more_fails() {
    netns_tests::require_test_bed!();
    common::full_mtu_passes_one_more_fails(Backend::Vxlan, 1450);
}
