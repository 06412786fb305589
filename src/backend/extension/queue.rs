//! Peer commands in the background: the data plane only queues them, so a slow or hanging
//! command never holds up lease events, the full pass, our own lease or the health server.
//!
//! The commands of one peer run in the order they were queued (a remove after the add it
//! undoes); those of different peers run side by side, at most [`AT_ONCE`] at a time, so a
//! hanging command delays nobody but the peer it is for, and only until its deadline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::run::{self, Invocation};
use crate::subnet::SubnetKey;

/// Commands running at the same time, at most.
const AT_ONCE: usize = 4;

pub struct CommandQueue {
    timeout: Duration,
    slots: Arc<Semaphore>,
    /// Each peer's last queued command, which its next one waits for.
    last: HashMap<SubnetKey, JoinHandle<()>>,
}

impl CommandQueue {
    pub fn new(timeout: Duration) -> Self {
        CommandQueue {
            timeout,
            slots: Arc::new(Semaphore::new(AT_ONCE)),
            last: HashMap::new(),
        }
    }

    /// Runs `inv` for `peer` after the peer's earlier commands; logs how it went.
    pub fn submit(&mut self, peer: SubnetKey, inv: Invocation) {
        self.last.retain(|_, h| !h.is_finished());
        let before = self.last.remove(&peer);
        let slots = self.slots.clone();
        let timeout = self.timeout;
        let handle = tokio::spawn(async move {
            if let Some(before) = before {
                let _ = before.await;
            }
            let Ok(_slot) = slots.acquire_owned().await else {
                return; // Closed only when the daemon goes.
            };
            let outcome = run::run(&inv, timeout).await;
            let (option, line) = (inv.option, &inv.line);
            if outcome.succeeded() {
                tracing::info!("extension: peer {peer}: ran {option} `{line}`: {outcome}");
            } else {
                tracing::error!("extension: peer {peer}: {option} `{line}` failed: {outcome}");
            }
        });
        self.last.insert(peer, handle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Instant;

    fn key(s: &str) -> SubnetKey {
        SubnetKey::v4(s.parse().unwrap())
    }

    fn sh(option: &'static str, script: &Path, arg: &str) -> Invocation {
        let line = format!("/bin/sh {} {arg}", script.display());
        Invocation::new(option, &line, Vec::new(), String::new()).unwrap()
    }

    fn wait_for_file(path: &Path, deadline: Duration) -> Option<String> {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Ok(s) = std::fs::read_to_string(path) {
                if s.ends_with("remove\n") || s.ends_with("done\n") {
                    return Some(s);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_peer_delays_no_other_and_each_peer_keeps_its_order() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("cmd.sh");
        // $1: what to do; writes into the dir.
        std::fs::write(
            &script,
            format!(
                "d={}\ncase $1 in\n hang) sleep 30;;\n slowadd) sleep 0.3; echo add >> $d/order;;\n \
                 remove) echo remove >> $d/order;;\n other) echo done > $d/other;;\nesac\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let mut q = CommandQueue::new(Duration::from_secs(20));
        q.submit(key("10.5.1.0/24"), sh("SubnetAddCommand", &script, "hang"));
        q.submit(
            key("10.5.2.0/24"),
            sh("SubnetAddCommand", &script, "slowadd"),
        );
        q.submit(
            key("10.5.2.0/24"),
            sh("SubnetRemoveCommand", &script, "remove"),
        );
        q.submit(key("10.5.3.0/24"), sh("SubnetAddCommand", &script, "other"));
        let order = tokio::task::spawn_blocking({
            let d = dir.path().to_path_buf();
            move || {
                (
                    wait_for_file(&d.join("order"), Duration::from_secs(10)),
                    wait_for_file(&d.join("other"), Duration::from_secs(10)),
                )
            }
        })
        .await
        .unwrap();
        assert_eq!(order.0.as_deref(), Some("add\nremove\n"));
        assert_eq!(order.1.as_deref(), Some("done\n"));
        assert!(!q.last[&key("10.5.1.0/24")].is_finished(), "still hanging");
    }
}
