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
        let v4 = self.config.v4.map(|f| f.network).zip(own.key.ipv4);
        let v6 = self.config.v6.map(|f| f.network).zip(own.key.ipv6);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::{self, FamilyNetworks, IpFamily};
    use crate::subnet::LeaseAttrs;

    fn keeper(config: &str, masquerade: bool, forward: bool) -> RuleKeeper {
        RuleKeeper {
            firewall: firewall::create(false),
            config: NetworkConfig::parse(config.as_bytes()).unwrap(),
            masquerade,
            forward,
            fully_random: true,
            every: Duration::from_secs(5),
            metrics: Arc::new(Metrics::default()),
        }
    }

    fn own(key: &str) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            attrs: LeaseAttrs {
                public_ip: None,
                public_ipv6: None,
                backend_type: "vxlan".into(),
                backend_data: None,
                backend_v6_data: None,
            },
            etcd_lease: Some(1),
            revision: 1,
            create_revision: 1,
        }
    }

    /// The IPv4 networks of the lease `10.5.3.0-24` under either config.
    fn ours_v4() -> FamilyNetworks {
        FamilyNetworks::new(IpFamily::V4, "10.5.0.0/16", "10.5.3.0/24")
    }

    const V4_ONLY: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
    const DUAL: &str = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/56","Backend":{"Type":"vxlan"}}"#;

    #[test]
    fn rules_cover_the_network_and_our_subnet() {
        let k = keeper(V4_ONLY, true, true);
        let rules = k.rules_for(&own("10.5.3.0-24"));
        assert_eq!(rules.families, [ours_v4()]);
        assert!(rules.masquerade && rules.forward && rules.fully_random);
    }

    #[test]
    fn a_dual_stack_lease_gets_rules_for_both_families() {
        let rules = keeper(DUAL, true, false).rules_for(&own("10.5.3.0-24&fd00:5:0:3::-64"));
        assert_eq!(
            rules.families,
            [
                ours_v4(),
                FamilyNetworks::new(IpFamily::V6, "fd00:5::/56", "fd00:5:0:3::/64"),
            ]
        );
    }

    #[test]
    fn a_family_our_lease_lacks_gets_no_rules() {
        let rules = keeper(DUAL, true, false).rules_for(&own("10.5.3.0-24"));
        assert_eq!(rules.families, [ours_v4()]);
    }

    #[test]
    fn with_neither_masquerade_nor_forward_there_is_nothing_to_keep() {
        let k = keeper(V4_ONLY, false, false);
        assert!(k.rules_for(&own("10.5.3.0-24")).is_empty());
    }
}
