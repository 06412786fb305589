//! flanneld in Rust: an overlay network daemon compatible with flannel.
//!
//! The control plane (config, leases, watch, subnet file, health) lives in this crate; the data
//! planes are behind [`backend::Backend`].

pub mod backend;
pub mod backoff;
pub mod blackhole;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod docker_opts;
pub mod error_chain;
pub mod firewall;
pub mod health;
pub mod iface;
pub mod install_cni;
pub mod kernel_events;
pub mod metrics;
pub mod netlink;
pub mod status;
pub mod subnet;
