//! Which subnet to take: pure arithmetic over the config, no I/O.
//!
//! Rather than enumerating a range (an IPv6 range can hold 2^60 subnets) or guessing at random
//! and hoping to miss the taken ones (which fails on a nearly full range), each family's range
//! is cut into runs of free subnets around the taken ones. The free count is then exact, and a
//! uniform draw over it lands on a free subnet every time: the cost grows with the number of
//! taken leases, not with the size of the range.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use rand::seq::index;

use crate::config::{FamilyConfig, NetworkConfig};
use crate::subnet::SubnetKey;

/// Up to this many free subnets, distinct picks come from an exact sample without replacement;
/// above it, a draw rarely repeats and repeats are simply drawn again.
const EXACT_SAMPLE_LIMIT: u128 = 65_536;

/// Up to `n` distinct free subnet keys chosen at random between SubnetMin and SubnetMax for every
/// enabled family, skipping every key in `taken` (a v4 subnet is taken if any taken key has that
/// v4 subnet; same for v6).
///
/// A taken subnet of another length (a lease from an older config) blocks every candidate it
/// overlaps. In dual stack, each IPv4 pick is paired with an independently drawn IPv6 pick, so
/// the result is as long as the scarcer family allows.
pub fn random_free(
    cfg: &NetworkConfig,
    taken: &HashSet<SubnetKey>,
    n: usize,
    rng: &mut impl rand::Rng,
) -> Vec<SubnetKey> {
    let v4 = cfg.v4.map(|f| (Pool::v4(&f, taken), f.subnet_len));
    let v6 = cfg.v6.map(|f| (Pool::v6(&f, taken), f.subnet_len));
    match (v4, v6) {
        (Some((p4, len4)), Some((p6, len6))) => {
            let picks4 = p4.pick(n, rng);
            let picks6 = p6.pick(picks4.len(), rng);
            picks4
                .into_iter()
                .zip(picks6)
                .filter_map(|(a, b)| {
                    Some(SubnetKey {
                        ipv4: Some(v4_net(a, len4)?),
                        ipv6: Some(v6_net(b, len6)?),
                    })
                })
                .collect()
        }
        (Some((p4, len4)), None) => p4
            .pick(n, rng)
            .into_iter()
            .filter_map(|a| v4_net(a, len4).map(SubnetKey::v4))
            .collect(),
        (None, Some((p6, len6))) => p6
            .pick(n, rng)
            .into_iter()
            .filter_map(|b| {
                Some(SubnetKey {
                    ipv4: None,
                    ipv6: Some(v6_net(b, len6)?),
                })
            })
            .collect(),
        (None, None) => Vec::new(),
    }
}

fn v4_net(addr: u128, len: u8) -> Option<Ipv4Network> {
    Ipv4Network::new(Ipv4Addr::from(u32::try_from(addr).ok()?), len).ok()
}

fn v6_net(addr: u128, len: u8) -> Option<Ipv6Network> {
    Ipv6Network::new(Ipv6Addr::from(addr), len).ok()
}

/// A stretch of consecutive free subnets, by index from SubnetMin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    first: u128,
    len: u128,
    /// Free subnets in all earlier runs: where this run starts in the 0..total numbering.
    before: u128,
}

/// The free subnets of one family between SubnetMin and SubnetMax.
#[derive(Debug)]
struct Pool {
    base: u128,
    /// log2 of the subnet size: `bits - subnet length`.
    shift: u32,
    runs: Vec<Run>,
    total: u128,
}

impl Pool {
    fn v4(f: &FamilyConfig<Ipv4Network>, taken: &HashSet<SubnetKey>) -> Pool {
        let taken = taken.iter().filter_map(|k| k.ipv4).map(|n| {
            (
                u128::from(u32::from(n.network())),
                u128::from(u32::from(n.broadcast())),
            )
        });
        let (min, max) = (u32::from(f.subnet_min), u32::from(f.subnet_max));
        Pool::new(min.into(), max.into(), 32, f.subnet_len, taken)
    }

    fn v6(f: &FamilyConfig<Ipv6Network>, taken: &HashSet<SubnetKey>) -> Pool {
        let taken = taken
            .iter()
            .filter_map(|k| k.ipv6)
            .map(|n| (u128::from(n.network()), u128::from(n.broadcast())));
        let (min, max) = (f.subnet_min.into(), f.subnet_max.into());
        Pool::new(min, max, 128, f.subnet_len, taken)
    }

    fn empty() -> Pool {
        Pool {
            base: 0,
            shift: 0,
            runs: Vec::new(),
            total: 0,
        }
    }

    /// `taken` holds inclusive address ranges, in any order, possibly overlapping.
    fn new(
        min: u128,
        max: u128,
        bits: u8,
        len: u8,
        taken: impl Iterator<Item = (u128, u128)>,
    ) -> Pool {
        if len > bits || min > max {
            return Pool::empty();
        }
        let shift = u32::from(bits - len);
        let last = (max - min) >> shift;
        let end = max.saturating_add((1u128 << shift) - 1);
        let mut blocked: Vec<(u128, u128)> = taken
            .filter(|&(s, e)| s <= e && e >= min && s <= end)
            .map(|(s, e)| {
                (
                    s.saturating_sub(min) >> shift,
                    ((e - min) >> shift).min(last),
                )
            })
            .collect();
        blocked.sort_unstable();
        let runs = free_runs(&blocked, last);
        let total = runs.last().map_or(0, |r| r.before + r.len);
        Pool {
            base: min,
            shift,
            runs,
            total,
        }
    }

    /// Up to `k` distinct free subnet addresses, uniformly at random.
    fn pick(&self, k: usize, rng: &mut impl rand::Rng) -> Vec<u128> {
        let want = self.total.min(k as u128);
        let ordinals = match usize::try_from(self.total) {
            Ok(total) if self.total <= EXACT_SAMPLE_LIMIT || want * 2 >= self.total => {
                index::sample(rng, total, want as usize)
                    .into_iter()
                    .map(|i| i as u128)
                    .collect()
            }
            _ => self.draw_distinct(want as usize, rng),
        };
        ordinals.into_iter().map(|o| self.address(o)).collect()
    }

    /// Only called with `want` under half of `total`, so each draw is new with odds above one
    /// half; the bound on attempts is never reached in practice but keeps the loop finite.
    fn draw_distinct(&self, want: usize, rng: &mut impl rand::Rng) -> Vec<u128> {
        // `want` comes from the caller's `n`; don't trust it as an allocation size.
        let mut seen = HashSet::with_capacity(want.min(1024));
        let mut out = Vec::with_capacity(want.min(1024));
        let attempts = want.saturating_mul(4).saturating_add(64);
        for _ in 0..attempts {
            if out.len() == want {
                break;
            }
            let o = rng.random_range(0..self.total);
            if seen.insert(o) {
                out.push(o);
            }
        }
        out
    }

    /// The address of the `ordinal`-th free subnet (counting from 0 across all runs).
    fn address(&self, ordinal: u128) -> u128 {
        let at = self.runs.partition_point(|r| r.before <= ordinal) - 1;
        let run = self.runs[at];
        self.base + ((run.first + (ordinal - run.before)) << self.shift)
    }
}

/// The gaps in 0..=last left by `blocked` (inclusive index ranges sorted by start).
fn free_runs(blocked: &[(u128, u128)], last: u128) -> Vec<Run> {
    let mut runs = Vec::new();
    let mut next = Some(0u128); // first index not yet known to be blocked; None past `last`
    let mut before = 0u128;
    let mut push = |first: u128, end: u128, runs: &mut Vec<Run>| {
        if first <= end {
            let len = end - first + 1;
            runs.push(Run { first, len, before });
            before += len;
        }
    };
    for &(lo, hi) in blocked {
        let Some(from) = next else { break };
        if lo > from {
            push(from, lo - 1, &mut runs);
        }
        if hi >= from {
            next = hi.checked_add(1).filter(|&i| i <= last);
        }
    }
    if let Some(from) = next {
        push(from, last, &mut runs);
    }
    runs
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn cfg(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json.as_bytes()).unwrap()
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn key(s: &str) -> SubnetKey {
        s.parse().unwrap()
    }

    fn keys(list: &[&str]) -> HashSet<SubnetKey> {
        list.iter().map(|s| key(s)).collect()
    }

    /// Every pick fits the config, is free of `taken` (by overlap) and unique per family.
    fn assert_sound(c: &NetworkConfig, taken: &HashSet<SubnetKey>, picked: &[SubnetKey]) {
        let mut seen4 = HashSet::new();
        let mut seen6 = HashSet::new();
        for k in picked {
            assert!(k.fits(c), "{k} does not fit");
            assert_eq!(k.ipv4.is_some(), c.v4.is_some(), "{k}");
            assert_eq!(k.ipv6.is_some(), c.v6.is_some(), "{k}");
            if let Some(n) = k.ipv4 {
                assert!(seen4.insert(n), "{n} picked twice");
                let clash = taken.iter().filter_map(|t| t.ipv4).any(|t| t.overlaps(n));
                assert!(!clash, "{n} is taken");
            }
            if let Some(n) = k.ipv6 {
                assert!(seen6.insert(n), "{n} picked twice");
                let clash = taken.iter().filter_map(|t| t.ipv6).any(|t| t.overlaps(n));
                assert!(!clash, "{n} is taken");
            }
        }
    }

    #[test]
    fn picks_are_free_inside_aligned_and_distinct() {
        let c = cfg(r#"{"Network":"10.5.0.0/16"}"#);
        let taken = keys(&["10.5.1.0-24", "10.5.7.0-24", "10.5.200.0-24", "10.9.0.0-24"]);
        let picked = random_free(&c, &taken, 100, &mut rng());
        assert_eq!(picked.len(), 100);
        assert_sound(&c, &taken, &picked);
    }

    #[test]
    fn returns_exactly_the_free_ones_when_fewer_than_n() {
        let c = cfg(r#"{"Network":"10.5.0.0/16"}"#);
        let free = ["10.5.3.0-24", "10.5.128.0-24", "10.5.255.0-24"];
        let taken: HashSet<SubnetKey> = (1..=255)
            .map(|i| SubnetKey::v4(Ipv4Network::new(Ipv4Addr::new(10, 5, i, 0), 24).unwrap()))
            .filter(|k| !free.contains(&k.to_string().as_str()))
            .collect();
        let picked: HashSet<SubnetKey> = random_free(&c, &taken, 100, &mut rng())
            .into_iter()
            .collect();
        assert_eq!(picked, keys(&free));
        assert_eq!(random_free(&c, &taken, 2, &mut rng()).len(), 2);
    }

    #[test]
    fn none_free_or_none_wanted_is_empty() {
        let c = cfg(r#"{"Network":"10.5.0.0/16"}"#);
        let everything = keys(&["10.5.0.0-16"]);
        assert!(random_free(&c, &everything, 100, &mut rng()).is_empty());
        assert!(random_free(&c, &HashSet::new(), 0, &mut rng()).is_empty());
    }

    #[test]
    fn default_subnet_min_skips_the_first_subnet() {
        let c = cfg(r#"{"Network":"10.5.0.0/16"}"#);
        let all = random_free(&c, &HashSet::new(), 1000, &mut rng());
        assert_eq!(all.len(), 255);
        assert!(!all.contains(&key("10.5.0.0-24")));
        assert!(all.contains(&key("10.5.1.0-24")));
        assert!(all.contains(&key("10.5.255.0-24")));
    }

    #[test]
    fn explicit_min_max_bound_the_picks() {
        let c = cfg(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.13.0"}"#);
        let got: HashSet<SubnetKey> = random_free(&c, &HashSet::new(), 100, &mut rng())
            .into_iter()
            .collect();
        assert_eq!(
            got,
            keys(&[
                "10.5.10.0-24",
                "10.5.11.0-24",
                "10.5.12.0-24",
                "10.5.13.0-24"
            ])
        );
    }

    #[test]
    fn a_taken_lease_of_another_length_blocks_what_it_overlaps() {
        let c = cfg(r#"{"Network":"10.5.0.0/16","SubnetLen":26}"#);
        // Leases from an older config: a /20 and a /28 inside one /26.
        let taken = keys(&["10.5.0.0-20", "10.5.16.16-28"]);
        let picked = random_free(&c, &taken, 5000, &mut rng());
        assert_eq!(picked.len() as u128, c.v4.unwrap().subnet_count() - 63 - 1);
        assert_sound(&c, &taken, &picked);
    }

    #[test]
    fn picks_are_uniform_over_the_free_runs() {
        let c = cfg(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.6.0"}"#);
        let taken = keys(&["10.5.2.0-24", "10.5.4.0-24"]);
        let mut rng = rng();
        let mut counts = std::collections::HashMap::new();
        for _ in 0..4000 {
            let k = random_free(&c, &taken, 1, &mut rng)[0];
            *counts.entry(k.to_string()).or_insert(0) += 1;
        }
        let mut names: Vec<_> = counts.keys().cloned().collect();
        names.sort();
        assert_eq!(
            names,
            ["10.5.1.0-24", "10.5.3.0-24", "10.5.5.0-24", "10.5.6.0-24"]
        );
        for (k, n) in counts {
            assert!((800..1200).contains(&n), "{k} picked {n} times of 4000");
        }
    }

    #[test]
    fn large_ranges_are_fast() {
        let start = Instant::now();
        let c = cfg(r#"{"Network":"10.0.0.0/8","SubnetLen":30}"#);
        let taken: HashSet<SubnetKey> = (0..2000u32)
            .map(|i| {
                let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + i * 4 * 997);
                SubnetKey::v4(Ipv4Network::new(a, 30).unwrap())
            })
            .collect();
        let picked = random_free(&c, &taken, 100, &mut rng());
        assert_eq!(picked.len(), 100);
        assert_sound(&c, &taken, &picked);

        let c = cfg(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"f000::/4"}"#);
        assert_eq!(c.v6.unwrap().subnet_count(), (1 << 60) - 1);
        let picked = random_free(&c, &HashSet::new(), 100, &mut rng());
        assert_eq!(picked.len(), 100);
        assert_sound(&c, &HashSet::new(), &picked);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_nearly_full_huge_range_still_finds_its_free_subnet() {
        let c = cfg(r#"{"Network":"10.0.0.0/8","SubnetLen":30}"#);
        // Everything but 10.77.0.8/30 is taken, by a handful of big leases.
        let taken = keys(&[
            "10.0.0.0-10",
            "10.64.0.0-13",
            "10.72.0.0-14",
            "10.76.0.0-16",
            "10.77.0.0-29",
            "10.77.0.12-30",
            "10.77.0.16-28",
            "10.77.0.32-27",
            "10.77.0.64-26",
            "10.77.0.128-25",
            "10.77.1.0-24",
            "10.77.2.0-23",
            "10.77.4.0-22",
            "10.77.8.0-21",
            "10.77.16.0-20",
            "10.77.32.0-19",
            "10.77.64.0-18",
            "10.77.128.0-17",
            "10.78.0.0-15",
            "10.80.0.0-12",
            "10.96.0.0-11",
            "10.128.0.0-9",
        ]);
        assert_eq!(
            random_free(&c, &taken, 100, &mut rng()),
            vec![key("10.77.0.8-30")]
        );
    }

    #[test]
    fn dual_stack_pairs_distinct_free_subnets() {
        let c = cfg(r#"{"EnableIPv6":true,"Network":"10.5.0.0/16","IPv6Network":"fc00::/48"}"#);
        let taken = keys(&["10.5.1.0-24&fc00:0:0:1::-64", "10.5.2.0-24&fc00:0:0:2::-64"]);
        let picked = random_free(&c, &taken, 100, &mut rng());
        assert_eq!(picked.len(), 100);
        assert_sound(&c, &taken, &picked);
    }

    #[test]
    fn dual_stack_is_limited_by_the_scarcer_family() {
        let c = cfg(
            r#"{"EnableIPv6":true,"Network":"10.5.0.0/16","IPv6Network":"fc00::/48",
                "IPv6SubnetMin":"fc00:0:0:10::","IPv6SubnetMax":"fc00:0:0:13::"}"#,
        );
        let taken = keys(&["10.5.9.0-24&fc00:0:0:11::-64"]);
        let picked = random_free(&c, &taken, 100, &mut rng());
        assert_eq!(picked.len(), 3);
        assert_sound(&c, &taken, &picked);
    }

    #[test]
    fn ipv6_only_keys_have_no_ipv4() {
        let c = cfg(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/60"}"#);
        let taken = keys(&["fc00:0:0:3::-64", "10.5.1.0-24"]);
        let picked = random_free(&c, &taken, 100, &mut rng());
        assert_eq!(picked.len(), 14);
        assert_sound(&c, &taken, &picked);
    }

    #[test]
    fn different_seeds_pick_differently() {
        let c = cfg(r#"{"Network":"10.0.0.0/8","SubnetLen":30}"#);
        let a = random_free(&c, &HashSet::new(), 5, &mut StdRng::seed_from_u64(1));
        let b = random_free(&c, &HashSet::new(), 5, &mut StdRng::seed_from_u64(2));
        assert_ne!(a, b);
    }

    #[test]
    fn free_runs_cover_the_gaps() {
        let runs = free_runs(&[(0, 1), (1, 3), (6, 6), (9, 20)], 10);
        let spans: Vec<(u128, u128, u128)> =
            runs.iter().map(|r| (r.first, r.len, r.before)).collect();
        assert_eq!(spans, vec![(4, 2, 0), (7, 2, 2)]);
        assert!(free_runs(&[(0, 10)], 10).is_empty());
        assert_eq!(free_runs(&[], 3).len(), 1);
        assert_eq!(free_runs(&[(0, u128::MAX)], u128::MAX), vec![]);
    }
}
