//! The health server: `/healthz`, `/readyz`, `/metrics`.
//!
//! A few lines of HTTP/1.0 over tokio are enough for probes and Prometheus scrapes; no web
//! framework on the daemon's footprint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;

/// Binds the server; the returned future serves until dropped.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &metrics)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut len = 0;
    // Read the whole head (to the blank line) before answering: closing with unread request
    // bytes makes the kernel reset the connection under a client that wrote in pieces.
    while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET" | "HEAD", "/readyz") if metrics.is_ready() => {
            ("200 OK", "text/plain", "ready\n".to_string())
        }
        ("GET" | "HEAD", "/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            "not ready: no lease or subnet file yet\n".to_string(),
        ),
        ("GET" | "HEAD", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

/// Tells systemd we are ready when it started us with `NOTIFY_SOCKET` (Type=notify).
pub fn notify_systemd_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("systemd notify: {e}");
            return;
        }
    };
    let bytes = path.as_encoded_bytes();
    // A leading '@' names an abstract socket.
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(b"READY=1", &addr))
    } else {
        sock.send_to(b"READY=1", &path)
    };
    match result {
        Ok(_) => tracing::info!("notified systemd: READY=1"),
        Err(e) => tracing::warn!("systemd notify via {:?}: {e}", path),
    }
}
