//! The Node annotations flannel reads and writes, under `--kube-annotation-prefix`.

use regex::Regex;

/// flannel's default prefix.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrefixError {
    #[error("--kube-annotation-prefix {0:?}: contains more than one '/'")]
    TwoSlashes(String),
    #[error(
        "--kube-annotation-prefix {0:?}: must be a lowercase domain name, then '/' and an \
         optional name of [a-z0-9_-] (e.g. flannel.alpha.coreos.com or example.org/net)"
    )]
    Format(String),
}

/// The full annotation keys of one prefix, as flannel derives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationKeys {
    pub kube_subnet_manager: String,
    pub backend_type: String,
    pub backend_data: String,
    pub backend_v6_data: String,
    pub public_ip: String,
    pub public_ipv6: String,
    pub public_ip_overwrite: String,
    pub public_ipv6_overwrite: String,
    pub node_public_ip: String,
    pub node_public_ipv6: String,
}

impl AnnotationKeys {
    /// flannel's rules: at most one `/`; none means one is appended; a prefix then ending in
    /// neither `/` nor `-` gets a `-`; the result must look like `fqdn/[name-]`.
    pub fn new(prefix: &str) -> Result<Self, PrefixError> {
        let mut p = prefix.to_string();
        match p.matches('/').count() {
            0 => p.push('/'),
            1 => {}
            _ => return Err(PrefixError::TwoSlashes(prefix.to_string())),
        }
        if !p.ends_with('/') && !p.ends_with('-') {
            p.push('-');
        }
        // Anchored at the end only, as flannel's check is.
        let format = Regex::new(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$")
            .expect("the pattern compiles");
        if !format.is_match(&p) {
            return Err(PrefixError::Format(prefix.to_string()));
        }
        let key = |name: &str| format!("{p}{name}");
        Ok(AnnotationKeys {
            kube_subnet_manager: key("kube-subnet-manager"),
            backend_type: key("backend-type"),
            backend_data: key("backend-data"),
            backend_v6_data: key("backend-v6-data"),
            public_ip: key("public-ip"),
            public_ipv6: key("public-ipv6"),
            public_ip_overwrite: key("public-ip-overwrite"),
            public_ipv6_overwrite: key("public-ipv6-overwrite"),
            node_public_ip: key("node-public-ip"),
            node_public_ipv6: key("node-public-ipv6"),
        })
    }
}

impl Default for AnnotationKeys {
    fn default() -> Self {
        AnnotationKeys::new(DEFAULT_PREFIX).expect("the default prefix is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_flannel_accepts_give_its_keys() {
        for (prefix, backend_type) in [
            (
                "flannel.alpha.coreos.com",
                "flannel.alpha.coreos.com/backend-type",
            ),
            (
                "flannel.alpha.coreos.com/",
                "flannel.alpha.coreos.com/backend-type",
            ),
            (
                "flannel.alpha.coreos.com/prefix",
                "flannel.alpha.coreos.com/prefix-backend-type",
            ),
            (
                "flannel.alpha.coreos.com/prefix-",
                "flannel.alpha.coreos.com/prefix-backend-type",
            ),
            ("org.com", "org.com/backend-type"),
            ("org9.com", "org9.com/backend-type"),
            ("org.com/9", "org.com/9-backend-type"),
        ] {
            let keys = AnnotationKeys::new(prefix).unwrap_or_else(|e| panic!("{prefix}: {e}"));
            assert_eq!(keys.backend_type, backend_type, "{prefix}");
        }
    }

    #[test]
    fn prefixes_flannel_refuses_are_refused_naming_the_flag_and_value() {
        for prefix in ["org", "org/", "org/prefix", "org.COM", "org.com/PREFIX"] {
            let err = AnnotationKeys::new(prefix).unwrap_err().to_string();
            assert!(
                err.contains("--kube-annotation-prefix") && err.contains(&format!("{prefix:?}")),
                "{err}"
            );
        }
        assert_eq!(
            AnnotationKeys::new("a.org/b/c"),
            Err(PrefixError::TwoSlashes("a.org/b/c".into()))
        );
    }

    #[test]
    fn the_default_prefix_gives_every_key_flannel_uses() {
        let k = AnnotationKeys::default();
        let p = "flannel.alpha.coreos.com/";
        assert_eq!(k.kube_subnet_manager, format!("{p}kube-subnet-manager"));
        assert_eq!(k.backend_data, format!("{p}backend-data"));
        assert_eq!(k.backend_v6_data, format!("{p}backend-v6-data"));
        assert_eq!(k.public_ip, format!("{p}public-ip"));
        assert_eq!(k.public_ipv6, format!("{p}public-ipv6"));
        assert_eq!(k.public_ip_overwrite, format!("{p}public-ip-overwrite"));
        assert_eq!(k.public_ipv6_overwrite, format!("{p}public-ipv6-overwrite"));
        assert_eq!(k.node_public_ip, format!("{p}node-public-ip"));
        assert_eq!(k.node_public_ipv6, format!("{p}node-public-ipv6"));
    }
}
