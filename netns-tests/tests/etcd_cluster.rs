//! flanneld against a 3-member etcd cluster (root only): the member a daemon talks to dies,
//! then two of three die (no quorum) and come back.
//!
//! Every flanneld gets all three client URLs and a 9 s lease TTL (renewed every 3 s), so lease
//! renewals are seen within seconds and an outage longer than the TTL is cheap to make.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use netns_tests::{
    heavy_lock, wait_until, Backend, Cluster, LeaseInfo, PacedTransfer, PingStats, Pod,
};

use common::CONVERGE;

const TTL: &str = "--subnet-lease-ttl=9s";

fn cluster() -> Cluster {
    Cluster::builder()
        .hosts(3)
        .etcd_members(3)
        .backend(Backend::Vxlan)
        .flanneld_arg(TTL)
        .build()
        .expect("3 hosts on a 3-member etcd cluster")
}

/// At most 1 % lost, and enough sent to judge.
fn assert_loss_at_most_1pc(st: &PingStats, what: &str) {
    assert!(
        st.transmitted >= 100,
        "{what}: too few pings to judge: {st}"
    );
    assert!(st.lost() * 100 <= st.transmitted, "{what}: {st}");
}

/// A metric of every host, by host index.
fn metric_all(c: &Cluster, name: &str) -> Vec<f64> {
    c.hosts()
        .iter()
        .map(|h| h.metric(name).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// The data plane of every host still holds every peer of `leases`, each flanneld runs, and
/// `/readyz` answers 200.
fn assert_steady(c: &Cluster, leases: &[LeaseInfo], when: &str) {
    for h in c.hosts().iter().filter(|h| h.pid().is_some()) {
        h.check_alive().unwrap_or_else(|e| panic!("{when}: {e}"));
        let state = c.kernel_state(h).unwrap_or_else(|e| panic!("{when}: {e}"));
        for l in leases.iter().filter(|l| l.public_ip != h.public_ip()) {
            c.check_peer_in(&state, l)
                .unwrap_or_else(|e| panic!("{when}: {e}"));
        }
        let (code, body) = h.http_get("/readyz").unwrap();
        assert_eq!(code, 200, "{when}: /readyz of {}: {body}", h.name());
    }
}

/// How long a new host may take to get its lease while a quorum of members is up (it takes
/// well under a second; the margin is for loaded CI machines).
const JOIN_LIMIT: Duration = Duration::from_secs(10);

/// A new host joins and its pod reaches (and is reached by) every pod in `pods`.
fn new_host_joins(c: &mut Cluster, pods: &[&Pod]) -> (usize, Pod) {
    let t = Instant::now();
    let i = c.add_host().expect("a new host joins");
    let joined = t.elapsed();
    assert!(
        joined <= JOIN_LIMIT,
        "host {i} took {joined:?} to get a lease with a quorum of etcd members up; its log:\n{}",
        c.host(i).log_tail(30)
    );
    c.wait_converged(CONVERGE)
        .expect("converged with the new host");
    let converged = t.elapsed();
    let p = c.add_pod(i).unwrap();
    for q in pods {
        p.wait_reaches(q.ip(), Duration::from_secs(5)).unwrap();
        q.wait_reaches(p.ip(), Duration::from_secs(5)).unwrap();
    }
    eprintln!(
        "host {i} ({}) joined: lease and subnet file after {joined:?}, converged after \
         {converged:?}, its pod reached both ways after {:?}",
        c.host(i).subnet().unwrap(),
        t.elapsed()
    );
    (i, p)
}

/// The cluster, converged, with one pod on each of its three hosts, each reaching the next.
fn converged_with_pods() -> (Cluster, [Pod; 3]) {
    let c = cluster();
    c.wait_converged(CONVERGE).expect("converged");
    let pods = [0, 1, 2].map(|i| c.add_pod(i).unwrap());
    for (x, y) in [(0, 1), (1, 2), (2, 0)] {
        pods[x]
            .wait_reaches(pods[y].ip(), Duration::from_secs(5))
            .unwrap();
    }
    (c, pods)
}

/// The flanneld process of each host (a restart changes it).
fn flanneld_pids(c: &Cluster) -> Vec<Option<u32>> {
    c.hosts().iter().map(|h| h.pid()).collect()
}

/// Watches a cluster without etcd quorum for `outage`: the data plane and readiness hold all
/// along, and every host shows the outage in `/metrics` (etcd down, errors above `errors0`),
/// then keeps retrying. Returns when the outage first showed on every host and the error
/// counts at the end.
fn watch_outage(
    c: &Cluster,
    leases: &[LeaseInfo],
    errors0: &[f64],
    outage: Duration,
) -> (Duration, Vec<f64>) {
    let t0 = Instant::now();
    let mut seen_down = None;
    let mut errors_mid = None;
    while t0.elapsed() < outage {
        assert_steady(c, leases, "without etcd quorum");
        let up = metric_all(c, "flannel_etcd_up");
        let errors = metric_all(c, "flannel_etcd_errors_total");
        if seen_down.is_none()
            && up.iter().all(|u| *u == 0.0)
            && errors.iter().zip(errors0).all(|(n, e)| n > e)
        {
            seen_down = Some(t0.elapsed());
            errors_mid = Some(errors);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let errors_end = metric_all(c, "flannel_etcd_errors_total");
    let seen_down = seen_down.unwrap_or_else(|| {
        panic!(
            "/metrics never showed the outage on every host: flannel_etcd_up {:?}, errors {:?} \
             (before {errors0:?})",
            metric_all(c, "flannel_etcd_up"),
            errors_end
        )
    });
    let errors_mid = errors_mid.unwrap();
    assert!(
        errors_end.iter().zip(&errors_mid).all(|(e, m)| e > m),
        "daemons keep retrying: errors when the outage showed {errors_mid:?}, at its end \
         {errors_end:?}"
    );
    (seen_down, errors_end)
}

/// Which member each host has established connections to.
fn connections(c: &Cluster) -> Vec<Vec<Ipv4Addr>> {
    c.hosts()
        .iter()
        .map(|h| h.etcd_connections().unwrap())
        .collect()
}

#[test]
fn etcd_member_killed_leases_renew_hosts_join_no_pod_connection_breaks() {
    netns_tests::require_test_bed!();
    let _heavy = heavy_lock();
    let (mut c, [a, b, d]) = converged_with_pods();
    let leases = c.leases().unwrap();
    let pids = flanneld_pids(&c);

    // The member host 0 talks to: the one it has an established connection with (the client
    // balances over all three, so there may be several; take the one most hosts use).
    let conns = connections(&c);
    eprintln!("etcd connections per host before the kill: {conns:?}");
    let mut uses: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for ip in conns.iter().flatten() {
        *uses.entry(*ip).or_default() += 1;
    }
    let victim_ip = conns[0]
        .iter()
        .copied()
        .max_by_key(|ip| uses[ip])
        .expect("host 0 has a connection to etcd");
    let victim = c
        .etcd_members()
        .iter()
        .position(|m| m.ip() == victim_ip)
        .expect("a member at that address");

    let renewals = metric_all(&c, "flannel_lease_renewals_total");
    let ping_ab = a.start_ping(b.ip(), Duration::from_millis(10)).unwrap();
    let ping_da = d.start_ping(a.ip(), Duration::from_millis(10)).unwrap();
    let tcp = PacedTransfer::start(&b, &d, 1024, Duration::from_millis(10)).unwrap();
    std::thread::sleep(Duration::from_secs(1));

    c.etcd_member(victim).kill9();
    let t0 = Instant::now();
    eprintln!("killed etcd member {victim} ({victim_ip})");

    // Every lease keeps renewing (two more renewals each, through the members left).
    let took = wait_until(
        Duration::from_secs(25),
        "every host to renew its lease twice more",
        || {
            let now = metric_all(&c, "flannel_lease_renewals_total");
            if now.iter().zip(&renewals).all(|(n, r)| *n >= r + 2.0) {
                Ok(t0.elapsed())
            } else {
                Err(format!("renewals before {renewals:?}, now {now:?}"))
            }
        },
    )
    .expect("renewals continue with a member down");
    eprintln!("all hosts renewed twice within {took:?} of the kill");
    assert_steady(&c, &leases, "after the member was killed");
    assert_eq!(c.leases().unwrap(), leases, "the leases did not change");
    assert_eq!(flanneld_pids(&c), pids, "no flanneld was restarted");
    for h in c.hosts() {
        assert_eq!(
            h.metric("flannel_lease_acquisitions_total").unwrap(),
            1.0,
            "{} kept its lease (no re-acquisition)",
            h.name()
        );
    }

    // A new host joins with the dead member still in its endpoint list.
    let (_, e) = new_host_joins(&mut c, &[&a, &b, &d]);

    std::thread::sleep(Duration::from_secs(1));
    let st_ab = ping_ab.stop().unwrap();
    let st_da = ping_da.stop().unwrap();
    let t = tcp
        .stop()
        .expect("the TCP connection spanning the kill is intact");
    eprintln!(
        "member {victim} down for {:?}: ping every 10 ms h0→h1: {st_ab}; h2→h0: {st_da}; \
         TCP h1→h2: {} bytes verified over {:?}, longest receive stall {:?}",
        t0.elapsed(),
        t.bytes,
        t.elapsed,
        t.longest_stall
    );
    assert_loss_at_most_1pc(&st_ab, "h0→h1 across the member kill");
    assert_loss_at_most_1pc(&st_da, "h2→h0 across the member kill");
    assert!(t.bytes > 0);
    eprintln!("etcd connections per host after: {:?}", connections(&c));

    // The member comes back and the cluster stays converged.
    c.etcd_member(victim).start().expect("member back");
    c.wait_converged(CONVERGE)
        .expect("converged after the member returned");
    assert!(e.ping(a.ip(), 2).unwrap().all_received());
    eprintln!("{}", c.table().unwrap());
}

#[test]
fn etcd_quorum_lost_data_plane_kept_ready_outage_in_metrics_then_converges() {
    netns_tests::require_test_bed!();
    let _heavy = heavy_lock();
    let (mut c, [a, b, d]) = converged_with_pods();
    let leases = c.leases().unwrap();
    let pids = flanneld_pids(&c);
    let errors0 = metric_all(&c, "flannel_etcd_errors_total");
    assert_eq!(metric_all(&c, "flannel_etcd_up"), vec![1.0; 3]);

    let ping = a.start_ping(b.ip(), Duration::from_millis(10)).unwrap();
    let tcp = PacedTransfer::start(&d, &a, 1024, Duration::from_millis(10)).unwrap();
    std::thread::sleep(Duration::from_secs(1));

    // Two of three members die: no quorum. Longer than the lease TTL.
    c.etcd_member(1).kill9();
    c.etcd_member(2).kill9();
    let t0 = Instant::now();
    let (seen_down, errors_end) = watch_outage(&c, &leases, &errors0, Duration::from_secs(20));
    assert!(
        d.ping(b.ip(), 3).unwrap().all_received(),
        "host 2 → host 1 during the outage"
    );
    eprintln!(
        "no quorum for {:?}: flannel_etcd_up 0 on every host after {seen_down:?}; \
         flannel_etcd_errors_total {errors0:?} → {errors_end:?}",
        t0.elapsed()
    );

    // Quorum returns (member 1 restarts): every daemon recovers by itself.
    c.etcd_member(1).start().expect("quorum back");
    let t1 = Instant::now();
    let renewals = metric_all(&c, "flannel_lease_renewals_total");
    wait_until(
        Duration::from_secs(30),
        "every host to see etcd again and renew",
        || {
            let up = metric_all(&c, "flannel_etcd_up");
            let now = metric_all(&c, "flannel_lease_renewals_total");
            if up.iter().all(|u| *u == 1.0) && now.iter().zip(&renewals).all(|(n, r)| n > r) {
                Ok(())
            } else {
                Err(format!(
                    "flannel_etcd_up {up:?}; renewals {renewals:?} → {now:?}"
                ))
            }
        },
    )
    .expect("daemons recover when quorum returns");
    let recovered = t1.elapsed();
    c.wait_converged(CONVERGE).expect("converged after quorum");
    let after = c.leases().unwrap();
    assert_eq!(
        after
            .iter()
            .map(|l| (l.subnet, l.public_ip))
            .collect::<Vec<_>>(),
        leases
            .iter()
            .map(|l| (l.subnet, l.public_ip))
            .collect::<Vec<_>>(),
        "every host kept its subnet through the outage"
    );
    assert_eq!(flanneld_pids(&c), pids, "no flanneld was restarted");
    let (_, _e) = new_host_joins(&mut c, &[&a, &b, &d]);

    let st = ping.stop().unwrap();
    let t = tcp
        .stop()
        .expect("the TCP connection spanning the outage is intact");
    eprintln!(
        "quorum back: etcd up and renewing on every host {recovered:?} after the restart; \
         ping every 10 ms h0→h1 all along: {st}; TCP h2→h0: {} bytes verified over {:?}, \
         longest receive stall {:?}\n{}",
        t.bytes,
        t.elapsed,
        t.longest_stall,
        c.table().unwrap()
    );
    assert_loss_at_most_1pc(&st, "h0→h1 through the quorum loss");
}
