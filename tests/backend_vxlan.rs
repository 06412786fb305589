//! The vxlan backend against a real kernel, inside throw-away network namespaces.
//! Needs root; skipped without it (fails when `CI` is set).

mod backend_netns;

use backend_netns::{
    config, context, lease, peer_set, report, route_to, BackendBed, NetnsGuard, Ns,
};
use flannel::backend::{self, BackendContext};
use flannel::subnet::Lease;
use serde_json::{json, Value};

const NETWORK: &str = "10.5.0.0/16";
const DEV: &str = "flannel.7";
const MAC_A: &str = "02:aa:00:00:00:02";
const MAC_B: &str = "02:bb:00:00:00:03";

fn vxlan_lease(key: &str, public_ip: &str, mac: &str) -> Lease {
    lease(
        key,
        &format!(
            r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":7,"VtepMAC":"{mac}"}}}}"#
        ),
    )
}

fn setup(tag: &str, backend: Value) -> (NetnsGuard, BackendContext) {
    backend_netns::init_logs();
    let guard = NetnsGuard::new(tag);
    let ext = guard.ns.underlay("198.18.0.1/24", None);
    (guard, context(config(NETWORK, backend), ext))
}

fn device(ns: &Ns) -> Value {
    ns.link(DEV)
        .unwrap_or_else(|| panic!("device {DEV} missing"))
}

fn assert_peer(ns: &Ns, subnet: &str, vtep: &str, mac: &str, public_ip: &str) {
    backend_netns::assert_vxlan_peer(ns, "-4", DEV, subnet, (vtep, mac, public_ip));
}

fn assert_no_peer(ns: &Ns, subnet: &str, vtep: &str, mac: &str) {
    backend_netns::assert_no_vxlan_peer(ns, "-4", DEV, subnet, vtep, mac);
}

/// The v4 bed: a namespace with an underlay and a vxlan config (VNI 7), the own lease
/// `10.5.1.0/24`, two vxlan peers (A, B) and two leases the backend must ignore (a host-gw
/// one and one with broken BackendData).
fn v4_bed(tag: &str) -> BackendBed {
    let (guard, ctx) = setup(tag, json!({"Type": "vxlan", "VNI": 7}));
    let own = lease(
        "10.5.1.0-24",
        r#"{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":7,"VtepMAC":"02:00:00:00:00:01"}}"#,
    );
    let hostgw = lease(
        "10.5.4.0-24",
        r#"{"PublicIP":"198.18.0.4","PublicIPv6":null,"BackendType":"host-gw"}"#,
    );
    let broken = lease(
        "10.5.5.0-24",
        r#"{"PublicIP":"198.18.0.5","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":7}}"#,
    );
    let peers = vec![peer_a(), peer_b(), hostgw, broken];
    BackendBed::new(guard, ctx, own, peers, report(6, 0, 0))
}

fn peer_a() -> Lease {
    vxlan_lease("10.5.2.0-24", "198.18.0.2", MAC_A)
}

fn peer_b() -> Lease {
    vxlan_lease("10.5.3.0-24", "203.0.113.3", MAC_B)
}

fn assert_peer_a(ns: &Ns) {
    assert_peer(ns, "10.5.2.0/24", "10.5.2.0", MAC_A, "198.18.0.2");
}

fn assert_peer_b(ns: &Ns) {
    assert_peer(ns, "10.5.3.0/24", "10.5.3.0", MAC_B, "203.0.113.3");
}

#[test]
fn vxlan_device_address_and_published_data_are_flannels() {
    netns_tests::require_root!();
    v4_bed("vx").run(|bed| async move {
        let ns = &bed.ns;
        let (_be, publish) = bed.started().await;
        // The device as a user sees it.
        let dev = device(ns);
        let info = &dev["linkinfo"]["info_data"];
        assert_eq!(dev["linkinfo"]["info_kind"], "vxlan");
        assert_eq!(info["id"], 7);
        assert_eq!(info["port"], 8472);
        assert_eq!(info["local"], "198.18.0.1");
        assert_eq!(info["link"], "e0");
        assert_eq!(info["learning"], false);
        assert_eq!(dev["mtu"], 1450);
        assert!(
            dev["flags"].as_array().unwrap().contains(&json!("UP")),
            "{dev}"
        );
        let mac = dev["address"].as_str().unwrap().to_string();
        assert_eq!(publish.backend_type, "vxlan");
        assert_eq!(
            publish.backend_data,
            Some(json!({"VNI": 7, "VtepMAC": mac}))
        );
        assert_eq!(publish.mtu, 1450);
        let addrs = ns.ip_json(&["-4", "addr", "show", "dev", DEV]);
        let addr = &addrs[0]["addr_info"][0];
        assert_eq!(
            (addr["local"].as_str(), addr["prefixlen"].as_u64()),
            (Some("10.5.1.0"), Some(32))
        );
    });
}

#[test]
fn vxlan_programs_only_vxlan_peers_idempotently() {
    netns_tests::require_root!();
    v4_bed("vxp").run_with_peers(|bed, mut be, peers| async move {
        let ns = &bed.ns;
        assert_peer_a(ns);
        assert_peer_b(ns);
        assert_no_peer(ns, "10.5.4.0/24", "10.5.4.0", "00:00:00:00:00:00");
        assert!(route_to(&ns.routes("e0"), "10.5.4.0/24").is_none());
        assert_no_peer(ns, "10.5.5.0/24", "10.5.5.0", "00:00:00:00:00:00");
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));
    });
}

#[test]
fn vxlan_removes_hand_made_entries_inside_the_network_and_keeps_foreign_ones() {
    netns_tests::require_root!();
    v4_bed("vxh").run_with_peers(|bed, mut be, peers| async move {
        let ns = &bed.ns;
        // Entries added by hand inside the Network on our device are removed, others are not.
        ns.ip_line(&format!(
            "route add 10.5.99.0/24 via 10.5.99.0 dev {DEV} onlink"
        ));
        ns.ip_line(&format!(
            "neigh add 10.5.99.0 lladdr 02:99:00:00:00:99 dev {DEV} nud permanent"
        ));
        ns.bridge(&[
            "fdb",
            "add",
            "02:99:00:00:00:99",
            "dev",
            DEV,
            "dst",
            "198.18.0.99",
            "self",
            "permanent",
        ]);
        ns.ip_line(&format!(
            "route add 172.16.0.0/24 via 10.5.2.0 dev {DEV} onlink"
        ));
        // On the external interface, a route inside the Network is ours only with our protocol.
        ns.ip_line("route add 10.5.200.0/24 via 198.18.0.50 dev e0");
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 3, 0));
        assert_no_peer(ns, "10.5.99.0/24", "10.5.99.0", "02:99:00:00:00:99");
        assert!(
            route_to(&ns.routes(DEV), "172.16.0.0/24").is_some(),
            "foreign route kept"
        );
        assert!(
            route_to(&ns.routes("e0"), "10.5.200.0/24").is_some(),
            "hand-made route kept"
        );
        let ours = ns.ip_json(&["-4", "route", "show", "proto", "102"]);
        let ours: Vec<(&str, &str)> = ours
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["dst"].as_str().unwrap(), r["dev"].as_str().unwrap()))
            .collect();
        assert_eq!(
            ours,
            [("10.5.2.0/24", DEV), ("10.5.3.0/24", DEV)],
            "`ip route show proto 102`"
        );
    });
}

#[test]
fn vxlan_corrects_wrong_entries_in_place_and_drops_flooding_remotes() {
    netns_tests::require_root!();
    v4_bed("vxw").run_with_peers(|bed, mut be, peers| async move {
        let ns = &bed.ns;
        // A wrong neighbour entry and a wrong FDB remote are corrected in place.
        ns.ip_line(&format!(
            "neigh replace 10.5.2.0 lladdr 02:99:00:00:00:01 dev {DEV} nud permanent"
        ));
        ns.bridge(&[
            "fdb",
            "replace",
            MAC_B,
            "dev",
            DEV,
            "dst",
            "198.18.0.77",
            "self",
            "permanent",
        ]);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 2));
        assert_peer_a(ns);
        assert_peer_b(ns);

        // A default (all-zero MAC) remote someone appended floods traffic: it goes.
        for remote in ["198.18.0.55", "198.18.0.56"] {
            ns.bridge(&[
                "fdb",
                "append",
                "00:00:00:00:00:00",
                "dev",
                DEV,
                "dst",
                remote,
                "self",
                "permanent",
            ]);
        }
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 1, 0));
        assert!(!ns.fdb(DEV).iter().any(|f| f["mac"] == "00:00:00:00:00:00"));
        assert_peer_a(ns);
    });
}

#[test]
fn vxlan_removed_peer_loses_its_entries_and_the_other_keeps_them() {
    netns_tests::require_root!();
    v4_bed("vxr").run_with_peers(|bed, mut be, _| async move {
        let ns = &bed.ns;
        let peers = peer_set([peer_a()]);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 3, 0));
        assert_no_peer(ns, "10.5.3.0/24", "10.5.3.0", MAC_B);
        assert_peer_a(ns);
    });
}

#[test]
fn vxlan_deleted_device_comes_back_with_its_mac_address_and_entries() {
    netns_tests::require_root!();
    v4_bed("vxd").run_with_peers(|bed, mut be, _| async move {
        let ns = &bed.ns;
        let peers = peer_set([peer_a()]);
        be.reconcile(&peers).await.unwrap();
        let mac = device(ns)["address"].clone();
        ns.ip(&["link", "del", DEV]);
        let r = be.reconcile(&peers).await.unwrap();
        assert_eq!((r.added, r.removed), (3, 0), "{r:?}");
        assert!(r.repaired >= 1, "{r:?}");
        let dev = device(ns);
        assert_eq!(dev["address"], mac);
        assert_eq!(dev["mtu"], 1450);
        let addrs = ns.ip_json(&["-4", "addr", "show", "dev", DEV]);
        assert_eq!(addrs[0]["addr_info"][0]["local"], "10.5.1.0");
        assert_peer_a(ns);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));
    });
}

#[test]
fn vxlan_restart_adopts_the_device_and_after_a_reboot_recreates_it_with_the_same_mac() {
    netns_tests::require_root!();
    v4_bed("vxa").run(|bed| async move {
        let ns = &bed.ns;
        let (be, publish, peers) = bed.with_peers().await;
        let mac = device(ns)["address"].clone();
        // A restart adopts: same MAC, same device, nothing changed.
        let ifindex = device(ns)["ifindex"].clone();
        drop(be);
        let (mut be, publish2) = bed.started().await;
        assert_eq!(publish2, publish);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));
        assert_eq!(device(ns)["ifindex"], ifindex, "device was re-created");
        assert_peer_a(ns);

        // A restart after the device is gone (e.g. reboot) creates it with the same MAC.
        drop(be);
        ns.ip(&["link", "del", DEV]);
        let mut be = backend::create(bed.ctx.clone()).expect("vxlan backend");
        assert_eq!(be.prepare().await.unwrap(), publish);
        assert_eq!(device(ns)["address"], mac);
    });
}

#[test]
fn vxlan_options_and_direct_routing() {
    netns_tests::require_root!();
    let (guard, ctx) = setup(
        "vxo",
        json!({"Type": "vxlan", "vni": 7, "port": 4789, "GBP": true, "learning": true,
               "MTU": 1400, "DirectRouting": true}),
    );
    let ns = guard.ns.clone();
    ns.clone().run(move || async move {
        let mut be = backend::create(ctx).expect("vxlan backend");
        let publish = be.prepare().await.expect("prepare");
        assert_eq!(publish.mtu, 1350);
        let dev = device(&ns);
        let info = &dev["linkinfo"]["info_data"];
        assert_eq!(info["port"], 4789);
        assert_eq!(info["learning"], true);
        assert_eq!(info["gbp"], true, "{info}");
        assert_eq!(dev["mtu"], 1350);
        be.lease_acquired(&lease("10.5.1.0-24", r#"{"PublicIP":"198.18.0.1"}"#))
            .await
            .unwrap();

        // Same L2 subnet as e0: plain route via the public IP. Elsewhere: vxlan.
        let near = vxlan_lease("10.5.2.0-24", "198.18.0.2", MAC_A);
        let far = vxlan_lease("10.5.3.0-24", "203.0.113.3", MAC_B);
        let peers = peer_set([near, far]);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(4, 0, 0));
        let ext_routes = ns.routes("e0");
        let r = route_to(&ext_routes, "10.5.2.0/24").expect("direct route");
        assert_eq!(r["gateway"], "198.18.0.2");
        assert_no_peer(&ns, "10.5.2.0/24", "10.5.2.0", MAC_A);
        assert_peer(&ns, "10.5.3.0/24", "10.5.3.0", MAC_B, "203.0.113.3");
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));

        // Gone: the direct route goes too.
        let peers = peer_set([vxlan_lease("10.5.3.0-24", "203.0.113.3", MAC_B)]);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 1, 0));
        assert!(route_to(&ns.routes("e0"), "10.5.2.0/24").is_none());
    });
}

#[test]
fn vxlan_incompatible_device_is_recreated_keeping_its_mac() {
    netns_tests::require_root!();
    let (guard, ctx) = setup("vxi", json!({"Type": "vxlan", "VNI": 7}));
    let ns = guard.ns.clone();
    // Left by someone else: wrong port.
    ns.ip(&[
        "link",
        "add",
        DEV,
        "address",
        "02:12:34:56:78:9a",
        "type",
        "vxlan",
        "id",
        "7",
        "local",
        "198.18.0.1",
        "dev",
        "e0",
        "dstport",
        "4789",
        "nolearning",
    ]);
    ns.clone().run(move || async move {
        let mut be = backend::create(ctx).expect("vxlan backend");
        let publish = be.prepare().await.expect("prepare");
        let dev = device(&ns);
        assert_eq!(dev["linkinfo"]["info_data"]["port"], 8472);
        assert_eq!(dev["address"], "02:12:34:56:78:9a");
        assert_eq!(
            publish.backend_data,
            Some(json!({"VNI": 7, "VtepMAC": "02:12:34:56:78:9a"}))
        );
    });
}

#[test]
fn vxlan_bad_options_are_refused() {
    // No kernel needed: options are checked when the backend is built.
    let ext = backend_netns::external_interface("198.18.0.1", "198.18.0.1", None);
    let err = backend::create(context(
        config(NETWORK, json!({"Type": "vxlan", "VNI": "seven"})),
        ext.clone(),
    ))
    .err()
    .expect("refused");
    assert!(err.to_string().contains("VNI"), "{err}");
    let err = backend::create(context(
        config(NETWORK, json!({"Type": "vxlan", "MTU": 100})),
        ext,
    ))
    .err()
    .expect("refused");
    assert!(err.to_string().contains("MTU 100"), "{err}");
}

/// A lease event (`Backend::update`) applies the difference to what the last pass programmed
/// without reading the kernel; repairs stay with the full pass (`reconcile`), and a change that
/// fails on the incremental path falls back to it at once.
#[test]
fn vxlan_lease_events_apply_only_what_changed() {
    netns_tests::require_root!();
    let (guard, ctx) = setup("vxi", json!({"Type": "vxlan", "VNI": 7}));
    let ns = guard.ns.clone();
    ns.clone().run(move || async move {
        let own = vxlan_lease("10.5.1.0-24", "198.18.0.1", "02:00:00:00:00:01");
        let mut be = backend::create(ctx).expect("vxlan backend");
        be.prepare().await.expect("prepare");
        be.lease_acquired(&own).await.expect("lease_acquired");
        let a = vxlan_lease("10.5.2.0-24", "198.18.0.2", MAC_A);
        let b = vxlan_lease("10.5.3.0-24", "198.18.0.3", MAC_B);

        // Nothing programmed yet: the first event is a full pass.
        assert_eq!(
            be.update(&peer_set([a.clone()])).await.unwrap(),
            report(3, 0, 0)
        );
        assert_peer(&ns, "10.5.2.0/24", "10.5.2.0", MAC_A, "198.18.0.2");

        // An added lease gets its three entries, and nothing else is touched: a stale route
        // a full pass would remove stays until one runs.
        ns.ip(&[
            "route",
            "add",
            "10.5.99.0/24",
            "via",
            "10.5.99.0",
            "dev",
            DEV,
            "onlink",
        ]);
        let peers = peer_set([a.clone(), b.clone()]);
        assert_eq!(be.update(&peers).await.unwrap(), report(3, 0, 0));
        assert_peer(&ns, "10.5.3.0/24", "10.5.3.0", MAC_B, "198.18.0.3");
        assert!(route_to(&ns.routes(DEV), "10.5.99.0/24").is_some());

        // A removed lease's entries go.
        let peers = peer_set([a.clone()]);
        assert_eq!(be.update(&peers).await.unwrap(), report(0, 3, 0));
        assert_no_peer(&ns, "10.5.3.0/24", "10.5.3.0", MAC_B);
        assert_peer(&ns, "10.5.2.0/24", "10.5.2.0", MAC_A, "198.18.0.2");

        // A changed lease (new public IP) is corrected in place.
        let a2 = vxlan_lease("10.5.2.0-24", "198.18.0.22", MAC_A);
        let peers = peer_set([a2.clone()]);
        assert_eq!(be.update(&peers).await.unwrap(), report(0, 0, 1));
        assert_peer(&ns, "10.5.2.0/24", "10.5.2.0", MAC_A, "198.18.0.22");

        // A route deleted by hand is repaired by the full pass, which also removes the stale
        // route; an event afterwards changes nothing.
        ns.ip(&["route", "del", "10.5.2.0/24", "dev", DEV]);
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(1, 1, 0));
        assert_peer(&ns, "10.5.2.0/24", "10.5.2.0", MAC_A, "198.18.0.22");
        assert!(route_to(&ns.routes(DEV), "10.5.99.0/24").is_none());
        assert_eq!(be.update(&peers).await.unwrap(), report(0, 0, 0));

        // The device deleted under us: the event's changes fail, and the full pass that
        // follows at once re-creates it with every peer.
        ns.ip(&["link", "del", DEV]);
        let peers = peer_set([a2.clone(), b.clone()]);
        let r = be.update(&peers).await.unwrap();
        assert!(r.added >= 6, "{r:?}");
        assert_peer(&ns, "10.5.2.0/24", "10.5.2.0", MAC_A, "198.18.0.22");
        assert_peer(&ns, "10.5.3.0/24", "10.5.3.0", MAC_B, "198.18.0.3");
        assert_eq!(be.update(&peers).await.unwrap(), report(0, 0, 0));
        assert_eq!(be.reconcile(&peers).await.unwrap(), report(0, 0, 0));
    });
}
