//! Wiring: interface → config → backend → lease → subnet file → run loops.
//!
//! Three long-lived tasks share state through `watch` channels, so each only ever acts on the
//! latest state: the watcher (registry → [`LeaseView`]), the lease keeper (renews, re-acquires
//! when the lease is lost) and the data plane (reconciles the kernel with the peers). A fourth,
//! the rule keeper, keeps the masquerade and forward rules. Everything after connecting talks to
//! the registry only through [`LeaseRegistry`].

mod config_wait;
mod data_plane;
mod lease_keeper;
#[cfg(test)]
mod memory_registry;
mod rule_keeper;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::backend::{self, BackendContext, BackendError, Publish};
use crate::cli::Opts;
use crate::config::NetworkConfig;
use crate::firewall;
use crate::health;
use crate::iface::{self, ExternalInterface, IfaceChoice, IfaceError};
use crate::metrics::Metrics;
use crate::subnet::acquire::AcquireRequest;
use crate::subnet::env::{SubnetEnv, SubnetEnvExt};
use crate::subnet::etcd::{EtcdError, EtcdOptions};
use crate::subnet::etcd_registry::EtcdRegistry;
use crate::subnet::kube::{KubeError, KubeOptions, KubeRegistry};
use crate::subnet::peers::RejectionLog;
use crate::subnet::registry::LeaseRegistry;
use crate::subnet::watch::LeaseView;
use crate::subnet::LeaseAttrs;

use config_wait::wait_for_config;
use data_plane::DataPlane;
use lease_keeper::{acquire_until_done, LeaseKeeper};
use rule_keeper::RuleKeeper;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Iface(#[from] IfaceError),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("--healthz-ip/--healthz-port {addr}: {err}")]
    Health {
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error("{0}")]
    Mismatch(String),
    /// A network config no waiting can fix (see [`ConfigError::names_no_backend`]).
    #[error("{err} (read from {location})")]
    Config {
        location: String,
        err: crate::config::ConfigError,
    },
    /// A task that runs for the life of the daemon returned, or panicked (`failure`).
    #[error("internal task {task} stopped; exiting so that it is restarted")]
    TaskEnded {
        task: &'static str,
        #[source]
        failure: Option<tokio::task::JoinError>,
    },
}

pub async fn run(opts: Opts) -> Result<(), DaemonError> {
    let metrics = Arc::new(Metrics::default());
    if opts.healthz_port != 0 {
        let addr = SocketAddr::new(opts.healthz_ip, opts.healthz_port);
        let listener = health::bind(addr)
            .await
            .map_err(|err| DaemonError::Health { addr, err })?;
        tracing::info!("health server on http://{addr}/ (healthz, readyz, metrics)");
        tokio::spawn(health::serve(listener, metrics.clone()));
    }

    if opts.kube_subnet_mgr {
        return run_kube(&opts, metrics).await;
    }
    let ext = select_iface(&opts, opts.public_ip, opts.public_ipv6).await?;
    let reg = EtcdRegistry::connect_until_done(&etcd_options(&opts), metrics.clone()).await?;
    run_with(&opts, ext, Arc::new(reg), metrics, Extras::default()).await
}

/// Kubernetes mode: the registry is our Node and its peers; our Node's `node-public-ip[v6]`
/// annotations choose the interface (over --public-ip, as in flannel), its published VTEP
/// MACs are kept, and NetworkUnavailable is cleared once the subnet file is written.
async fn run_kube(opts: &Opts, metrics: Arc<Metrics>) -> Result<(), DaemonError> {
    let kube_opts = KubeOptions {
        api_url: opts.kube_api_url.clone(),
        kubeconfig: opts.kubeconfig_file.clone(),
        keys: crate::subnet::kube::annotations::AnnotationKeys::new(&opts.kube_annotation_prefix)
            .map_err(|e| DaemonError::Mismatch(e.to_string()))?,
        net_config_path: opts.net_config_path.clone(),
    };
    let reg = Arc::new(KubeRegistry::connect(&kube_opts, metrics.clone()).await?);
    let start = reg.node_at_start().await?;
    if start.public_ip.is_some() || start.public_ipv6.is_some() {
        tracing::info!(
            "Node {}: node-public-ip {:?}, node-public-ipv6 {:?} (over --public-ip/--public-ipv6)",
            reg.node_name(),
            start.public_ip,
            start.public_ipv6
        );
    }
    let ext = select_iface(
        opts,
        start.public_ip.or(opts.public_ip),
        start.public_ipv6.or(opts.public_ipv6),
    )
    .await?;
    let mac = |m: &Option<String>| m.as_deref().and_then(crate::netlink::parse_mac);
    let (tell, written) = tokio::sync::oneshot::channel();
    if opts.set_node_network_unavailable {
        let reg = reg.clone();
        tokio::spawn(async move {
            if written.await.is_ok() {
                reg.set_network_available().await;
            }
        });
    }
    let extras = Extras {
        stored_vtep_macs: (mac(&start.vtep_mac), mac(&start.vtep_mac_v6)),
        subnet_file_written: Some(tell),
    };
    run_with(opts, ext, reg, metrics, extras).await
}

/// What a registry brings beyond the trait.
#[derive(Default)]
struct Extras {
    stored_vtep_macs: (Option<crate::netlink::Mac>, Option<crate::netlink::Mac>),
    subnet_file_written: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn select_iface(
    opts: &Opts,
    public_ip: Option<std::net::Ipv4Addr>,
    public_ipv6: Option<std::net::Ipv6Addr>,
) -> Result<ExternalInterface, DaemonError> {
    let ext = iface::select(&IfaceChoice {
        iface: opts.iface.clone(),
        iface_regex: opts.iface_regex.clone(),
        iface_can_reach: opts.iface_can_reach,
        public_ip,
        public_ipv6,
    })
    .await?;
    tracing::info!(
        "external interface {} (index {}, MTU {}), address {:?}, public IP {:?}, public IPv6 {:?}",
        ext.name,
        ext.index,
        ext.mtu,
        ext.iface_addr,
        ext.public_ip,
        ext.public_ipv6
    );
    Ok(ext)
}

/// Everything after the registry is connected: config → backend → lease → run loops.
async fn run_with<R: LeaseRegistry>(
    opts: &Opts,
    ext: ExternalInterface,
    reg: Arc<R>,
    metrics: Arc<Metrics>,
    extras: Extras,
) -> Result<(), DaemonError> {
    let config = wait_for_config(&*reg).await?;
    check_families(&config, &ext)?;
    tracing::info!(
        "network config: network {:?}, IPv6 network {:?}, backend {}",
        config.v4.map(|f| f.network),
        config.v6.map(|f| f.network),
        config.backend_type
    );

    let mut backend = backend::create(BackendContext {
        config: config.clone(),
        ext: ext.clone(),
        metrics: metrics.clone(),
        stored_vtep_macs: extras.stored_vtep_macs,
    })?;
    let publish = backend.prepare().await?;
    let attrs = lease_attrs(&config, &ext, &publish);

    let old_subnet = match SubnetEnv::read_lenient(&opts.subnet_file) {
        Ok(env) => env.and_then(|e| e.lease_key()),
        Err(e) => {
            tracing::warn!("ignoring the old subnet file: {e}");
            None
        }
    };
    let request = AcquireRequest {
        attrs,
        prefer: old_subnet,
        ttl: opts.subnet_lease_ttl,
    };
    let lease = acquire_until_done(&*reg, &config, &request, &metrics).await;

    let (view_tx, view_rx) = watch::channel(LeaseView::default());
    let (own_tx, own_rx) = watch::channel(lease.clone());
    let watcher = {
        let reg = reg.clone();
        tokio::spawn(async move { reg.watch_leases(view_tx).await })
    };
    let plane = DataPlane {
        backend,
        config: config.clone(),
        ext_index: ext.index,
        mtu: publish.mtu,
        subnet_file: opts.subnet_file.clone(),
        ip_masq: opts.ip_masq,
        metrics: metrics.clone(),
        rejections: RejectionLog::default(),
        own_overruled_by: None,
        blackholes: crate::blackhole::OwnBlackholes::new(opts.ip_blackhole_route)
            .inspect_err(|e| tracing::warn!("no blackhole routes: {e}"))
            .ok(),
        subnet_file_written: extras.subnet_file_written,
    };
    let plane = tokio::spawn(plane.run(own_rx.clone(), view_rx.clone()));
    let rules = RuleKeeper {
        firewall: firewall::create(config.enable_nftables),
        config: config.clone(),
        masquerade: opts.ip_masq,
        forward: opts.iptables_forward_rules,
        fully_random: !opts.ip_masq_fully_random_disable,
        every: Duration::from_secs(u64::from(opts.iptables_resync)),
        metrics: metrics.clone(),
    };
    let rules = tokio::spawn(rules.run(own_rx));
    let keeper = LeaseKeeper {
        reg,
        config,
        request,
        renew_after: opts.renew_after(),
        metrics,
    };
    let keeper = tokio::spawn(keeper.run(lease, own_tx, view_rx));
    // Each task runs for the life of the daemon. One that ends has panicked or lost its
    // channel: exit with the reason, so that the supervisor restarts a whole daemon, which
    // adopts the data plane as it is, rather than keep one that silently stopped a duty.
    let (task, end) = tokio::select! {
        r = watcher => ("lease watcher", r),
        r = plane => ("data plane", r),
        r = rules => ("rule keeper", r),
        r = keeper => ("lease keeper", r),
    };
    Err(DaemonError::TaskEnded {
        task,
        failure: end.err(),
    })
}

fn etcd_options(opts: &Opts) -> EtcdOptions {
    EtcdOptions {
        endpoints: opts.endpoints(),
        prefix: opts.etcd_prefix.clone(),
        cafile: opts.etcd_cafile.clone(),
        certfile: opts.etcd_certfile.clone(),
        keyfile: opts.etcd_keyfile.clone(),
        username: opts.etcd_username.clone(),
        password: opts.etcd_password.clone(),
        insecure_password: opts.etcd_insecure_password,
    }
}

fn check_families(config: &NetworkConfig, ext: &ExternalInterface) -> Result<(), DaemonError> {
    if config.v4.is_some() && ext.public_ip.is_none() {
        return Err(DaemonError::Mismatch(format!(
            "the network config enables IPv4 but interface {} has no IPv4 address \
             (give one, --public-ip, or choose another interface with --iface)",
            ext.name
        )));
    }
    if config.v6.is_some() && ext.public_ipv6.is_none() {
        return Err(DaemonError::Mismatch(format!(
            "the network config enables IPv6 but interface {} has no global IPv6 address \
             (give one, --public-ipv6, or choose another interface with --iface)",
            ext.name
        )));
    }
    Ok(())
}

fn lease_attrs(config: &NetworkConfig, ext: &ExternalInterface, publish: &Publish) -> LeaseAttrs {
    let raw = |v: &Option<serde_json::Value>| {
        v.as_ref()
            .map(|v| serde_json::value::to_raw_value(v).expect("JSON values serialize"))
    };
    LeaseAttrs {
        public_ip: ext.public_ip.filter(|_| config.v4.is_some()),
        public_ipv6: ext.public_ipv6.filter(|_| config.v6.is_some()),
        backend_type: publish.backend_type.clone(),
        backend_data: raw(&publish.backend_data),
        backend_v6_data: raw(&publish.backend_v6_data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json.as_bytes()).unwrap()
    }

    const V4: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
    const V6: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:5::/56","Backend":{"Type":"vxlan"}}"#;
    const DUAL: &str = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/56","Backend":{"Type":"vxlan"}}"#;

    fn ext(v4: Option<&str>, v6: Option<&str>) -> ExternalInterface {
        ExternalInterface {
            name: "uplink0".into(),
            index: 7,
            iface_addr: v4.map(|a| a.parse().unwrap()),
            iface_v6_addr: v6.map(|a| a.parse().unwrap()),
            public_ip: v4.map(|a| a.parse().unwrap()),
            public_ipv6: v6.map(|a| a.parse().unwrap()),
            mtu: 1500,
        }
    }

    fn publish(data: Option<serde_json::Value>, v6_data: Option<serde_json::Value>) -> Publish {
        Publish {
            backend_type: "vxlan".into(),
            backend_data: data,
            backend_v6_data: v6_data,
            mtu: 1450,
        }
    }

    #[test]
    fn ipv4_enabled_on_an_interface_without_ipv4_names_the_interface() {
        let err = check_families(&config(V4), &ext(None, Some("2001:db8::1"))).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("enables IPv4") && msg.contains("uplink0"),
            "{msg}"
        );
    }

    #[test]
    fn ipv6_enabled_on_an_interface_without_ipv6_names_the_interface() {
        let err = check_families(&config(DUAL), &ext(Some("198.18.0.1"), None)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("enables IPv6") && msg.contains("uplink0"),
            "{msg}"
        );
    }

    #[test]
    fn an_interface_with_every_enabled_family_passes() {
        check_families(&config(V4), &ext(Some("198.18.0.1"), None)).unwrap();
        check_families(&config(V6), &ext(None, Some("2001:db8::1"))).unwrap();
        check_families(&config(DUAL), &ext(Some("198.18.0.1"), Some("2001:db8::1"))).unwrap();
    }

    #[test]
    fn lease_attrs_publish_only_the_enabled_families() {
        let both = ext(Some("198.18.0.1"), Some("2001:db8::1"));
        let attrs = lease_attrs(&config(V4), &both, &publish(None, None));
        assert_eq!(attrs.public_ip, Some("198.18.0.1".parse().unwrap()));
        assert_eq!(attrs.public_ipv6, None);
        let attrs = lease_attrs(&config(V6), &both, &publish(None, None));
        assert_eq!(attrs.public_ip, None);
        assert_eq!(attrs.public_ipv6, Some("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn lease_attrs_carry_the_backend_type_and_data_as_json() {
        let both = ext(Some("198.18.0.1"), Some("2001:db8::1"));
        let data = serde_json::json!({"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"});
        let v6 = serde_json::json!({"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:01"});
        let attrs = lease_attrs(&config(DUAL), &both, &publish(Some(data), Some(v6)));
        assert_eq!(attrs.backend_type, "vxlan");
        assert_eq!(
            attrs.backend_data.as_ref().map(|r| r.get()),
            Some(r#"{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}"#)
        );
        assert_eq!(
            attrs.backend_v6_data.as_ref().map(|r| r.get()),
            Some(r#"{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"}"#)
        );
    }

    #[test]
    fn lease_attrs_without_backend_data_leave_it_out() {
        let attrs = lease_attrs(
            &config(V4),
            &ext(Some("198.18.0.1"), None),
            &publish(None, None),
        );
        assert!(attrs.backend_data.is_none() && attrs.backend_v6_data.is_none());
    }
}
