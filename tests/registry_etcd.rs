//! The etcd registry through the `LeaseRegistry` trait the daemon uses, against a real etcd:
//! config, acquisition with the attributes published, renewal, the watched view, and which
//! failures the daemon retries slowly.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::Etcd;
use flannel::config::NetworkConfig;
use flannel::metrics::Metrics;
use flannel::subnet::acquire::{AcquireRequest, Renewal};
use flannel::subnet::etcd::{EtcdOptions, Registry};
use flannel::subnet::etcd_registry::EtcdRegistry;
use flannel::subnet::registry::{AcquireFailure, LeaseRegistry};
use flannel::subnet::watch::LeaseView;
use flannel::subnet::LeaseAttrs;
use tokio::sync::watch;

const CONFIG_KEY: &str = "/coreos.com/network/config";
const WITHIN: Duration = Duration::from_secs(10);

async fn connect(etcd: &Etcd) -> (Registry, EtcdRegistry, Arc<Metrics>) {
    let opts = EtcdOptions {
        endpoints: vec![etcd.endpoint()],
        prefix: "/coreos.com/network".into(),
        ..Default::default()
    };
    let metrics = Arc::new(Metrics::default());
    let leases = EtcdRegistry::connect_until_done(&opts, metrics.clone())
        .await
        .unwrap();
    (Registry::connect(&opts).await.unwrap(), leases, metrics)
}

fn request(ip: &str) -> AcquireRequest {
    let attrs = LeaseAttrs::from_json(
        "test",
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    AcquireRequest {
        attrs,
        prefer: None,
        ttl: Duration::from_secs(600),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reads_acquires_renews_and_watches_through_the_trait() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    let (raw, reg, metrics) = connect(&etcd).await;
    assert_eq!(reg.config_location(), CONFIG_KEY);
    let json = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
    raw.client().put(CONFIG_KEY, json, None).await.unwrap();
    let read = reg.read_config().await.unwrap();
    assert_eq!(read.value.as_deref(), Some(json.as_bytes()));
    assert!(metrics.etcd_up.load(Ordering::Relaxed));

    let config = NetworkConfig::parse(json.as_bytes()).unwrap();
    let lease = reg.acquire(&config, &request("198.18.8.1")).await.unwrap();
    // Other hosts read our attributes from the lease's key.
    let stored = raw
        .client()
        .get(raw.lease_key(&lease.key), None)
        .await
        .unwrap();
    let value = String::from_utf8_lossy(stored.kvs()[0].value()).into_owned();
    assert!(
        value.contains(r#""PublicIP":"198.18.8.1""#) && value.contains("aa:bb:cc:dd:ee:ff"),
        "{value}"
    );

    match reg.keep(&lease).await.unwrap() {
        Renewal::Renewed { ttl_secs } => assert!(ttl_secs > 590, "{ttl_secs}"),
        other => panic!("expected a renewal, got {other:?}"),
    }

    let (tx, mut rx) = watch::channel(LeaseView::default());
    let reg = Arc::new(reg);
    let watcher = {
        let reg = reg.clone();
        tokio::spawn(async move { reg.watch_leases(tx).await })
    };
    // The watcher starts from the listing the lease was chosen from and must still see ours.
    let view = tokio::time::timeout(
        WITHIN,
        rx.wait_for(|v| v.synced && v.leases.contains_key(&lease.key)),
    )
    .await
    .expect("our lease in the watched view in time")
    .unwrap()
    .clone();
    assert_eq!(
        view.leases[&lease.key].attrs.public_ip,
        lease.attrs.public_ip
    );
    watcher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_network_is_no_lease_not_a_registry_failure() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    let (_raw, reg, metrics) = connect(&etcd).await;
    // Four /26s, the first never handed out: room for three hosts.
    let config = NetworkConfig::parse(
        br#"{"Network":"10.5.0.0/24","SubnetLen":26,"Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap();
    for host in 1..=3 {
        let ip = format!("198.18.8.{host}");
        reg.acquire(&config, &request(&ip)).await.unwrap();
    }
    match reg.acquire(&config, &request("198.18.8.4")).await {
        Err(AcquireFailure::NoLease(e)) => {
            assert!(e.to_string().contains("no free subnet"), "{e}")
        }
        Err(AcquireFailure::Registry(e)) => panic!("a full network is not an etcd failure: {e}"),
        Ok(lease) => panic!("no subnet should be free, got {}", lease.key),
    }
    assert_eq!(metrics.etcd_errors.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_write_ends_the_wait_for_a_change() {
    netns_tests::require_etcd!();
    let etcd = Etcd::start_local(Default::default()).unwrap();
    let (raw, reg, _metrics) = connect(&etcd).await;
    let read = reg.read_config().await.unwrap();
    assert_eq!(read.value, None);
    let reg = Arc::new(reg);
    let waiter = {
        let reg = reg.clone();
        tokio::spawn(async move { reg.config_changed(read.version).await })
    };
    let json = r#"{"Network":"10.6.0.0/16"}"#;
    raw.client().put(CONFIG_KEY, json, None).await.unwrap();
    // Well under the wait's one-minute cap: the write itself ended it.
    tokio::time::timeout(WITHIN, waiter)
        .await
        .expect("the wait ends when the config is written")
        .unwrap();
    let read = reg.read_config().await.unwrap();
    assert_eq!(read.value.as_deref(), Some(json.as_bytes()));
}
