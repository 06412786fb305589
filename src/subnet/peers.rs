//! Which leases are peers: the one filter every backend's input passes through.
//!
//! Anyone who can write to etcd can write a lease, and a backend installs what it is given: a
//! lease `<our /24>.128-25` would route half of our own pods into the overlay, `10.5.0.0-16` or
//! `0.0.0.0-0` would catch traffic for every subnet nobody holds. So before any backend sees
//! them, peer leases are checked against the config and against each other:
//!
//! 1. each subnet of an enabled family lies inside that family's network and has the configured
//!    prefix length (`SubnetLen` / `IPv6SubnetLen`); a lease with no subnet of an enabled family
//!    is no peer either;
//! 2. of leases that overlap, the one with the older etcd create revision wins (the key breaks
//!    ties); this step sees the same view on every host, so every host picks the same winner;
//! 3. on this host only, a lease overlapping our own subnet, or carrying our own public address
//!    (a stale lease of ours), is refused.
//!
//! A lease fails as a whole: a dual-stack lease with one bad half programs neither.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use ipnetwork::{Ipv4Network, Ipv6Network};

use super::lease::{Lease, PeerSet, SubnetKey};
use crate::config::{FamilyConfig, NetworkConfig};
use crate::netlink::Net;

/// Why a lease is not a peer; the label of `flannel_rejected_leases_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    OutsideNetwork,
    WrongPrefixLength,
    OverlapsOwn,
    OverlapsOlder,
    OwnPublicIp,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::OutsideNetwork,
        Reason::WrongPrefixLength,
        Reason::OverlapsOwn,
        Reason::OverlapsOlder,
        Reason::OwnPublicIp,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::OutsideNetwork => "outside_network",
            Reason::WrongPrefixLength => "wrong_prefix_length",
            Reason::OverlapsOwn => "overlaps_own",
            Reason::OverlapsOlder => "overlaps_older",
            Reason::OwnPublicIp => "own_public_ip",
        }
    }

    /// Position in [`Reason::ALL`], for per-reason counters.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A rejected lease: the reason, and a sentence naming the values for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.detail, self.reason.label())
    }
}

/// The outcome of one pass of the filter.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Filtered {
    /// The leases the backends program.
    pub accepted: PeerSet,
    /// Every other lease except our own, with the reason.
    pub rejected: BTreeMap<SubnetKey, Rejection>,
    /// An older lease that overlaps ours: every other host routes the overlap to it.
    pub own_overruled_by: Option<SubnetKey>,
}

/// Splits `all` (every lease under the prefix, ours included or not) into the peers the
/// backends may program and the rejected leases, for a host holding `own`.
pub fn filter(all: &PeerSet, config: &NetworkConfig, own: &Lease) -> Filtered {
    let shape: BTreeMap<SubnetKey, Option<Rejection>> = all
        .keys()
        .chain(std::iter::once(&own.key))
        .map(|k| (*k, check_shape(k, config)))
        .collect();
    let losers = overlap_losers(
        all.values()
            .chain((!all.contains_key(&own.key)).then_some(own))
            .filter(|l| shape[&l.key].is_none()),
        config,
    );

    let mut out = Filtered {
        own_overruled_by: losers.get(&own.key).copied(),
        ..Filtered::default()
    };
    for (key, lease) in all {
        if *key == own.key {
            continue;
        }
        let rejection = shape[key]
            .clone()
            .or_else(|| overlaps_own(key, &own.key, config))
            .or_else(|| own_public_ip(lease, own))
            .or_else(|| {
                losers.get(key).map(|winner| Rejection {
                    reason: Reason::OverlapsOlder,
                    detail: format!(
                        "overlaps lease {winner}, created first (etcd revision {}, this one {})",
                        all.get(winner)
                            .map_or(own.create_revision, |w| w.create_revision),
                        lease.create_revision
                    ),
                })
            });
        match rejection {
            Some(r) => {
                out.rejected.insert(*key, r);
            }
            None => {
                out.accepted.insert(*key, lease.clone());
            }
        }
    }
    out
}

/// The subnets of `key` in the families the config enables.
fn enabled_halves(
    key: &SubnetKey,
    config: &NetworkConfig,
) -> (Option<Ipv4Network>, Option<Ipv6Network>) {
    (
        key.ipv4.filter(|_| config.v4.is_some()),
        key.ipv6.filter(|_| config.v6.is_some()),
    )
}

/// Step 1: inside the network, with the configured prefix length. A subnet of a family the
/// config disables is not programmed by any backend, so it is not judged either.
fn check_shape(key: &SubnetKey, config: &NetworkConfig) -> Option<Rejection> {
    let v4 = key.ipv4.zip(config.v4.as_ref());
    let v6 = key.ipv6.zip(config.v6.as_ref());
    if v4.is_none() && v6.is_none() {
        return Some(Rejection {
            reason: Reason::OutsideNetwork,
            detail: format!(
                "no subnet in an enabled family (IPv4 network {}, IPv6 network {})",
                shown(config.v4.map(|f| f.network)),
                shown(config.v6.map(|f| f.network))
            ),
        });
    }
    let v4 = v4.and_then(|(n, family)| shape_of(n, family));
    let v6 = v6.and_then(|(n, family)| shape_of(n, family));
    v4.or(v6)
}

/// Judges one subnet against its family's part of the config.
fn shape_of<N: Net>(subnet: N, family: &FamilyConfig<N>) -> Option<Rejection> {
    let (prefix, want) = (subnet.prefix_len(), family.subnet_len);
    if !subnet.within(&family.network) {
        return Some(Rejection {
            reason: Reason::OutsideNetwork,
            detail: format!(
                "subnet {subnet} is not inside the network {}",
                family.network
            ),
        });
    }
    (prefix != want).then(|| Rejection {
        reason: Reason::WrongPrefixLength,
        detail: format!("subnet {subnet} has prefix length {prefix}, the config gives {want}"),
    })
}

fn shown<N: fmt::Display>(n: Option<N>) -> String {
    n.map_or_else(|| "(disabled)".to_string(), |n| n.to_string())
}

/// Step 2: of overlapping leases (all of the configured length, so overlapping means equal
/// subnets), the older create revision wins, then the smaller key. A loser claims nothing, so
/// a lease that overlaps only a loser still wins. Returns loser → the winner it lost to.
fn overlap_losers<'a>(
    valid: impl Iterator<Item = &'a Lease>,
    config: &NetworkConfig,
) -> HashMap<SubnetKey, SubnetKey> {
    let mut order: Vec<&Lease> = valid.collect();
    order.sort_by_key(|l| (l.create_revision, l.key));
    let mut v4_claims: HashMap<Ipv4Network, SubnetKey> = HashMap::new();
    let mut v6_claims: HashMap<Ipv6Network, SubnetKey> = HashMap::new();
    let mut losers = HashMap::new();
    for lease in order {
        let (v4, v6) = enabled_halves(&lease.key, config);
        let winner = v4
            .and_then(|n| v4_claims.get(&n))
            .or_else(|| v6.and_then(|n| v6_claims.get(&n)));
        if let Some(winner) = winner {
            losers.insert(lease.key, *winner);
            continue;
        }
        if let Some(n) = v4 {
            v4_claims.insert(n, lease.key);
        }
        if let Some(n) = v6 {
            v6_claims.insert(n, lease.key);
        }
    }
    losers
}

/// Step 3a: any overlap with our own subnet, whatever its length, in an enabled family.
fn overlaps_own(key: &SubnetKey, own: &SubnetKey, config: &NetworkConfig) -> Option<Rejection> {
    let (v4, v6) = enabled_halves(key, config);
    let (own4, own6) = enabled_halves(own, config);
    let hit4 = v4.zip(own4).is_some_and(|(a, b)| overlap4(a, b));
    let hit6 = v6.zip(own6).is_some_and(|(a, b)| overlap6(a, b));
    (hit4 || hit6).then(|| Rejection {
        reason: Reason::OverlapsOwn,
        detail: format!("overlaps our own lease {own}"),
    })
}

fn overlap4(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

fn overlap6(a: Ipv6Network, b: Ipv6Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Step 3b: a lease naming our public address is a stale one of ours (from before a restart
/// that took another subnet); programming it would send traffic to ourselves.
fn own_public_ip(lease: &Lease, own: &Lease) -> Option<Rejection> {
    let same = |a: Option<IpAddr>, b: Option<IpAddr>| a.is_some() && a == b;
    let v4 = |l: &Lease| l.attrs.public_ip.map(IpAddr::from);
    let v6 = |l: &Lease| l.attrs.public_ipv6.map(IpAddr::from);
    let ip = if same(v4(lease), v4(own)) {
        v4(own)
    } else if same(v6(lease), v6(own)) {
        v6(own)
    } else {
        None
    }?;
    Some(Rejection {
        reason: Reason::OwnPublicIp,
        detail: format!("carries our own public address {ip}"),
    })
}

/// Remembers the reason each key is rejected for, so that a rejection is logged and counted
/// once, not on every reconciliation pass; again only when its reason changes, or when it is
/// rejected anew after having been accepted or gone.
#[derive(Debug, Default)]
pub struct RejectionLog {
    last: BTreeMap<SubnetKey, Reason>,
}

/// What changed since the last pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RejectionNews<'a> {
    /// Rejected now and not (or for another reason) last time.
    pub new: Vec<(SubnetKey, &'a Rejection)>,
    /// Rejected last time, accepted now.
    pub accepted: Vec<(SubnetKey, Reason)>,
}

impl RejectionLog {
    pub fn update<'a>(&mut self, filtered: &'a Filtered) -> RejectionNews<'a> {
        let mut news = RejectionNews::default();
        for (key, r) in &filtered.rejected {
            if self.last.get(key) != Some(&r.reason) {
                news.new.push((*key, r));
            }
        }
        for (key, reason) in &self.last {
            if filtered.accepted.contains_key(key) {
                news.accepted.push((*key, *reason));
            }
        }
        self.last = filtered
            .rejected
            .iter()
            .map(|(k, r)| (*k, r.reason))
            .collect();
        news
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet::LeaseAttrs;

    const V4: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
    const DUAL: &str = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":64,"Backend":{"Type":"vxlan"}}"#;

    fn config(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json.as_bytes()).unwrap()
    }

    /// A lease with public IP 198.18.0.`host` created at etcd revision `created`.
    fn lease(key: &str, host: u8, created: i64) -> Lease {
        let json = format!(
            r#"{{"PublicIP":"198.18.0.{host}","PublicIPv6":"2001:db8::{host}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:00:00:{host:02x}"}}}}"#
        );
        Lease {
            key: key.parse().unwrap(),
            attrs: LeaseAttrs::from_json(key, json.as_bytes()).unwrap(),
            etcd_lease: Some(1),
            revision: created,
            create_revision: created,
        }
    }

    fn set(leases: &[&Lease]) -> PeerSet {
        leases.iter().map(|l| (l.key, (*l).clone())).collect()
    }

    fn key(s: &str) -> SubnetKey {
        s.parse().unwrap()
    }

    fn reason(f: &Filtered, k: &str) -> Option<Reason> {
        f.rejected.get(&key(k)).map(|r| r.reason)
    }

    fn accepted(f: &Filtered) -> Vec<String> {
        f.accepted.keys().map(|k| k.to_string()).collect()
    }

    #[test]
    fn well_formed_peers_pass_and_our_own_lease_is_no_peer() {
        let own = lease("10.5.1.0-24", 1, 10);
        let a = lease("10.5.2.0-24", 2, 11);
        let b = lease("10.5.3.0-24", 3, 12);
        let f = filter(&set(&[&own, &a, &b]), &config(V4), &own);
        assert_eq!(accepted(&f), ["10.5.2.0-24", "10.5.3.0-24"]);
        assert!(f.rejected.is_empty(), "{:?}", f.rejected);
        assert_eq!(f.own_overruled_by, None);
    }

    #[test]
    fn half_of_our_own_subnet_is_rejected() {
        let own = lease("10.5.1.0-24", 1, 10);
        let half = lease("10.5.1.128-25", 9, 5);
        let f = filter(&set(&[&own, &half]), &config(V4), &own);
        assert_eq!(reason(&f, "10.5.1.128-25"), Some(Reason::WrongPrefixLength));
        assert!(f.accepted.is_empty());
        let detail = &f.rejected[&key("10.5.1.128-25")].detail;
        assert!(
            detail.contains("10.5.1.128/25") && detail.contains("24"),
            "{detail}"
        );
    }

    #[test]
    fn whole_network_and_catch_all_are_rejected() {
        let own = lease("10.5.1.0-24", 1, 10);
        let whole = lease("10.5.0.0-16", 8, 3);
        let all = lease("0.0.0.0-0", 9, 4);
        let other = lease("10.6.0.0-24", 7, 5);
        let f = filter(&set(&[&own, &whole, &all, &other]), &config(V4), &own);
        assert_eq!(reason(&f, "10.5.0.0-16"), Some(Reason::WrongPrefixLength));
        assert_eq!(reason(&f, "0.0.0.0-0"), Some(Reason::OutsideNetwork));
        assert_eq!(reason(&f, "10.6.0.0-24"), Some(Reason::OutsideNetwork));
        assert!(f.accepted.is_empty());
    }

    #[test]
    fn udp_catch_all_lease_without_backend_type_is_rejected() {
        let cfg = config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#);
        let own = lease("10.5.1.0-24", 1, 10);
        let mut all = lease("0.0.0.0-0", 9, 4);
        all.attrs = LeaseAttrs::from_json("k", br#"{"PublicIP":"198.18.0.9"}"#).unwrap();
        let peer = lease("10.5.2.0-24", 2, 11);
        let f = filter(&set(&[&own, &all, &peer]), &cfg, &own);
        assert_eq!(reason(&f, "0.0.0.0-0"), Some(Reason::OutsideNetwork));
        assert_eq!(accepted(&f), ["10.5.2.0-24"]);
    }

    #[test]
    fn older_create_revision_wins_whatever_the_order() {
        // Same IPv4 subnet under two keys (a dual-stack one and an IPv4-only one): they
        // overlap although the keys differ.
        let cfg = config(V4);
        let own = lease("10.5.1.0-24", 1, 10);
        let old = lease("10.5.7.0-24&fc00:0:0:7::-64", 7, 20);
        let new = lease("10.5.7.0-24", 8, 30);
        for (older, newer) in [(&old, &new), (&new, &old)] {
            let mut older = (*older).clone();
            let mut newer = (*newer).clone();
            older.create_revision = 20;
            newer.create_revision = 30;
            // Insertion order of the map does not matter; the key order is the other way round
            // in the second round.
            let f = filter(&set(&[&newer, &own, &older]), &cfg, &own);
            assert_eq!(
                f.accepted.keys().copied().collect::<Vec<_>>(),
                [older.key],
                "{f:?}"
            );
            assert_eq!(f.rejected[&newer.key].reason, Reason::OverlapsOlder);
            assert!(f.rejected[&newer.key]
                .detail
                .contains(&older.key.to_string()));
        }
    }

    #[test]
    fn equal_create_revisions_are_ordered_by_key() {
        let own = lease("10.5.1.0-24", 1, 10);
        let a = lease("10.5.7.0-24", 7, 20);
        let b = lease("10.5.7.0-24&fc00:0:0:7::-64", 8, 20);
        let f = filter(&set(&[&own, &a, &b]), &config(V4), &own);
        assert_eq!(accepted(&f), ["10.5.7.0-24"]);
        assert_eq!(
            reason(&f, "10.5.7.0-24&fc00:0:0:7::-64"),
            Some(Reason::OverlapsOlder)
        );
    }

    #[test]
    fn loser_claims_nothing_so_every_host_agrees() {
        // b loses to a on its IPv4 half; c shares only b's IPv6 half, so c wins.
        let cfg = config(DUAL);
        let own = lease("10.5.1.0-24&fc00:0:0:1::-64", 1, 10);
        let a = lease("10.5.2.0-24&fc00:0:0:2::-64", 2, 11);
        let b = lease("10.5.2.0-24&fc00:0:0:3::-64", 3, 12);
        let c = lease("10.5.4.0-24&fc00:0:0:3::-64", 4, 13);
        let f = filter(&set(&[&own, &a, &b, &c]), &cfg, &own);
        assert_eq!(
            accepted(&f),
            ["10.5.2.0-24&fc00:0:0:2::-64", "10.5.4.0-24&fc00:0:0:3::-64"]
        );
        assert_eq!(
            reason(&f, "10.5.2.0-24&fc00:0:0:3::-64"),
            Some(Reason::OverlapsOlder)
        );
    }

    #[test]
    fn lease_overlapping_ours_is_rejected_here_even_when_older() {
        let cfg = config(V4);
        let own = lease("10.5.1.0-24", 1, 50);
        let older = lease("10.5.1.0-24&fc00:0:0:9::-64", 9, 5);
        let f = filter(&set(&[&own, &older]), &cfg, &own);
        assert_eq!(
            reason(&f, "10.5.1.0-24&fc00:0:0:9::-64"),
            Some(Reason::OverlapsOwn)
        );
        assert!(f.accepted.is_empty());
        // Elsewhere the older lease wins over ours: say so.
        assert_eq!(f.own_overruled_by, Some(older.key));

        // On a third host, the same view gives the older lease the subnet and refuses ours.
        let third = lease("10.5.3.0-24", 3, 60);
        let f = filter(&set(&[&own, &older, &third]), &cfg, &third);
        assert_eq!(accepted(&f), ["10.5.1.0-24&fc00:0:0:9::-64"]);
        assert_eq!(reason(&f, "10.5.1.0-24"), Some(Reason::OverlapsOlder));
    }

    #[test]
    fn lease_overlapping_ours_loses_to_ours_elsewhere_when_newer() {
        let cfg = config(V4);
        let own = lease("10.5.1.0-24", 1, 5);
        let newer = lease("10.5.1.0-24&fc00:0:0:9::-64", 9, 50);
        let third = lease("10.5.3.0-24", 3, 60);
        let f = filter(&set(&[&own, &newer, &third]), &cfg, &own);
        assert_eq!(
            reason(&f, "10.5.1.0-24&fc00:0:0:9::-64"),
            Some(Reason::OverlapsOwn)
        );
        assert_eq!(f.own_overruled_by, None);
        let f = filter(&set(&[&own, &newer, &third]), &cfg, &third);
        assert_eq!(accepted(&f), ["10.5.1.0-24"]);
        assert_eq!(
            reason(&f, "10.5.1.0-24&fc00:0:0:9::-64"),
            Some(Reason::OverlapsOlder)
        );
    }

    #[test]
    fn dual_stack_lease_with_one_bad_half_is_rejected_whole() {
        let cfg = config(DUAL);
        let own = lease("10.5.1.0-24&fc00:0:0:1::-64", 1, 10);
        // IPv4 half fine, IPv6 half overlaps ours.
        let overlapping = lease("10.5.2.0-24&fc00:0:0:1:8000::-65", 2, 11);
        // IPv4 half fine, IPv6 half outside the IPv6 network.
        let outside = lease("10.5.3.0-24&fd00::-64", 3, 12);
        // IPv4 half fine, IPv6 half the wrong length.
        let short = lease("10.5.4.0-24&fc00:0:0:10::-60", 4, 13);
        let good = lease("10.5.5.0-24&fc00:0:0:5::-64", 5, 14);
        let f = filter(
            &set(&[&own, &overlapping, &outside, &short, &good]),
            &cfg,
            &own,
        );
        assert_eq!(accepted(&f), ["10.5.5.0-24&fc00:0:0:5::-64"]);
        assert_eq!(
            reason(&f, "10.5.2.0-24&fc00:0:0:1:8000::-65"),
            Some(Reason::WrongPrefixLength)
        );
        assert_eq!(
            reason(&f, "10.5.3.0-24&fd00::-64"),
            Some(Reason::OutsideNetwork)
        );
        assert_eq!(
            reason(&f, "10.5.4.0-24&fc00:0:0:10::-60"),
            Some(Reason::WrongPrefixLength)
        );

        // Same length, same IPv6 subnet as ours under another IPv4 subnet: overlaps ours.
        let twin = lease("10.5.6.0-24&fc00:0:0:1::-64", 6, 15);
        let f = filter(&set(&[&own, &twin]), &cfg, &own);
        assert_eq!(
            reason(&f, "10.5.6.0-24&fc00:0:0:1::-64"),
            Some(Reason::OverlapsOwn)
        );
    }

    #[test]
    fn subnets_of_a_disabled_family_are_not_judged() {
        let own = lease("10.5.1.0-24", 1, 10);
        // IPv6 is disabled: the odd IPv6 half is nobody's business, the IPv4 half is fine.
        let dual = lease("10.5.2.0-24&fd00::-60", 2, 11);
        // Nothing in an enabled family: nothing a backend could program.
        let v6_only = lease("fc00:0:0:3::-64", 3, 12);
        let f = filter(&set(&[&own, &dual, &v6_only]), &config(V4), &own);
        assert_eq!(accepted(&f), ["10.5.2.0-24&fd00::-60"]);
        assert_eq!(reason(&f, "fc00:0:0:3::-64"), Some(Reason::OutsideNetwork));
    }

    #[test]
    fn stale_lease_with_our_public_ip_is_rejected() {
        let own = lease("10.5.1.0-24", 1, 10);
        let stale = lease("10.5.9.0-24", 1, 3);
        let f = filter(&set(&[&own, &stale]), &config(V4), &own);
        assert_eq!(reason(&f, "10.5.9.0-24"), Some(Reason::OwnPublicIp));
        assert!(f.accepted.is_empty());
    }

    #[test]
    fn own_lease_missing_from_the_view_still_protects_our_subnet() {
        let own = lease("10.5.1.0-24", 1, 10);
        let twin = lease("10.5.1.0-24&fc00::-64", 2, 5);
        let f = filter(&set(&[&twin]), &config(V4), &own);
        assert_eq!(
            reason(&f, "10.5.1.0-24&fc00::-64"),
            Some(Reason::OverlapsOwn)
        );
    }

    #[test]
    fn reservations_compete_like_leases() {
        let own = lease("10.5.1.0-24", 1, 10);
        let mut reserved = lease("10.5.7.0-24", 7, 4);
        reserved.etcd_lease = None;
        let late = lease("10.5.7.0-24&fc00::-64", 8, 40);
        let f = filter(&set(&[&own, &reserved, &late]), &config(V4), &own);
        assert_eq!(accepted(&f), ["10.5.7.0-24"]);
        assert_eq!(
            reason(&f, "10.5.7.0-24&fc00::-64"),
            Some(Reason::OverlapsOlder)
        );
    }

    #[test]
    fn rejected_lease_is_accepted_once_the_older_one_is_gone() {
        let cfg = config(V4);
        let own = lease("10.5.1.0-24", 1, 10);
        let old = lease("10.5.7.0-24&fc00::-64", 7, 20);
        let new = lease("10.5.7.0-24", 8, 30);
        let mut log = RejectionLog::default();

        let f = filter(&set(&[&own, &old, &new]), &cfg, &own);
        let news = log.update(&f);
        assert_eq!(news.new.len(), 1);
        assert_eq!(news.new[0].0, new.key);
        // The same rejection on the next pass is not news.
        let f = filter(&set(&[&own, &old, &new]), &cfg, &own);
        assert_eq!(log.update(&f), RejectionNews::default());

        let f = filter(&set(&[&own, &new]), &cfg, &own);
        assert_eq!(accepted(&f), ["10.5.7.0-24"]);
        let news = log.update(&f);
        assert_eq!(news.accepted, [(new.key, Reason::OverlapsOlder)]);
        assert!(news.new.is_empty());

        // Rejected again later: news again.
        let f = filter(&set(&[&own, &old, &new]), &cfg, &own);
        assert_eq!(log.update(&f).new.len(), 1);
    }

    #[test]
    fn reason_change_is_news() {
        let cfg = config(V4);
        let own = lease("10.5.1.0-24", 1, 10);
        let mut log = RejectionLog::default();
        let stale = lease("10.5.9.0-24", 1, 3);
        let f = filter(&set(&[&own, &stale]), &cfg, &own);
        assert_eq!(log.update(&f).new.len(), 1);
        // The same key now overlaps an older lease instead.
        let mut moved = stale.clone();
        moved.attrs.public_ip = Some("198.18.0.44".parse().unwrap());
        moved.attrs.public_ipv6 = Some("2001:db8::44".parse().unwrap());
        moved.create_revision = 30;
        let older = lease("10.5.9.0-24&fc00::-64", 5, 20);
        let f = filter(&set(&[&own, &moved, &older]), &cfg, &own);
        let news = log.update(&f);
        assert_eq!(news.new.len(), 1);
        assert_eq!(news.new[0].1.reason, Reason::OverlapsOlder);
    }

    #[test]
    fn reason_labels_are_distinct_and_indexed() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let labels: std::collections::BTreeSet<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Reason::ALL.len());
    }
}
