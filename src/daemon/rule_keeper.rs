//! The masquerade and forward rules.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::NetworkConfig;
use crate::firewall::{Firewall, Rules};
use crate::metrics::Metrics;
use crate::subnet::Lease;

/// Keeps the masquerade and forward rules in place: installed for our lease, replaced when the
/// lease changes, checked every `--iptables-resync` seconds and restored when someone removed
/// them. Left in place at exit, like the data plane.
pub(super) struct RuleKeeper {
    pub(super) firewall: Box<dyn Firewall>,
    pub(super) config: NetworkConfig,
    pub(super) masquerade: bool,
    pub(super) forward: bool,
    pub(super) fully_random: bool,
    pub(super) every: Duration,
    pub(super) metrics: Arc<Metrics>,
}

impl RuleKeeper {
    fn rules_for(&self, own: &Lease) -> Rules {
        let v4 = self.config.network.zip(own.key.ipv4);
        let v6 = self.config.ipv6_network.zip(own.key.ipv6);
        Rules::new(v4, v6, self.masquerade, self.forward, self.fully_random)
    }

    pub(super) async fn run(mut self, mut own_rx: watch::Receiver<Lease>) {
        let mut rules = self.rules_for(&own_rx.borrow_and_update());
        if rules.is_empty() {
            // Nothing to keep; stay alive, since the daemon treats an ended task as a failure.
            return std::future::pending().await;
        }
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut installed_once = false;
        let mut last_error = String::new();
        loop {
            tokio::select! {
                r = own_rx.changed() => {
                    if r.is_err() { return; }
                    rules = self.rules_for(&own_rx.borrow_and_update());
                }
                _ = tick.tick() => {}
            }
            let (fw, want) = (self.firewall, rules.clone());
            let (fw, result) = tokio::task::spawn_blocking(move || {
                let mut fw = fw;
                let r = fw.ensure(&want);
                (fw, r)
            })
            .await
            .expect("firewall task does not panic");
            self.firewall = fw;
            match result {
                Ok(true) if installed_once => {
                    Metrics::inc(&self.metrics.firewall_restores);
                    tracing::warn!("masquerade/forward rules were missing or changed: restored");
                }
                Ok(true) => {
                    installed_once = true;
                    tracing::info!("masquerade/forward rules installed");
                }
                Ok(false) => installed_once = true,
                Err(e) => {
                    let msg = e.to_string();
                    if msg != last_error {
                        tracing::error!("installing masquerade/forward rules: {msg}");
                        last_error = msg;
                    }
                }
            }
        }
    }
}
