//! The one check every privileged test (and benchmark) runs first: root, and the tools it needs.
//!
//! A test starts with [`require_root!`](crate::require_root), [`require_test_bed!`](crate::require_test_bed)
//! or [`require!`](crate::require) (any list of [`Need`]s). When something is missing the test
//! returns early with a `SKIPPED <test>: needs ...` line, unless `CI` is set: a test that cannot
//! run in CI must fail, so there it panics. The macros name the test themselves.

use std::path::Path;

use crate::{cmd, etcd_bin};

fn etcd_found() -> bool {
    let bin = etcd_bin();
    if bin.components().count() > 1 {
        cmd::is_executable(&bin)
    } else {
        cmd::on_path(&bin.to_string_lossy())
    }
}

/// One thing a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need<'a> {
    /// Effective uid 0 (namespaces, links, iptables).
    Root,
    /// An executable of this name on `PATH`.
    Tool(&'a str),
    /// A file at this path (e.g. a reference CNI plugin).
    File(&'a str),
    /// The etcd the tests start ([`crate::etcd_bin`]: `$ETCD_BIN`, else `etcd` on `PATH`).
    Etcd,
}

/// What the namespace test bed runs ([`crate::Cluster`], [`crate::Etcd`], [`crate::Host`]).
pub const TEST_BED: &[Need<'static>] = &[
    Need::Root,
    Need::Tool("ip"),
    Need::Tool("bridge"),
    Need::Etcd,
    Need::Tool("etcdctl"),
    Need::Tool("ping"),
    Need::Tool("iptables"),
];

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The needs that this machine does not meet, as phrases (`root`, `` `etcd` on PATH ``).
pub fn missing(needs: &[Need]) -> Vec<String> {
    needs
        .iter()
        .filter_map(|need| match *need {
            Need::Root if !is_root() => Some("root".to_string()),
            Need::Tool(t) if !cmd::on_path(t) => Some(format!("`{t}` on PATH")),
            Need::File(f) if !Path::new(f).exists() => Some(f.to_string()),
            Need::Etcd if !etcd_found() => Some(format!("etcd (`{}`)", etcd_bin().display())),
            _ => None,
        })
        .collect()
}

/// Whether `test` can run here. Something missing: panics when `CI` is set, otherwise prints a
/// skip line naming `test` and returns `false`.
pub fn require(test: &str, needs: &[Need]) -> bool {
    let missing = missing(needs);
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: needs {}", missing.join(", "));
    if std::env::var_os("CI").is_some() {
        panic!("{msg}; CI is set, so this is a failure, not a skip");
    }
    eprintln!("SKIPPED {msg}");
    false
}

/// The name of the function this expands in (the test's name), without its module path.
#[macro_export]
macro_rules! test_name {
    () => {{
        fn here() {}
        let path = ::std::any::type_name_of_val(&here);
        let path = path.strip_suffix("::here").unwrap_or(path);
        path.rsplit("::").next().unwrap_or(path)
    }};
}

/// `require!(Need::Root, Need::Etcd, ...)`: returns from the calling test when a need is
/// missing (a skip), panics instead when `CI` is set. See [`privileges`](crate::privileges).
#[macro_export]
macro_rules! require {
    ($($need:expr),* $(,)?) => {
        if !$crate::privileges::require($crate::test_name!(), &[$($need),*]) {
            return;
        }
    };
}

/// Returns from the calling test unless it runs as root (panics under `CI`).
#[macro_export]
macro_rules! require_root {
    () => {
        $crate::require!($crate::privileges::Need::Root)
    };
}

/// Returns from the calling test unless the etcd to start is there ([`Need::Etcd`]; panics
/// under `CI`).
#[macro_export]
macro_rules! require_etcd {
    () => {
        $crate::require!($crate::privileges::Need::Etcd)
    };
}

/// `require_all!(NEEDS)`: like [`require!`](crate::require) with a slice of [`Need`]s.
#[macro_export]
macro_rules! require_all {
    ($needs:expr) => {
        if !$crate::privileges::require($crate::test_name!(), $needs) {
            return;
        }
    };
}

/// Returns from the calling test unless the whole namespace test bed can run: root and
/// [`TEST_BED`](crate::privileges::TEST_BED)'s tools (panics under `CI`).
#[macro_export]
macro_rules! require_test_bed {
    () => {
        $crate::require_all!($crate::privileges::TEST_BED)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_name_is_the_enclosing_function() {
        assert_eq!(test_name!(), "test_name_is_the_enclosing_function");
    }

    #[test]
    fn missing_names_what_is_absent() {
        let absent = missing(&[
            Need::Tool("no-such-tool-netns-tests"),
            Need::File("/no/such/file"),
            Need::Tool("sh"),
        ]);
        assert_eq!(
            absent,
            ["`no-such-tool-netns-tests` on PATH", "/no/such/file"]
        );
    }
}
