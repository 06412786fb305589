//! The etcd v3 registry: connection (TLS, auth), the network config, and the lease operations
//! flannel performs (create-if-absent, replace-if-unchanged, renew, list, watch).

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchResponse, WatchStream,
};

use super::lease::{Lease, LeaseAttrs, LeaseError, SubnetKey};
use crate::error_chain::Chain;

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
    #[error(
        "--etcd-endpoints {0:?}: plain http:// with --etcd-password would send the password in \
         the clear; use https://, or pass --etcd-insecure-password to accept that"
    )]
    PasswordInClear(String),
    #[error("{flag} {path}: {err}")]
    File {
        flag: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("etcd: {}", Chain(.0))]
    Client(#[from] etcd_client::Error),
    #[error("etcd: {0}")]
    Other(String),
}

impl EtcdError {
    /// Errors that retrying cannot fix: the operator must change a flag or a file.
    pub fn is_fatal(&self) -> bool {
        match self {
            EtcdError::Client(e) => client_error_is_fatal(e),
            EtcdError::Other(_) => false,
            _ => true,
        }
    }
}

/// Decided from the error's kind and gRPC code, never its text. etcd answers a wrong user or
/// password with `InvalidArgument`, a role without access with `PermissionDenied`; an expired
/// token (`Unauthenticated`) never gets here, since [`Registry::call`] authenticates again.
/// Everything else (unreachable member, timeout, leader change) may pass with time.
fn client_error_is_fatal(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    use tonic::Code;
    match e {
        E::InvalidUri(_) | E::InvalidArgs(_) => true,
        E::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument
        ),
        _ => false,
    }
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
    pub password: Option<Password>,
    /// Accept sending the password over plain http:// (`--etcd-insecure-password`).
    pub insecure_password: bool,
}

/// The etcd password: its `Debug` and `Display` never show it, so no log line or debug dump of
/// the options can leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(secret: impl Into<String>) -> Self {
        Password(secret.into())
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FromStr for Password {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Password(s.to_string()))
    }
}

/// A connected registry under one network prefix. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    /// Every clone of a client shares its auth token, so a token refreshed through one (see
    /// [`Registry::call`]) is the one all of them send.
    client: Client,
    prefix: String,
    /// Whether we authenticate with a password, so that a refused token can be renewed.
    authenticates: bool,
    /// The largest answer taken from etcd.
    max_message: usize,
}

/// The largest answer accepted from etcd (the client's default is 4 MiB). Listings come in
/// pages, so this only has to hold one page, or one watch answer, which etcd may fill with the
/// events of many revisions at once; a larger one breaks the watch, and the re-list that
/// follows moves past it.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Keys asked for per page of a listing (10,000 flannel leases are 20 pages of ~100 kB).
const PAGE_KEYS: i64 = 500;
/// Listings restarted when etcd compacts the revision a paged listing reads at.
const LIST_ATTEMPTS: usize = 3;

/// Whether etcd refused the auth token a request carried: it expired (`--auth-token-ttl`), or
/// etcd restarted and forgot every simple token. Authenticating again fixes both.
fn token_refused(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unauthenticated || s.message().contains("invalid auth token")
        }
        _ => false,
    }
}

/// Whether etcd cancelled a new watch for its token: etcd 3.4 names the expired token, older
/// releases say "permission denied" (which a token that was never allowed gets too: the one
/// retry then fails the same way).
fn cancelled_for_auth(reason: &str) -> bool {
    reason.contains("invalid auth token") || reason.contains("permission denied")
}

/// Whether a range answer was too large for the client to take.
fn answer_too_large(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::OutOfRange && s.message().contains("too large"))
}

/// Whether a read at a fixed revision failed because etcd compacted that revision.
fn revision_compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("compacted"))
}

/// The end of the range of keys starting with `prefix` (etcd's "prefix end").
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
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
    /// Where each probe's answers are shown (`/v1/status`).
    board: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl EndpointKeeper {
    fn new(client: Client, endpoints: &[String], options: ConnectOptions) -> Self {
        EndpointKeeper {
            client,
            probes: endpoints.iter().map(|e| (e.clone(), None)).collect(),
            options,
            in_use: endpoints.iter().cloned().collect(),
            board: None,
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
        if let Some(metrics) = &self.board {
            metrics.status.set_endpoint_answers(&results);
        }
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

    fn any_https(&self) -> bool {
        self.endpoints.iter().any(|e| e.starts_with("https://"))
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
            if self.password.is_some() && !https && !self.insecure_password {
                return Err(EtcdError::PasswordInClear(e.clone()));
            }
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        match (&self.username, &self.password) {
            (Some(u), Some(p)) => opts = opts.with_user(u.clone(), p.expose()),
            (Some(_), None) => return Err(EtcdError::HalfAuth("--etcd-username")),
            (None, Some(_)) => return Err(EtcdError::HalfAuth("--etcd-password")),
            (None, None) => {}
        }
        if self.uses_tls() || self.any_https() {
            let mut tls = TlsOptions::new();
            tls = match &self.cafile {
                Some(ca) => {
                    tls.ca_certificate(Certificate::from_pem(read_file("--etcd-cafile", ca)?))
                }
                // As flannel (Go's system pool): the machine's CA store, which honours
                // SSL_CERT_FILE and SSL_CERT_DIR. Without this every certificate is unknown.
                None => tls.with_native_roots(),
            };
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
        Self::connect_reporting(opts, None).await
    }

    /// Connects; with `metrics`, the member probes' answers go to its status board.
    pub async fn connect_reporting(
        opts: &EtcdOptions,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    ) -> Result<Self, EtcdError> {
        let connect = opts.connect_options()?;
        let client = Client::connect(&opts.endpoints, Some(connect.clone())).await?;
        if opts.endpoints.len() > 1 {
            // The balanced channel keeps dispatching to a member that is down (a refused
            // connection makes it "ready" at once, with no load), so without this a request
            // fails about as often as it meets the dead member, and a client that starts while
            // one is down may fail every time. Only members that answer stay in the balancer.
            let mut keeper = EndpointKeeper::new(client.clone(), &opts.endpoints, connect);
            keeper.board = metrics;
            keeper.probe_once().await;
            tokio::spawn(keeper.run());
        }
        Ok(Registry {
            client,
            prefix: opts.prefix.trim_end_matches('/').to_string(),
            authenticates: opts.password.is_some(),
            max_message: MAX_MESSAGE,
        })
    }

    /// The same registry taking answers of at most `bytes` (default [`MAX_MESSAGE`]); listings
    /// then come in smaller pages.
    pub fn with_max_message(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }

    /// Runs `op` on a client; when etcd refused its auth token, authenticates again and runs
    /// it once more. Every request goes through here, so no number of token expiries or etcd
    /// restarts leaves the daemon stuck with a dead token.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        match op(self.client.clone()).await {
            Err(e) if self.authenticates && token_refused(&e) => {
                self.reauthenticate().await?;
                Ok(op(self.client.clone()).await?)
            }
            result => Ok(result?),
        }
    }

    async fn reauthenticate(&self) -> Result<(), EtcdError> {
        tracing::info!(
            "etcd refused our auth token (expired, or etcd restarted): authenticating again"
        );
        self.client.refresh_token().await?;
        Ok(())
    }

    /// Opens a watch and waits for etcd to confirm it. Returns the stream and etcd's first
    /// answer (the creation, or a cancel). A watch opened with an expired token is not refused
    /// as a request but cancelled in its first answer: authenticate again and retry once.
    async fn open_watch(
        &self,
        key: String,
        opts: WatchOptions,
    ) -> Result<(WatchStream, WatchResponse), EtcdError> {
        let mut retried = false;
        loop {
            let (stream, first) = self
                .call(|c| {
                    let (key, opts) = (key.clone(), opts.clone());
                    let limit = self.max_message;
                    async move {
                        let mut w = c.watch_client().max_decoding_message_size(limit);
                        let mut stream = w.watch(key, Some(opts)).await?;
                        let first = stream.message().await?;
                        Ok((stream, first))
                    }
                })
                .await?;
            let first =
                first.ok_or_else(|| EtcdError::Other("watch stream ended at creation".into()))?;
            let denied = first.canceled() && cancelled_for_auth(first.cancel_reason());
            if denied && self.authenticates && !retried {
                retried = true;
                self.reauthenticate().await?;
                continue;
            }
            return Ok((stream, first));
        }
    }

    /// Reads every key in `[prefix, prefix end)` in pages, all at the revision of the first
    /// page, so no answer grows past the message limit however many (or however large) the
    /// entries are; returns the entries and that revision. A page still too large is asked
    /// for again with fewer keys.
    async fn range_paged(
        &self,
        prefix: &str,
        keys_only: bool,
    ) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let end = prefix_end(prefix.as_bytes());
        let mut attempts = 0;
        'listing: loop {
            attempts += 1;
            let mut from = prefix.as_bytes().to_vec();
            let mut revision = 0;
            let mut limit = PAGE_KEYS;
            let mut entries = Vec::new();
            loop {
                let mut opts = GetOptions::new().with_range(end.clone()).with_limit(limit);
                if keys_only {
                    opts = opts.with_keys_only();
                }
                if revision > 0 {
                    opts = opts.with_revision(revision);
                }
                let page = self
                    .call(|c| {
                        let (from, opts) = (from.clone(), opts.clone());
                        let max_message = self.max_message;
                        async move {
                            let mut kv = c.kv_client().max_decoding_message_size(max_message);
                            kv.get(from, Some(opts)).await
                        }
                    })
                    .await;
                let mut resp = match page {
                    Ok(resp) => resp,
                    Err(EtcdError::Client(e)) if answer_too_large(&e) && limit > 1 => {
                        limit = (limit / 8).max(1);
                        continue;
                    }
                    Err(EtcdError::Client(e))
                        if revision_compacted(&e) && attempts < LIST_ATTEMPTS =>
                    {
                        // The pages read so far are of a revision etcd no longer serves: the
                        // rest could not match them, so start over at the current one.
                        tracing::info!(
                            "revision {revision} compacted while listing: listing again"
                        );
                        continue 'listing;
                    }
                    Err(e) => return Err(e),
                };
                if revision == 0 {
                    revision = resp.header().map(|h| h.revision()).unwrap_or_default();
                }
                let more = resp.more();
                entries.extend(resp.take_kvs());
                match entries.last() {
                    Some(last) if more => {
                        from = last.key().to_vec();
                        from.push(0);
                        limit = (limit * 2).min(PAGE_KEYS);
                    }
                    _ => return Ok((entries, revision)),
                }
            }
        }
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
        let key = self.config_key();
        self.call(|mut c| {
            let key = key.clone();
            async move { c.get(key, Some(GetOptions::new().with_count_only())).await }
        })
        .await?;
        Ok(())
    }

    /// The config value and the revision it was read at.
    pub async fn get_config(&self) -> Result<(Option<Vec<u8>>, i64), EtcdError> {
        let key = self.config_key();
        let resp = self
            .call(|mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        Ok((resp.kvs().first().map(|kv| kv.value().to_vec()), rev))
    }

    /// Watches the config key; the stream and etcd's first answer (see [`Self::watch_subnets`]).
    pub async fn watch_config(
        &self,
        from_revision: i64,
    ) -> Result<(WatchStream, WatchResponse), EtcdError> {
        let opts = WatchOptions::new().with_start_revision(from_revision);
        self.open_watch(self.config_key(), opts).await
    }

    /// Parses one key/value under the subnets prefix.
    pub fn parse_kv(&self, kv: &KeyValue) -> Result<Lease, LeaseError> {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let suffix =
            key.strip_prefix(&self.subnets_prefix())
                .ok_or_else(|| LeaseError::BadKey {
                    key: super::lease::clip(&key),
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
        let (entries, revision) = self.range_paged(&self.subnets_prefix(), false).await?;
        let mut listing = Listing {
            revision,
            ..Default::default()
        };
        for kv in &entries {
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

    /// Watches every lease from `from_revision`. Returns the stream and etcd's first answer,
    /// which the caller handles like any other (it may already report a compaction).
    pub async fn watch_subnets(
        &self,
        from_revision: i64,
    ) -> Result<(WatchStream, WatchResponse), EtcdError> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from_revision)
            .with_progress_notify();
        self.open_watch(self.subnets_prefix(), opts).await
    }

    /// Grants an etcd lease of `ttl`; returns its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self
            .call(|mut c| async move { c.lease_grant(secs, None).await })
            .await?;
        Ok(resp.id())
    }

    /// Revokes an etcd lease, deleting the keys attached to it.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call(|mut c| async move { c.lease_revoke(id).await })
            .await?;
        Ok(())
    }

    /// Refreshes an etcd lease to its full TTL; returns the TTL left (≤ 0: it had expired).
    pub async fn keep_alive_once(&self, id: i64) -> Result<i64, EtcdError> {
        self.call(|mut c| async move {
            // The client sends a first keep-alive itself and turns a TTL of 0 (the lease
            // expired or was revoked) into this error; that is an answer, not a failure.
            let (mut keeper, mut stream) = match c.lease_keep_alive(id).await {
                Ok(pair) => pair,
                Err(etcd_client::Error::LeaseKeepAliveError(msg)) if msg == "lease not found" => {
                    return Ok(0)
                }
                Err(e) => return Err(e),
            };
            keeper.keep_alive().await?;
            let resp = tokio::time::timeout(Duration::from_secs(5), stream.message())
                .await
                .map_err(|_| {
                    etcd_client::Error::LeaseKeepAliveError(
                        "keep-alive of the subnet lease timed out".into(),
                    )
                })??
                .ok_or_else(|| {
                    etcd_client::Error::LeaseKeepAliveError("keep-alive stream closed".into())
                })?;
            Ok(resp.ttl())
        })
        .await
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
        let resp = self
            .call(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
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
        let shares = |k: &SubnetKey| {
            (k.ipv4.is_some() && k.ipv4 == lease.key.ipv4)
                || (k.ipv6.is_some() && k.ipv6 == lease.key.ipv6)
        };
        let (keys, _) = self.range_paged(&self.subnets_prefix(), true).await?;
        Ok(!keys.iter().any(|kv| {
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
        self.call(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await?;
        Ok(())
    }

    /// Direct client access for tools and tests (etcdctl-like operations).
    pub fn client(&self) -> Client {
        self.client.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, message: &str) -> EtcdError {
        EtcdError::Client(etcd_client::Error::GRpcStatus(tonic::Status::new(
            code, message,
        )))
    }

    #[test]
    fn refusals_of_our_credentials_are_fatal() {
        use tonic::Code;
        let wrong_password = status(
            Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password",
        );
        assert!(wrong_password.is_fatal());
        assert!(status(Code::PermissionDenied, "etcdserver: permission denied").is_fatal());
        assert!(status(Code::Unauthenticated, "etcdserver: user name not found").is_fatal());
        // The code decides, not the wording: a reworded message is still fatal.
        assert!(status(Code::PermissionDenied, "access refused").is_fatal());
        let bad_uri = "http://[::1"
            .parse::<tonic::codegen::http::Uri>()
            .unwrap_err();
        assert!(EtcdError::Client(etcd_client::Error::InvalidUri(bad_uri)).is_fatal());
    }

    #[test]
    fn an_unreachable_or_slow_etcd_is_retried() {
        use tonic::Code;
        assert!(!status(Code::Unavailable, "connection refused").is_fatal());
        assert!(!status(Code::DeadlineExceeded, "context deadline exceeded").is_fatal());
        // Text that used to look fatal does not make a transient code fatal.
        assert!(!status(Code::Unavailable, "permission denied by proxy").is_fatal());
        assert!(!status(Code::Unknown, "etcdserver: leader changed").is_fatal());
        assert!(!EtcdError::Other("watch closed".into()).is_fatal());
    }

    #[test]
    fn an_expired_token_is_refreshed_not_fatal() {
        let expired = etcd_client::Error::GRpcStatus(tonic::Status::new(
            tonic::Code::Unauthenticated,
            "etcdserver: invalid auth token",
        ));
        // Registry::call authenticates again on this error instead of returning it.
        assert!(token_refused(&expired));
    }

    fn with_password(endpoint: &str, insecure_password: bool) -> EtcdOptions {
        EtcdOptions {
            endpoints: vec![endpoint.into()],
            prefix: "/coreos.com/network".into(),
            username: Some("flannel".into()),
            password: Some(Password::new("s3cret-pw")),
            insecure_password,
            ..Default::default()
        }
    }

    #[test]
    fn password_over_plain_http_needs_the_insecure_flag() {
        let err = with_password("http://127.0.0.1:2379", false)
            .connect_options()
            .unwrap_err();
        assert!(err.is_fatal());
        let msg = err.to_string();
        assert!(msg.contains("--etcd-insecure-password"), "{msg}");
        assert!(msg.contains("http://127.0.0.1:2379"), "{msg}");
        assert!(with_password("http://127.0.0.1:2379", true)
            .connect_options()
            .is_ok());
        assert!(with_password("https://127.0.0.1:2379", false)
            .connect_options()
            .is_ok());
    }

    #[test]
    fn debug_output_hides_the_password() {
        let opts = with_password("https://127.0.0.1:2379", false);
        let dump = format!("{opts:?} {opts:#?} {}", opts.password.as_ref().unwrap());
        assert!(!dump.contains("s3cret-pw"), "{dump}");
        assert!(dump.contains("flannel"), "{dump}");
    }

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/a/subnets/"), b"/a/subnets0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
