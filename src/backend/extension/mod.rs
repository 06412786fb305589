//! `extension`: the data plane is the operator's commands, run as flannel runs them (see
//! [`words`] and [`run`]):
//! - `PreStartupCommand` before the lease is acquired; its output is published as the lease's
//!   `BackendData` (a JSON string). A failure stops the daemon, as in flannel.
//! - `PostStartupCommand` once our lease is known, with `NETWORK`, `SUBNET`, `IPV6SUBNET`,
//!   `PUBLIC_IP`, `PUBLIC_IPV6`. A failure is logged and retried with the lease (flannel exits).
//! - `SubnetAddCommand` / `SubnetRemoveCommand` when a peer lease of type `extension` appears,
//!   changes or goes, with the peer's `SUBNET` and `PUBLIC_IP` and its `BackendData` string on
//!   stdin.
//!
//! Peer commands never run on the event path: [`queue::CommandQueue`] runs them in the
//! background, in order per peer, a few at once, each killed at `CommandTimeout`; their outcome
//! is logged. Nothing reads back what the commands did, so a full pass only runs commands for
//! what changed in the leases since the last one.

mod queue;
mod run;
mod words;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value};

use super::common::{self, Effect};
use super::{Backend, BackendContext, BackendError, KernelChange, Publish, ReconcileReport};
use crate::subnet::{Lease, PeerSet, SubnetKey};
use queue::CommandQueue;
use run::Invocation;

const BACKEND: &str = "extension";
/// How long a command may run when `CommandTimeout` is not set.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The backend's options, flannel's four commands plus our deadline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Options {
    pre_startup: Option<String>,
    post_startup: Option<String>,
    subnet_add: Option<String>,
    subnet_remove: Option<String>,
    timeout: Duration,
}

impl Options {
    fn parse(backend: &Map<String, Value>) -> Result<Options, BackendError> {
        let timeout = common::uint_option(BACKEND, backend, "CommandTimeout", 24 * 3600)?;
        if timeout == Some(0) {
            return Err(BackendError::BadOption {
                backend: BACKEND,
                option: "CommandTimeout",
                value: "0".into(),
                why: "must be at least 1 (seconds)".into(),
            });
        }
        Ok(Options {
            pre_startup: command_option(backend, "PreStartupCommand")?,
            post_startup: command_option(backend, "PostStartupCommand")?,
            subnet_add: command_option(backend, "SubnetAddCommand")?,
            subnet_remove: command_option(backend, "SubnetRemoveCommand")?,
            timeout: timeout.map_or(DEFAULT_TIMEOUT, Duration::from_secs),
        })
    }
}

/// A command option: `None` when absent, `null` or empty (flannel skips an empty command); an
/// error when it is not a string or has only white space (flannel would crash on it).
fn command_option(
    backend: &Map<String, Value>,
    option: &'static str,
) -> Result<Option<String>, BackendError> {
    match common::lookup(backend, option) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if words::split(s).is_empty() => Err(BackendError::BadOption {
            backend: BACKEND,
            option,
            value: format!("{s:?}"),
            why: "has no words: give a program to run, or leave it empty".into(),
        }),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(BackendError::BadOption {
            backend: BACKEND,
            option,
            value: v.to_string(),
            why: "must be a string (a command line)".into(),
        }),
    }
}

/// What a peer's commands are run with: a change to it runs `SubnetAddCommand` again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerInput {
    /// `SUBNET`: the IPv4 subnet, as flannel prints it (`0.0.0.0/0` when the lease has none).
    subnet: String,
    /// `PUBLIC_IP` (`0.0.0.0` when the lease has none).
    public_ip: String,
    /// The `BackendData` string (empty when absent), for stdin.
    data: String,
}

impl PeerInput {
    /// The input of an `extension` lease; an error when its `BackendData` is not a string.
    fn of(lease: &Lease) -> Result<PeerInput, String> {
        let data = match lease.attrs.backend_data.as_deref() {
            None => String::new(),
            Some(raw) => match serde_json::from_str::<Value>(raw.get()) {
                // Go decodes `null` into a string as no change: empty.
                Ok(Value::Null) => String::new(),
                Ok(Value::String(s)) => s,
                _ => {
                    return Err(format!(
                        "BackendData {} is not a JSON string",
                        crate::subnet::lease::clip(raw.get())
                    ))
                }
            },
        };
        Ok(PeerInput {
            subnet: go_subnet(lease.key.ipv4),
            public_ip: lease
                .attrs
                .public_ip
                .unwrap_or(Ipv4Addr::UNSPECIFIED)
                .to_string(),
            data,
        })
    }

    fn vars(&self) -> Vec<(String, String)> {
        vec![
            ("SUBNET".into(), self.subnet.clone()),
            ("PUBLIC_IP".into(), self.public_ip.clone()),
        ]
    }
}

/// An IPv4 subnet as flannel's `ip.IP4Net` prints it, its zero value included.
fn go_subnet(net: Option<ipnetwork::Ipv4Network>) -> String {
    net.map_or_else(
        || "0.0.0.0/0".into(),
        |n| format!("{}/{}", n.ip(), n.prefix()),
    )
}

pub struct ExtensionBackend {
    ctx: BackendContext,
    opts: Options,
    queue: CommandQueue,
    /// The peers `SubnetAddCommand` was run for, with what it was run with.
    added: BTreeMap<SubnetKey, PeerInput>,
    /// Peers not handled, with the reason; logged when it changes.
    skipped: common::Skipped,
    /// Our lease the `PostStartupCommand` last succeeded for.
    started_for: Option<SubnetKey>,
}

impl ExtensionBackend {
    pub fn new(ctx: BackendContext) -> Result<Self, BackendError> {
        let opts = Options::parse(&ctx.config.backend)?;
        Ok(ExtensionBackend {
            queue: CommandQueue::new(opts.timeout),
            ctx,
            opts,
            added: BTreeMap::new(),
            skipped: common::Skipped::new(),
            started_for: None,
        })
    }

    /// Runs a startup command now (the daemon waits for it, up to the deadline).
    async fn run_startup(
        &self,
        option: &'static str,
        line: &str,
        vars: Vec<(String, String)>,
    ) -> Result<String, BackendError> {
        let inv = Invocation::new(option, line, vars, String::new())
            .expect("commands with no words are refused when parsed");
        let outcome = run::run(&inv, self.opts.timeout).await;
        if !outcome.succeeded() {
            return Err(BackendError::Setup {
                backend: BACKEND,
                why: format!("{option} `{line}`: {outcome}"),
            });
        }
        tracing::info!(
            "{BACKEND}: ran {option} `{line}`; output: {:?}",
            outcome.output
        );
        Ok(outcome.output)
    }

    /// The `extension` peers and what their commands get; the others go into `skipped`.
    fn wanted(&mut self, peers: &PeerSet) -> BTreeMap<SubnetKey, PeerInput> {
        let mut skipped = common::Skipped::new();
        let mut want = BTreeMap::new();
        for (key, lease) in peers {
            let kind = lease.attrs.effective_backend_type();
            if kind != BACKEND {
                skipped.insert(*key, format!("backend type {kind:?} is not {BACKEND}"));
                continue;
            }
            match PeerInput::of(lease) {
                Ok(input) => {
                    want.insert(*key, input);
                }
                Err(why) => {
                    skipped.insert(*key, why);
                }
            }
        }
        common::log_skipped(BACKEND, "", &mut self.skipped, skipped);
        want
    }

    /// Queues the command `option` for a peer; `None` when it is not configured.
    fn queue_command(
        &mut self,
        key: SubnetKey,
        option: &'static str,
        effect: Effect,
        input: &PeerInput,
    ) -> Option<KernelChange> {
        let line = match option {
            "SubnetAddCommand" => self.opts.subnet_add.as_deref(),
            _ => self.opts.subnet_remove.as_deref(),
        }?;
        let inv = Invocation::new(option, line, input.vars(), input.data.clone())
            .expect("commands with no words are refused when parsed");
        let what = format!("run {option} for {} via {}", input.subnet, input.public_ip);
        self.queue.submit(key, inv);
        Some(KernelChange {
            peer: Some(key),
            effect,
            what,
            error: None,
        })
    }
}

#[async_trait]
impl Backend for ExtensionBackend {
    async fn prepare(&mut self) -> Result<Publish, BackendError> {
        let backend_data = match self.opts.pre_startup.clone() {
            Some(line) => {
                let output = self
                    .run_startup("PreStartupCommand", &line, Vec::new())
                    .await?;
                Some(Value::String(output))
            }
            None => {
                tracing::info!("{BACKEND}: no PreStartupCommand configured");
                None
            }
        };
        Ok(Publish {
            backend_type: BACKEND.into(),
            backend_data,
            backend_v6_data: None,
            mtu: self.ctx.ext.mtu,
        })
    }

    async fn lease_acquired(&mut self, own: &Lease) -> Result<(), BackendError> {
        let Some(line) = self.opts.post_startup.clone() else {
            return Ok(());
        };
        if self.started_for == Some(own.key) {
            return Ok(());
        }
        let cfg = &self.ctx.config;
        let vars = vec![
            ("NETWORK".into(), go_subnet(cfg.v4.map(|f| f.network))),
            ("SUBNET".into(), go_subnet(own.key.ipv4)),
            (
                "IPV6SUBNET".into(),
                own.key
                    .ipv6
                    .map_or_else(|| "::/0".into(), |n| format!("{}/{}", n.ip(), n.prefix())),
            ),
            (
                "PUBLIC_IP".into(),
                self.ctx
                    .public_ip()
                    .unwrap_or(Ipv4Addr::UNSPECIFIED)
                    .to_string(),
            ),
            // Flannel prints its missing IPv6 address (a nil pointer) as `<nil>`.
            (
                "PUBLIC_IPV6".into(),
                self.ctx
                    .public_ipv6()
                    .map_or_else(|| "<nil>".into(), |a| a.to_string()),
            ),
        ];
        self.run_startup("PostStartupCommand", &line, vars).await?;
        self.started_for = Some(own.key);
        Ok(())
    }

    async fn reconcile(&mut self, peers: &PeerSet) -> Result<ReconcileReport, BackendError> {
        let want = self.wanted(peers);
        let mut report = ReconcileReport::default();
        let gone: Vec<(SubnetKey, PeerInput)> = self
            .added
            .iter()
            .filter(|(k, _)| !want.contains_key(k))
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (key, input) in gone {
            self.added.remove(&key);
            if let Some(c) = self.queue_command(key, "SubnetRemoveCommand", Effect::Removed, &input)
            {
                report.removed += 1;
                report.changes.push(c);
            }
        }
        for (key, input) in want {
            let effect = match self.added.get(&key) {
                Some(had) if *had == input => continue,
                Some(_) => Effect::Repaired,
                None => Effect::Added,
            };
            if let Some(c) = self.queue_command(key, "SubnetAddCommand", effect, &input) {
                match effect {
                    Effect::Added => report.added += 1,
                    _ => report.repaired += 1,
                }
                report.changes.push(c);
            }
            self.added.insert(key, input);
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts(v: Value) -> Result<Options, BackendError> {
        Options::parse(v.as_object().unwrap())
    }

    #[test]
    fn options_are_read_case_insensitively_with_a_default_deadline() {
        let o = opts(
            json!({"Type": "extension", "subnetaddcommand": "ip route add $SUBNET",
            "PreStartupCommand": "", "SubnetRemoveCommand": null}),
        )
        .unwrap();
        assert_eq!(o.subnet_add.as_deref(), Some("ip route add $SUBNET"));
        assert_eq!((o.pre_startup, o.subnet_remove), (None, None));
        assert_eq!(o.timeout, DEFAULT_TIMEOUT);
        let o = opts(json!({"CommandTimeout": 5})).unwrap();
        assert_eq!(o.timeout, Duration::from_secs(5));
    }

    #[test]
    fn bad_options_name_the_option_and_value() {
        for (v, option, value) in [
            (json!({"SubnetAddCommand": 7}), "SubnetAddCommand", "7"),
            (
                json!({"PostStartupCommand": " \t "}),
                "PostStartupCommand",
                "\" \\t \"",
            ),
            (json!({"CommandTimeout": 0}), "CommandTimeout", "0"),
            (json!({"CommandTimeout": "5s"}), "CommandTimeout", "\"5s\""),
        ] {
            let e = opts(v).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("backend extension: option {option} {value}:")),
                "{e}"
            );
        }
    }

    fn lease(v4: &str, public_ip: Option<&str>, data: Option<&str>) -> Lease {
        let mut attrs = json!({"BackendType": "extension"});
        if let Some(ip) = public_ip {
            attrs["PublicIP"] = json!(ip);
        }
        let mut raw = attrs.to_string();
        if let Some(d) = data {
            raw = format!("{},\"BackendData\":{d}}}", &raw[..raw.len() - 1]);
        }
        Lease {
            key: SubnetKey::v4(v4.parse().unwrap()),
            attrs: crate::subnet::LeaseAttrs::from_json("k", raw.as_bytes()).unwrap(),
            etcd_lease: Some(1),
            revision: 1,
            create_revision: 1,
        }
    }

    #[test]
    fn a_peer_gives_its_subnet_public_ip_and_backend_data_string() {
        let i =
            PeerInput::of(&lease("10.5.7.0/24", Some("198.18.0.3"), Some("\"mac x\""))).unwrap();
        assert_eq!(
            i,
            PeerInput {
                subnet: "10.5.7.0/24".into(),
                public_ip: "198.18.0.3".into(),
                data: "mac x".into()
            }
        );
        let i = PeerInput::of(&lease("10.5.7.0/24", None, Some("null"))).unwrap();
        assert_eq!((i.public_ip.as_str(), i.data.as_str()), ("0.0.0.0", ""));
        let e =
            PeerInput::of(&lease("10.5.7.0/24", None, Some("{\"VtepMAC\":\"x\"}"))).unwrap_err();
        assert!(e.contains("not a JSON string"), "{e}");
    }

    fn backend(options: Value) -> ExtensionBackend {
        let mut b = json!({"Type": "extension"});
        b.as_object_mut()
            .unwrap()
            .extend(options.as_object().unwrap().clone());
        let raw = json!({"Network": "10.5.0.0/16", "Backend": b}).to_string();
        let config = crate::config::NetworkConfig::parse(raw.as_bytes()).unwrap();
        let public = Some("198.18.0.1".parse().unwrap());
        let ext = crate::iface::ExternalInterface {
            name: "eth0".into(),
            index: 2,
            iface_addr: public,
            iface_v6_addr: None,
            public_ip: public,
            public_ipv6: None,
            mtu: 1500,
        };
        ExtensionBackend::new(BackendContext::new(config, ext)).unwrap()
    }

    #[tokio::test]
    async fn pre_startup_output_is_published_as_a_json_string_and_a_failure_stops_the_start() {
        let mut b = backend(json!({"PreStartupCommand": "/bin/echo  vtep  $HOME"}));
        let p = b.prepare().await.unwrap();
        let home = std::env::var("HOME").unwrap_or_default();
        assert_eq!(
            p.backend_data,
            Some(Value::String(format!("vtep {home}").trim().to_string()))
        );
        assert_eq!((p.backend_type.as_str(), p.mtu), ("extension", 1500));
        assert_eq!(
            backend(json!({})).prepare().await.unwrap().backend_data,
            None
        );

        let mut b = backend(json!({"PreStartupCommand": "/bin/ls /nonexistent-flannel-dir"}));
        let e = b.prepare().await.unwrap_err().to_string();
        assert!(
            e.starts_with(
                "backend extension: PreStartupCommand `/bin/ls /nonexistent-flannel-dir`: \
                 exit status: 2; output: \""
            ) && e.contains("No such file"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn commands_are_queued_for_what_changed_in_the_leases() {
        let mut b =
            backend(json!({"SubnetAddCommand": "/bin/true", "SubnetRemoveCommand": "/bin/true"}));
        let set =
            |leases: &[Lease]| -> PeerSet { leases.iter().map(|l| (l.key, l.clone())).collect() };
        let a = lease("10.5.1.0/24", Some("198.18.0.2"), Some("\"a\""));
        let mut other = lease("10.5.2.0/24", Some("198.18.0.3"), None);
        other.attrs.backend_type = "vxlan".into();
        let counts = |r: ReconcileReport| (r.added, r.repaired, r.removed);

        assert_eq!(
            counts(
                b.reconcile(&set(&[a.clone(), other.clone()]))
                    .await
                    .unwrap()
            ),
            (1, 0, 0)
        );
        // A pass with nothing changed (a renewal) runs nothing.
        assert_eq!(
            counts(
                b.reconcile(&set(&[a.clone(), other.clone()]))
                    .await
                    .unwrap()
            ),
            (0, 0, 0)
        );
        // Changed BackendData: the add command again.
        let a2 = lease("10.5.1.0/24", Some("198.18.0.2"), Some("\"b\""));
        let r = b.reconcile(&set(&[a2])).await.unwrap();
        assert_eq!(counts(r.clone()), (0, 1, 0));
        assert_eq!(
            r.changes[0].what,
            "run SubnetAddCommand for 10.5.1.0/24 via 198.18.0.2"
        );
        // Gone: the remove command.
        assert_eq!(
            counts(b.reconcile(&PeerSet::new()).await.unwrap()),
            (0, 0, 1)
        );
        // Without a remove command configured, nothing is queued for a lease that goes.
        let mut b = backend(json!({"SubnetAddCommand": "/bin/true"}));
        b.reconcile(&set(&[a])).await.unwrap();
        assert_eq!(
            counts(b.reconcile(&PeerSet::new()).await.unwrap()),
            (0, 0, 0)
        );
    }
}
