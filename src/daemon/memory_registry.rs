//! A registry held in memory, for the daemon's unit tests: it shows what the trait asks of a
//! registry that is not etcd, and lets a test script its answers.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::watch;

use crate::config::NetworkConfig;
use crate::subnet::acquire::{AcquireRequest, Renewal};
use crate::subnet::registry::{AcquireFailure, ConfigRead, LeaseRegistry};
use crate::subnet::watch::LeaseView;
use crate::subnet::{Lease, LeaseAttrs};

#[derive(Debug, thiserror::Error)]
#[error("memory registry unreachable")]
pub(super) struct Unreachable;

pub(super) type AcquireAnswer = Result<Lease, AcquireFailure<Unreachable>>;

/// Answers each call from its script, in order; the last answer of a script repeats.
#[derive(Default)]
pub(super) struct MemoryRegistry {
    pub(super) configs: Mutex<VecDeque<Result<Option<&'static str>, Unreachable>>>,
    pub(super) config_reads: Mutex<usize>,
    pub(super) acquisitions: Mutex<VecDeque<AcquireAnswer>>,
    pub(super) requests: Mutex<Vec<AcquireRequest>>,
    pub(super) renewals: Mutex<VecDeque<Renewal>>,
}

fn next<T>(script: &Mutex<VecDeque<T>>, repeat: impl Fn(&T) -> T) -> T {
    let mut script = script.lock().unwrap();
    if script.len() > 1 {
        script.pop_front().unwrap()
    } else {
        repeat(script.front().expect("a scripted answer"))
    }
}

impl LeaseRegistry for MemoryRegistry {
    type Error = Unreachable;

    fn config_location(&self) -> String {
        "memory".into()
    }

    async fn read_config(&self) -> Result<ConfigRead, Unreachable> {
        let mut reads = self.config_reads.lock().unwrap();
        *reads += 1;
        let value = next(&self.configs, |c| {
            c.as_ref().map(|v| *v).map_err(|_| Unreachable)
        })?;
        Ok(ConfigRead {
            value: value.map(|v| v.as_bytes().to_vec()),
            version: *reads as i64,
        })
    }

    async fn config_changed(&self, _version: i64) {}

    async fn acquire(&self, _config: &NetworkConfig, request: &AcquireRequest) -> AcquireAnswer {
        self.requests.lock().unwrap().push(request.clone());
        next(&self.acquisitions, |a| match a {
            Ok(lease) => Ok(lease.clone()),
            Err(_) => Err(AcquireFailure::Registry(Unreachable)),
        })
    }

    async fn keep(&self, _lease: &Lease) -> Result<Renewal, Unreachable> {
        Ok(next(&self.renewals, |r| *r))
    }

    async fn watch_leases(&self, _tx: watch::Sender<LeaseView>) {
        std::future::pending().await
    }
}

pub(super) fn lease(key: &str, revision: i64) -> Lease {
    Lease {
        key: key.parse().unwrap(),
        attrs: LeaseAttrs {
            public_ip: Some("198.18.0.1".parse().unwrap()),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: None,
            backend_v6_data: None,
        },
        etcd_lease: Some(7),
        revision,
        create_revision: revision,
    }
}

/// A script of answers, first to last.
pub(super) fn script<T, const N: usize>(answers: [T; N]) -> Mutex<VecDeque<T>> {
    Mutex::new(answers.into())
}
