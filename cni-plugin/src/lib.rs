//! The flannel CNI plugin's parts, as a library so that fuzz targets and benchmarks can drive
//! the same parsers the binary uses.

pub mod bridge;
pub mod conf;
pub mod delegate;
pub mod ipam;
pub mod masq;
pub mod netlink;
pub mod netns;
pub mod spec;
pub mod teardown;
