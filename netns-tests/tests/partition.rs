//! A host cut off the underlay for longer than its lease TTL, then plugged back (root only).
//!
//! The network has room for exactly four /28 subnets, so every host that joins while the cut-off
//! host's lease is alive is pushed towards its subnet: the only thing that keeps them off it is
//! the lease in etcd.
//!
//! Each phase of the story (the cut, the expiry, the return) is its own test on its own cluster,
//! so that one failure does not hide the others.

mod common;

use std::time::{Duration, Instant};

use netns_tests::{
    heavy_lock, wait_until, Cluster, HeavyLock, LeaseInfo, PingRun, PingStats, Pod, WatchEvent,
    WatchLog,
};

use common::CONVERGE;

/// Lease TTL of every flanneld (renewed every 10/3 s).
const TTL_SECS: u64 = 10;

/// 10.9.0.16/28, .32/28, .48/28, .64/28: four subnets and no more.
const CONFIG: &str = r#"{"Network":"10.9.0.0/25","SubnetLen":28,"SubnetMin":"10.9.0.16","SubnetMax":"10.9.0.64","Backend":{"Type":"vxlan"}}"#;

/// Every peer in `leases` is still programmed on host `i`.
fn assert_keeps_peers(c: &Cluster, i: usize, leases: &[LeaseInfo], when: &str) {
    let h = c.host(i);
    h.check_alive().unwrap_or_else(|e| panic!("{when}: {e}"));
    let state = c.kernel_state(h).unwrap_or_else(|e| panic!("{when}: {e}"));
    for l in leases.iter().filter(|l| l.public_ip != h.public_ip()) {
        c.check_peer_in(&state, l)
            .unwrap_or_else(|e| panic!("{when}: {e}"));
    }
}

fn assert_no_loss(st: &PingStats, what: &str) {
    assert!(st.transmitted >= 50, "{what}: too few pings to judge: {st}");
    assert!(st.lost() * 100 <= st.transmitted, "{what}: {st}");
}

/// Three hosts with a pod each (pods reach each other), then host 2 cut off the underlay; the
/// watch on the subnets and a ping h0 → h1 every 20 ms started before the cut.
struct Partitioned {
    c: Cluster,
    a: Pod,
    b: Pod,
    p: Pod,
    victim: usize,
    /// Every lease before the cut.
    leases: Vec<LeaseInfo>,
    /// Host 2's lease before the cut.
    old: LeaseInfo,
    /// flanneld's pid on host 2 before the cut.
    pid: Option<u32>,
    log: WatchLog,
    ping: PingRun,
    /// When host 2 was cut off.
    t0: Instant,
    _heavy: HeavyLock,
}

fn partitioned() -> Partitioned {
    let heavy = heavy_lock();
    let c = Cluster::builder()
        .hosts(3)
        .config_json(CONFIG)
        .flanneld_arg(&format!("--subnet-lease-ttl={TTL_SECS}s"))
        .build()
        .expect("3 hosts in a network of four subnets");
    c.wait_converged(CONVERGE).expect("converged");
    let a = c.add_pod(0).unwrap();
    let b = c.add_pod(1).unwrap();
    let p = c.add_pod(2).unwrap();
    for (x, y) in [(&a, &b), (&a, &p), (&b, &p)] {
        x.wait_reaches(y.ip(), Duration::from_secs(5)).unwrap();
        y.wait_reaches(x.ip(), Duration::from_secs(5)).unwrap();
    }
    let victim = 2;
    let leases = c.leases().unwrap();
    let old = c.lease_of(victim).unwrap().expect("host 2 has a lease");
    let pid = c.host(victim).pid();
    let log = c
        .etcd()
        .watch_log(&c.subnets_prefix(), &c.dir().join("subnets-watch.jsonl"))
        .unwrap();
    let ping = a.start_ping(b.ip(), Duration::from_millis(20)).unwrap();

    c.partition(victim).expect("cut host 2 off");
    let t0 = Instant::now();
    eprintln!("host {victim} ({}) cut off the underlay", old.subnet);
    Partitioned {
        c,
        a,
        b,
        p,
        victim,
        leases,
        old,
        pid,
        log,
        ping,
        t0,
        _heavy: heavy,
    }
}

impl Partitioned {
    /// While cut off, host 2 keeps its data plane and its daemon; its lease expires in etcd
    /// and the others drop it. Returns when they did.
    fn wait_lease_expired_and_dropped(&self) {
        let (c, victim, leases) = (&self.c, self.victim, &self.leases);
        let expired = wait_until(
            Duration::from_secs(TTL_SECS + 10),
            "host 2's lease to expire in etcd",
            || {
                assert_keeps_peers(c, victim, leases, "while cut off");
                match c.lease_of(victim).map_err(|e| e.to_string())? {
                    None => Ok(self.t0.elapsed()),
                    Some(l) => Err(format!("still there: {l:?}")),
                }
            },
        )
        .expect("the lease expires");
        let dropped = c
            .wait_peer_gone(&self.old, Duration::from_secs(10))
            .expect("the other hosts drop the expired lease");
        eprintln!(
            "lease {} expired {expired:?} after the cut; the others dropped it {dropped:?} later",
            self.old.subnet
        );
    }
}

#[test]
fn partitioned_hosts_leased_subnet_is_taken_by_no_one_while_the_lease_lives() {
    netns_tests::require_test_bed!();
    let mut bed = partitioned();
    let (subnet, victim, t0) = (bed.old.subnet, bed.victim, bed.t0);
    let c = &mut bed.c;

    // A host joins while the lease is alive: it gets the one free subnet, not host 2's.
    let h3 = c.add_host().expect("host 3 joins during the partition");
    let s3 = c.host(h3).subnet().unwrap();
    assert_ne!(
        s3, subnet,
        "host 3 took the partitioned host's leased subnet"
    );
    // Another one finds no free subnet at all, and still does not take host 2's.
    let h4 = c.add_host_stopped().unwrap();
    c.host(h4).start().unwrap();
    wait_until(
        Duration::from_secs(5),
        "host 4 to find the network full",
        || {
            let log = c.host(h4).log_tail(50);
            if log.contains("no free subnet") {
                Ok(())
            } else {
                Err(log)
            }
        },
    )
    .expect("host 4 sees no free subnet while host 2's lease lives");
    c.host(h4).kill9();
    let lease_now = c.lease_of(victim).unwrap();
    assert_eq!(
        lease_now.as_ref().map(|l| l.subnet),
        Some(subnet),
        "host 2's lease is still alive {:?} after the cut",
        t0.elapsed()
    );
    assert!(
        c.lease_of(h4).unwrap().is_none(),
        "host 4 got no lease: {:?}",
        c.leases().unwrap()
    );
    eprintln!(
        "{:?} after the cut: host 3 got {s3}, host 4 found no free subnet; {subnet} still \
         held by host 2",
        t0.elapsed()
    );
}

#[test]
fn partitioned_host_keeps_its_data_plane_after_its_lease_expired_and_the_others_dropped_it() {
    netns_tests::require_test_bed!();
    let bed = partitioned();
    bed.wait_lease_expired_and_dropped();
    std::thread::sleep(Duration::from_secs(2));
    assert_keeps_peers(
        &bed.c,
        bed.victim,
        &bed.leases,
        "cut off, after the lease expired",
    );
    eprintln!("host 2 still holds every peer after its lease expired");
}

#[test]
fn healed_host_takes_its_old_subnet_back_without_a_restart_and_no_other_traffic_is_lost() {
    netns_tests::require_test_bed!();
    let bed = partitioned();
    let (c, victim, subnet) = (&bed.c, bed.victim, bed.old.subnet);
    // When host 2 returns it has a choice of two free subnets: its own and the fourth.
    bed.wait_lease_expired_and_dropped();

    c.heal(victim).expect("plug host 2 back");
    let t1 = Instant::now();
    let back = wait_until(
        Duration::from_secs(30),
        "host 2 to hold a lease again",
        || match c.lease_of(victim).map_err(|e| e.to_string())? {
            Some(l) => Ok(l),
            None => Err("no lease yet".into()),
        },
    )
    .expect("host 2 re-acquires");
    let reacquired = t1.elapsed();
    assert_eq!(back.subnet, subnet, "host 2 took its old subnet again");
    c.wait_converged(CONVERGE)
        .expect("converged after the partition");
    let converged = t1.elapsed();
    for x in [&bed.a, &bed.b] {
        x.wait_reaches(bed.p.ip(), Duration::from_secs(5)).unwrap();
        bed.p.wait_reaches(x.ip(), Duration::from_secs(5)).unwrap();
    }
    let reachable = t1.elapsed();
    let h = c.host(victim);
    assert_eq!(h.pid(), bed.pid, "flanneld on host 2 was not restarted");
    assert_eq!(h.subnet().unwrap(), subnet, "subnet file unchanged");
    assert_eq!(h.metric("flannel_lease_acquisitions_total").unwrap(), 2.0);
    let how = if h.log_tail(400).contains("expired in etcd") {
        "renewal found the lease expired"
    } else {
        "the watch saw the lease deleted"
    };
    let st = bed.ping.stop().unwrap();
    eprintln!(
        "healed: host 2 re-acquired {subnet} after {reacquired:?} ({how}), cluster converged \
         after {converged:?}, pods reach each other after {reachable:?}; \
         ping h0→h1 every 20 ms all along: {st}\n{}",
        c.table().unwrap()
    );
    assert_no_loss(&st, "h0→h1 while host 2 was cut off");

    // The whole history of host 2's key: only host 2 ever wrote it, and it was deleted (the
    // expiry) before host 2 wrote it again.
    let key = bed.old.key.clone();
    let events: Vec<WatchEvent> = bed
        .log
        .events()
        .unwrap()
        .into_iter()
        .filter(|e| e.key == key)
        .collect();
    let history: Vec<String> = events
        .iter()
        .map(|e| {
            if e.delete {
                format!("rev {} DELETE", e.revision)
            } else {
                format!("rev {} PUT {}", e.revision, e.value)
            }
        })
        .collect();
    eprintln!("history of {key}:\n  {}", history.join("\n  "));
    let ip = format!("\"PublicIP\":\"{}\"", h.public_ip());
    for e in events.iter().filter(|e| !e.delete) {
        assert!(
            e.value.contains(&ip),
            "{key} written by another host: {e:?}"
        );
    }
    let first_delete = events.iter().position(|e| e.delete);
    let put_after = first_delete.and_then(|d| events[d..].iter().position(|e| !e.delete));
    assert!(
        first_delete.is_some() && put_after.is_some(),
        "expected the expiry (DELETE) and then host 2's PUT: {history:?}"
    );
}
