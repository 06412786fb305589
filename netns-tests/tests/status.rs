//! `flanneld status` on a live cluster (root only): peers programmed, a route deleted by hand
//! reported as fixed, an etcd member down named, an overlapping lease listed with its reason.

mod common;

use std::time::Duration;

use netns_tests::{wait_until, Backend, Cluster, Host};
use serde_json::Value;

use common::CONVERGE;

/// `flanneld status --json` on `h`: (exit code, the status).
fn status_json(h: &Host) -> Result<(i32, Value), String> {
    let (code, out, err) = h.flanneld_status(&["--json"]).map_err(|e| e.to_string())?;
    let v = serde_json::from_str(&out)
        .map_err(|e| format!("exit {code}: not JSON ({e}): {out}{err}"))?;
    Ok((code, v))
}

/// The peers of a status whose data plane is `programmed`, by subnet.
fn programmed(status: &Value) -> Vec<String> {
    status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["data_plane"] == "programmed")
        .filter_map(|p| p["subnet"].as_str().map(String::from))
        .collect()
}

fn peer_subnets(c: &Cluster, of: usize) -> Vec<String> {
    let mut subnets: Vec<String> = (0..c.hosts().len())
        .filter(|&i| i != of)
        .map(|i| c.host(i).subnet().unwrap().to_string())
        .collect();
    subnets.sort();
    subnets
}

#[test]
fn status_shows_peers_programmed_and_a_deleted_route_fixed() {
    netns_tests::require_test_bed!();
    let c = Cluster::new(3, Backend::Vxlan).expect("cluster");
    c.wait_converged(CONVERGE).expect("converged");
    let want = peer_subnets(&c, 0);
    wait_until(
        CONVERGE,
        "flanneld status: both peers programmed, exit 0",
        || {
            let (code, s) = status_json(c.host(0))?;
            let mut got = programmed(&s);
            got.sort();
            (code == 0 && got == want)
                .then_some(())
                .ok_or(format!("exit {code}, programmed {got:?}, want {want:?}"))
        },
    )
    .expect("status shows both peers");
    let (code, table, err) = c.host(0).flanneld_status(&[]).unwrap();
    assert_eq!(code, 0, "{table}{err}");
    for subnet in &want {
        let line = table
            .lines()
            .find(|l| l.contains(subnet.as_str()))
            .unwrap_or_else(|| panic!("no line for peer {subnet}:\n{table}"));
        assert!(line.contains("programmed"), "{line}\n{table}");
    }
    assert!(table.contains("Status    OK"), "{table}");

    // A route deleted by hand is put back by the next full pass (a kernel notification starts
    // it at once), which the status reports as fixed for that peer.
    let victim = c.host(1).subnet().unwrap();
    let victim_key = format!("{}-{}", victim.network(), victim.prefix());
    c.host(0)
        .netns()
        .ip(&["route", "del", &victim.to_string()])
        .expect("delete the route");
    let repair = wait_until(
        Duration::from_secs(15),
        "flanneld status to report the route as fixed",
        || {
            let (_, s) = status_json(c.host(0))?;
            let changes = s["last_repair"]["changes"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            changes
                .iter()
                .find(|ch| {
                    ch["peer"] == victim_key.as_str()
                        && ch["error"].is_null()
                        && ch["what"]
                            .as_str()
                            .is_some_and(|w| w.contains("route") && w.contains(&victim.to_string()))
                })
                .cloned()
                .ok_or(format!("last repair: {}", s["last_repair"]))
        },
    )
    .expect("repair reported");
    assert_eq!(repair["effect"], "added", "{repair}");
    let (code, table, _) = c.host(0).flanneld_status(&[]).unwrap();
    assert_eq!(code, 0, "the route is back: {table}");
    assert!(
        table.contains(&format!("peer {victim_key}: added: replace route {victim}")),
        "{table}"
    );
}

#[test]
fn status_names_the_etcd_member_that_does_not_answer() {
    netns_tests::require_test_bed!();
    let c = Cluster::builder()
        .hosts(3)
        .etcd_members(3)
        .backend(Backend::Vxlan)
        .build()
        .expect("3 hosts on a 3-member etcd cluster");
    c.wait_converged(CONVERGE).expect("converged");
    let members: Vec<String> = c.etcd_members().iter().map(|m| m.endpoint()).collect();
    wait_until(CONVERGE, "every member answering", || {
        let (_, s) = status_json(c.host(0))?;
        let answering = s["registry"]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["answers"] == true)
            .count();
        (answering == 3)
            .then_some(())
            .ok_or(format!("{}", s["registry"]))
    })
    .expect("three members answer");

    let down = &members[2];
    c.etcd_member(2).kill9();
    wait_until(
        Duration::from_secs(15),
        "status to name the member down",
        || {
            let (code, s) = status_json(c.host(0))?;
            let named = s["registry"]["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["endpoint"] == down.as_str() && e["answers"] == false);
            (named && code == 1)
                .then_some(())
                .ok_or(format!("exit {code}: {}", s["registry"]))
        },
    )
    .expect("member reported down");
    let (code, table, _) = c.host(0).flanneld_status(&[]).unwrap();
    assert_eq!(code, 1, "{table}");
    let line = table
        .lines()
        .find(|l| l.trim_start().starts_with(down.as_str()))
        .unwrap_or_else(|| panic!("no line for {down}:\n{table}"));
    assert!(line.contains("DOES NOT ANSWER"), "{line}");
    assert!(
        table.contains(&format!("etcd member {down} does not answer")),
        "{table}"
    );
    for m in &members[..2] {
        assert!(table.contains(&format!("{m}  answers")), "{table}");
    }
}

#[test]
fn status_lists_an_overlapping_lease_with_its_reason() {
    netns_tests::require_test_bed!();
    let c = Cluster::new(3, Backend::Vxlan).expect("cluster");
    c.wait_converged(CONVERGE).expect("converged");
    // Host 0's subnet again under another key (dual-stack form; IPv6 is off): newer than host
    // 0's own lease, so host 1 refuses it as overlapping the older lease.
    let net0 = c.host(0).subnet().unwrap();
    let key = format!("{}-24&fc00::-64", net0.network());
    let value = serde_json::json!({
        "PublicIP": "198.18.0.250",
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": "02:00:5e:00:00:fa"},
    });
    c.etcd()
        .put(&format!("{}{key}", c.subnets_prefix()), &value.to_string())
        .expect("etcd put");
    let rejected = wait_until(CONVERGE, "host 1's status to list the lease", || {
        let (_, s) = status_json(c.host(1))?;
        s["rejected"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["key"] == key.as_str())
            .cloned()
            .ok_or(format!("rejected: {}", s["rejected"]))
    })
    .expect("rejected lease listed");
    assert_eq!(rejected["reason"], "overlaps_older", "{rejected}");
    assert_eq!(rejected["public_ip"], "198.18.0.250", "{rejected}");
    let (_, table, _) = c.host(1).flanneld_status(&[]).unwrap();
    let line = table
        .lines()
        .find(|l| l.contains(&key))
        .unwrap_or_else(|| panic!("no line for {key}:\n{table}"));
    assert!(line.contains("overlaps_older"), "{line}");
}
