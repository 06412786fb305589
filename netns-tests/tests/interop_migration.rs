//! Migration in place (root only, flannel's Go peers from `scripts/go-peers.sh`): on a cluster
//! of Go flanneld and ours, the daemon of one host is stopped and the other one started in its
//! place (same namespace, subnet file and etcd), Go → ours, then back ours → Go. The host keeps
//! its subnet (and VTEP MAC), pod traffic across it recovers within 2 s, and no host is left
//! with a route, neighbour or FDB entry twice. For vxlan, host-gw and udp (whose TUN device goes
//! with the daemon that opened it: the new daemon makes its own).

mod interop;

use std::time::{Duration, Instant};

use netns_tests::{wait_for, Backend, Cluster, GoPeers, LeaseInfo, Pod, Wait};

/// The host whose daemon is replaced; it starts with Go flanneld, so are host 2's. Host 1 runs
/// ours: the replaced host has a Go and a Rust peer.
const MIGRATED: usize = 0;
const HOSTS: usize = 3;
const RECOVERY: Duration = Duration::from_secs(2);
/// The background ping's interval: lost pings × this bounds the outage.
const PING_EVERY: Duration = Duration::from_millis(20);

/// One ping from `a` to `b` answered within 200 ms.
fn reaches(a: &Pod, b: &Pod) -> Result<(), String> {
    let out = a
        .netns()
        .command("ping")
        .args(["-n", "-c", "1", "-W", "0.2", &b.ip().to_string()])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{} → {} unanswered", a.ip(), b.ip()))
    }
}

/// What one switch measured.
struct Switch {
    what: String,
    /// From SIGTERM to the old daemon until the new one is ready (subnet file written).
    to_ready: Duration,
    /// From SIGTERM until pod traffic crosses the host both ways once the new daemon is ready.
    recovered: Duration,
    /// Pings lost by a ping every [`PING_EVERY`] through the host during the switch.
    lost: u32,
    sent: u32,
}

/// Replaces host [`MIGRATED`]'s daemon and checks what the module doc promises.
fn switch(c: &Cluster, peers: &GoPeers, pods: &[Pod], before: &LeaseInfo) -> Switch {
    let h = c.host(MIGRATED);
    let next = if h.runs_go() {
        "our flanneld"
    } else {
        "Go flanneld"
    };
    let what = format!("{} → {next}", interop::daemon(h));
    let (here, ours_peer, go_peer) = (&pods[MIGRATED], &pods[1], &pods[2]);
    let background = ours_peer
        .start_ping(here.ip(), PING_EVERY)
        .expect("background ping");
    let t0 = Instant::now();
    interop::swap_daemon(c, peers, MIGRATED);
    h.wait_ready(interop::CONVERGE)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let to_ready = t0.elapsed();
    // The deadline counts from SIGTERM: the new daemon's start-up is part of the outage.
    wait_for(
        RECOVERY.saturating_sub(to_ready),
        Duration::from_millis(10),
        &format!("{what}: pod traffic across {} both ways", h.name()),
        || {
            h.check_alive().map_err(Wait::NotYet)?;
            for (a, b) in [
                (here, ours_peer),
                (ours_peer, here),
                (here, go_peer),
                (go_peer, here),
            ] {
                reaches(a, b).map_err(Wait::NotYet)?;
            }
            Ok(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", interop::table(c)));
    let recovered = t0.elapsed();
    c.wait_converged(interop::CONVERGE)
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", interop::table(c)));
    let stats = background.stop().expect("background ping summary");

    let after = c
        .lease_of(MIGRATED)
        .unwrap()
        .expect("a lease after the switch");
    assert_eq!(after.key, before.key, "{what}: the host keeps its subnet");
    assert_eq!(h.subnet().unwrap(), before.subnet, "{what}: subnet file");
    if c.backend() == Some(Backend::Vxlan) {
        // Kept or not, every peer must have the lease's MAC: wait_converged checked that; a
        // kept MAC is what lets traffic through without waiting for the peers.
        assert_eq!(
            after.vtep_mac, before.vtep_mac,
            "{what}: the host keeps its VtepMAC"
        );
        assert_eq!(
            h.link_mac(&c.vxlan_dev()).unwrap(),
            after.vtep_mac,
            "{what}: the device has the published MAC"
        );
    }
    assert_nothing_twice(c, &what);
    Switch {
        what,
        to_ready,
        recovered,
        lost: stats.lost(),
        sent: stats.transmitted,
    }
}

/// No host has an entry twice, and on the vxlan device exactly one neighbour and one FDB entry
/// per peer (nothing stale of an old MAC).
fn assert_nothing_twice(c: &Cluster, what: &str) {
    let dev = (c.backend() == Some(Backend::Vxlan)).then(|| c.vxlan_dev());
    let mut found = Vec::new();
    for h in c.hosts() {
        found.extend(interop::duplicates(h, dev.as_deref()));
        if let Some(dev) = &dev {
            let peers = c.hosts().len() - 1;
            let (neigh, fdb) = (h.neighbours(dev).unwrap(), h.fdb(dev).unwrap());
            if neigh.len() != peers || fdb.len() != peers {
                found.push(format!(
                    "{} ({}): {} neighbours and {} FDB entries for {peers} peers: {neigh:?} {fdb:?}",
                    h.name(),
                    interop::daemon(h),
                    neigh.len(),
                    fdb.len()
                ));
            }
        }
    }
    assert!(
        found.is_empty(),
        "{what}: entries twice or stale:\n{}",
        found.join("\n")
    );
}

fn migrate_and_back(peers: &GoPeers, backend: Backend) {
    let c = interop::mixed_cluster(peers, backend, HOSTS, |i| i != 1, &[]);
    let pods = c.add_pods(&[0, 1, 2]).expect("one pod per host");
    for a in &pods {
        for b in pods.iter().filter(|b| b.name() != a.name()) {
            a.wait_reaches(b.ip(), interop::CONVERGE).unwrap();
        }
    }
    let before = c.lease_of(MIGRATED).unwrap().expect("a lease");
    assert_nothing_twice(&c, "before any switch");
    let there = switch(&c, peers, &pods, &before);
    let back = switch(&c, peers, &pods, &before);
    for s in [&there, &back] {
        eprintln!(
            "{backend:?} {}: ready after {:?}, pod traffic both ways after {:?}; \
             background ping every {PING_EVERY:?}: {} of {} lost",
            s.what, s.to_ready, s.recovered, s.lost, s.sent
        );
        assert!(
            PING_EVERY * s.lost <= RECOVERY,
            "{}: {} pings lost every {PING_EVERY:?}: an outage over {RECOVERY:?}",
            s.what,
            s.lost
        );
    }
    c.assert_connected(&pods, 1 << 20);
}

#[test]
fn vxlan_go_host_migrates_to_ours_and_back() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_go_peers!();
    migrate_and_back(peers, Backend::Vxlan);
}

#[test]
fn host_gw_go_host_migrates_to_ours_and_back() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_go_peers!();
    migrate_and_back(peers, Backend::HostGw);
}

#[test]
fn udp_go_host_migrates_to_ours_and_back() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_go_peers!();
    migrate_and_back(peers, Backend::Udp);
}

/// The subnet file is the other daemon's memory: with its lease gone from etcd while it was
/// stopped, a host that switches daemons takes the subnet its subnet file names (when free),
/// Go → ours and ours → Go.
#[test]
fn the_other_daemons_subnet_file_brings_back_the_subnet() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_go_peers!();
    let c = interop::mixed_cluster(peers, Backend::HostGw, 2, |i| i == 0, &[]);
    for round in 0..2 {
        let h = c.host(MIGRATED);
        let before = c.lease_of(MIGRATED).unwrap().expect("a lease");
        let from = interop::daemon(h);
        h.stop();
        assert_eq!(
            c.etcd().del(&before.key).unwrap(),
            1,
            "deleting {}",
            before.key
        );
        h.set_go_flanneld(if h.runs_go() {
            None
        } else {
            Some(&peers.flanneld)
        });
        h.start().unwrap();
        h.wait_ready(interop::CONVERGE).unwrap();
        let after = c.lease_of(MIGRATED).unwrap().expect("a lease again");
        assert_eq!(
            after.subnet,
            before.subnet,
            "round {round}: {} after {from} takes the subnet of the subnet file",
            interop::daemon(h)
        );
        eprintln!(
            "round {round}: {} took {} from {from}'s subnet file",
            interop::daemon(h),
            after.subnet
        );
    }
    c.wait_converged(interop::CONVERGE).unwrap();
}
