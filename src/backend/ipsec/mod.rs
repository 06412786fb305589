//! `ipsec`: strongSwan's charon negotiates IKEv2 with a pre-shared key and ESP carries the pod
//! traffic between hosts. We drive a charon that is already running (its VICI socket) the way
//! flannel drives the one it starts: per peer one connection and one child SA between the two
//! subnets, named as flannel names them, with the shared key for the peer's public IP.
//!
//! Unlike flannel, charon installs the IPsec policies itself (trap policies from the moment a
//! connection is loaded, so nothing leaves in plaintext before the SA is up), which also makes
//! the backend work with charon's userspace ESP (`kernel-libipsec`) on kernels without ESP.

mod charon;
mod config;
mod vici;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ipnetwork::Ipv4Network;

use super::common::{self, Effect};
use super::{Backend, BackendContext, BackendError, KernelChange, Publish, ReconcileReport};
use crate::netlink::{self, Netlink};
use crate::subnet::{Lease, PeerSet, SubnetKey};
use charon::{Charon, ViciError};
pub use config::IpsecOptions;
use vici::Message;

const BACKEND: &str = "ipsec";

/// Where flannel's charon listens; `FLANNELD_IPSEC_VICI_SOCKET` points elsewhere.
const DEFAULT_VICI_SOCKET: &str = "/var/run/charon.vici";
const VICI_SOCKET_ENV: &str = "FLANNELD_IPSEC_VICI_SOCKET";

/// How long the first connection may wait for charon (started beside us, maybe after us).
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// ESP in tunnel mode adds at most this much (outer IP header, SPI, sequence, IV, padding,
/// trailer, ICV): flannel's figure, so pods get the same MTU.
const IPSEC_OVERHEAD: u32 = 77;
const UDP_ENCAP_OVERHEAD: u32 = 8;

/// The IKE proposal flannel loads for every connection.
const IKE_PROPOSAL: &str = "aes256-sha256-modp4096";

/// Our side of every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Local {
    public_ip: Ipv4Addr,
    subnet: Ipv4Network,
}

/// One peer's connection, as loaded into charon.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Conn {
    key: SubnetKey,
    peer_ip: Ipv4Addr,
    peer_subnet: Ipv4Network,
}

impl Conn {
    /// flannel's connection name: both public IPs and both subnets.
    fn name(&self, local: &Local) -> String {
        format!(
            "{}-{}-{}-{}",
            local.public_ip, local.subnet, self.peer_subnet, self.peer_ip
        )
    }

    /// flannel's child SA name: both subnets.
    fn child_name(&self, local: &Local) -> String {
        format!("{}-{}", local.subnet, self.peer_subnet)
    }
}

/// Whether a connection charon holds is one of ours: named `<our public IP>-<subnet>-...`.
fn is_ours(name: &str, local: &Local) -> bool {
    name.strip_prefix(&format!("{}-", local.public_ip))
        .is_some_and(|rest| rest.split('-').count() == 3)
}

/// The `load-conn` message for `conn`.
fn load_conn_message(opts: &IpsecOptions, local: &Local, conn: &Conn) -> Message {
    let child = Message::new()
        .list("local_ts", [local.subnet.to_string()])
        .list("remote_ts", [conn.peer_subnet.to_string()])
        .list("esp_proposals", [opts.esp_proposal.clone()])
        // Trap policies at once (no plaintext before the SA is up), and initiate as flannel.
        .kv("start_action", "trap|start")
        .kv("close_action", "trap")
        .kv("dpd_action", "restart")
        .kv("mode", "tunnel")
        .kv("rekey_time", "1h");
    let ike = Message::new()
        .list("local_addrs", [local.public_ip.to_string()])
        .list("remote_addrs", [conn.peer_ip.to_string()])
        .list("proposals", [IKE_PROPOSAL])
        .kv("version", "2")
        .kv("keyingtries", "0")
        .kv("encap", if opts.udp_encap { "yes" } else { "no" })
        .section("local", Message::new().kv("auth", "psk"))
        .section("remote", Message::new().kv("auth", "psk"))
        .section(
            "children",
            Message::new().section(&conn.child_name(local), child),
        );
    Message::new().section(&conn.name(local), ike)
}

fn shared_key_id(ip: Ipv4Addr) -> String {
    format!("flannel-{ip}")
}

/// The `load-shared` message: the PSK for one public IP (ours or a peer's), as flannel loads it.
fn load_shared_message(psk: &str, ip: Ipv4Addr) -> Message {
    Message::new()
        .kv("id", shared_key_id(ip))
        .kv("type", "IKE")
        .kv("data", psk)
        .list("owners", [ip.to_string()])
}

pub struct IpsecBackend {
    ctx: BackendContext,
    opts: IpsecOptions,
    socket: PathBuf,
    charon: Option<Charon>,
    nl: Option<Netlink>,
    local: Option<Local>,
    /// The subnet address we put on `lo` (see [`IpsecBackend::ensure_subnet_address`]).
    lo_address: Option<Ipv4Network>,
    /// The connections we loaded, by name; after a charon restart charon has none of them.
    loaded: BTreeMap<String, Conn>,
    /// Peers not programmed, with the reason; logged when it changes.
    skipped: common::Skipped,
}

impl IpsecBackend {
    pub fn new(ctx: BackendContext) -> Result<Self, BackendError> {
        let opts = IpsecOptions::parse(&ctx.config.backend)?;
        if ctx.config.v4.is_none() {
            return Err(BackendError::Setup {
                backend: BACKEND,
                why: "carries IPv4 only, as flannel's: enable IPv4 in the network config".into(),
            });
        }
        if ctx.config.v6.is_some() {
            tracing::warn!("{BACKEND}: carries IPv4 only, as flannel's; IPv6 subnets get no SA");
        }
        let socket = std::env::var_os(VICI_SOCKET_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_VICI_SOCKET));
        Ok(IpsecBackend {
            ctx,
            opts,
            socket,
            charon: None,
            nl: None,
            local: None,
            lo_address: None,
            loaded: BTreeMap::new(),
            skipped: common::Skipped::new(),
        })
    }

    fn vici_error(&self, e: ViciError) -> BackendError {
        BackendError::Setup {
            backend: BACKEND,
            why: format!("charon ({VICI_SOCKET_ENV}={}): {e}", self.socket.display()),
        }
    }

    /// The connection to charon, made anew when there is none. A new connection may be a new
    /// charon that lost every connection we loaded: the pass that follows finds them missing.
    async fn charon(&mut self) -> Result<&mut Charon, BackendError> {
        if self.charon.is_none() {
            let c = Charon::connect(&self.socket)
                .await
                .map_err(|e| self.vici_error(e))?;
            tracing::info!(
                "{BACKEND}: connected to charon at {}",
                self.socket.display()
            );
            self.charon = Some(c);
        }
        Ok(self.charon.as_mut().expect("just connected"))
    }

    /// The names charon has loaded, reconnecting once when the connection was lost (charon
    /// restarted under us).
    async fn loaded_names(&mut self) -> Result<BTreeSet<String>, BackendError> {
        for attempt in 0..2 {
            match self.charon().await?.connection_names().await {
                Ok(names) => return Ok(names.into_iter().collect()),
                Err(e) if e.is_connection_lost() && attempt == 0 => {
                    tracing::warn!("{BACKEND}: lost charon ({e}); reconnecting");
                    self.charon = None;
                }
                Err(e) => {
                    self.charon = None;
                    return Err(self.vici_error(e));
                }
            }
        }
        unreachable!("the second attempt returns")
    }

    /// charon routes each child SA's remote subnet from an address inside the local one, and
    /// without such an address it installs no route and no policy (with its userspace ESP the
    /// SA then fails). The CNI bridge's gateway address exists only once a pod runs, so the
    /// subnet's network address goes on `lo` (as vxlan puts it on `flannel.1`); one of an old
    /// lease is removed.
    async fn ensure_subnet_address(&mut self, subnet: Ipv4Network) -> Result<(), BackendError> {
        let nl = common::connect(BACKEND, &mut self.nl)?;
        let want = Ipv4Network::new(subnet.network(), 32).expect("a /32 is valid");
        let context = format!("address {want} on lo");
        let lo = netlink::link_by_name(&nl.h, "lo")
            .await
            .map_err(common::fatal(BACKEND, &context))?
            .ok_or_else(|| BackendError::Setup {
                backend: BACKEND,
                why: "no device lo".into(),
            })?;
        let have = netlink::addresses::<Ipv4Network>(&nl.h, lo.index)
            .await
            .map_err(common::fatal(BACKEND, &context))?;
        if let Some(old) = self
            .lo_address
            .filter(|old| *old != want && have.contains(old))
        {
            match netlink::delete_address(&nl.h, lo.index, old).await {
                Ok(()) => tracing::info!("{BACKEND}: removed old address {old} from lo"),
                Err(e) if e.is_not_found() => {}
                Err(e) => tracing::warn!("{BACKEND}: removing old address {old} from lo: {e}"),
            }
        }
        if !have.contains(&want) {
            netlink::replace_address(&nl.h, lo.index, want)
                .await
                .map_err(common::fatal(BACKEND, &context))?;
            tracing::info!("{BACKEND}: {context} set");
        }
        self.lo_address = Some(want);
        Ok(())
    }

    fn wanted(&mut self, peers: &PeerSet) -> BTreeMap<SubnetKey, Conn> {
        let mut skipped = common::Skipped::new();
        let want = common::candidates::<Ipv4Network>(peers, BACKEND, &mut skipped)
            .into_iter()
            .map(|c| {
                let conn = Conn {
                    key: c.key,
                    peer_ip: c.public_ip,
                    peer_subnet: c.subnet,
                };
                (c.key, conn)
            })
            .collect();
        common::log_skipped(BACKEND, "", &mut self.skipped, skipped);
        want
    }

    async fn load(&mut self, local: &Local, conn: &Conn) -> Result<(), ViciError> {
        let shared_own = load_shared_message(&self.opts.psk, local.public_ip);
        let shared_peer = load_shared_message(&self.opts.psk, conn.peer_ip);
        let msg = load_conn_message(&self.opts, local, conn);
        let c = self.charon.as_mut().expect("connected by loaded_names");
        c.command("load-shared", &shared_own).await?;
        c.command("load-shared", &shared_peer).await?;
        c.command("load-conn", &msg).await
    }

    async fn unload(&mut self, name: &str, peer_ip: Option<Ipv4Addr>) -> Result<(), ViciError> {
        let c = self.charon.as_mut().expect("connected by loaded_names");
        c.command("unload-conn", &Message::new().kv("name", name))
            .await?;
        // unload-conn removes the trap policies and the children it started; the IKE SA and
        // any child the peer initiated go with an explicit terminate.
        let terminate = Message::new()
            .kv("ike", name)
            .kv("force", "yes")
            .kv("timeout", "-1");
        if let Err(e) = c.command("terminate", &terminate).await {
            if e.is_connection_lost() {
                return Err(e);
            }
            tracing::debug!("{BACKEND}: terminate {name}: {e}");
        }
        if let Some(ip) = peer_ip {
            let id = Message::new().kv("id", shared_key_id(ip));
            if let Err(e) = c.command("unload-shared", &id).await {
                tracing::debug!("{BACKEND}: unload-shared for {ip}: {e}");
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for IpsecBackend {
    async fn prepare(&mut self) -> Result<Publish, BackendError> {
        tracing::info!(
            "{BACKEND}: UDPEncap={} ESPProposal={} charon VICI socket {}",
            self.opts.udp_encap,
            self.opts.esp_proposal,
            self.socket.display()
        );
        let deadline = Instant::now() + CONNECT_WAIT;
        loop {
            match self.charon().await {
                Ok(_) => break,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::info!(
                        "{BACKEND}: waiting for charon: {}",
                        crate::error_chain::Chain(&e)
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let overhead = IPSEC_OVERHEAD
            + if self.opts.udp_encap {
                UDP_ENCAP_OVERHEAD
            } else {
                0
            };
        Ok(Publish {
            backend_type: BACKEND.into(),
            // flannel publishes no BackendData for ipsec.
            backend_data: None,
            backend_v6_data: None,
            mtu: self.ctx.ext.mtu.saturating_sub(overhead),
        })
    }

    async fn lease_acquired(&mut self, own: &Lease) -> Result<(), BackendError> {
        let subnet = own.key.ipv4.ok_or_else(|| BackendError::Setup {
            backend: BACKEND,
            why: format!("our lease {} has no IPv4 subnet", own.key),
        })?;
        let public_ip = self.ctx.public_ip().ok_or_else(|| BackendError::Setup {
            backend: BACKEND,
            why: format!("interface {} has no IPv4 public IP", self.ctx.ext.name),
        })?;
        self.ensure_subnet_address(subnet).await?;
        // Connections named after an old subnet are stale now: the next pass unloads them.
        self.local = Some(Local { public_ip, subnet });
        Ok(())
    }

    async fn reconcile(&mut self, peers: &PeerSet) -> Result<ReconcileReport, BackendError> {
        let Some(local) = self.local else {
            return Ok(ReconcileReport::default());
        };
        self.ensure_subnet_address(local.subnet).await?;
        let in_charon = self.loaded_names().await?;
        let want = self.wanted(peers);
        let want_names: BTreeMap<String, Conn> =
            want.values().map(|c| (c.name(&local), c.clone())).collect();
        let mut report = ReconcileReport::default();
        let mut failed = Vec::new();

        for (name, conn) in &want_names {
            if in_charon.contains(name) {
                continue;
            }
            // We loaded it and charon lacks it: charon restarted (or someone unloaded it).
            let effect = if self.loaded.contains_key(name) {
                Effect::Repaired
            } else {
                Effect::Added
            };
            let result = self.load(&local, conn).await;
            record(
                &mut report,
                &mut failed,
                Some(conn.key),
                effect,
                format!("load-conn {name}"),
                result.as_ref().err(),
            );
            match result {
                Ok(()) => {
                    self.loaded.insert(name.clone(), conn.clone());
                }
                Err(e) if e.is_connection_lost() => {
                    self.charon = None;
                    break;
                }
                Err(_) => {}
            }
        }

        let stale: Vec<String> = in_charon
            .iter()
            .filter(|n| is_ours(n, &local) && !want_names.contains_key(*n))
            .cloned()
            .collect();
        for name in stale {
            if self.charon.is_none() {
                break;
            }
            let gone = self.loaded.get(&name).cloned();
            let peer_ip = gone.as_ref().map(|c| c.peer_ip);
            // A peer still wanted under another name keeps its shared key.
            let keep_key = peer_ip.is_some_and(|ip| want.values().any(|c| c.peer_ip == ip));
            let result = self
                .unload(&name, if keep_key { None } else { peer_ip })
                .await;
            record(
                &mut report,
                &mut failed,
                gone.map(|c| c.key),
                Effect::Removed,
                format!("unload-conn {name}"),
                result.as_ref().err(),
            );
            match result {
                Ok(()) => {
                    self.loaded.remove(&name);
                }
                Err(e) if e.is_connection_lost() => self.charon = None,
                Err(_) => {}
            }
        }
        self.loaded.retain(|n, _| want_names.contains_key(n));

        if failed.is_empty() {
            if report.added + report.removed + report.repaired > 0 {
                tracing::info!(
                    "{BACKEND}: {} connection(s) loaded, {} reloaded, {} unloaded",
                    report.added,
                    report.repaired,
                    report.removed
                );
            }
            Ok(report)
        } else {
            Err(BackendError::Setup {
                backend: BACKEND,
                why: format!(
                    "charon ({}): {} change(s) failed: {}",
                    self.socket.display(),
                    failed.len(),
                    failed.join("; ")
                ),
            })
        }
    }
}

/// Counts one change in the report and, when it failed, in `failed`.
fn record(
    report: &mut ReconcileReport,
    failed: &mut Vec<String>,
    peer: Option<SubnetKey>,
    effect: Effect,
    what: String,
    error: Option<&ViciError>,
) {
    if let Some(e) = error {
        failed.push(format!("{what}: {e}"));
    } else {
        match effect {
            Effect::Added => report.added += 1,
            Effect::Repaired => report.repaired += 1,
            Effect::Removed => report.removed += 1,
        }
    }
    report.changes.push(KernelChange {
        peer,
        effect,
        what,
        error: error.map(ToString::to_string),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use vici::Element;

    fn local() -> Local {
        Local {
            public_ip: "198.18.0.10".parse().unwrap(),
            subnet: "10.5.1.0/24".parse().unwrap(),
        }
    }

    fn conn() -> Conn {
        Conn {
            key: "10.5.2.0-24".parse().unwrap(),
            peer_ip: "198.18.0.11".parse().unwrap(),
            peer_subnet: "10.5.2.0/24".parse().unwrap(),
        }
    }

    fn section<'a>(m: &'a Message, key: &str) -> &'a Message {
        match m.get(key) {
            Some(Element::Section(s)) => s,
            other => panic!("{key} is not a section: {other:?}"),
        }
    }

    #[test]
    fn connection_and_child_are_named_as_flannel_names_them() {
        assert_eq!(
            conn().name(&local()),
            "198.18.0.10-10.5.1.0/24-10.5.2.0/24-198.18.0.11"
        );
        assert_eq!(conn().child_name(&local()), "10.5.1.0/24-10.5.2.0/24");
        assert!(is_ours(&conn().name(&local()), &local()));
        assert!(!is_ours("198.18.0.10-other", &local()));
        assert!(!is_ours(
            "198.18.0.100-10.5.1.0/24-10.5.2.0/24-198.18.0.11",
            &local()
        ));
    }

    #[test]
    fn a_connection_carries_flannels_settings() {
        let opts = IpsecOptions {
            psk: "k".repeat(96),
            udp_encap: true,
            esp_proposal: "aes256-sha256".into(),
        };
        let msg = load_conn_message(&opts, &local(), &conn());
        let ike = section(&msg, "198.18.0.10-10.5.1.0/24-10.5.2.0/24-198.18.0.11");
        assert_eq!(ike.strs("local_addrs").unwrap(), ["198.18.0.10"]);
        assert_eq!(ike.strs("remote_addrs").unwrap(), ["198.18.0.11"]);
        assert_eq!(ike.strs("proposals").unwrap(), [IKE_PROPOSAL]);
        assert_eq!(ike.str("version").as_deref(), Some("2"));
        assert_eq!(ike.str("encap").as_deref(), Some("yes"));
        assert_eq!(section(ike, "local").str("auth").as_deref(), Some("psk"));
        assert_eq!(section(ike, "remote").str("auth").as_deref(), Some("psk"));
        let child = section(section(ike, "children"), "10.5.1.0/24-10.5.2.0/24");
        assert_eq!(child.strs("local_ts").unwrap(), ["10.5.1.0/24"]);
        assert_eq!(child.strs("remote_ts").unwrap(), ["10.5.2.0/24"]);
        assert_eq!(child.strs("esp_proposals").unwrap(), ["aes256-sha256"]);
        assert_eq!(child.str("mode").as_deref(), Some("tunnel"));
    }

    #[test]
    fn the_shared_key_is_owned_by_one_public_ip() {
        let m = load_shared_message("secret", "198.18.0.11".parse().unwrap());
        assert_eq!(m.str("type").as_deref(), Some("IKE"));
        assert_eq!(m.str("data").as_deref(), Some("secret"));
        assert_eq!(m.strs("owners").unwrap(), ["198.18.0.11"]);
        assert_eq!(m.str("id").as_deref(), Some("flannel-198.18.0.11"));
    }
}
