//! The health server: `/healthz`, `/readyz`, `/metrics`, `/v1/status`.
//!
//! hyper's HTTP/1 server (already in the tree through the etcd client's gRPC) parses the
//! requests; no web framework on the daemon's footprint. The port is often reachable from the
//! whole node network, so a flood of idle or slow connections must cost the daemon a bounded
//! number of file descriptors and little CPU, and probes must get answers again as soon as it
//! ends: see [`Limits`]. hyper enforces the head's size and deadline; the connection cap and
//! the whole-request deadline are ours.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use crate::metrics::{self, Metrics};

/// What one client, or many, may take from the health server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once. A new connection beyond it closes the *oldest* one: a
    /// flood of idle connections then costs at most this many descriptors, and a probe that
    /// sends its request at once (as kubelet and Prometheus do) is still answered.
    pub max_connections: usize,
    /// Bytes of request head (request line and headers) read; a longer head (or one of more
    /// than 100 header lines) gets 431. At least 8192: hyper's smallest read buffer.
    pub max_head_bytes: usize,
    /// Time to receive the whole head; an idle or slow ("slow-loris") client is closed then.
    pub head_deadline: Duration,
    /// Time for the whole exchange, answer included.
    pub request_deadline: Duration,
}

/// The limits the daemon runs with.
pub const LIMITS: Limits = Limits {
    max_connections: 128,
    max_head_bytes: 8192,
    head_deadline: Duration::from_secs(2),
    request_deadline: Duration::from_secs(5),
};

/// Bytes read away after a 431 before closing anyway.
const DRAIN_AFTER_431: usize = 64 * 1024;

/// Binds the server; the returned future serves until dropped.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    serve_with(listener, metrics, LIMITS).await
}

async fn serve_with(listener: TcpListener, metrics: Arc<Metrics>, limits: Limits) {
    let registry = Arc::new(metrics::registry(metrics.clone()));
    let open = Arc::new(OpenConnections::default());
    let mut backoff = AcceptBackoff::default();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if let Some(failures) = backoff.after_success() {
                    tracing::debug!(
                        "health server: accepting connections again after {failures} failed attempts"
                    );
                }
                let metrics = metrics.clone();
                let registry = registry.clone();
                open.admit(limits.max_connections, async move {
                    let _ = tokio::time::timeout(
                        limits.request_deadline,
                        answer(stream, &metrics, &registry, &limits),
                    )
                    .await;
                });
            }
            Err(err) => {
                let Some(pause) = backoff.after_error(&err) else {
                    continue;
                };
                if backoff.failures == 1 && backoff.may_warn(Instant::now()) {
                    tracing::warn!(
                        "health server: accept failed: {err}; retrying with back-off (up to {:?}) until it succeeds",
                        AcceptBackoff::MAX_PAUSE
                    );
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// The connection tasks still running, oldest first, so that the oldest can be closed when a
/// new one would exceed the cap.
#[derive(Debug, Default)]
struct OpenConnections {
    tasks: Mutex<OpenTasks>,
}

#[derive(Debug, Default)]
struct OpenTasks {
    next_id: u64,
    by_age: BTreeMap<u64, AbortHandle>,
}

impl OpenConnections {
    /// Runs `serve_one` as its own task, first closing the oldest connections that would put
    /// the count over `max`.
    fn admit(self: &Arc<Self>, max: usize, serve_one: impl Future<Output = ()> + Send + 'static) {
        let mut evicted = Vec::new();
        {
            let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
            while tasks.by_age.len() >= max.max(1) {
                match tasks.by_age.pop_first() {
                    Some((_, oldest)) => evicted.push(oldest),
                    None => break,
                }
            }
            let id = tasks.next_id;
            tasks.next_id += 1;
            let gone = Departure {
                open: self.clone(),
                id,
            };
            // The task cannot remove itself before it is registered: its `Departure` waits for
            // this lock.
            let task = tokio::spawn(async move {
                let _gone = gone;
                serve_one.await;
            });
            tasks.by_age.insert(id, task.abort_handle());
        }
        // Aborting drops the task's stream (closing the connection) on the runtime.
        for oldest in evicted {
            oldest.abort();
        }
    }
}

/// Removes a connection task from [`OpenConnections`] when it ends, however it ends.
struct Departure {
    open: Arc<OpenConnections>,
    id: u64,
}

impl Drop for Departure {
    fn drop(&mut self) {
        self.open
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_age
            .remove(&self.id);
    }
}

/// Pauses after accept errors that say the process or the system ran out of something (file
/// descriptors, memory, buffers). The pending connection stays queued, so without a pause
/// accept fails again at once and the loop burns a CPU until a descriptor frees up.
#[derive(Debug, Default)]
struct AcceptBackoff {
    /// Consecutive failed accepts: 0 outside an episode.
    failures: u32,
    warned_at: Option<Instant>,
}

impl AcceptBackoff {
    const FIRST_PAUSE: Duration = Duration::from_millis(10);
    const MAX_PAUSE: Duration = Duration::from_secs(1);
    /// A flood keeps starting new episodes (each time idle connections are closed, the queue
    /// refills them): one warning per this interval is enough.
    const WARN_EVERY: Duration = Duration::from_secs(60);

    fn may_warn(&mut self, now: Instant) -> bool {
        let due = self
            .warned_at
            .is_none_or(|last| now.duration_since(last) >= Self::WARN_EVERY);
        if due {
            self.warned_at = Some(now);
        }
        due
    }

    /// How long to wait before the next accept; `None` for errors that concern only the
    /// connection being accepted (it is gone; take the next one at once).
    fn after_error(&mut self, err: &std::io::Error) -> Option<Duration> {
        if is_per_connection(err) {
            return None;
        }
        let doublings = self.failures.min(16);
        self.failures = self.failures.saturating_add(1);
        Some((Self::FIRST_PAUSE * 2u32.pow(doublings)).min(Self::MAX_PAUSE))
    }

    /// Ends an episode of failures: returns how many there were, if any.
    fn after_success(&mut self) -> Option<u32> {
        let failures = std::mem::take(&mut self.failures);
        (failures > 0).then_some(failures)
    }
}

/// Errors accept(2) reports for one connection (aborted by the client, refused by a security
/// module, or a pending network error that Linux passes on), as opposed to the listener's or
/// the process's state.
fn is_per_connection(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EPERM
                | libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETDOWN
                | libc::ENETUNREACH
        )
    )
}

/// One connection, served by hyper's HTTP/1 server: it enforces the head limits
/// ([`Limits::max_head_bytes`] → 431, [`Limits::head_deadline`] → closed); the whole-request
/// deadline is the caller's.
async fn answer(mut stream: TcpStream, metrics: &Metrics, registry: &Registry, limits: &Limits) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.head_deadline)
        .max_buf_size(limits.max_head_bytes)
        // One request per connection, as probes and scrapes send: the request deadline then
        // bounds what one connection can hold.
        .keep_alive(false)
        .title_case_headers(true)
        .auto_date_header(false);
    let service = service_fn(|request| async move {
        Ok::<_, std::convert::Infallible>(respond(&request, metrics, registry))
    });
    let served = http
        .serve_connection(TokioIo::new(&mut stream), service)
        .await;
    if served.is_err_and(|err| err.is_parse_too_large()) {
        // hyper has answered 431 while the rest of the oversized head may still be coming:
        // read some of it away (within the request deadline) so that closing does not reset
        // the connection before the client has read the answer.
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < DRAIN_AFTER_431 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }
}

/// `/healthz`, as flannel answers it.
const HEALTHZ_BODY: &str = "flanneld is running";
/// `/readyz` with 200, as flannel answers it.
const READY_BODY: &str = "flanneld is ready";
/// `/readyz` with 503: flannel's text, then why.
const NOT_READY_BODY: &str = "flanneld is not ready yet: no lease or subnet file written";

/// The answer to one request: status, plain-text body (hyper leaves it out for HEAD).
fn respond<B>(request: &Request<B>, metrics: &Metrics, registry: &Registry) -> Response<String> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, path) => match path {
            // flannel's own bodies, byte for byte (no newline); ours adds the reason to the 503.
            "/healthz" => (StatusCode::OK, "text/plain", HEALTHZ_BODY.to_string()),
            "/readyz" if metrics.is_ready() => {
                (StatusCode::OK, "text/plain", READY_BODY.to_string())
            }
            "/readyz" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                NOT_READY_BODY.to_string(),
            ),
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics::render(registry),
            ),
            "/v1/status" => (
                StatusCode::OK,
                "application/json",
                crate::status::to_json(&metrics.status()),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found\n".to_string(),
            ),
        },
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    };
    // The answers have always been HTTP/1.0 with `Connection: close`, whatever the request;
    // the headers are written in this order (hyper would add the length last).
    let length = HeaderValue::from(body.len());
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.version_mut() = Version::HTTP_10;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, length);
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A server with the daemon's limits on a free loopback port.
    async fn start() -> SocketAddr {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Arc::new(Metrics::default())));
        addr
    }

    /// Sends `request` and reads the answer to the end.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        String::from_utf8_lossy(&response).into_owned()
    }

    #[tokio::test]
    async fn answers_the_status_as_json() {
        let addr = start().await;
        let response = exchange(addr, b"GET /v1/status HTTP/1.0\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.0 200 OK\r\n"), "{response}");
        assert!(
            response.contains("Content-Type: application/json\r\n"),
            "{response}"
        );
        let body = response.split_once("\r\n\r\n").unwrap().1;
        let status: crate::status::Status = serde_json::from_str(body).unwrap();
        assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
        assert!(status.lease.is_none() && status.peers.is_empty());
    }

    #[tokio::test]
    async fn answers_probes() {
        let addr = start().await;
        let response = exchange(addr, b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.0 200 OK\r\n"), "{response}");
        assert!(
            response.ends_with("\r\n\r\nflanneld is running"),
            "{response}"
        );
    }

    /// Status line, headers and body of each endpoint, as the server has always answered
    /// them (kubelet, Prometheus and scripts read these).
    #[tokio::test]
    async fn answers_keep_their_status_headers_and_bodies() {
        let addr = start().await;
        let answer = |status: &str, content_type: &str, body: &str| {
            format!(
                "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        };
        let cases = [
            (
                "GET /healthz HTTP/1.0",
                answer("200 OK", "text/plain", "flanneld is running"),
            ),
            // An HTTP/1.1 client that would keep the connection gets the same closing answer.
            (
                "GET /healthz?verbose HTTP/1.1",
                answer("200 OK", "text/plain", "flanneld is running"),
            ),
            (
                "GET /readyz HTTP/1.0",
                answer(
                    "503 Service Unavailable",
                    "text/plain",
                    "flanneld is not ready yet: no lease or subnet file written",
                ),
            ),
            (
                "GET /nope HTTP/1.0",
                answer("404 Not Found", "text/plain", "not found\n"),
            ),
            (
                "POST /healthz HTTP/1.0",
                answer(
                    "405 Method Not Allowed",
                    "text/plain",
                    "method not allowed\n",
                ),
            ),
        ];
        for (request_line, expected) in cases {
            let request = format!("{request_line}\r\nHost: x\r\n\r\n");
            let response = exchange(addr, request.as_bytes()).await;
            assert_eq!(response, expected, "{request_line}");
        }
        let head = exchange(addr, b"HEAD /healthz HTTP/1.0\r\n\r\n").await;
        assert_eq!(
            head,
            answer("200 OK", "text/plain", "flanneld is running")
                .trim_end_matches("flanneld is running"),
            "HEAD has the GET's head and no body"
        );
        let metrics = exchange(addr, b"GET /metrics HTTP/1.0\r\n\r\n").await;
        assert!(
            metrics.starts_with(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: "
            ),
            "{metrics}"
        );
        assert!(
            metrics.contains("\r\n\r\n# HELP flannel_ready "),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn head_written_in_pieces_is_answered() {
        let addr = start().await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // The blank line that ends the head is split across writes.
        for piece in [&b"GET /healthz HTTP/1.0\r\n\r"[..], b"\n"] {
            stream.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.0 200 OK\r\n"), "{response}");
    }

    #[tokio::test]
    async fn oversized_head_gets_431() {
        let addr = start().await;
        let padding = "a".repeat(LIMITS.max_head_bytes + 2000);
        let request = format!("GET /healthz HTTP/1.0\r\nX-Padding: {padding}\r\n\r\n");
        let response = exchange(addr, request.as_bytes()).await;
        // hyper answers before it knows the request's version, with the status line Go
        // flanneld's net/http server sends for a head over its (1 MiB) limit.
        assert!(
            response.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{response}"
        );
    }

    #[tokio::test]
    async fn slow_loris_is_closed_at_the_head_deadline() {
        let addr = start().await;
        let (mut from_server, mut to_server) = TcpStream::connect(addr).await.unwrap().into_split();
        let started = Instant::now();
        // One byte a second of a head that never ends.
        let trickle = tokio::spawn(async move {
            let bytes = b"GET /healthz HTTP/1.0\r\nX-Slow: "
                .iter()
                .chain(std::iter::repeat(&b'a'));
            for b in bytes {
                if to_server.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), from_server.read(&mut buf))
            .await
            .expect("the server never closed the slow connection");
        trickle.abort();
        let after = started.elapsed();
        assert!(
            matches!(closed, Ok(0) | Err(_)),
            "got an answer: {closed:?}"
        );
        assert!(
            after >= LIMITS.head_deadline - Duration::from_millis(100)
                && after < LIMITS.head_deadline + Duration::from_secs(1),
            "closed after {after:?}, deadline {:?}",
            LIMITS.head_deadline
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_over_the_cap_close_the_oldest_and_probes_are_answered() {
        let addr = start().await;
        let flood = LIMITS.max_connections + 150;
        let mut idle = Vec::new();
        for _ in 0..flood {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // While all of them are still open on our side, the server has already closed all but
        // the newest `max_connections`.
        let closed_within = |stream: TcpStream| async move {
            let mut stream = stream;
            let mut buf = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await;
            (matches!(read, Ok(Ok(0)) | Ok(Err(_))), stream)
        };
        let outcomes = futures::future::join_all(idle.into_iter().map(closed_within)).await;
        let closed = outcomes.iter().filter(|(closed, _)| *closed).count();
        assert!(
            closed >= flood - LIMITS.max_connections,
            "{closed} of {flood} idle connections closed within 1 s; the cap is {}",
            LIMITS.max_connections
        );
        let started = Instant::now();
        let response = exchange(addr, b"GET /healthz HTTP/1.0\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.0 200 OK\r\n"), "{response}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        drop(outcomes);
    }

    fn os_error(code: i32) -> std::io::Error {
        std::io::Error::from_raw_os_error(code)
    }

    #[test]
    fn accept_backs_off_when_out_of_descriptors_and_not_for_aborted_connections() {
        let mut backoff = AcceptBackoff::default();
        assert_eq!(backoff.after_error(&os_error(libc::ECONNABORTED)), None);
        assert_eq!(
            backoff.after_success(),
            None,
            "an aborted connection is no episode"
        );
        let pauses: Vec<_> = (0..10)
            .map(|_| backoff.after_error(&os_error(libc::EMFILE)).unwrap())
            .collect();
        assert_eq!(pauses[0], AcceptBackoff::FIRST_PAUSE);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]), "{pauses:?}");
        assert_eq!(pauses[9], AcceptBackoff::MAX_PAUSE);
        for code in [libc::ENFILE, libc::ENOMEM, libc::ENOBUFS] {
            assert!(backoff.after_error(&os_error(code)).is_some(), "{code}");
        }
        assert_eq!(backoff.after_success(), Some(13));
        assert_eq!(backoff.after_success(), None);
        assert_eq!(
            backoff.after_error(&os_error(libc::EMFILE)),
            Some(AcceptBackoff::FIRST_PAUSE),
            "a new episode starts from the first pause"
        );
    }

    #[test]
    fn accept_failures_warn_at_most_once_a_minute() {
        let mut backoff = AcceptBackoff::default();
        let start = Instant::now();
        assert!(backoff.may_warn(start));
        assert!(!backoff.may_warn(start + Duration::from_secs(2)));
        assert!(!backoff.may_warn(start + Duration::from_secs(59)));
        assert!(backoff.may_warn(start + AcceptBackoff::WARN_EVERY));
    }
}
