//! Where leases live: the lease model, subnet arithmetic, the etcd registry, the watcher and the
//! subnet file.

pub mod acquire;
pub mod alloc;
pub mod env;
pub mod etcd;
pub mod etcd_registry;
pub mod kube;
pub mod lease;
pub mod malformed;
pub mod peers;
pub mod registry;
pub mod watch;

pub use lease::{Lease, LeaseAttrs, PeerSet, SubnetKey};
