//! The table `flanneld status` prints: one screen a person reads at a glance, the problems
//! last. Ages are counted from the daemon's `now`, so the same status always prints the same.

use std::fmt::Write;

use super::{Change, PlaneState, ReconcileStatus, Status};

/// Terminal colours; `Style::plain()` when the output is not a terminal.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    colour: bool,
}

impl Style {
    pub fn plain() -> Self {
        Style { colour: false }
    }

    pub fn coloured() -> Self {
        Style { colour: true }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    fn good(&self, text: &str) -> String {
        self.paint("32", text)
    }

    fn bad(&self, text: &str) -> String {
        self.paint("1;31", text)
    }

    fn warn(&self, text: &str) -> String {
        self.paint("33", text)
    }
}

/// `90s` → `1m30s`; whole units only, the two largest.
pub fn age(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

fn ago(now: u64, then: u64) -> String {
    format!("{} ago", age(now.saturating_sub(then)))
}

fn or_dash(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

/// Pads `cells` to `widths` (the visible text: colour codes are added after padding).
fn row(cells: &[(String, Option<String>)], widths: &[usize]) -> String {
    let mut line = String::from(" ");
    for (i, (text, painted)) in cells.iter().enumerate() {
        let pad = widths[i].saturating_sub(text.chars().count());
        line.push(' ');
        line.push_str(painted.as_deref().unwrap_or(text));
        if i + 1 < cells.len() {
            line.push_str(&" ".repeat(pad + 1));
        }
    }
    line
}

fn table(out: &mut String, header: &[&str], rows: Vec<Vec<(String, Option<String>)>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, (text, _)) in r.iter().enumerate() {
            widths[i] = widths[i].max(text.chars().count());
        }
    }
    let head: Vec<(String, Option<String>)> =
        header.iter().map(|h| (h.to_string(), None)).collect();
    let _ = writeln!(out, "{}", row(&head, &widths));
    for r in rows {
        let _ = writeln!(out, "{}", row(&r, &widths));
    }
}

fn plain(text: impl Into<String>) -> (String, Option<String>) {
    (text.into(), None)
}

fn change_line(c: &Change) -> String {
    let peer = c
        .peer
        .as_deref()
        .map_or("stale entry".to_string(), |p| format!("peer {p}"));
    match &c.error {
        Some(e) => format!("{peer}: {} FAILED: {} ({e})", c.effect, c.what),
        None => format!("{peer}: {}: {}", c.effect, c.what),
    }
}

fn pass_summary(r: &ReconcileStatus) -> String {
    if r.changes.is_empty() && r.error.is_none() {
        return "nothing to fix".to_string();
    }
    format!(
        "{} added, {} corrected, {} stale removed",
        r.added, r.repaired, r.removed
    )
}

/// The whole table, ending with the problems (or `OK`).
pub fn render(s: &Status, style: Style) -> String {
    let mut out = String::new();
    match &s.lease {
        Some(l) => {
            let subnets: Vec<&str> = [&l.subnet, &l.ipv6_subnet]
                .into_iter()
                .filter_map(|n| n.as_deref())
                .collect();
            let ips: Vec<&str> = [&l.public_ip, &l.public_ipv6]
                .into_iter()
                .filter_map(|n| n.as_deref())
                .collect();
            let held = match (&l.held_by, l.expires) {
                (Some(by), _) => format!("held by {by}"),
                (None, Some(at)) => format!("expires in {}", age(at.saturating_sub(s.now))),
                (None, None) => "reserved (no expiry)".to_string(),
            };
            let _ = writeln!(
                out,
                "Lease     {}  public IP {}  backend {}  {held}",
                subnets.join(" "),
                if ips.is_empty() {
                    "-".to_string()
                } else {
                    ips.join(" ")
                },
                l.backend
            );
        }
        None => {
            let _ = writeln!(out, "Lease     {}", style.bad("none yet"));
        }
    }
    let up = if s.registry.up {
        style.good("up")
    } else {
        style.bad("DOWN")
    };
    let _ = writeln!(out, "Registry  {} {up}", s.registry.kind);
    for e in &s.registry.endpoints {
        let answer = match e.answers {
            Some(true) => style.good("answers"),
            Some(false) => style.bad("DOES NOT ANSWER"),
            None => "not probed".to_string(),
        };
        let _ = writeln!(out, "  {}  {answer}", e.endpoint);
    }

    let _ = writeln!(out, "\nPeers ({})", s.peers.len());
    if !s.peers.is_empty() {
        let rows = s
            .peers
            .iter()
            .map(|p| {
                let subnet = [&p.subnet, &p.ipv6_subnet]
                    .into_iter()
                    .filter_map(|n| n.as_deref())
                    .collect::<Vec<_>>()
                    .join(" ");
                let state = match p.data_plane {
                    PlaneState::Programmed => "programmed",
                    PlaneState::Missing => "MISSING",
                    PlaneState::Differs => "DIFFERS",
                    PlaneState::Unknown => "not yet checked",
                };
                let painted = match p.data_plane {
                    PlaneState::Programmed => style.good(state),
                    PlaneState::Unknown => style.warn(state),
                    _ => style.bad(state),
                };
                vec![
                    plain(subnet),
                    plain(or_dash(&p.public_ip)),
                    // flannel's udp leases carry no type.
                    plain(if p.backend.is_empty() {
                        "-"
                    } else {
                        &p.backend
                    }),
                    (state.to_string(), Some(painted)),
                    plain(ago(s.now, p.changed)),
                ]
            })
            .collect();
        table(
            &mut out,
            &["SUBNET", "PUBLIC IP", "BACKEND", "DATA PLANE", "CHANGED"],
            rows,
        );
        for p in &s.peers {
            for c in &p.differs {
                let _ = writeln!(out, "  {}", style.bad(&change_line(c)));
            }
        }
    }

    let _ = writeln!(out);
    match &s.last_reconcile {
        Some(r) => {
            let _ = writeln!(
                out,
                "Last reconcile  {}, took {} ms: {}",
                ago(s.now, r.at),
                r.duration_ms,
                pass_summary(r)
            );
            if let Some(e) = &r.error {
                let _ = writeln!(out, "  {}", style.bad(e));
            }
        }
        None => {
            let _ = writeln!(out, "Last reconcile  {}", style.warn("none yet"));
        }
    }
    if let Some(r) = &s.last_repair {
        let _ = writeln!(
            out,
            "Last repair     {}: {}",
            ago(s.now, r.at),
            pass_summary(r)
        );
        for c in &r.changes {
            let _ = writeln!(out, "  {}", change_line(c));
        }
        if r.more_changes > 0 {
            let _ = writeln!(out, "  and {} more", r.more_changes);
        }
    }

    if !s.rejected.is_empty() {
        let _ = writeln!(out, "\nRejected leases ({})", s.rejected.len());
        let rows = s
            .rejected
            .iter()
            .map(|r| {
                vec![
                    plain(r.key.clone()),
                    plain(or_dash(&r.public_ip)),
                    (r.reason.clone(), Some(style.warn(&r.reason))),
                    plain(r.detail.clone()),
                ]
            })
            .collect();
        table(&mut out, &["LEASE", "PUBLIC IP", "REASON", "DETAIL"], rows);
    }

    if let Some(u) = &s.udp {
        let _ = writeln!(
            out,
            "\nudp  tx {} packets, {} bytes, {} dropped; rx {} packets, {} bytes, {} dropped",
            u.tx_packets, u.tx_bytes, u.tx_dropped, u.rx_packets, u.rx_bytes, u.rx_dropped
        );
    }

    let problems = s.problems();
    let _ = writeln!(out);
    if problems.is_empty() {
        let _ = writeln!(out, "Status    {}", style.good("OK"));
    } else {
        let _ = writeln!(
            out,
            "Status    {}",
            style.bad(&format!("{} problem(s)", problems.len()))
        );
        for p in problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out
}
