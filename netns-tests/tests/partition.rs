//! A host cut off the underlay for longer than its lease TTL, then plugged back (root only).
//!
//! The network has room for exactly four /28 subnets, so every host that joins while the cut-off
//! host's lease is alive is pushed towards its subnet: the only thing that keeps them off it is
//! the lease in etcd.

mod common;

use std::time::{Duration, Instant};

use netns_tests::{heavy_lock, wait_until, Cluster, LeaseInfo, PingStats, WatchEvent};

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

#[test]
fn partitioned_host_keeps_data_plane_and_its_subnet_which_no_one_takes_while_leased() {
    netns_tests::require_test_bed!();
    let _heavy = heavy_lock();
    let mut c = Cluster::builder()
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
    let subnet = old.subnet;
    let pid = c.host(victim).pid();
    let log = c
        .etcd()
        .watch_log(&c.subnets_prefix(), &c.dir().join("subnets-watch.jsonl"))
        .unwrap();
    let ping = a.start_ping(b.ip(), Duration::from_millis(20)).unwrap();

    c.partition(victim).expect("cut host 2 off");
    let t0 = Instant::now();
    eprintln!("host {victim} ({subnet}) cut off the underlay");

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

    // Host 3 leaves (its lease deleted), so that when host 2 returns it has a choice of two
    // free subnets: its own and host 3's.
    c.host(h3).stop();
    let l3 = c.lease_of(h3).unwrap().expect("host 3's lease");
    c.etcd().del(&l3.key).unwrap();

    // While cut off, host 2 keeps its data plane and its daemon; when its lease expires in
    // etcd the others drop it.
    let expired = wait_until(
        Duration::from_secs(TTL_SECS + 10),
        "host 2's lease to expire in etcd",
        || {
            assert_keeps_peers(&c, victim, &leases, "while cut off");
            match c.lease_of(victim).map_err(|e| e.to_string())? {
                None => Ok(t0.elapsed()),
                Some(l) => Err(format!("still there: {l:?}")),
            }
        },
    )
    .expect("the lease expires");
    let dropped = c
        .wait_peer_gone(&old, Duration::from_secs(10))
        .expect("the other hosts drop the expired lease");
    std::thread::sleep(Duration::from_secs(2));
    assert_keeps_peers(&c, victim, &leases, "cut off, after the lease expired");
    eprintln!(
        "lease {subnet} expired {expired:?} after the cut; the others dropped it {dropped:?} \
         later; host 2 still holds every peer"
    );

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
    for x in [&a, &b] {
        x.wait_reaches(p.ip(), Duration::from_secs(5)).unwrap();
        p.wait_reaches(x.ip(), Duration::from_secs(5)).unwrap();
    }
    let reachable = t1.elapsed();
    let h = c.host(victim);
    assert_eq!(h.pid(), pid, "flanneld on host 2 was not restarted");
    assert_eq!(h.subnet().unwrap(), subnet, "subnet file unchanged");
    assert_eq!(h.metric("flannel_lease_acquisitions_total").unwrap(), 2.0);
    let how = if h.log_tail(400).contains("expired in etcd") {
        "renewal found the lease expired"
    } else {
        "the watch saw the lease deleted"
    };
    let st = ping.stop().unwrap();
    eprintln!(
        "healed: host 2 re-acquired {subnet} after {reacquired:?} ({how}), cluster converged \
         after {converged:?}, pods reach each other after {reachable:?}; \
         ping h0→h1 every 20 ms all along: {st}\n{}",
        c.table().unwrap()
    );
    assert_no_loss(&st, "h0→h1 while host 2 was cut off");

    // The whole history of host 2's key: only host 2 ever wrote it, and it was deleted (the
    // expiry) before host 2 wrote it again.
    let key = old.key.clone();
    let events: Vec<WatchEvent> = log
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
