//! `flanneld status`: reads `/v1/status` from the daemon on this node and prints it.
//!
//! A plain blocking HTTP/1.0 GET over a `TcpStream`: one request, no runtime needed.

use std::io::{IsTerminal, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use super::table::{self, Style};
use super::Status;

/// Exit code when the daemon reports a problem (a peer missing or differing, a member down).
pub const EXIT_PROBLEMS: u8 = 1;
/// Exit code when the daemon cannot be reached or its answer is not a status.
pub const EXIT_UNREACHABLE: u8 = 2;

const TIMEOUT: Duration = Duration::from_secs(5);

/// `FLANNELD_HEALTHZ_PORT` in `dist/flanneld.default`.
pub const DEFAULT_PORT: u16 = 10260;

/// Shows what the flanneld on this node sees: its lease, the registry, every peer and the
/// state of its data plane. Exits 1 when something is missing or differs, 2 when the daemon
/// cannot be reached.
#[derive(Parser, Debug)]
#[command(name = "flanneld status")]
pub struct StatusOpts {
    /// Address of the daemon's health server (the daemon's --healthz-ip; 0.0.0.0 and :: mean
    /// this host's loopback).
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,
    /// Port of the daemon's health server (the daemon's --healthz-port). The default is the
    /// port `dist/flanneld.default` (the systemd unit's settings) gives the daemon; the
    /// daemon's own default, 0, turns the server off.
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = DEFAULT_PORT)]
    pub healthz_port: u16,
    /// Print the JSON of /v1/status instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "--healthz-port 0: flanneld serves its status only on a health port; start it with \
         --healthz-port N and run `flanneld status --healthz-port N` (or set \
         FLANNELD_HEALTHZ_PORT)"
    )]
    NoPort,
    #[error(
        "cannot reach flanneld at http://{addr}/v1/status: {err} (is it running with \
         --healthz-port {port}? point elsewhere with --healthz-ip/--healthz-port or \
         FLANNELD_HEALTHZ_IP/FLANNELD_HEALTHZ_PORT)",
        port = .addr.port()
    )]
    Connect {
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error("http://{addr}/v1/status answered {status_line:?} (an older flanneld?)")]
    Http {
        addr: SocketAddr,
        status_line: String,
    },
    #[error("http://{addr}/v1/status: not a status: {err}")]
    Json {
        addr: SocketAddr,
        err: serde_json::Error,
    },
}

/// Where to ask: an unspecified `--healthz-ip` (the daemon listens on every address) is
/// reached through loopback.
pub fn target(opts: &StatusOpts) -> Result<SocketAddr, FetchError> {
    if opts.healthz_port == 0 {
        return Err(FetchError::NoPort);
    }
    let ip = match opts.healthz_ip {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(SocketAddr::new(ip, opts.healthz_port))
}

/// GETs `/v1/status` from `addr`.
pub fn fetch(addr: SocketAddr) -> Result<Status, FetchError> {
    let connect = |err| FetchError::Connect { addr, err };
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(connect)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(connect)?;
    stream
        .write_all(b"GET /v1/status HTTP/1.0\r\nHost: flanneld\r\n\r\n")
        .map_err(connect)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(connect)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or_default().to_string();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(FetchError::Http { addr, status_line });
    }
    serde_json::from_str(body).map_err(|err| FetchError::Json { addr, err })
}

/// What `flanneld status` prints for `status`, and its exit code.
pub fn output(status: &Status, json: bool, style: Style) -> (String, u8) {
    let code = if status.problems().is_empty() {
        0
    } else {
        EXIT_PROBLEMS
    };
    let text = if json {
        super::to_json(status)
    } else {
        table::render(status, style)
    };
    (text, code)
}

/// `flanneld status ARGS`.
pub fn main(args: &[String]) -> ExitCode {
    let opts = StatusOpts::parse_from(
        std::iter::once("flanneld status".to_string()).chain(args.iter().cloned()),
    );
    let status = target(&opts).and_then(fetch);
    match status {
        Ok(status) => {
            let style = if std::io::stdout().is_terminal() {
                Style::coloured()
            } else {
                Style::plain()
            };
            let (text, code) = output(&status, opts.json, style);
            print!("{text}");
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("flanneld status: {e}");
            ExitCode::from(EXIT_UNREACHABLE)
        }
    }
}
