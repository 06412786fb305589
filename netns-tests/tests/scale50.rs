//! 50 hosts started at once against a 3-member etcd cluster, one pod each (root only).
//!
//! `NETNS_TESTS_SCALE_HOSTS` changes the number of hosts (default 50). The test holds the
//! heavy-test lock, so it never shares the machine with the other heavy tests.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use netns_tests::{heavy_lock, par_map, ping_pairs, Backend, Cluster, Pod};

fn hosts() -> usize {
    std::env::var("NETNS_TESTS_SCALE_HOSTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50)
}

/// xorshift64*: a tiny deterministic generator; the seed is printed so a run can be repeated.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

#[test]
fn fifty_hosts_at_once_get_distinct_subnets_and_pods_reach_across_the_mesh() {
    netns_tests::require_test_bed!();
    let _heavy = heavy_lock();
    let n = hosts();
    let t = Instant::now();
    let c = Cluster::builder()
        .hosts(n)
        .etcd_members(3)
        .backend(Backend::Vxlan)
        .no_start()
        .build()
        .expect("underlay, 3 etcd members and the host namespaces");
    let made = t.elapsed();

    // Every flanneld at once.
    let t0 = Instant::now();
    for h in c.hosts() {
        h.start().unwrap();
    }
    c.wait_all_ready(0..n).expect("every flanneld ready");
    let ready = t0.elapsed();
    c.wait_routes(n, Duration::from_secs(60))
        .expect("every host routes to every other subnet");
    let mesh = t0.elapsed();
    c.wait_converged(Duration::from_secs(60))
        .expect("routes, neighbours and FDB entries for every peer on every host");
    let converged = t0.elapsed();

    // Distinct subnets, each host's subnet file naming its own lease.
    let leases = c.leases().unwrap();
    assert_eq!(leases.len(), n, "one lease per host");
    let subnets: BTreeSet<_> = leases.iter().map(|l| l.subnet).collect();
    assert_eq!(subnets.len(), n, "every host got a distinct subnet");
    for (i, h) in c.hosts().iter().enumerate() {
        let lease = leases
            .iter()
            .find(|l| l.public_ip == h.public_ip())
            .unwrap_or_else(|| panic!("host {i} has no lease"));
        assert_eq!(h.subnet().unwrap(), lease.subnet, "subnet file of host {i}");
    }

    // One pod per host; each pings 3 pods on other hosts.
    let t1 = Instant::now();
    let all: Vec<usize> = (0..n).collect();
    let pods: Vec<Pod> = c.add_pods(&all).expect("one pod per host");
    let pods_made = t1.elapsed();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let mut rng = Rng(seed);
    let mut pairs: Vec<(&Pod, &Pod)> = Vec::new();
    for (i, a) in pods.iter().enumerate() {
        let mut picked = BTreeSet::new();
        while picked.len() < 3.min(n - 1) {
            let j = rng.below(n);
            if j != i {
                picked.insert(j);
            }
        }
        pairs.extend(picked.into_iter().map(|j| (a, &pods[j])));
    }
    let t2 = Instant::now();
    let failures = ping_pairs(&pairs, 1, 16);
    let pinged = t2.elapsed();

    let stats = par_map(c.hosts(), 8, |h| h.proc_stats().unwrap());
    let mut rss: Vec<u64> = stats.iter().map(|s| s.rss_kb).collect();
    let mut cpu: Vec<f64> = stats.iter().map(|s| s.cpu_secs).collect();
    rss.sort_unstable();
    cpu.sort_by(f64::total_cmp);
    eprintln!(
        "{n} hosts, 3 etcd members: namespaces made in {made:?}; after starting every \
         flanneld at once: all ready {ready:?}, every route {mesh:?}, converged (routes, \
         neighbours, FDB) {converged:?}; {n} pods in {pods_made:?}; {} pings (seed {seed}) in \
         {pinged:?}; flanneld RSS median {} KiB max {} KiB, CPU median {:.3} s max {:.3} s; \
         total {:?}",
        pairs.len(),
        rss[n / 2],
        rss[n - 1],
        cpu[n / 2],
        cpu[n - 1],
        t.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} pings lost (seed {seed}):\n{}",
        failures.len(),
        pairs.len(),
        failures.join("\n")
    );
}
