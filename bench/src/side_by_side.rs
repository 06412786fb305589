//! flannel's own Go `flanneld` as the anchor of the benchmarks: `scale`, `mesh50` and `udp` run
//! it beside ours in the same run (same etcd content, same backend, same flags) and print
//! Rust/Go ratios against the targets of issue #13.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// Which daemon a figure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    /// Ours (`target/release/flanneld`).
    Rust,
    /// flannel's Go flanneld, built by `scripts/go-peers.sh`.
    Go,
}

impl Daemon {
    pub const BOTH: [Daemon; 2] = [Daemon::Rust, Daemon::Go];

    /// The name in `--daemons` and in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Daemon::Rust => "flanneld",
            Daemon::Go => "go-flanneld",
        }
    }

    /// `--daemons flanneld,go-flanneld` (either or both, in the order they run).
    pub fn parse_list(v: &str) -> Result<Vec<Daemon>, String> {
        let list: Vec<Daemon> = v
            .split(',')
            .map(|d| {
                Daemon::BOTH
                    .into_iter()
                    .find(|x| x.name() == d)
                    .ok_or(format!(
                        "--daemons: unknown daemon {d:?} (flanneld, go-flanneld)"
                    ))
            })
            .collect::<Result<_, _>>()?;
        if list.is_empty() {
            return Err("--daemons: name at least one daemon".into());
        }
        Ok(list)
    }
}

/// flannel's Go flanneld and its `VERSIONS` text, from the test bed's one lookup of the Go peers
/// (`$GO_PEERS_DIR`, else what `scripts/go-peers.sh` prints).
pub fn go_flanneld() -> Result<(PathBuf, String), String> {
    let peers = netns_tests::go_peers::go_peers()?;
    Ok((peers.flanneld.clone(), peers.versions.clone()))
}

/// The Go flanneld a benchmark runs: `explicit` (`--go-flanneld PATH`) or [`go_flanneld`];
/// prints what it runs.
pub fn resolve_go(explicit: Option<&Path>, bench: &str) -> Result<PathBuf, String> {
    let (bin, versions) = match explicit {
        Some(p) => (p.to_path_buf(), String::new()),
        None => go_flanneld()?,
    };
    eprintln!("{bench}: go-flanneld {}", bin.display());
    for l in versions.lines() {
        eprintln!("{bench}:   {l}");
    }
    Ok(bin)
}

/// User + system CPU seconds of process `pid` and of the children it has waited for
/// (`/proc/<pid>/stat` fields 14 to 17): flannel's Go daemon runs `iptables` every
/// `--iptables-resync` seconds, and that work is the daemon's too.
pub fn cpu_with_children(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Field n of the line is index n - 3 after the command name.
    let ticks: u64 = (14..=17)
        .map(|n| fields.get(n - 3)?.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// How a Rust/Go ratio is judged.
#[derive(Debug, Clone, Copy)]
pub enum Want {
    /// Rust / Go at most this (lower is better: time, memory, CPU).
    AtMost(f64),
    /// Rust / Go at least this (higher is better: throughput).
    AtLeast(f64),
}

/// One row of a side-by-side table.
pub struct Row {
    pub name: &'static str,
    pub unit: &'static str,
    pub rust: f64,
    pub go: f64,
    pub want: Option<Want>,
}

impl Row {
    pub fn ratio(&self) -> f64 {
        self.rust / self.go
    }

    pub fn met(&self) -> Option<bool> {
        let r = self.ratio();
        self.want.map(|w| match w {
            Want::AtMost(x) => r <= x,
            Want::AtLeast(x) => r >= x,
        })
    }
}

/// Prints the rows as a table (flanneld, go-flanneld, Rust/Go, target) and returns them as
/// JSON: `{name: {unit, flanneld, go_flanneld, rust_over_go, target, met}}`.
pub fn table(title: &str, rows: &[Row]) -> Value {
    println!("\n{title}");
    println!(
        "{:<44} {:>14} {:>14} {:>8}  target",
        "measure", "flanneld", "go-flanneld", "Rust/Go"
    );
    let mut out = serde_json::Map::new();
    for r in rows {
        let target = match r.want {
            Some(Want::AtMost(x)) => format!("≤ {x:.2}×"),
            Some(Want::AtLeast(x)) => format!("≥ {x:.2}×"),
            None => String::new(),
        };
        let verdict = match r.met() {
            Some(true) => " MET",
            Some(false) => " NOT MET",
            None => "",
        };
        println!(
            "{:<44} {:>11.3} {:<2} {:>11.3} {:<2} {:>7.3}×  {target}{verdict}",
            r.name,
            r.rust,
            r.unit,
            r.go,
            r.unit,
            r.ratio()
        );
        out.insert(
            r.name.into(),
            json!({
                "unit": r.unit,
                "flanneld": r.rust,
                "go_flanneld": r.go,
                "rust_over_go": r.ratio(),
                "target": target,
                "met": r.met(),
            }),
        );
    }
    println!("(same run, on a machine shared with other work: compare ratios, not absolutes)");
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_list_parses_and_names_a_bad_entry() {
        assert_eq!(
            Daemon::parse_list("go-flanneld,flanneld").unwrap(),
            [Daemon::Go, Daemon::Rust]
        );
        let e = Daemon::parse_list("flanneld,go").unwrap_err();
        assert!(e.contains("\"go\""), "{e}");
    }

    #[test]
    fn targets_are_judged_on_the_right_side() {
        let row = |rust, go, want| Row {
            name: "x",
            unit: "s",
            rust,
            go,
            want: Some(want),
        };
        assert_eq!(row(1.0, 2.0, Want::AtMost(0.5)).met(), Some(true));
        assert_eq!(row(1.1, 2.0, Want::AtMost(0.5)).met(), Some(false));
        assert_eq!(row(8.0, 1.0, Want::AtLeast(8.0)).met(), Some(true));
        assert_eq!(row(7.9, 1.0, Want::AtLeast(8.0)).met(), Some(false));
    }

    #[test]
    fn own_cpu_time_is_read() {
        let me = std::process::id();
        let t0 = cpu_with_children(me).expect("own /proc stat");
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(60) {}
        assert!(cpu_with_children(me).unwrap() > t0);
    }
}
