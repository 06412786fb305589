//! The one place that knows how to start an etcd member: its binary ([`etcd_bin`]) and its
//! flags ([`EtcdSpec`]). [`crate::Etcd`] (on loopback or in a namespace) and the benchmarks
//! start etcd through it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

/// The etcd to run: `$ETCD_BIN` when set (a path, or a name looked up on `PATH`), else `etcd`.
pub fn etcd_bin() -> PathBuf {
    std::env::var_os("ETCD_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

/// Server-side TLS: etcd serves its clients over https with `cert`/`key`; with `client_ca`
/// set it also requires a client certificate signed by that CA.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// How to start one etcd member. [`EtcdSpec::single`] is a one-member cluster; set the public
/// fields for anything else, then [`EtcdSpec::args`] or [`EtcdSpec::command`].
#[derive(Debug, Clone)]
pub struct EtcdSpec {
    pub name: String,
    pub data_dir: PathBuf,
    /// URLs etcd listens on for clients; the first is the one it advertises.
    pub listen_client_urls: Vec<String>,
    pub peer_url: String,
    /// `--initial-cluster`: `<name>=<peer_url>` for a single member.
    pub initial_cluster: String,
    /// `--initial-cluster-token` and `--initial-cluster-state=new`, for a multi-member cluster.
    pub cluster_token: Option<String>,
    pub tls: Option<EtcdTls>,
    /// Flags added after the ones above (a repeated flag overrides: the last one wins).
    pub extra_args: Vec<String>,
}

impl EtcdSpec {
    /// A one-member cluster named `name`, data in `data_dir`, serving `client_url`, with its
    /// peer URL `peer_url` (keep it on loopback or inside a test namespace).
    pub fn single(
        name: &str,
        data_dir: impl Into<PathBuf>,
        client_url: &str,
        peer_url: &str,
    ) -> EtcdSpec {
        EtcdSpec {
            name: name.to_string(),
            data_dir: data_dir.into(),
            listen_client_urls: vec![client_url.to_string()],
            peer_url: peer_url.to_string(),
            initial_cluster: format!("{name}={peer_url}"),
            cluster_token: None,
            tls: None,
            extra_args: Vec::new(),
        }
    }

    /// The URL clients use (the first client URL).
    pub fn client_url(&self) -> &str {
        &self.listen_client_urls[0]
    }

    /// etcd's command line (without the binary).
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--name={}", self.name),
            format!("--data-dir={}", self.data_dir.display()),
            format!("--listen-client-urls={}", self.listen_client_urls.join(",")),
            format!("--advertise-client-urls={}", self.client_url()),
            format!("--listen-peer-urls={}", self.peer_url),
            format!("--initial-advertise-peer-urls={}", self.peer_url),
            format!("--initial-cluster={}", self.initial_cluster),
        ];
        if let Some(token) = &self.cluster_token {
            a.push(format!("--initial-cluster-token={token}"));
            a.push("--initial-cluster-state=new".into());
        }
        if let Some(tls) = &self.tls {
            a.push(format!("--cert-file={}", tls.cert.display()));
            a.push(format!("--key-file={}", tls.key.display()));
            if let Some(ca) = &tls.client_ca {
                a.push("--client-cert-auth".into());
                a.push(format!("--trusted-ca-file={}", ca.display()));
            }
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }

    /// [`etcd_bin`] with [`EtcdSpec::args`], run inside the named network namespace (`ip netns
    /// exec`) or, with `None`, in the caller's.
    pub fn command(&self, netns: Option<&str>) -> Command {
        let mut c = crate::netns::command_in(netns, etcd_bin());
        c.args(self.args().into_iter().map(OsString::from));
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_member_with_client_tls_and_extra_flags_last() {
        let mut spec = EtcdSpec::single("t", "/d", "https://127.0.0.1:1", "http://127.0.0.1:2");
        spec.tls = Some(EtcdTls {
            cert: "/s.crt".into(),
            key: "/s.key".into(),
            client_ca: Some("/ca.crt".into()),
        });
        spec.extra_args = vec!["--log-level=info".into()];
        assert_eq!(
            spec.args(),
            [
                "--name=t",
                "--data-dir=/d",
                "--listen-client-urls=https://127.0.0.1:1",
                "--advertise-client-urls=https://127.0.0.1:1",
                "--listen-peer-urls=http://127.0.0.1:2",
                "--initial-advertise-peer-urls=http://127.0.0.1:2",
                "--initial-cluster=t=http://127.0.0.1:2",
                "--cert-file=/s.crt",
                "--key-file=/s.key",
                "--client-cert-auth",
                "--trusted-ca-file=/ca.crt",
                "--log-level=info",
            ]
        );
    }

    #[test]
    fn a_cluster_member_names_its_token_and_listens_on_all_client_urls() {
        let mut spec = EtcdSpec::single("n1", "/d", "http://10.0.0.1:2379", "http://10.0.0.1:2380");
        spec.listen_client_urls.push("http://127.0.0.1:2379".into());
        spec.initial_cluster = "n0=http://10.0.0.0:2380,n1=http://10.0.0.1:2380".into();
        spec.cluster_token = Some("tok".into());
        let args = spec.args();
        assert!(args
            .contains(&"--listen-client-urls=http://10.0.0.1:2379,http://127.0.0.1:2379".into()));
        assert!(args.contains(&"--advertise-client-urls=http://10.0.0.1:2379".into()));
        assert!(args.contains(&"--initial-cluster-token=tok".into()));
        assert!(args.contains(&"--initial-cluster-state=new".into()));
    }
}
