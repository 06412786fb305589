//! The host-gw backend against a real kernel, inside throw-away network namespaces.
//! Needs root; skipped without it (fails when `CI` is set). The NAT refusal needs no kernel.

mod backend_netns;

use backend_netns::{
    assert_prepare_refused, config, context, external_interface, init_logs, lease, peer_set,
    report, route_to, NetnsGuard,
};
use flannel::backend;
use serde_json::json;

const NETWORK: &str = "10.5.0.0/16";
/// flanneld's route protocol number, as `ip route … proto` takes it.
const PROTO: &str = "102";

fn hostgw_lease(key: &str, public_ip: &str) -> flannel::subnet::Lease {
    lease(
        key,
        &format!(r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"host-gw"}}"#),
    )
}

#[test]
fn hostgw_routes_peers_via_public_ip_and_converges() {
    netns_tests::require_root!();
    init_logs();
    let guard = NetnsGuard::new("hg");
    let ns = guard.ns.clone();
    let ext = ns.underlay("198.18.0.1/24", None);
    let ctx = context(config(NETWORK, json!({"Type": "host-gw"})), ext);
    ns.clone().run(move || async move {
        let own = hostgw_lease("10.5.1.0-24", "198.18.0.1");
        let mut be = backend::create(ctx.clone()).expect("host-gw backend");
        let publish = be.prepare().await.expect("prepare");
        assert_eq!(publish.backend_type, "host-gw");
        assert_eq!(publish.backend_data, None);
        assert_eq!(publish.mtu, 1500);
        be.lease_acquired(&own).await.unwrap();

        let a = hostgw_lease("10.5.2.0-24", "198.18.0.2");
        let b = hostgw_lease("10.5.3.0-24", "198.18.0.3");
        let vx = lease(
            "10.5.4.0-24",
            r#"{"PublicIP":"198.18.0.4","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:04"}}"#,
        );
        // As the daemon does: the backend programs what the peer filter accepts.
        let all = peer_set([a.clone(), b.clone(), vx, own.clone()]);
        let peers = flannel::subnet::peers::filter(&all, &ctx.config, &own).accepted;
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(2, 0, 0));
        let routes = ns.routes("e0");
        assert_eq!(route_to(&routes, "10.5.2.0/24").unwrap()["gateway"], "198.18.0.2");
        assert_eq!(route_to(&routes, "10.5.3.0/24").unwrap()["gateway"], "198.18.0.3");
        assert!(route_to(&routes, "10.5.4.0/24").is_none(), "vxlan peer ignored");
        assert!(route_to(&routes, "10.5.1.0/24").is_none(), "own lease not routed");
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));

        // A stale route of ours in the Network via e0 goes, a wrong one is corrected, others
        // stay: also one inside the Network that someone made by hand.
        ns.ip(&["route", "add", "10.5.98.0/24", "via", "198.18.0.98", "dev", "e0", "proto", PROTO]);
        ns.ip(&["route", "replace", "10.5.2.0/24", "via", "198.18.0.22", "dev", "e0"]);
        ns.ip(&["route", "add", "172.16.9.0/24", "via", "198.18.0.99", "dev", "e0"]);
        ns.ip(&["route", "add", "10.5.200.0/24", "via", "198.18.0.50", "dev", "e0"]);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 1, 1));
        let routes = ns.routes("e0");
        assert!(route_to(&routes, "10.5.98.0/24").is_none());
        assert_eq!(route_to(&routes, "10.5.2.0/24").unwrap()["gateway"], "198.18.0.2");
        assert!(route_to(&routes, "172.16.9.0/24").is_some(), "foreign route kept");
        assert!(route_to(&routes, "198.18.0.0/24").is_some(), "connected route kept");
        let by_hand = route_to(&routes, "10.5.200.0/24").expect("hand-made route in the Network kept");
        assert_eq!(by_hand["gateway"], "198.18.0.50");
        assert_eq!(ns.routes_of_flanneld("-4"), ["10.5.2.0/24", "10.5.3.0/24"], "`ip route show proto {PROTO}`");
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));

        // An older flanneld's route (proto static) to a peer is rewritten as ours, once.
        ns.ip(&["route", "replace", "10.5.3.0/24", "via", "198.18.0.3", "dev", "e0", "proto", "static"]);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 1));
        assert_eq!(ns.routes_of_flanneld("-4"), ["10.5.2.0/24", "10.5.3.0/24"]);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));

        // A removed peer's route goes.
        let peers = peer_set([a.clone()]);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 1, 0));
        assert!(route_to(&ns.routes("e0"), "10.5.3.0/24").is_none());

        // A restart adopts without touching anything.
        drop(be);
        let mut be = backend::create(ctx).expect("host-gw backend");
        assert_eq!(be.prepare().await.unwrap(), publish);
        be.lease_acquired(&own).await.unwrap();
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));
        assert_eq!(
            route_to(&ns.routes("e0"), "10.5.2.0/24").unwrap()["gateway"],
            "198.18.0.2"
        );
    });
}

#[test]
fn hostgw_refuses_nat() {
    let ext = external_interface("198.18.0.1", "203.0.113.9", None);
    let ctx = context(config(NETWORK, json!({"Type": "host-gw"})), ext);
    assert_prepare_refused(ctx, &["host-gw", "203.0.113.9", "198.18.0.1", "e0", "NAT"]);
}

/// A prepared host-gw backend on `ctx` holding our lease 10.5.1.0/24 (public IP 198.18.0.1).
async fn started_hostgw(ctx: flannel::backend::BackendContext) -> Box<dyn backend::Backend> {
    let own = hostgw_lease("10.5.1.0-24", "198.18.0.1");
    let mut be = backend::create(ctx).expect("host-gw backend");
    be.prepare().await.expect("prepare");
    be.lease_acquired(&own).await.unwrap();
    be
}

/// Several datagrams of changes, one failing in the middle of the second: the failure is
/// reported for its own peer and every other route is in place.
#[test]
fn hostgw_each_change_of_a_large_batch_gets_its_own_answer() {
    netns_tests::require_root!();
    init_logs();
    let guard = NetnsGuard::new("hgb");
    let ns = guard.ns.clone();
    let ext = ns.underlay("198.18.0.1/16", None);
    let ctx = context(config(NETWORK, json!({"Type": "host-gw"})), ext);
    ns.clone().run(move || async move {
        let mut be = started_hostgw(ctx).await;
        // 10.5.2.0/24 … 10.5.251.0/24: 250 routes, two datagrams. 10.5.200.0/24's public IP
        // is not on e0's network, so the kernel refuses its route.
        let gateway = |i: u32| {
            if i == 200 {
                "203.0.113.9".to_string()
            } else {
                format!("198.18.1.{i}")
            }
        };
        let peers =
            peer_set((2..252).map(|i| hostgw_lease(&format!("10.5.{i}.0-24"), &gateway(i))));
        let err = be
            .reconcile(&peers)
            .await
            .expect_err("one route is refused")
            .to_string();
        assert!(err.contains("1 change(s) failed"), "{err}");
        assert!(
            err.contains("peer 10.5.200.0-24") && err.contains("via 203.0.113.9"),
            "{err}"
        );
        let routes = ns.routes("e0");
        for i in (2..252).filter(|i| *i != 200) {
            let dst = format!("10.5.{i}.0/24");
            let r = route_to(&routes, &dst).unwrap_or_else(|| panic!("no route {dst}"));
            assert_eq!(r["gateway"], gateway(i), "{dst}");
        }
        assert!(route_to(&routes, "10.5.200.0/24").is_none());
    });
}

/// A lease event (`Backend::update`) applies the difference to the routes the last pass
/// programmed without reading the kernel; a hand-deleted route is repaired by the full pass.
#[test]
fn hostgw_lease_events_apply_only_what_changed() {
    netns_tests::require_root!();
    init_logs();
    let guard = NetnsGuard::new("hgi");
    let ns = guard.ns.clone();
    let ext = ns.underlay("198.18.0.1/24", None);
    let ctx = context(config(NETWORK, json!({"Type": "host-gw"})), ext);
    ns.clone().run(move || async move {
        let mut be = started_hostgw(ctx).await;
        let a = hostgw_lease("10.5.2.0-24", "198.18.0.2");
        let b = hostgw_lease("10.5.3.0-24", "198.18.0.3");
        assert_eq!(
            be.update(&peer_set([a.clone()])).await.unwrap(),
            report(1, 0, 0)
        );

        // Added: only its route; a stale route of ours stays until a full pass.
        ns.ip(&[
            "route",
            "add",
            "10.5.98.0/24",
            "via",
            "198.18.0.98",
            "dev",
            "e0",
            "proto",
            PROTO,
        ]);
        let peers = peer_set([a.clone(), b.clone()]);
        assert_eq!(be.update(&peers).await.unwrap(), report(1, 0, 0));
        assert_eq!(
            route_to(&ns.routes("e0"), "10.5.3.0/24").unwrap()["gateway"],
            "198.18.0.3"
        );
        assert!(route_to(&ns.routes("e0"), "10.5.98.0/24").is_some());

        // Removed, then changed.
        assert_eq!(
            be.update(&peer_set([a.clone()])).await.unwrap(),
            report(0, 1, 0)
        );
        assert!(route_to(&ns.routes("e0"), "10.5.3.0/24").is_none());
        let a2 = hostgw_lease("10.5.2.0-24", "198.18.0.22");
        let peers = peer_set([a2]);
        assert_eq!(be.update(&peers).await.unwrap(), report(0, 0, 1));
        assert_eq!(
            route_to(&ns.routes("e0"), "10.5.2.0/24").unwrap()["gateway"],
            "198.18.0.22"
        );

        // Deleted by hand: the full pass puts it back and removes the stale one.
        ns.ip(&["route", "del", "10.5.2.0/24", "dev", "e0"]);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(1, 1, 0));
        assert_eq!(ns.routes_of_flanneld("-4"), ["10.5.2.0/24"]);
        assert_eq!(be.update(&peers).await.unwrap(), report(0, 0, 0));
    });
}
