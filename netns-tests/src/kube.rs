//! A real Kubernetes control plane for the kube-mode tests and benchmark: etcd 3.6 and
//! kube-apiserver, built from their Go modules by `scripts/kube-peers.sh`, with `kubectl` from
//! the same release.
//!
//! [`kube_peers`] finds the programs once per process: the folder `$KUBE_PEERS_DIR` when set
//! (what `scripts/test.sh` exports), otherwise whatever `scripts/kube-peers.sh` prints (it builds
//! them on a machine's first run, then returns at once). Tests start with
//! [`require_kube_peers!`](crate::require_kube_peers): when the programs cannot be had the test
//! is skipped with a note, or fails when `CI` is set.
//!
//! [`ControlPlane`] runs both in a namespace of the test bed (the [`crate::Cluster`]'s etcd
//! namespace, or one of its own on the underlay), so the cluster's hosts reach the apiserver at
//! `https://<ip>:6443` over the underlay. It has token authentication (an admin token in
//! `system:masters`, flannel's tokens) and RBAC on, and no kubelet or controller-manager: the
//! tests make the Nodes and set their podCIDRs themselves. The RBAC rules flanneld gets are
//! read from `dist/kube-flannel.yml`, the manifest users install, so the tests prove that
//! manifest's ClusterRole is enough.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};

use crate::bins::workspace_dir;
use crate::built;
use crate::{cmd, free_port, wait_for, wait_until, Daemon, Error, Netns, Result, Underlay, Wait};

/// The programs of one pinned Kubernetes release and etcd.
#[derive(Debug, Clone)]
pub struct KubePeers {
    /// The folder holding them.
    pub dir: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kubectl: PathBuf,
    /// etcd 3.6 (not Debian's 3.4, which kube-apiserver 1.36 does not support).
    pub etcd: PathBuf,
    /// The `VERSIONS` file: one line per program (module and version) and the Go version.
    pub versions: String,
}

impl KubePeers {
    /// Checks that `dir` holds every program and reads `VERSIONS`.
    pub fn in_dir(dir: &Path) -> Result<KubePeers, String> {
        Ok(KubePeers {
            dir: dir.to_path_buf(),
            kube_apiserver: built::program(dir, "kube-apiserver")?,
            kubectl: built::program(dir, "kubectl")?,
            etcd: built::program(dir, "etcd")?,
            versions: built::versions(dir)?,
        })
    }
}

/// The control plane's programs, found once per process (see the module doc); the error says
/// why not.
pub fn kube_peers() -> Result<&'static KubePeers, String> {
    static FOUND: OnceLock<Result<KubePeers, String>> = OnceLock::new();
    FOUND.get_or_init(find).as_ref().map_err(Clone::clone)
}

fn find() -> Result<KubePeers, String> {
    KubePeers::in_dir(&built::folder("KUBE_PEERS_DIR", "kube-peers.sh")?)
}

/// The programs for `test`, with their versions printed; when they cannot be had: panics under
/// `CI`, otherwise prints a skip line and returns `None`.
pub fn require(test: &str) -> Option<&'static KubePeers> {
    built::require(
        test,
        "kube-apiserver (scripts/kube-peers.sh)",
        kube_peers(),
        |p| {
            format!(
                "Kubernetes control plane from {}:\n{}",
                p.dir.display(),
                p.versions
            )
        },
    )
}

/// `let peers = require_kube_peers!();`: the [`KubePeers`], or returns from the calling test (a
/// skip; a panic under `CI`) when they cannot be had.
#[macro_export]
macro_rules! require_kube_peers {
    () => {
        match $crate::kube::require($crate::test_name!()) {
            Some(p) => p,
            None => return,
        }
    };
}

/// `dist/kube-flannel.yml` in this workspace: the manifest users install.
pub fn manifest_path() -> PathBuf {
    workspace_dir().join("dist/kube-flannel.yml")
}

/// The bearer tokens of the token file. The flannel token's user is the manifest's
/// ServiceAccount (`system:serviceaccount:kube-flannel:flannel`), so the manifest's own
/// ClusterRoleBinding is what grants it its rights.
pub const ADMIN_TOKEN: &str = "admin-token-netns-tests";
pub const FLANNEL_TOKEN: &str = "flannel-token-netns-tests";
/// A user bound to the manifest's ClusterRole minus `nodes/status patch` (see
/// [`ControlPlane::bind_role_without_status_patch`]).
pub const FLANNEL_LIMITED_TOKEN: &str = "flannel-limited-token-netns-tests";
pub const FLANNEL_USER: &str = "system:serviceaccount:kube-flannel:flannel";
pub const FLANNEL_LIMITED_USER: &str = "flannel-limited";

/// Where and how to start a [`ControlPlane`].
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    /// The namespace to run in (it must exist); `None`: the caller's (then `ip` must be a
    /// loopback address).
    pub netns: Option<String>,
    /// The apiserver's address (bind and advertise); `None`: `127.0.0.1`.
    pub ip: Option<Ipv4Addr>,
    /// Write an audit log of every request (user, verb, resource) at Metadata level; see
    /// [`ControlPlane::requests_by_user`].
    pub audit: bool,
    /// More kube-apiserver flags.
    pub extra_args: Vec<String>,
}

/// etcd 3.6 + kube-apiserver (see the module doc). Dropping it kills both, deletes its own
/// namespace (if it made one) and its temporary directory (certificates, tokens, etcd data,
/// logs).
#[derive(Debug)]
pub struct ControlPlane {
    peers: &'static KubePeers,
    apiserver: Daemon,
    etcd: Daemon,
    netns: Option<String>,
    ip: Ipv4Addr,
    port: u16,
    etcd_port: u16,
    extra_args: Vec<String>,
    audit: bool,
    dir: tempfile::TempDir,
    admin_kubeconfig: PathBuf,
    /// Declared last: dropped after the processes inside it are killed.
    _own_ns: Option<Netns>,
}

/// How long the apiserver may take to become ready: kubernetes' own test server allows a
/// minute, and contended CI machines have been seen taking 35 s.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

impl ControlPlane {
    /// The port of the apiserver when it runs in a namespace of the test bed.
    pub const PORT: u16 = 6443;
    /// The address of a control plane in its own namespace ([`ControlPlane::start_on`]): above
    /// every host's (`.10 + i`, at most `.249`) and etcd member's.
    pub const OWN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

    /// Starts etcd and the apiserver as `opts` says and waits until the apiserver is ready.
    pub fn start(peers: &'static KubePeers, opts: KubeOptions) -> Result<ControlPlane> {
        Self::start_with_ns(peers, opts, None)
    }

    /// Starts it in the cluster's etcd namespace (`<name>-etcd`), at the etcd member's underlay
    /// address ([`Underlay::ETCD_IP`]); the cluster's etcd 3.4 keeps its ports.
    pub fn start_in_cluster(
        peers: &'static KubePeers,
        cluster: &crate::Cluster,
        audit: bool,
    ) -> Result<ControlPlane> {
        Self::start(
            peers,
            KubeOptions {
                netns: Some(format!("{}-etcd", cluster.name())),
                ip: Some(Underlay::ETCD_IP),
                audit,
                ..KubeOptions::default()
            },
        )
    }

    /// Makes namespace `<prefix>-kube`, plugs it into `underlay` at [`ControlPlane::OWN_IP`],
    /// and starts the control plane there.
    pub fn start_on(
        peers: &'static KubePeers,
        underlay: &Underlay,
        prefix: &str,
        audit: bool,
    ) -> Result<ControlPlane> {
        let ns = Netns::create(&format!("{prefix}-kube"))?;
        underlay.attach(&ns, "kube", Self::OWN_IP)?;
        let opts = KubeOptions {
            netns: Some(ns.name().to_string()),
            ip: Some(Self::OWN_IP),
            audit,
            ..KubeOptions::default()
        };
        Self::start_with_ns(peers, opts, Some(ns))
    }

    fn start_with_ns(
        peers: &'static KubePeers,
        opts: KubeOptions,
        own_ns: Option<Netns>,
    ) -> Result<ControlPlane> {
        let dir = tempfile::Builder::new()
            .prefix("netns-tests-kube.")
            .tempdir()
            .map_err(|e| Error::io("making a temporary directory", e))?;
        let ip = opts.ip.unwrap_or(Ipv4Addr::LOCALHOST);
        if opts.netns.is_none() && !ip.is_loopback() {
            return Err(Error::Other(format!(
                "a control plane in the caller's namespace must listen on loopback, not {ip}"
            )));
        }
        // Inside a namespace of the test bed the ports are ours; in the caller's, take free ones.
        let (port, etcd_port) = match opts.netns {
            Some(_) => (Self::PORT, 12379),
            None => (free_port(), free_port()),
        };
        let d = dir.path();
        let cp = ControlPlane {
            peers,
            apiserver: Daemon::new("kube-apiserver", d.join("kube-apiserver.log"), 30),
            etcd: Daemon::new("etcd 3.6 (kube)", d.join("etcd.log"), 15),
            netns: opts.netns,
            ip,
            port,
            etcd_port,
            extra_args: opts.extra_args,
            audit: opts.audit,
            admin_kubeconfig: d.join("admin.kubeconfig"),
            dir,
            _own_ns: own_ns,
        };
        cp.write_credentials()?;
        cp.write_kubeconfig_to(&cp.admin_kubeconfig, ADMIN_TOKEN)?;
        cp.start_etcd()?;
        cp.start_apiserver()?;
        Ok(cp)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA, the serving certificate (for the apiserver's address, loopback and the in-cluster
    /// names), the service-account signing key, the token file and the audit policy.
    fn write_credentials(&self) -> Result<()> {
        let d = self.dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=netns-tests-kube-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
        )?;
        let ext = format!(
            "subjectAltName=IP:{},IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,\
             DNS:kubernetes.default,DNS:kubernetes.default.svc,\
             DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n",
            self.ip
        );
        write(&self.path("server.ext"), &ext)?;
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=kube-apiserver",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
        )?;
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                "server.crt",
            ],
        )?;
        openssl(d, &["genrsa", "-out", "sa.key", "2048"])?;
        // token,user,uid,"groups"
        write(
            &self.path("tokens.csv"),
            &format!(
                "{ADMIN_TOKEN},admin,uid-admin,\"system:masters\"\n\
                 {FLANNEL_TOKEN},{FLANNEL_USER},uid-flannel,\"system:serviceaccounts,system:serviceaccounts:kube-flannel\"\n\
                 {FLANNEL_LIMITED_TOKEN},{FLANNEL_LIMITED_USER},uid-flannel-limited\n"
            ),
        )?;
        write(
            &self.path("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [\"RequestReceived\"]\n\
             rules:\n  - level: Metadata\n",
        )
    }

    fn start_etcd(&self) -> Result<()> {
        let peer = format!("http://127.0.0.1:{}", self.etcd_port + 1);
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let mut c = crate::netns::command_in(self.netns.as_deref(), &self.peers.etcd);
        c.args([
            "--name=kube",
            &format!("--data-dir={}", self.path("etcd-data").display()),
            &format!("--listen-client-urls={client}"),
            &format!("--advertise-client-urls={client}"),
            &format!("--listen-peer-urls={peer}"),
            &format!("--initial-advertise-peer-urls={peer}"),
            &format!("--initial-cluster=kube={peer}"),
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]);
        c.process_group(0);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD") {
                c.env_remove(k);
            }
        }
        self.etcd.start(c)
    }

    /// Starts kube-apiserver (a no-op while it runs) with the flags of a minimal test server and
    /// waits until it is ready. etcd's data survives [`ControlPlane::stop_apiserver`], so
    /// everything made before is still there.
    pub fn start_apiserver(&self) -> Result<()> {
        let p = |n: &str| self.path(n).display().to_string();
        let mut c = crate::netns::command_in(self.netns.as_deref(), &self.peers.kube_apiserver);
        c.args([
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
            format!("--bind-address={}", self.ip),
            format!("--advertise-address={}", self.ip),
            format!("--secure-port={}", self.port),
            format!("--cert-dir={}", p("cert-dir")),
            format!("--tls-cert-file={}", p("server.crt")),
            format!("--tls-private-key-file={}", p("server.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            format!(
                "--service-account-issuer=https://{}:{}/",
                self.ip, self.port
            ),
            format!("--service-account-key-file={}", p("sa.key")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--authorization-mode=RBAC".into(),
            format!("--token-auth-file={}", p("tokens.csv")),
            // No controller-manager makes the default ServiceAccount, without which Pods
            // could not be created.
            "--disable-admission-plugins=ServiceAccount".into(),
            "--allow-privileged=true".into(),
        ]);
        if self.audit {
            c.args([
                format!("--audit-policy-file={}", p("audit-policy.yaml")),
                format!("--audit-log-path={}", p("audit.log")),
                "--audit-log-format=json".into(),
                "--audit-log-mode=blocking".into(),
            ]);
        }
        c.args(&self.extra_args);
        c.process_group(0);
        self.apiserver.start(c)?;
        self.wait_ready(READY_TIMEOUT)
    }

    /// Polls `/readyz` with the admin token, then waits for namespace `default` (made by a
    /// controller inside the apiserver shortly after it is ready).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        wait_for(
            timeout,
            Duration::from_millis(250),
            "kube-apiserver to become ready",
            || {
                self.etcd
                    .check_alive()
                    .map_err(|e| Wait::Fatal(Error::Other(e)))?;
                self.apiserver
                    .check_alive()
                    .map_err(|e| Wait::Fatal(Error::Other(e)))?;
                self.kubectl(&["get", "--raw", "/readyz"])
                    .map_err(|e| Wait::NotYet(e.to_string()))?;
                self.kubectl(&["get", "namespace", "default", "-o", "name"])
                    .map_err(|e| Wait::NotYet(e.to_string()))
            },
        )
        .map(drop)
    }

    /// Stops kube-apiserver (SIGTERM, SIGKILL after 5 s); etcd and its data stay.
    pub fn stop_apiserver(&self) {
        self.apiserver.stop(Duration::from_secs(5));
    }

    pub fn apiserver_running(&self) -> bool {
        self.apiserver.is_running()
    }

    /// The apiserver's process id while it runs.
    pub fn apiserver_pid(&self) -> Option<u32> {
        self.apiserver.pid()
    }

    /// The etcd's process id while it runs.
    pub fn etcd_pid(&self) -> Option<u32> {
        self.etcd.pid()
    }

    /// The apiserver's log.
    pub fn apiserver_log(&self) -> String {
        self.apiserver.log()
    }

    /// `https://<ip>:<port>` (flanneld's `--kube-api-url`).
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.ip, self.port)
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The namespace the control plane runs in (`None`: the caller's).
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The CA that signed the apiserver's certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.path("ca.crt")
    }

    /// The temporary directory holding logs, certificates and kubeconfigs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The admin's kubeconfig (user `admin` in `system:masters`).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// Writes a kubeconfig for `token` (server [`ControlPlane::url`], the CA by path) into the
    /// control plane's directory as `<name>.kubeconfig`; its path.
    pub fn kubeconfig(&self, name: &str, token: &str) -> Result<PathBuf> {
        let path = self.path(&format!("{name}.kubeconfig"));
        self.write_kubeconfig_to(&path, token)?;
        Ok(path)
    }

    fn write_kubeconfig_to(&self, path: &Path, token: &str) -> Result<()> {
        // JSON is YAML, and kubeconfig files are read as YAML.
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "netns-tests", "cluster": {
                "server": self.url(),
                "certificate-authority": self.ca_cert(),
            }}],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "netns-tests", "context": {"cluster": "netns-tests", "user": "user"}}],
            "current-context": "netns-tests",
        });
        write(path, &config.to_string())
    }

    /// `kubectl` as the admin, run where the apiserver runs; its stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_as(&self.admin_kubeconfig, args, None)
    }

    /// `kubectl --kubeconfig=<kubeconfig> args...` in the control plane's namespace, with `stdin`
    /// fed when given; its stdout, or an error carrying stderr (e.g. `Forbidden`).
    pub fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String> {
        let mut c = crate::netns::command_in(self.netns.as_deref(), &self.peers.kubectl);
        c.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg("--request-timeout=20s")
            .args(args);
        kubectl_run(c, stdin)
    }

    /// `kubectl` as the admin from another namespace (e.g. a host of the cluster), to prove the
    /// apiserver is reachable there.
    pub fn kubectl_from(&self, netns: &str, kubeconfig: &Path, args: &[&str]) -> Result<String> {
        let mut c = crate::netns::command_in(Some(netns), &self.peers.kubectl);
        c.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg("--request-timeout=20s")
            .args(args);
        kubectl_run(c, None)
    }

    /// One HTTP request to the apiserver with bearer `token`, from namespace `netns` (`None`:
    /// the control plane's), as flanneld sends it: e.g. `PATCH
    /// /api/v1/nodes/<n>/status` with `application/strategic-merge-patch+json`, which
    /// `kubectl patch` cannot send alone (it GETs first, which needs another right). The status
    /// code and the body.
    pub fn request(
        &self,
        netns: Option<&str>,
        token: &str,
        method: &str,
        path: &str,
        body: Option<(&str, &str)>,
    ) -> Result<(u16, String)> {
        let mut c = crate::netns::command_in(netns.or(self.netns.as_deref()), "curl");
        c.args(["--silent", "--show-error", "--max-time", "20", "--cacert"])
            .arg(self.ca_cert())
            .args(["--header", &format!("Authorization: Bearer {token}")])
            .args(["--request", method, "--write-out", "\n%{http_code}"]);
        if let Some((content_type, data)) = body {
            c.args(["--header", &format!("Content-Type: {content_type}")])
                .args(["--data-binary", data]);
        }
        c.arg(format!("{}{path}", self.url()));
        let out = cmd::check(&mut c)?;
        let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
        let code = code
            .parse()
            .map_err(|_| Error::Other(format!("`{}`: no status code in {out:?}", cmd::show(&c))))?;
        Ok((code, body.to_string()))
    }

    /// flanneld's annotation patch: a strategic merge of `metadata.annotations` into Node
    /// `node`'s status subresource, with `token`, from `netns`; the status code and body.
    pub fn patch_node_status(
        &self,
        netns: Option<&str>,
        token: &str,
        node: &str,
        patch: &Value,
    ) -> Result<(u16, String)> {
        self.request(
            netns,
            token,
            "PATCH",
            &format!("/api/v1/nodes/{node}/status"),
            Some(("application/strategic-merge-patch+json", &patch.to_string())),
        )
    }

    /// `kubectl apply -f -` of one JSON object or List, as the admin.
    pub fn apply(&self, object: &Value) -> Result<String> {
        self.kubectl_as(
            &self.admin_kubeconfig,
            &["apply", "-f", "-"],
            Some(&object.to_string()),
        )
    }

    /// `kubectl create -f -` of one JSON object or List, as the admin.
    pub fn create(&self, object: &Value) -> Result<String> {
        self.kubectl_as(
            &self.admin_kubeconfig,
            &["create", "-f", "-"],
            Some(&object.to_string()),
        )
    }

    /// Creates Node `name` with `pod_cidrs` (`spec.podCIDR` is the first; empty: none yet, as
    /// before the controller-manager assigns one) and `annotations` (besides a kubelet's, see
    /// [`node_object`]).
    pub fn create_node(
        &self,
        name: &str,
        pod_cidrs: &[&str],
        annotations: &[(&str, &str)],
    ) -> Result<()> {
        self.create(&node_object(name, pod_cidrs, annotations))
            .map(drop)
    }

    /// Sets a Node's podCIDRs (allowed once, while it has none: they are immutable after).
    pub fn set_pod_cidrs(&self, name: &str, pod_cidrs: &[&str]) -> Result<()> {
        let patch = json!({"spec": {"podCIDR": pod_cidrs.first(), "podCIDRs": pod_cidrs}});
        self.kubectl(&[
            "patch",
            "node",
            name,
            "--type=merge",
            "-p",
            &patch.to_string(),
        ])
        .map(drop)
    }

    /// Deletes Node `name`.
    pub fn delete_node(&self, name: &str) -> Result<()> {
        self.kubectl(&["delete", "node", name, "--wait=false"])
            .map(drop)
    }

    /// Node `name` as JSON.
    pub fn node(&self, name: &str) -> Result<Value> {
        let out = self.kubectl(&["get", "node", name, "-o", "json"])?;
        parse_json(&out, "kubectl get node")
    }

    /// The names of every Node, sorted.
    pub fn node_names(&self) -> Result<Vec<String>> {
        let out = self.kubectl(&["get", "nodes", "-o", "name"])?;
        let mut names: Vec<String> = out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("node/"))
            .map(str::to_string)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Node `name`'s annotations.
    pub fn annotations(&self, name: &str) -> Result<serde_json::Map<String, Value>> {
        Ok(self.node(name)?["metadata"]["annotations"]
            .as_object()
            .cloned()
            .unwrap_or_default())
    }

    /// Sets (`Some`) or removes (`None`) annotations of Node `name`, as a user would with
    /// `kubectl annotate`.
    pub fn patch_annotations(&self, name: &str, changes: &[(&str, Option<&str>)]) -> Result<()> {
        let annotations: serde_json::Map<String, Value> = changes
            .iter()
            .map(|(k, v)| (k.to_string(), v.map_or(Value::Null, |v| json!(v))))
            .collect();
        let patch = json!({"metadata": {"annotations": annotations}});
        self.kubectl(&[
            "patch",
            "node",
            name,
            "--type=merge",
            "-p",
            &patch.to_string(),
        ])
        .map(drop)
    }

    /// Sets Node `name`'s `NetworkUnavailable` condition, as a cloud node controller or a
    /// kubelet would before the network is up.
    pub fn set_network_unavailable(&self, name: &str, unavailable: bool) -> Result<()> {
        let status = if unavailable { "True" } else { "False" };
        let patch = json!({"status": {"conditions": [{
            "type": "NetworkUnavailable", "status": status, "reason": "NetnsTests",
            "message": "set by the test", "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]}});
        self.kubectl(&[
            "patch",
            "node",
            name,
            "--subresource=status",
            "--type=strategic",
            "-p",
            &patch.to_string(),
        ])
        .map(drop)
    }

    /// The `NetworkUnavailable` condition of Node `name`, if it has one.
    pub fn network_unavailable(&self, name: &str) -> Result<Option<Value>> {
        let node = self.node(name)?;
        Ok(node["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "NetworkUnavailable")
            .cloned())
    }

    /// Creates Pod `namespace/name` scheduled on `node_name` (what flanneld reads for its Node
    /// when only `POD_NAME` and `POD_NAMESPACE` are set); makes the namespace when missing.
    pub fn create_pod(&self, namespace: &str, name: &str, node_name: &str) -> Result<()> {
        // Made only when missing: applying it over the manifest's would drop its labels.
        if self
            .kubectl(&["get", "namespace", namespace, "-o", "name"])
            .is_err()
        {
            self.kubectl(&["create", "namespace", namespace])?;
        }
        self.create(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node_name, "hostNetwork": true,
                     "containers": [{"name": "flanneld", "image": "flannel-rs/flanneld:test"}]},
        }))
        .map(drop)
    }

    /// Applies the manifest's Namespace, ServiceAccount, ClusterRole and ClusterRoleBinding, which
    /// give [`FLANNEL_TOKEN`] exactly the manifest's rights; a kubeconfig for that token.
    pub fn bind_flannel_token(&self) -> Result<PathBuf> {
        let objects = self.manifest_objects()?;
        let wanted = [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
        ];
        let items: Vec<Value> = objects
            .into_iter()
            .filter(|o| wanted.contains(&o["kind"].as_str().unwrap_or_default()))
            .collect();
        if items.len() != wanted.len() {
            return Err(Error::Other(format!(
                "{}: expected one each of {wanted:?}, found {} of them",
                manifest_path().display(),
                items.len()
            )));
        }
        self.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}))?;
        self.kubeconfig("flannel", FLANNEL_TOKEN)
    }

    /// Binds [`FLANNEL_LIMITED_TOKEN`] to a copy of the manifest's ClusterRole without its
    /// `nodes/status` rule (ClusterRole `flannel-no-status-patch`); a kubeconfig for that token.
    pub fn bind_role_without_status_patch(&self) -> Result<PathBuf> {
        let mut role = self.manifest_cluster_role()?;
        let rules = role["rules"]
            .as_array_mut()
            .ok_or_else(|| Error::Other("the manifest's ClusterRole has no rules".into()))?;
        let before = rules.len();
        rules.retain(|r| {
            !r["resources"]
                .as_array()
                .is_some_and(|rs| rs.iter().any(|x| x == "nodes/status"))
        });
        if rules.len() == before {
            return Err(Error::Other(
                "the manifest's ClusterRole has no nodes/status rule to leave out".into(),
            ));
        }
        role["metadata"] = json!({"name": "flannel-no-status-patch"});
        let binding = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "flannel-no-status-patch"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "flannel-no-status-patch"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": FLANNEL_LIMITED_USER}],
        });
        self.apply(&json!({"apiVersion": "v1", "kind": "List", "items": [role, binding]}))?;
        self.kubeconfig("flannel-limited", FLANNEL_LIMITED_TOKEN)
    }

    /// The manifest's ClusterRole `flannel`, as JSON.
    pub fn manifest_cluster_role(&self) -> Result<Value> {
        self.manifest_objects()?
            .into_iter()
            .find(|o| o["kind"] == "ClusterRole")
            .ok_or_else(|| Error::Other(format!("{}: no ClusterRole", manifest_path().display())))
    }

    /// Every object of `dist/kube-flannel.yml`, as kubectl reads it (YAML to JSON; a client-side
    /// dry run, which still asks the server for its resource types).
    pub fn manifest_objects(&self) -> Result<Vec<Value>> {
        let manifest = manifest_path().display().to_string();
        let out = self.kubectl(&["create", "--dry-run=client", "-o", "json", "-f", &manifest])?;
        // One JSON document per object, one after the other.
        let mut objects = Vec::new();
        for v in serde_json::Deserializer::from_str(&out).into_iter::<Value>() {
            let v = v.map_err(|e| {
                Error::Other(format!(
                    "kubectl create --dry-run=client: bad JSON ({e}): {out}"
                ))
            })?;
            match v["kind"].as_str() {
                Some("List") => objects.extend(v["items"].as_array().cloned().unwrap_or_default()),
                _ => objects.push(v),
            }
        }
        Ok(objects)
    }

    /// How many requests each user made so far, from the audit log ([`KubeOptions::audit`]).
    pub fn requests_by_user(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let path = self.path("audit.log");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Ok(count_requests_by_user(&text))
    }

    /// The audit log's path ([`KubeOptions::audit`]).
    pub fn audit_log(&self) -> PathBuf {
        self.path("audit.log")
    }
}

/// Counts the requests of an audit `log` (JSON lines) by user name. A request has one event per
/// stage, and a watch still open has only its `ResponseStarted`: each `auditID` counts once.
pub fn count_requests_by_user(log: &str) -> std::collections::BTreeMap<String, u64> {
    let mut seen = std::collections::HashSet::new();
    let mut counts = std::collections::BTreeMap::new();
    for line in log.lines() {
        let Ok(ev) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let id = ev["auditID"].as_str().unwrap_or_default().to_string();
        if !seen.insert(id) {
            continue;
        }
        let user = ev["user"]["username"].as_str().unwrap_or("?").to_string();
        *counts.entry(user).or_insert(0) += 1;
    }
    counts
}

/// The annotations a kubelet puts on the Node it registers. Every Node the bed makes has them:
/// flannel's Go flanneld panics on a Node without any annotation (it assigns into a nil map).
pub const KUBELET_ANNOTATIONS: &[(&str, &str)] = &[
    ("node.alpha.kubernetes.io/ttl", "0"),
    (
        "volumes.kubernetes.io/controller-managed-attach-detach",
        "true",
    ),
];

/// A Node object as the tests make it: `annotations` besides [`KUBELET_ANNOTATIONS`].
pub fn node_object(name: &str, pod_cidrs: &[&str], annotations: &[(&str, &str)]) -> Value {
    let annotations: serde_json::Map<String, Value> = KUBELET_ANNOTATIONS
        .iter()
        .chain(annotations)
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let mut spec = serde_json::Map::new();
    if let Some(first) = pod_cidrs.first() {
        spec.insert("podCIDR".into(), json!(first));
        spec.insert("podCIDRs".into(), json!(pod_cidrs));
    }
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": annotations},
        "spec": spec,
    })
}

fn kubectl_run(mut c: Command, stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .map_err(|e| Error::io(format!("starting `{}`", cmd::show(&c)), e))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes())
            .map_err(|e| Error::io(format!("writing to `{}`", cmd::show(&c)), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io(format!("waiting for `{}`", cmd::show(&c)), e))?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: cmd::show(&c),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn parse_json(text: &str, what: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| Error::Other(format!("{what}: bad JSON ({e}): {text}")))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let mut c = Command::new("openssl");
    c.current_dir(dir).args(args);
    cmd::check(&mut c).map(drop)
}

/// Waits until the control plane's Node names are exactly `want`.
pub fn wait_nodes(cp: &ControlPlane, want: &[&str], timeout: Duration) -> Result<()> {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    wait_until(timeout, "the Node list", || {
        let names = cp.node_names().map_err(|e| e.to_string())?;
        if names == want {
            Ok(())
        } else {
            Err(format!("nodes {names:?}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_once_per_user() {
        let log = [
            r#"{"auditID":"1","stage":"ResponseComplete","user":{"username":"a"},"verb":"get"}"#,
            r#"{"auditID":"2","stage":"ResponseStarted","user":{"username":"a"},"verb":"watch"}"#,
            r#"{"auditID":"3","stage":"ResponseStarted","user":{"username":"b"},"verb":"watch"}"#,
            r#"{"auditID":"3","stage":"ResponseComplete","user":{"username":"b"},"verb":"watch"}"#,
            "not json",
        ]
        .join("\n");
        let counts = count_requests_by_user(&log);
        // a: one get, one watch still open; b: one watch, closed (two events).
        assert_eq!(counts.get("a"), Some(&2));
        assert_eq!(counts.get("b"), Some(&1));
        assert_eq!(counts.len(), 2);
    }

    #[test]
    fn a_node_without_pod_cidrs_has_an_empty_spec() {
        let n = node_object("n1", &[], &[("k", "v")]);
        assert_eq!(n["spec"], json!({}));
        assert_eq!(n["metadata"]["annotations"]["k"], "v");
        assert_eq!(
            n["metadata"]["annotations"]["node.alpha.kubernetes.io/ttl"],
            "0"
        );
        let n = node_object("n2", &["10.244.1.0/24", "fd00:1::/64"], &[]);
        assert_eq!(n["spec"]["podCIDR"], "10.244.1.0/24");
        assert_eq!(n["spec"]["podCIDRs"][1], "fd00:1::/64");
    }
}
