//! The lease registry against a real etcd: racing acquirers and watching through compaction.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::Etcd;
use flannel::config::NetworkConfig;
use flannel::metrics::Metrics;
use flannel::subnet::acquire::{acquire, AcquireError, AcquireRequest};
use flannel::subnet::etcd::{EtcdOptions, Password, Registry};
use flannel::subnet::watch::{self as lease_watch, LeaseView};
use flannel::subnet::LeaseAttrs;

async fn registry(etcd: &Etcd) -> Registry {
    Registry::connect(&EtcdOptions {
        endpoints: vec![etcd.endpoint()],
        prefix: "/coreos.com/network".into(),
        ..Default::default()
    })
    .await
    .unwrap()
}

fn attrs(ip: &str) -> LeaseAttrs {
    LeaseAttrs::from_json(
        "test",
        format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"alloc"}}"#).as_bytes(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_acquirers_share_out_exactly_the_free_subnets() {
    // A /24 in /28s: 16 subnets, the first never handed out → 15 free.
    race(br#"{"Network":"10.5.0.0/24","SubnetLen":28,"Backend":{"Type":"alloc"}}"#).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_dual_stack_acquirers_never_share_an_ipv4_subnet() {
    // Dual-stack keys differ in their IPv6 half (65,535 free /64s), so two hosts racing for
    // one IPv4 subnet write two different keys: the later one must back off.
    race(
        br#"{"Network":"10.5.0.0/24","SubnetLen":28,"EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"alloc"}}"#,
    )
    .await;
}

async fn race(config_json: &[u8]) {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    let config = NetworkConfig::parse(config_json).unwrap();
    let reg = registry(&etcd).await;
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let (reg, config) = (reg.clone(), config.clone());
            tokio::spawn(async move {
                let mut attrs = attrs(&format!("198.18.8.{}", i + 1));
                if config.v6.is_some() {
                    attrs.public_ipv6 = Some(format!("fd00:18::{}", i + 1).parse().unwrap());
                }
                let req = AcquireRequest {
                    attrs,
                    prefer: None,
                    ttl: Duration::from_secs(600),
                };
                acquire(&reg, &config, &req).await
            })
        })
        .collect();
    let mut won = Vec::new();
    let mut out_of_subnets = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(lease) => won.push(lease),
            Err(e @ AcquireError::NoFreeSubnet { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("10.5.0.0/24") && msg.contains("15"), "{msg}");
                out_of_subnets += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(won.len(), 15);
    assert_eq!(out_of_subnets, 9);
    let v4: HashSet<_> = won.iter().map(|l| l.key.ipv4.unwrap()).collect();
    assert_eq!(v4.len(), 15, "an IPv4 subnet was handed out twice");
    assert!(!v4.contains(&"10.5.0.0/28".parse().unwrap()));
    if config.v6.is_some() {
        let v6: HashSet<_> = won.iter().map(|l| l.key.ipv6.unwrap()).collect();
        assert_eq!(v6.len(), 15, "an IPv6 subnet was handed out twice");
    }
    // etcd agrees: 15 keys, each with the public IP of the acquirer that won it.
    let stored = etcd.get_prefix("/coreos.com/network/subnets/").unwrap();
    assert_eq!(stored.len(), 15);
    for lease in &won {
        let key = format!("/coreos.com/network/subnets/{}", lease.key);
        let value = &stored.iter().find(|(k, _)| *k == key).unwrap().1;
        let ip = lease.attrs.public_ip.unwrap().to_string();
        assert!(value.contains(&ip), "{key} holds {value}, expected {ip}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumed_behind_a_compaction_loses_no_change() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    let reg = registry(&etcd).await;
    let put = |k: &str, ip: &str| {
        etcd.put(
            &format!("/coreos.com/network/subnets/{k}"),
            &format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"alloc"}}"#),
        )
        .unwrap()
    };
    put("10.5.1.0-24", "198.18.0.1");
    put("10.5.2.0-24", "198.18.0.2");
    put("10.5.3.0-24", "198.18.0.3");
    // A view as a watcher had it before it was cut off.
    let listing = reg.list_subnets().await.unwrap();
    let mut stale = LeaseView::default();
    stale.replace_all(listing.leases, listing.revision);

    // While it is away: a removal, a change, two additions — then etcd compacts them away.
    etcd.etcdctl(&["del", "/coreos.com/network/subnets/10.5.1.0-24"])
        .unwrap();
    put("10.5.2.0-24", "198.18.0.22");
    put("10.5.4.0-24", "198.18.0.4");
    put("10.5.5.0-24", "198.18.0.5");
    let rev = reg.list_subnets().await.unwrap().revision;
    etcd.etcdctl(&["compaction", &rev.to_string()]).unwrap();

    let metrics = Arc::new(Metrics::default());
    let (tx, mut rx) = tokio::sync::watch::channel(stale.clone());
    let task = tokio::spawn(lease_watch::run(
        reg.clone(),
        stale,
        None,
        tx,
        metrics.clone(),
    ));
    // The resumed watch starts behind the compaction: it must list again and converge.
    let want: BTreeSet<String> = ["10.5.2.0-24", "10.5.3.0-24", "10.5.4.0-24", "10.5.5.0-24"]
        .into_iter()
        .map(String::from)
        .collect();
    let view = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let v = rx.borrow_and_update().clone();
            let keys: BTreeSet<String> = v.leases.keys().map(|k| k.to_string()).collect();
            if keys == want {
                return v;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the view never matched etcd after compaction");
    let changed = &view.leases[&"10.5.2.0-24".parse().unwrap()];
    assert_eq!(
        changed.attrs.public_ip,
        Some("198.18.0.22".parse().unwrap())
    );
    assert!(
        metrics
            .watch_relists
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    // And it keeps following live changes after the re-list.
    put("10.5.6.0-24", "198.18.0.6");
    etcd.etcdctl(&["del", "/coreos.com/network/subnets/10.5.3.0-24"])
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let done = {
                let v = rx.borrow_and_update();
                v.leases.contains_key(&"10.5.6.0-24".parse().unwrap())
                    && !v.leases.contains_key(&"10.5.3.0-24".parse().unwrap())
            };
            if done {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("live changes after the re-list were missed");
    let final_view = rx.borrow().clone();
    let in_etcd: BTreeSet<String> = reg
        .list_subnets()
        .await
        .unwrap()
        .leases
        .iter()
        .map(|l| l.key.to_string())
        .collect();
    let in_view: BTreeSet<String> = final_view.leases.keys().map(|k| k.to_string()).collect();
    assert_eq!(in_view, in_etcd);
    task.abort();
}

/// A lease value as flannel's vxlan backend writes it.
fn lease_json(ip: &str) -> String {
    format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"c6:d2:aa:01:02:03"}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subnets_listing_over_the_message_limit_still_grants_leases() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    let reg = registry(&etcd).await;
    let config =
        NetworkConfig::parse(br#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#).unwrap();
    // Three junk values just under etcd's 1.5 MiB request limit: 4.2 MB under the prefix, more
    // than the client takes in one answer.
    let mut client = reg.client();
    for i in 0..3 {
        let junk = vec![b'x'; 1_400_000];
        client
            .put(format!("/coreos.com/network/subnets/junk-{i}"), junk, None)
            .await
            .unwrap();
    }
    client
        .put(
            "/coreos.com/network/subnets/10.5.7.0-24",
            lease_json("198.18.8.7"),
            None,
        )
        .await
        .unwrap();

    // Also when a page of the default size is too large for the client: smaller pages.
    let limited = reg.clone().with_max_message(4 * 1024 * 1024);
    for r in [&reg, &limited] {
        let listing = r.list_subnets().await.expect("listing past 4 MiB");
        assert_eq!(listing.leases.len(), 1);
        assert_eq!(listing.malformed.len(), 3);
        for (_, _, err) in &listing.malformed {
            assert!(err.to_string().len() < 1000, "{err}");
        }
    }

    let req = AcquireRequest {
        attrs: attrs("198.18.8.1"),
        prefer: None,
        ttl: Duration::from_secs(600),
    };
    let lease = acquire(&reg, &config, &req).await.expect("a lease");
    assert_ne!(lease.key.to_string(), "10.5.7.0-24");

    // The watcher's list (and the re-list after a compaction) takes the same path.
    let (tx, mut rx) = tokio::sync::watch::channel(LeaseView::default());
    let metrics = Arc::new(Metrics::default());
    let task = tokio::spawn(lease_watch::run(
        reg.clone(),
        LeaseView::default(),
        None,
        tx,
        metrics.clone(),
    ));
    let view = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let v = rx.borrow_and_update().clone();
            if v.synced && v.leases.len() == 2 {
                return v;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the watcher never listed the two leases");
    assert!(view.leases.contains_key(&lease.key));
    assert_eq!(
        metrics
            .malformed_leases
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_leases_list_completely() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    let reg = registry(&etcd).await;
    let mut client = reg.client();
    // 10,000 /30s of a /16, written 100 to a transaction (etcd allows 128 operations).
    let keys: Vec<String> = (0..10_000u32)
        .map(|i| {
            let ip =
                std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 5, 0, 0)) + i * 4);
            format!("{ip}-30")
        })
        .collect();
    for chunk in keys.chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|k| {
                etcd_client::TxnOp::put(
                    format!("/coreos.com/network/subnets/{k}"),
                    lease_json("198.18.9.1"),
                    None,
                )
            })
            .collect();
        client
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .unwrap();
    }
    let listing = reg.list_subnets().await.unwrap();
    let listed: BTreeSet<String> = listing.leases.iter().map(|l| l.key.to_string()).collect();
    assert_eq!(listing.leases.len(), 10_000, "no lease listed twice");
    assert_eq!(listed, keys.into_iter().collect::<BTreeSet<_>>());
    assert!(listing.malformed.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_opened_after_the_token_expired_is_not_refused() {
    netns_tests::require_etcd!();
    let mut etcd = Etcd::start_local(common::short_lived_tokens()).unwrap();
    etcd.enable_auth().unwrap();
    let reg = Registry::connect(&EtcdOptions {
        endpoints: vec![etcd.endpoint()],
        prefix: "/coreos.com/network".into(),
        username: Some("flannel".into()),
        password: Some(Password::new("s3cret")),
        insecure_password: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let revision = reg.list_subnets().await.unwrap().revision;
    common::poll(
        "etcd to expire the registry's token",
        Duration::from_secs(20),
        || (common::expired_flannel_tokens(&etcd) >= 1).then_some(()),
    );
    // etcd does not refuse a watch made with an expired token: it cancels it as "permission
    // denied", which must not be taken as the answer.
    let (_stream, first) = reg.watch_subnets(revision + 1).await.unwrap();
    assert!(
        !first.canceled(),
        "watch cancelled: {}",
        first.cancel_reason()
    );
    assert!(first.created());
}
