//! The etcd v3 registry: connection (TLS, auth), the network config, and the lease operations
//! flannel performs (create-if-absent, replace-if-unchanged, renew, list, watch).

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};

use super::lease::{Lease, LeaseAttrs, LeaseError, SubnetKey};

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("--etcd-endpoints: no endpoint given")]
    NoEndpoints,
    #[error("--etcd-endpoints {0:?}: must start with http:// or https://")]
    BadScheme(String),
    #[error(
        "--etcd-endpoints {0:?}: plain http:// while --etcd-cafile/--etcd-certfile/--etcd-keyfile \
         are given; use https:// so the credentials are not sent in the clear"
    )]
    PlainWithTls(String),
    #[error("--etcd-certfile and --etcd-keyfile go together (only {0} was given)")]
    HalfIdentity(&'static str),
    #[error("--etcd-username and --etcd-password go together (only {0} was given)")]
    HalfAuth(&'static str),
    #[error("{flag} {path}: {err}")]
    File {
        flag: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("etcd: {}", with_causes(.0))]
    Client(#[from] etcd_client::Error),
    #[error("etcd: {0}")]
    Other(String),
}

impl EtcdError {
    /// Errors that retrying cannot fix: the operator must change a flag or a file.
    pub fn is_fatal(&self) -> bool {
        match self {
            EtcdError::Client(e) => {
                let s = e.to_string();
                s.contains("invalid") && s.contains("uri")
                    || s.contains("authentication failed")
                    || s.contains("permission denied")
            }
            EtcdError::Other(_) => false,
            _ => true,
        }
    }
}

/// An error and its causes on one line: transport errors hide the useful part (an unknown
/// certificate issuer, a refused connection) in their sources.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// How to reach etcd: flannel's `--etcd-*` flags.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub cafile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// A connected registry under one network prefix. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    client: Client,
    prefix: String,
}

/// How often the members behind `--etcd-endpoints` are probed.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How long a member may take to answer a probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Keeps the client's balanced channel to the members that answer: each member is probed on
/// its own connection (a `Status` call that must name a leader, so a member cut off from its
/// quorum counts as down too); down members are taken out of the balancer and put back when
/// they answer again. When none answers, all stay in, so the client keeps trying every one.
struct EndpointKeeper {
    client: Client,
    probes: Vec<(String, Option<Client>)>,
    options: ConnectOptions,
    in_use: std::collections::BTreeSet<String>,
}

impl EndpointKeeper {
    fn new(client: Client, endpoints: &[String], options: ConnectOptions) -> Self {
        EndpointKeeper {
            client,
            probes: endpoints.iter().map(|e| (e.clone(), None)).collect(),
            options,
            in_use: endpoints.iter().cloned().collect(),
        }
    }

    async fn healthy(endpoint: &str, probe: &mut Option<Client>, options: &ConnectOptions) -> bool {
        let answer = tokio::time::timeout(PROBE_TIMEOUT, async {
            if probe.is_none() {
                *probe = Some(Client::connect([endpoint], Some(options.clone())).await?);
            }
            let c = probe.as_mut().expect("just set");
            c.status().await
        })
        .await;
        match answer {
            Ok(Ok(status)) => status.leader() != 0,
            Ok(Err(_)) | Err(_) => {
                *probe = None;
                false
            }
        }
    }

    async fn probe_once(&mut self) {
        let options = &self.options;
        let checks = self.probes.iter_mut().map(|(ep, probe)| async move {
            (ep.clone(), Self::healthy(ep, probe, options).await)
        });
        let results = futures::future::join_all(checks).await;
        let healthy: std::collections::BTreeSet<String> = results
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(ep, _)| ep.clone())
            .collect();
        let want = if healthy.is_empty() {
            self.probes.iter().map(|(ep, _)| ep.clone()).collect()
        } else {
            healthy
        };
        for ep in want.difference(&self.in_use) {
            if self.client.add_endpoint(ep).await.is_ok() {
                tracing::info!("etcd member {ep} answers again: back in use");
            }
        }
        for ep in self.in_use.difference(&want) {
            if self.client.remove_endpoint(ep).await.is_ok() {
                tracing::warn!("etcd member {ep} does not answer: not used until it does");
            }
        }
        self.in_use = want;
    }

    async fn run(mut self) {
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            self.probe_once().await;
        }
    }
}

/// Every lease under `<prefix>/subnets/` at one revision, with the entries that did not parse.
#[derive(Debug, Default)]
pub struct Listing {
    pub leases: Vec<Lease>,
    pub malformed: Vec<(String, i64, LeaseError)>,
    pub revision: i64,
}

fn read_file(flag: &'static str, path: &PathBuf) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|err| EtcdError::File {
        flag,
        path: path.clone(),
        err,
    })
}

impl EtcdOptions {
    fn uses_tls(&self) -> bool {
        self.cafile.is_some() || self.certfile.is_some() || self.keyfile.is_some()
    }

    /// Checks the flags and builds the client options; reads the TLS files.
    fn connect_options(&self) -> Result<ConnectOptions, EtcdError> {
        if self.endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        for e in &self.endpoints {
            let https = e.starts_with("https://");
            if !https && !e.starts_with("http://") {
                return Err(EtcdError::BadScheme(e.clone()));
            }
            if self.uses_tls() && !https {
                return Err(EtcdError::PlainWithTls(e.clone()));
            }
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        match (&self.username, &self.password) {
            (Some(u), Some(p)) => opts = opts.with_user(u.clone(), p.clone()),
            (Some(_), None) => return Err(EtcdError::HalfAuth("--etcd-username")),
            (None, Some(_)) => return Err(EtcdError::HalfAuth("--etcd-password")),
            (None, None) => {}
        }
        if self.uses_tls() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.cafile {
                tls = tls.ca_certificate(Certificate::from_pem(read_file("--etcd-cafile", ca)?));
            }
            match (&self.certfile, &self.keyfile) {
                (Some(c), Some(k)) => {
                    let cert = read_file("--etcd-certfile", c)?;
                    let key = read_file("--etcd-keyfile", k)?;
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                (Some(_), None) => return Err(EtcdError::HalfIdentity("--etcd-certfile")),
                (None, Some(_)) => return Err(EtcdError::HalfIdentity("--etcd-keyfile")),
                (None, None) => {}
            }
            opts = opts.with_tls(tls);
        }
        Ok(opts)
    }
}

impl Registry {
    /// Connects (lazily for plain connections: a down etcd is found by the first request).
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, EtcdError> {
        let connect = opts.connect_options()?;
        let client = Client::connect(&opts.endpoints, Some(connect.clone())).await?;
        if opts.endpoints.len() > 1 {
            // The balanced channel keeps dispatching to a member that is down (a refused
            // connection makes it "ready" at once, with no load), so without this a request
            // fails about as often as it meets the dead member, and a client that starts while
            // one is down may fail every time. Only members that answer stay in the balancer.
            let mut keeper = EndpointKeeper::new(client.clone(), &opts.endpoints, connect);
            keeper.probe_once().await;
            tokio::spawn(keeper.run());
        }
        Ok(Registry {
            client,
            prefix: opts.prefix.trim_end_matches('/').to_string(),
        })
    }

    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    pub fn lease_key(&self, key: &SubnetKey) -> String {
        format!("{}{}", self.subnets_prefix(), key)
    }

    /// Checks that etcd answers (a status call that needs no key permissions).
    pub async fn ping(&self) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        c.get(self.config_key(), Some(GetOptions::new().with_count_only()))
            .await?;
        Ok(())
    }

    /// The config value and the revision it was read at.
    pub async fn get_config(&self) -> Result<(Option<Vec<u8>>, i64), EtcdError> {
        let mut c = self.client.clone();
        let resp = c.get(self.config_key(), None).await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        Ok((resp.kvs().first().map(|kv| kv.value().to_vec()), rev))
    }

    pub async fn watch_config(&self, from_revision: i64) -> Result<WatchStream, EtcdError> {
        let mut c = self.client.clone();
        let opts = WatchOptions::new().with_start_revision(from_revision);
        Ok(c.watch(self.config_key(), Some(opts)).await?)
    }

    /// Parses one key/value under the subnets prefix.
    pub fn parse_kv(&self, kv: &KeyValue) -> Result<Lease, LeaseError> {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let suffix =
            key.strip_prefix(&self.subnets_prefix())
                .ok_or_else(|| LeaseError::BadKey {
                    key: key.clone(),
                    why: "outside the subnets prefix".into(),
                })?;
        let subnet: SubnetKey = suffix.parse()?;
        let attrs = LeaseAttrs::from_json(&key, kv.value())?;
        Ok(Lease {
            key: subnet,
            attrs,
            etcd_lease: (kv.lease() != 0).then_some(kv.lease()),
            revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
        })
    }

    /// Parses the subnet key of a deleted entry.
    pub fn parse_deleted_key(&self, kv: &KeyValue) -> Option<SubnetKey> {
        let key = String::from_utf8_lossy(kv.key());
        key.strip_prefix(&self.subnets_prefix())?.parse().ok()
    }

    pub async fn list_subnets(&self) -> Result<Listing, EtcdError> {
        let mut c = self.client.clone();
        let resp = c
            .get(self.subnets_prefix(), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut listing = Listing {
            revision: resp.header().map(|h| h.revision()).unwrap_or_default(),
            ..Default::default()
        };
        for kv in resp.kvs() {
            match self.parse_kv(kv) {
                Ok(lease) => listing.leases.push(lease),
                Err(e) => listing.malformed.push((
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.mod_revision(),
                    e,
                )),
            }
        }
        Ok(listing)
    }

    pub async fn watch_subnets(&self, from_revision: i64) -> Result<WatchStream, EtcdError> {
        let mut c = self.client.clone();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from_revision)
            .with_progress_notify();
        Ok(c.watch(self.subnets_prefix(), Some(opts)).await?)
    }

    /// Grants an etcd lease of `ttl`; returns its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let mut c = self.client.clone();
        let secs = ttl.as_secs().max(1) as i64;
        Ok(c.lease_grant(secs, None).await?.id())
    }

    /// Revokes an etcd lease, deleting the keys attached to it.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        c.lease_revoke(id).await?;
        Ok(())
    }

    /// Refreshes an etcd lease to its full TTL; returns the TTL left (≤ 0: it had expired).
    pub async fn keep_alive_once(&self, id: i64) -> Result<i64, EtcdError> {
        let mut c = self.client.clone();
        // The client sends a first keep-alive itself and turns a TTL of 0 (the lease expired
        // or was revoked) into this error; that is an answer, not a failure.
        let (mut keeper, mut stream) = match c.lease_keep_alive(id).await {
            Ok(pair) => pair,
            Err(etcd_client::Error::LeaseKeepAliveError(msg)) if msg == "lease not found" => {
                return Ok(0)
            }
            Err(e) => return Err(e.into()),
        };
        keeper.keep_alive().await?;
        let resp = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .map_err(|_| EtcdError::Other("keep-alive of the subnet lease timed out".into()))??
            .ok_or_else(|| EtcdError::Other("keep-alive stream closed".into()))?;
        Ok(resp.ttl())
    }

    /// Writes `attrs` at `key` only if the key does not exist; returns the lease read back, or
    /// `None` when someone else holds the key.
    pub async fn create_if_absent(
        &self,
        key: SubnetKey,
        attrs: &LeaseAttrs,
        etcd_lease: Option<i64>,
    ) -> Result<Option<Lease>, EtcdError> {
        let k = self.lease_key(&key);
        let cmp = Compare::create_revision(k.clone(), CompareOp::Equal, 0);
        self.put_if(key, cmp, attrs, etcd_lease).await
    }

    /// Writes `attrs` at `key` only if the key is still at `mod_revision` (our re-use of a lease
    /// we read); `None` when it changed under us.
    pub async fn replace_if_unchanged(
        &self,
        key: SubnetKey,
        mod_revision: i64,
        attrs: &LeaseAttrs,
        etcd_lease: Option<i64>,
    ) -> Result<Option<Lease>, EtcdError> {
        let k = self.lease_key(&key);
        let cmp = Compare::mod_revision(k, CompareOp::Equal, mod_revision);
        self.put_if(key, cmp, attrs, etcd_lease).await
    }

    async fn put_if(
        &self,
        key: SubnetKey,
        cmp: Compare,
        attrs: &LeaseAttrs,
        etcd_lease: Option<i64>,
    ) -> Result<Option<Lease>, EtcdError> {
        let k = self.lease_key(&key);
        let put_opts = etcd_lease.map(|id| PutOptions::new().with_lease(id));
        let txn = Txn::new().when([cmp]).and_then([
            TxnOp::put(k.clone(), attrs.to_json(), put_opts),
            TxnOp::get(k, None),
        ]);
        let mut c = self.client.clone();
        let resp = c.txn(txn).await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        // The key's create revision decides which of two overlapping leases wins; a replaced
        // key keeps the one it had, so read it back in the same transaction.
        let create_revision = resp
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.create_revision()),
                _ => None,
            })
            .unwrap_or(revision);
        Ok(Some(Lease {
            key,
            attrs: attrs.clone(),
            etcd_lease,
            revision,
            create_revision,
        }))
    }

    /// Whether `lease` (just created) is the oldest key holding any of its subnets. Two dual-stack
    /// keys can share an IPv4 subnet while differing in IPv6 (or the reverse), which the
    /// create-if-absent check on the key cannot see; of such keys the first created wins.
    pub async fn holds_alone(&self, lease: &Lease) -> Result<bool, EtcdError> {
        let mut c = self.client.clone();
        let resp = c
            .get(
                self.subnets_prefix(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        let shares = |k: &SubnetKey| {
            (k.ipv4.is_some() && k.ipv4 == lease.key.ipv4)
                || (k.ipv6.is_some() && k.ipv6 == lease.key.ipv6)
        };
        Ok(!resp.kvs().iter().any(|kv| {
            self.parse_deleted_key(kv).is_some_and(|k| {
                k != lease.key && shares(&k) && kv.create_revision() < lease.revision
            })
        }))
    }

    /// Deletes our key if nobody changed it since `lease` was written.
    pub async fn delete_if_unchanged(&self, lease: &Lease) -> Result<(), EtcdError> {
        let k = self.lease_key(&lease.key);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                k.clone(),
                CompareOp::Equal,
                lease.revision,
            )])
            .and_then([TxnOp::delete(k, None)]);
        let mut c = self.client.clone();
        c.txn(txn).await?;
        Ok(())
    }

    /// Direct client access for tools and tests (etcdctl-like operations).
    pub fn client(&self) -> Client {
        self.client.clone()
    }
}
