//! Network namespaces: open one by path, and make a netlink socket inside it.
//!
//! The socket is created on a short-lived thread that enters the namespace with setns(2); a
//! socket keeps the namespace it was created in, so the main thread never changes namespace.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

use crate::netlink::{Netlink, NetlinkError};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("open network namespace {path}: {err}")]
    Open { path: String, err: io::Error },
    #[error("enter network namespace {path}: {err}")]
    Enter { path: String, err: io::Error },
    #[error("netlink in network namespace {path}: {err}")]
    Netlink { path: String, err: NetlinkError },
}

impl NetnsError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, NetnsError::Open { err, .. } if err.kind() == io::ErrorKind::NotFound)
    }
}

/// An open network namespace.
pub struct Netns {
    pub path: String,
    pub file: File,
}

impl Netns {
    pub fn open(path: &str) -> Result<Netns, NetnsError> {
        let file = File::open(Path::new(path)).map_err(|err| NetnsError::Open {
            path: path.to_string(),
            err,
        })?;
        Ok(Netns {
            path: path.to_string(),
            file,
        })
    }

    /// A netlink socket that talks to this namespace, made on a short-lived thread.
    pub fn netlink(&self) -> Result<Netlink, NetnsError> {
        std::thread::scope(|s| {
            s.spawn(|| self.netlink_entering_this_thread())
                .join()
                .expect("netns thread panicked")
        })
    }

    /// Move the calling thread into this namespace and make a netlink socket there.
    /// Only for a thread of its own that ends right after: it stays in the namespace.
    pub fn netlink_entering_this_thread(&self) -> Result<Netlink, NetnsError> {
        // setns(2) changes only the calling thread's namespace, and callers run this on a
        // dedicated thread that ends afterwards.
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|errno| NetnsError::Enter {
            path: self.path.clone(),
            err: errno.into(),
        })?;
        Netlink::new().map_err(|err| NetnsError::Netlink {
            path: self.path.clone(),
            err,
        })
    }
}
