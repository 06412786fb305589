//! The host-gw backend with IPv6 (dual stack and IPv6-only) against a real kernel, inside
//! throw-away network namespaces. Needs root; skipped without it (fails when `CI` is set).
//! The NAT refusal needs no kernel.

mod backend_netns;

use backend_netns::{
    assert_prepare_refused, config_v6, context, external_interface, init_logs, lease, peer_set,
    report, route_to, NetnsGuard,
};
use flannel::backend;
use serde_json::json;

fn hg(key: &str, ip4: Option<&str>, ip6: Option<&str>) -> flannel::subnet::Lease {
    let v = json!({
        "PublicIP": ip4.unwrap_or("0.0.0.0"),
        "PublicIPv6": ip6,
        "BackendType": "host-gw",
    });
    lease(key, &v.to_string())
}

#[test]
fn hostgw_dual_stack_routes_both_families() {
    netns_tests::require_root!();
    init_logs();
    let guard = NetnsGuard::new("hg6");
    let ns = guard.ns.clone();
    let ext = ns.underlay_dual(Some("198.18.0.1/24"), "fd00:18::1/64");
    let ctx = context(
        config_v6(Some("10.5.0.0/16"), "fc00::/48", json!({"Type": "host-gw"})),
        ext,
    );
    ns.clone().run(move || async move {
        let own = hg(
            "10.5.1.0-24&fc00:0:0:1::-64",
            Some("198.18.0.1"),
            Some("fd00:18::1"),
        );
        let mut be = backend::create(ctx.clone()).expect("host-gw backend");
        let publish = be.prepare().await.expect("prepare");
        assert_eq!(publish.backend_v6_data, None);
        be.lease_acquired(&own).await.unwrap();

        let a = hg(
            "10.5.2.0-24&fc00:0:0:2::-64",
            Some("198.18.0.2"),
            Some("fd00:18::2"),
        );
        let b = hg("10.5.3.0-24", Some("198.18.0.3"), None);
        let c = hg("fc00:0:0:4::-64", None, Some("fd00:18::4"));
        // A dual-stack key without PublicIPv6: its IPv6 subnet cannot be routed.
        let d = hg("10.5.5.0-24&fc00:0:0:5::-64", Some("198.18.0.5"), None);
        // As the daemon does: the backend programs what the peer filter accepts.
        let all = peer_set([a.clone(), b.clone(), c.clone(), d.clone(), own.clone()]);
        let peers = flannel::subnet::peers::filter(&all, &ctx.config, &own).accepted;
        assert_eq!(
            be.reconcile(&peers).await.unwrap(),
            report(2 + 1 + 1 + 1, 0, 0)
        );
        let r6 = ns.routes6("e0");
        assert_eq!(
            route_to(&r6, "fc00:0:0:2::/64").unwrap()["gateway"],
            "fd00:18::2"
        );
        assert_eq!(
            route_to(&r6, "fc00:0:0:4::/64").unwrap()["gateway"],
            "fd00:18::4"
        );
        assert!(route_to(&r6, "fc00:0:0:5::/64").is_none());
        assert!(
            route_to(&r6, "fc00:0:0:1::/64").is_none(),
            "own subnet not routed"
        );
        let r4 = ns.routes("e0");
        assert_eq!(
            route_to(&r4, "10.5.2.0/24").unwrap()["gateway"],
            "198.18.0.2"
        );
        assert_eq!(
            route_to(&r4, "10.5.5.0/24").unwrap()["gateway"],
            "198.18.0.5"
        );
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));

        // Stale (ours: proto 102) and wrong IPv6 routes are repaired; foreign ones stay, also
        // one made by hand inside the IPv6Network.
        ns.ip_line("-6 route add fc00:0:0:99::/64 via fd00:18::99 dev e0 proto 102");
        ns.ip_line("-6 route add fc00:0:0:200::/64 via fd00:18::50 dev e0");
        ns.ip_line("-6 route replace fc00:0:0:2::/64 via fd00:18::22 dev e0");
        ns.ip_line("-6 route add fd77::/64 via fd00:18::99 dev e0");
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 1, 1));
        let r6 = ns.routes6("e0");
        assert!(route_to(&r6, "fc00:0:0:99::/64").is_none());
        assert_eq!(
            route_to(&r6, "fc00:0:0:2::/64").unwrap()["gateway"],
            "fd00:18::2"
        );
        assert!(route_to(&r6, "fd77::/64").is_some(), "foreign route kept");
        assert!(
            route_to(&r6, "fc00:0:0:200::/64").is_some(),
            "hand-made route in the IPv6Network kept"
        );
        let ours = ns.routes_of_flanneld("-6");
        assert!(
            ours.contains(&"fc00:0:0:2::/64".to_string())
                && !ours.contains(&"fc00:0:0:200::/64".to_string()),
            "{ours:?}"
        );
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));

        // A and C gone: their routes go.
        let peers = peer_set([b.clone(), d.clone()]);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 3, 0));
        let r6 = ns.routes6("e0");
        assert!(route_to(&r6, "fc00:0:0:2::/64").is_none());
        assert!(route_to(&r6, "fc00:0:0:4::/64").is_none());

        // A restart adopts.
        drop(be);
        let mut be = backend::create(ctx).expect("host-gw backend");
        assert_eq!(be.prepare().await.unwrap(), publish);
        be.lease_acquired(&own).await.unwrap();
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));
    });
}

#[test]
fn hostgw_ipv6_only() {
    netns_tests::require_root!();
    init_logs();
    let guard = NetnsGuard::new("hg6o");
    let ns = guard.ns.clone();
    let ext = ns.underlay_dual(None, "fd00:18::1/64");
    let ctx = context(
        config_v6(None, "fc00::/48", json!({"Type": "host-gw"})),
        ext,
    );
    ns.clone().run(move || async move {
        let mut be = backend::create(ctx).expect("host-gw backend");
        be.prepare()
            .await
            .expect("an IPv6-only host needs no IPv4 address");
        be.lease_acquired(&hg("fc00:0:0:1::-64", None, Some("fd00:18::1")))
            .await
            .unwrap();
        let peers = peer_set([hg("fc00:0:0:2::-64", None, Some("fd00:18::2"))]);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(1, 0, 0));
        assert_eq!(
            route_to(&ns.routes6("e0"), "fc00:0:0:2::/64").unwrap()["gateway"],
            "fd00:18::2"
        );
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));
    });
}

#[test]
fn hostgw_refuses_ipv6_nat() {
    let ext = external_interface(
        "198.18.0.1",
        "198.18.0.1",
        Some(("fd00:18::1", "2001:db8::9")),
    );
    let ctx = context(
        config_v6(Some("10.5.0.0/16"), "fc00::/48", json!({"Type": "host-gw"})),
        ext,
    );
    let parts = [
        "host-gw",
        "2001:db8::9",
        "fd00:18::1",
        "e0",
        "NAT",
        "--public-ipv6",
    ];
    assert_prepare_refused(ctx, &parts);
}
