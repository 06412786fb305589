//! The vxlan backend with IPv6 (dual stack and IPv6-only) against a real kernel, inside
//! throw-away network namespaces. Needs root; skipped without it (fails when `CI` is set).

mod backend_netns;

use backend_netns::{
    config_v6, context, lease, peer_set, report, route_to, BackendBed, NetnsGuard, Ns,
};
use flannel::backend;
use flannel::subnet::Lease;
use serde_json::{json, Value};

const NETWORK: &str = "10.5.0.0/16";
const NETWORK6: &str = "fc00::/48";
const DEV: &str = "flannel.7";
const DEV6: &str = "flannel-v6.7";
const MAC_A4: &str = "02:aa:00:00:00:04";
const MAC_A6: &str = "02:aa:00:00:00:06";
const MAC_B4: &str = "02:bb:00:00:00:04";
const MAC_C6: &str = "02:cc:00:00:00:06";

/// A vxlan lease; `None` leaves a field out (`PublicIP` becomes `0.0.0.0`, as flannel writes
/// it for IPv6-only hosts).
fn vx(
    key: &str,
    ip4: Option<&str>,
    ip6: Option<&str>,
    mac4: Option<&str>,
    mac6: Option<&str>,
) -> Lease {
    let mut v = json!({
        "PublicIP": ip4.unwrap_or("0.0.0.0"),
        "PublicIPv6": ip6,
        "BackendType": "vxlan",
    });
    if let Some(m) = mac4 {
        v["BackendData"] = json!({"VNI": 7, "VtepMAC": m});
    }
    if let Some(m) = mac6 {
        v["BackendV6Data"] = json!({"VNI": 7, "VtepMAC": m});
    }
    lease(key, &v.to_string())
}

fn device(ns: &Ns, dev: &str) -> Value {
    ns.link(dev)
        .unwrap_or_else(|| panic!("device {dev} missing"))
}

fn assert_peer6(ns: &Ns, subnet: &str, vtep: &str, mac: &str, public_ip: &str) {
    backend_netns::assert_vxlan_peer(ns, "-6", DEV6, subnet, (vtep, mac, public_ip));
}

fn assert_no_peer6(ns: &Ns, subnet: &str, vtep: &str, mac: &str) {
    backend_netns::assert_no_vxlan_peer(ns, "-6", DEV6, subnet, vtep, mac);
}

fn v6_addresses(ns: &Ns, dev: &str) -> Vec<String> {
    ns.ip_json(&["-6", "addr", "show", "dev", dev, "scope", "global"])
        .as_array()
        .and_then(|a| a.first().cloned())
        .map(|d| {
            d["addr_info"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"])))
                .collect()
        })
        .unwrap_or_default()
}

/// The dual-stack bed: a namespace with a dual-stack underlay and a vxlan config (VNI 7), the
/// own lease and four peers A..D (see [`dual_stack_peers`]).
fn dual_stack_bed(tag: &str) -> BackendBed {
    backend_netns::init_logs();
    let guard = NetnsGuard::new(tag);
    let ext = guard
        .ns
        .underlay_dual(Some("198.18.0.1/24"), "fd00:18::1/64");
    let ctx = context(
        config_v6(Some(NETWORK), NETWORK6, json!({"Type": "vxlan", "VNI": 7})),
        ext,
    );
    let own = vx(
        "10.5.1.0-24&fc00:0:0:1::-64",
        Some("198.18.0.1"),
        Some("fd00:18::1"),
        None,
        None,
    );
    let peers = dual_stack_peers().to_vec();
    BackendBed::new(guard, ctx, own, peers, report(3 + 3 + 3 + 3 + 3, 0, 0))
}

/// A: dual stack. B: IPv4 only. C: dual-stack key, but no BackendV6Data (its IPv4 side is
/// programmed, its IPv6 side ignored). D: IPv6 only.
fn dual_stack_peers() -> [Lease; 4] {
    let a = vx(
        "10.5.2.0-24&fc00:0:0:2::-64",
        Some("198.18.0.2"),
        Some("fd00:18::2"),
        Some(MAC_A4),
        Some(MAC_A6),
    );
    let b = vx("10.5.3.0-24", Some("198.18.0.3"), None, Some(MAC_B4), None);
    let c = vx(
        "10.5.4.0-24&fc00:0:0:4::-64",
        Some("198.18.0.4"),
        Some("fd00:18::4"),
        Some("02:cc:00:00:00:04"),
        None,
    );
    let d = vx(
        "fc00:0:0:5::-64",
        None,
        Some("2001:db8::5"),
        None,
        Some(MAC_C6),
    );
    [a, b, c, d]
}

fn assert_peer_d6(ns: &Ns) {
    assert_peer6(ns, "fc00:0:0:5::/64", "fc00:0:0:5::", MAC_C6, "2001:db8::5");
}

#[test]
fn vxlan_dual_stack_programs_both_devices() {
    netns_tests::require_root!();
    dual_stack_bed("vx6").run(|bed| async move {
        let ns = &bed.ns;
        let mut be = backend::create(bed.ctx.clone()).expect("vxlan backend");
        let publish = be.prepare().await.expect("prepare");

        // Both devices, the IPv6 one on the IPv6 underlay address with 70 bytes of overhead.
        let dev4 = device(ns, DEV);
        let dev6 = device(ns, DEV6);
        let info = &dev6["linkinfo"]["info_data"];
        assert_eq!(dev6["linkinfo"]["info_kind"], "vxlan");
        assert_eq!(info["id"], 7);
        assert_eq!(info["port"], 8472);
        assert_eq!(info["local6"], "fd00:18::1", "{info}");
        assert_eq!(info["link"], "e0");
        assert_eq!(info["learning"], false);
        assert_eq!(dev6["mtu"], 1430);
        assert_eq!(dev4["mtu"], 1450);
        assert!(
            dev6["flags"].as_array().unwrap().contains(&json!("UP")),
            "{dev6}"
        );
        let mac4 = dev4["address"].as_str().unwrap().to_string();
        let mac6 = dev6["address"].as_str().unwrap().to_string();
        assert_ne!(mac4, mac6);
        assert_eq!(
            publish.backend_data,
            Some(json!({"VNI": 7, "VtepMAC": mac4}))
        );
        assert_eq!(
            publish.backend_v6_data,
            Some(json!({"VNI": 7, "VtepMAC": mac6}))
        );
        assert_eq!(
            publish.mtu, 1430,
            "pods get the smaller MTU of the two devices"
        );

        be.lease_acquired(&bed.own).await.expect("lease_acquired");
        assert_eq!(v6_addresses(ns, DEV6), vec!["fc00:0:0:1::/128".to_string()]);
    });
}

#[test]
fn vxlan_dual_stack_programs_each_peer_by_family() {
    netns_tests::require_root!();
    dual_stack_bed("vx6p").run_with_peers(|bed, mut be, peers| async move {
        let ns = &bed.ns;
        assert_peer6(ns, "fc00:0:0:2::/64", "fc00:0:0:2::", MAC_A6, "fd00:18::2");
        assert_peer_d6(ns);
        assert_no_peer6(ns, "fc00:0:0:4::/64", "fc00:0:0:4::", "02:cc:00:00:00:04");
        let r4 = ns.routes(DEV);
        assert!(route_to(&r4, "10.5.2.0/24").is_some(), "{r4:?}");
        assert!(route_to(&r4, "10.5.3.0/24").is_some(), "{r4:?}");
        assert!(route_to(&r4, "10.5.4.0/24").is_some(), "{r4:?}");
        assert!(
            !ns.fdb(DEV).iter().any(|f| f["dst"] == "fd00:18::2"),
            "IPv6 remotes stay off the IPv4 device"
        );

        // Idempotent.
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));
    });
}

#[test]
fn vxlan_dual_stack_undoes_hand_made_ipv6_changes_and_keeps_foreign_routes() {
    netns_tests::require_root!();
    dual_stack_bed("vx6h").run_with_peers(|bed, mut be, peers| async move {
        let ns = &bed.ns;
        // Hand-made changes inside the IPv6 network are undone; foreign routes stay.
        ns.ip_line(&format!(
            "-6 route add fc00:0:0:99::/64 via fc00:0:0:99:: dev {DEV6} onlink"
        ));
        ns.ip_line(&format!(
            "-6 route add fd99::/64 via fc00:0:0:2:: dev {DEV6} onlink"
        ));
        ns.ip_line(&format!(
            "-6 neigh replace fc00:0:0:2:: lladdr 02:99:00:00:00:01 dev {DEV6} nud permanent"
        ));
        ns.bridge(&[
            "fdb",
            "replace",
            MAC_C6,
            "dev",
            DEV6,
            "dst",
            "fd00:18::77",
            "self",
            "permanent",
        ]);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 1, 2));
        assert_peer6(ns, "fc00:0:0:2::/64", "fc00:0:0:2::", MAC_A6, "fd00:18::2");
        assert_peer_d6(ns);
        assert!(route_to(&ns.routes6(DEV6), "fc00:0:0:99::/64").is_none());
        assert!(
            route_to(&ns.routes6(DEV6), "fd99::/64").is_some(),
            "foreign route kept"
        );
    });
}

#[test]
fn vxlan_dual_stack_peer_gone_loses_both_families() {
    netns_tests::require_root!();
    dual_stack_bed("vx6g").run_with_peers(|bed, mut be, _| async move {
        let ns = &bed.ns;
        // A gone: both its families' entries go.
        let [_, b, c, d] = dual_stack_peers();
        let peers = peer_set([b, c, d]);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 6, 0));
        assert_no_peer6(ns, "fc00:0:0:2::/64", "fc00:0:0:2::", MAC_A6);
        assert!(route_to(&ns.routes(DEV), "10.5.2.0/24").is_none());
    });
}

#[test]
fn vxlan_dual_stack_deleted_ipv6_device_comes_back_the_same() {
    netns_tests::require_root!();
    dual_stack_bed("vx6d").run_with_peers(|bed, mut be, _| async move {
        let ns = &bed.ns;
        let mac6 = device(ns, DEV6)["address"].as_str().unwrap().to_string();
        // With D the only IPv6 peer left (A gone), ...
        let [_, b, c, d] = dual_stack_peers();
        let peers = peer_set([b, c, d]);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 6, 0));
        // ... the IPv6 device deleted: back with the same MAC, address and entries.
        ns.ip(&["link", "del", DEV6]);
        let r = be.reconcile(&peers).await.unwrap();
        assert_eq!((r.added, r.removed), (3, 0), "{r:?}");
        assert_eq!(device(ns, DEV6)["address"], mac6.as_str());
        assert_eq!(v6_addresses(ns, DEV6), vec!["fc00:0:0:1::/128".to_string()]);
        assert_peer_d6(ns);
    });
}

#[test]
fn vxlan_dual_stack_restart_adopts_both_devices() {
    netns_tests::require_root!();
    dual_stack_bed("vx6r").run(|bed| async move {
        let ns = &bed.ns;
        let (be, publish, peers) = bed.with_peers().await;
        // A restart adopts both devices untouched.
        let ifindex = device(ns, DEV6)["ifindex"].clone();
        drop(be);
        let mut be = backend::create(bed.ctx.clone()).expect("vxlan backend");
        assert_eq!(be.prepare().await.unwrap(), publish);
        be.lease_acquired(&bed.own).await.unwrap();
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));
        assert_eq!(
            device(ns, DEV6)["ifindex"],
            ifindex,
            "device was re-created"
        );
    });
}

#[test]
fn vxlan_ipv6_only_has_only_the_v6_device() {
    netns_tests::require_root!();
    backend_netns::init_logs();
    let guard = NetnsGuard::new("vx6o");
    let ns = guard.ns.clone();
    let ext = ns.underlay_dual(None, "fd00:18::1/64");
    let ctx = context(
        config_v6(
            None,
            NETWORK6,
            json!({"Type": "vxlan", "VNI": 7, "MTU": 1400}),
        ),
        ext,
    );
    ns.clone().run(move || async move {
        let config = ctx.config.clone();
        let mut be = backend::create(ctx).expect("vxlan backend");
        let publish = be.prepare().await.expect("prepare");
        assert!(
            ns.link(DEV).is_none(),
            "no IPv4 device in an IPv6-only network"
        );
        let dev6 = device(&ns, DEV6);
        assert_eq!(dev6["mtu"], 1330);
        assert_eq!(publish.mtu, 1330);
        assert_eq!(publish.backend_data, None);
        assert_eq!(
            publish.backend_v6_data,
            Some(json!({"VNI": 7, "VtepMAC": dev6["address"]}))
        );
        let own = vx("fc00:0:0:1::-64", None, Some("fd00:18::1"), None, None);
        be.lease_acquired(&own).await.unwrap();
        assert_eq!(
            v6_addresses(&ns, DEV6),
            vec!["fc00:0:0:1::/128".to_string()]
        );

        let peers = peer_set([
            vx(
                "fc00:0:0:2::-64",
                None,
                Some("fd00:18::2"),
                None,
                Some(MAC_A6),
            ),
            // Our own public IPv6 under another key (a stale lease): never routed to.
            vx(
                "fc00:0:0:3::-64",
                None,
                Some("fd00:18::1"),
                None,
                Some(MAC_C6),
            ),
        ]);
        // As the daemon does: the backend programs what the peer filter accepts.
        let peers = flannel::subnet::peers::filter(&peers, &config, &own).accepted;
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(3, 0, 0));
        assert_peer6(&ns, "fc00:0:0:2::/64", "fc00:0:0:2::", MAC_A6, "fd00:18::2");
        assert_no_peer6(&ns, "fc00:0:0:3::/64", "fc00:0:0:3::", MAC_C6);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));
    });
}

#[test]
fn vxlan_ipv6_direct_routing() {
    netns_tests::require_root!();
    backend_netns::init_logs();
    let guard = NetnsGuard::new("vx6d");
    let ns = guard.ns.clone();
    let ext = ns.underlay_dual(Some("198.18.0.1/24"), "fd00:18::1/64");
    let ctx = context(
        config_v6(
            Some(NETWORK),
            NETWORK6,
            json!({"Type": "vxlan", "VNI": 7, "DirectRouting": true}),
        ),
        ext,
    );
    ns.clone().run(move || async move {
        let mut be = backend::create(ctx).expect("vxlan backend");
        be.prepare().await.expect("prepare");
        be.lease_acquired(&vx(
            "10.5.1.0-24&fc00:0:0:1::-64",
            Some("198.18.0.1"),
            Some("fd00:18::1"),
            None,
            None,
        ))
        .await
        .unwrap();
        let near = vx(
            "10.5.2.0-24&fc00:0:0:2::-64",
            Some("198.18.0.2"),
            Some("fd00:18::2"),
            Some(MAC_A4),
            Some(MAC_A6),
        );
        let far = vx(
            "10.5.3.0-24&fc00:0:0:3::-64",
            Some("203.0.113.3"),
            Some("2001:db8::3"),
            Some(MAC_B4),
            Some(MAC_C6),
        );
        let peers = peer_set([near, far]);
        // near: one route per family on e0; far: three entries per family.
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(2 + 6, 0, 0));
        let r = ns.routes6("e0");
        assert_eq!(
            route_to(&r, "fc00:0:0:2::/64").expect("direct route")["gateway"],
            "fd00:18::2"
        );
        assert_no_peer6(&ns, "fc00:0:0:2::/64", "fc00:0:0:2::", MAC_A6);
        assert_peer6(
            &ns,
            "fc00:0:0:3::/64",
            "fc00:0:0:3::",
            MAC_C6,
            "2001:db8::3",
        );
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));
    });
}
