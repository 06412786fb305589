//! Faults: hosts leaving, flanneld killed, kernel state removed by hand, etcd down (root only).

mod common;

use std::time::{Duration, Instant};

use netns_tests::{Backend, Cluster, PingStats};

use common::CONVERGE;

/// At most 1 % lost.
fn assert_loss_at_most_1pc(st: &PingStats, what: &str) {
    assert!(
        st.transmitted >= 100,
        "{what}: too few pings to judge: {st}"
    );
    assert!(st.lost() * 100 <= st.transmitted, "{what}: {st}");
}

fn host_leaves(backend: Backend) {
    let c = Cluster::new(3, backend).expect("cluster");
    c.wait_converged(CONVERGE).expect("converged");
    let a = c.add_pod(0).unwrap();
    let b = c.add_pod(1).unwrap();
    let gone = c.lease_of(2).unwrap().expect("host 2 has a lease");

    // The host goes away: flanneld stops (leaving its lease, as flannel does) and the lease is
    // deleted, as an operator or the TTL would.
    c.host(2).stop();
    assert_eq!(c.etcd().del(&gone.key).unwrap(), 1);
    let took = c
        .wait_peer_gone(&gone, Duration::from_secs(10))
        .expect("peers drop the host that left");
    eprintln!(
        "{backend:?}: hosts 0 and 1 dropped {} in {took:?}",
        gone.subnet
    );

    // The others still talk, and their own state is intact.
    c.wait_converged(Duration::from_secs(5)).unwrap();
    assert!(a.ping(b.ip(), 3).unwrap().all_received());
    assert!(b.ping(a.ip(), 3).unwrap().all_received());
}

#[test]
fn vxlan_host_leaves_peers_drop_neighbour_fdb_route() {
    netns_tests::require_test_bed!();
    host_leaves(Backend::Vxlan);
}

#[test]
fn hostgw_host_leaves_peers_drop_route() {
    netns_tests::require_test_bed!();
    host_leaves(Backend::HostGw);
}

#[test]
fn kill9_and_restart_keeps_subnet_mac_and_traffic() {
    netns_tests::require_test_bed!();
    let c = Cluster::new(3, Backend::Vxlan).expect("cluster");
    c.wait_converged(CONVERGE).expect("converged");
    let a = c.add_pod(0).unwrap();
    let b = c.add_pod(1).unwrap();
    a.wait_reaches(b.ip(), Duration::from_secs(5)).unwrap();
    let h = c.host(1);
    let subnet = h.subnet().unwrap();
    let lease = c.lease_of(1).unwrap().unwrap();
    let mac = h.link_mac("flannel.1").unwrap().expect("flannel.1");
    assert_eq!(lease.vtep_mac.as_deref(), Some(mac.as_str()));

    let ping = a.start_ping(b.ip(), Duration::from_millis(10)).unwrap();
    std::thread::sleep(Duration::from_secs(1)); // traffic flows before the kill
    let old_pid = h.pid().unwrap();
    h.kill9();
    let t0 = Instant::now();
    h.start().unwrap();
    h.wait_ready(Duration::from_secs(30)).expect("ready again");
    let ready = t0.elapsed();
    c.wait_converged(CONVERGE).expect("converged again");
    std::thread::sleep(Duration::from_secs(3)); // and keeps flowing after the restart
    let st = ping.stop().unwrap();
    eprintln!(
        "flanneld pid {old_pid} killed, pid {} ready after {ready:?}; ping every 10 ms: {st}",
        h.pid().unwrap()
    );

    assert_eq!(h.subnet().unwrap(), subnet, "same subnet after restart");
    assert_eq!(
        h.link_mac("flannel.1").unwrap().as_deref(),
        Some(mac.as_str()),
        "same VTEP MAC on flannel.1"
    );
    let after = c.lease_of(1).unwrap().expect("lease after restart");
    assert_eq!(after.subnet, subnet);
    assert_eq!(
        after.vtep_mac.as_deref(),
        Some(mac.as_str()),
        "same VtepMAC in the lease"
    );
    assert_eq!(
        c.leases().unwrap().len(),
        3,
        "no second lease for the restarted host"
    );
    assert_loss_at_most_1pc(&st, "pings across a kill -9 and restart");
}

#[test]
fn vxlan_device_deleted_by_hand_is_recreated() {
    netns_tests::require_test_bed!();
    let c = Cluster::new(3, Backend::Vxlan).expect("cluster");
    c.wait_converged(CONVERGE).expect("converged");
    let pods: Vec<_> = (0..3).map(|i| c.add_pod(i).unwrap()).collect();
    for p in &pods[1..] {
        pods[0]
            .wait_reaches(p.ip(), Duration::from_secs(5))
            .unwrap();
    }

    c.host(0)
        .netns()
        .ip(&["link", "del", "flannel.1"])
        .expect("delete flannel.1");
    let t0 = Instant::now();
    let limit = Duration::from_secs(10);
    c.wait_converged(limit)
        .expect("flannel.1 and its peers back");
    for p in &pods[1..] {
        let left = limit
            .saturating_sub(t0.elapsed())
            .max(Duration::from_millis(500));
        pods[0].wait_reaches(p.ip(), left).unwrap();
        p.wait_reaches(pods[0].ip(), left).unwrap();
    }
    let took = t0.elapsed();
    eprintln!("flannel.1 re-created and all peers reachable after {took:?}");
    assert!(took <= limit, "took {took:?}");
    let mac = c.host(0).link_mac("flannel.1").unwrap().expect("flannel.1");
    let lease = c.lease_of(0).unwrap().unwrap();
    assert_eq!(
        lease.vtep_mac.as_deref(),
        Some(mac.as_str()),
        "lease names the device's MAC"
    );
    assert!(c.host(0).is_running());
}

fn deleted_route_is_restored(backend: Backend) {
    let c = Cluster::new(3, backend).expect("cluster");
    c.wait_converged(CONVERGE).expect("converged");
    let a = c.add_pod(0).unwrap();
    let b = c.add_pod(1).unwrap();
    a.wait_reaches(b.ip(), Duration::from_secs(5)).unwrap();

    let subnet = c.host(1).subnet().unwrap().to_string();
    // A route gone from a programmed peer is put back as a new entry.
    let repairs = || {
        let m = |name| c.host(0).metric(name).unwrap();
        m("flannel_dataplane_entries_added_total") + m("flannel_dataplane_repairs_total")
    };
    let before = repairs();
    c.host(0)
        .netns()
        .ip(&["route", "del", &subnet])
        .expect("delete the route");
    // The repair can be quicker than any look at the routing table, so whether the deletion was
    // seen and undone is read from flanneld's own count of repairs.
    let took = c
        .wait_converged(Duration::from_secs(15))
        .expect("route restored");
    netns_tests::wait_until(
        Duration::from_secs(15),
        "flanneld counts the route it put back",
        || {
            let now = repairs();
            (now > before)
                .then_some(())
                .ok_or(format!("entries added or repaired {before} → {now}"))
        },
    )
    .expect("repair counted");
    eprintln!("{backend:?}: route to {subnet} restored after {took:?}");
    a.wait_reaches(b.ip(), Duration::from_secs(5)).unwrap();
}

#[test]
fn vxlan_route_deleted_by_hand_is_restored() {
    netns_tests::require_test_bed!();
    deleted_route_is_restored(Backend::Vxlan);
}

#[test]
fn hostgw_route_deleted_by_hand_is_restored() {
    netns_tests::require_test_bed!();
    deleted_route_is_restored(Backend::HostGw);
}

/// The destinations of host `h`'s routes carrying flanneld's protocol number (102).
fn routes_with_our_protocol(c: &Cluster, h: usize) -> Vec<String> {
    let routes = c
        .host(h)
        .netns()
        .ip_json(&["-4", "route", "show", "proto", "102"])
        .unwrap();
    let mut dsts: Vec<String> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["dst"].as_str().unwrap().to_string())
        .collect();
    dsts.sort();
    dsts
}

/// Something of flanneld's on host 0 that a person deletes by hand.
enum Ours {
    /// The route to a peer's subnet.
    Route,
    /// The neighbour entry of a peer's VTEP on the vxlan device.
    Neighbour,
}

/// Unrelated kernel changes on host 0 do not wake flanneld's repair pass; deleting something of
/// its own does, and the pass keeps a route an operator made inside the Network on eth0.
fn repairs_only_its_own_state(backend: Backend, delete: Ours) {
    let c = Cluster::new(3, backend).expect("cluster");
    c.wait_converged(CONVERGE).expect("converged");
    let h = c.host(0);
    let ns = h.netns();
    let leases = c.leases().unwrap();
    let mut peers: Vec<String> = leases
        .iter()
        .filter(|l| l.public_ip != h.public_ip())
        .map(|l| l.subnet.to_string())
        .collect();
    peers.sort();
    assert_eq!(
        routes_with_our_protocol(&c, 0),
        peers,
        "`ip route show proto 102`"
    );

    // An operator's route inside the Network via a LAN host (no lease holds that subnet).
    let by_hand = (200..=255)
        .map(|i| format!("10.5.{i}.0/24"))
        .find(|s| leases.iter().all(|l| l.subnet.to_string() != *s))
        .expect("a free /24");
    ns.ip(&[
        "route",
        "add",
        &by_hand,
        "via",
        "198.18.0.50",
        "dev",
        "eth0",
    ])
    .unwrap();

    // Kernel changes that are not flanneld's: a veth pair made and deleted, a route outside
    // the Network and an ARP entry on eth0 made and deleted.
    let events = || h.metric("flannel_kernel_events_total").unwrap();
    let before = events();
    ns.ip(&["link", "add", "xv0", "type", "veth", "peer", "name", "xv1"])
        .unwrap();
    ns.ip(&["link", "set", "xv0", "up"]).unwrap();
    ns.ip(&["link", "del", "xv0"]).unwrap();
    ns.ip(&[
        "route",
        "add",
        "192.0.2.0/24",
        "via",
        "198.18.0.50",
        "dev",
        "eth0",
    ])
    .unwrap();
    ns.ip(&["route", "del", "192.0.2.0/24", "dev", "eth0"])
        .unwrap();
    ns.ip(&[
        "neigh",
        "add",
        "198.18.0.51",
        "lladdr",
        "02:00:00:00:00:51",
        "dev",
        "eth0",
    ])
    .unwrap();
    ns.ip(&["neigh", "del", "198.18.0.51", "dev", "eth0"])
        .unwrap();

    // One of ours deleted: back sooner than the periodic pass (10 s) would bring it. The
    // kernel reports in order, so by then every notification above has been judged.
    let peer = leases
        .iter()
        .find(|l| l.subnet.to_string() == peers[0])
        .unwrap();
    let redone = || {
        h.metric("flannel_dataplane_entries_added_total").unwrap()
            + h.metric("flannel_dataplane_repairs_total").unwrap()
    };
    let redone_before = redone();
    match delete {
        Ours::Route => ns.ip(&["route", "del", &peers[0]]).unwrap(),
        Ours::Neighbour => {
            let vtep = peer.subnet.network().to_string();
            ns.ip(&["neigh", "del", &vtep, "dev", &c.vxlan_dev()])
                .unwrap()
        }
    };
    // The daemon may put it back before a check could see it gone: what proves the deletion
    // was seen is that flanneld re-created an entry.
    let t = Instant::now();
    netns_tests::wait_until(
        Duration::from_secs(3),
        "flanneld to re-create the entry",
        || {
            let now = redone();
            (now > redone_before)
                .then_some(())
                .ok_or(format!("entries added + repaired: {redone_before} → {now}"))
        },
    )
    .expect("the deletion is repaired on the kernel notification");
    c.wait_converged(Duration::from_secs(3))
        .expect("restored on the kernel notification");
    let took = t.elapsed();
    eprintln!(
        "{backend:?}: {} of {} restored after {took:?}",
        match delete {
            Ours::Route => "route",
            Ours::Neighbour => "neighbour entry",
        },
        peers[0]
    );
    assert_eq!(
        events() - before,
        1.0,
        "only the deletion of our entry may wake the data plane"
    );

    // That repair pass left the operator's route alone; ours carry our protocol number.
    let kept = ns.ip(&["route", "show", &by_hand]).unwrap();
    assert!(
        kept.contains("via 198.18.0.50 dev eth0"),
        "{by_hand}: {kept:?}"
    );
    assert_eq!(routes_with_our_protocol(&c, 0), peers);
}

#[test]
fn hostgw_repairs_only_its_own_state_and_keeps_hand_made_routes() {
    netns_tests::require_test_bed!();
    repairs_only_its_own_state(Backend::HostGw, Ours::Route);
}

#[test]
fn vxlan_repairs_only_its_own_state_and_keeps_hand_made_routes() {
    netns_tests::require_test_bed!();
    repairs_only_its_own_state(Backend::Vxlan, Ours::Neighbour);
}

/// How long etcd stays down (default 30 s; `NETNS_TESTS_ETCD_OUTAGE_SECS` to change).
fn outage() -> Duration {
    let secs = std::env::var("NETNS_TESTS_ETCD_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

#[test]
fn etcd_down_traffic_flows_then_new_host_joins() {
    netns_tests::require_test_bed!();
    let mut c = Cluster::new(3, Backend::Vxlan).expect("cluster");
    c.wait_converged(CONVERGE).expect("converged");
    let a = c.add_pod(0).unwrap();
    let b = c.add_pod(1).unwrap();
    let d = c.add_pod(2).unwrap();
    a.wait_reaches(b.ip(), Duration::from_secs(5)).unwrap();
    let leases = c.leases().unwrap();

    let ping = a.start_ping(b.ip(), Duration::from_millis(10)).unwrap();
    c.etcd().stop().unwrap();
    let t0 = Instant::now();
    let outage = outage();
    // Watch the data plane all through the outage (from the leases known before it).
    while t0.elapsed() < outage {
        for h in c.hosts() {
            h.check_alive()
                .unwrap_or_else(|e| panic!("during the etcd outage: {e}"));
            for l in leases.iter().filter(|l| l.public_ip != h.public_ip()) {
                c.check_peer(h, l)
                    .unwrap_or_else(|e| panic!("during the etcd outage: {e}"));
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        d.ping(a.ip(), 3).unwrap().all_received(),
        "host 2 → host 0 during the outage"
    );
    let st = ping.stop().unwrap();
    eprintln!(
        "etcd down for {:?}; ping every 10 ms meanwhile: {st}",
        t0.elapsed()
    );
    assert_loss_at_most_1pc(&st, "pings while etcd is down");

    c.etcd().start().expect("etcd back");
    let t1 = Instant::now();
    let new = c.add_host().expect("a new host joins after etcd returns");
    c.wait_converged(CONVERGE)
        .expect("converged with the new host");
    let e = c.add_pod(new).unwrap();
    for p in [&a, &b, &d] {
        e.wait_reaches(p.ip(), Duration::from_secs(5)).unwrap();
        p.wait_reaches(e.ip(), Duration::from_secs(5)).unwrap();
    }
    eprintln!(
        "host {new} joined and is reachable {:?} after etcd returned\n{}",
        t1.elapsed(),
        c.table().unwrap()
    );
    assert_eq!(c.leases().unwrap().len(), 4);
}
