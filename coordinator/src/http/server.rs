//! The HTTP API's connections: the accept loop, TLS with the HTTP port's
//! own ALPN, and the limits a public HTTP server needs (slowloris, idle
//! keep-alive, requests per connection, open connections), over hyper's
//! HTTP/1.1 + HTTP/2 server.
//!
//! Each connection runs in its own task with a watchdog beside hyper, which
//! knows when a request starts (the service is called) and ends (its
//! response body is dropped) and when bytes arrive, and from that keeps one
//! deadline, as Go's `net/http` splits it:
//! - no request yet: the whole first request head within the header timeout
//!   (counted from the end of the TLS handshake); this also bounds hyper's
//!   HTTP/1-or-2 detection and the HTTP/2 preface, which have no timer;
//! - idle between requests: the idle timeout, until the first byte of the
//!   next request, which then has the header timeout for its head;
//! - a request in flight: none (the request path has its own deadlines),
//!   but its body must arrive in full within the idle timeout of its head
//!   (a slow POST gets a 400, and HTTP/1.1 then closes the connection).
//!
//! hyper's own `header_read_timeout` is off: it also runs while an HTTP/1.1
//! connection waits idle for its next request, so it would cut every idle
//! keep-alive connection at the header timeout.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, Version};
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use nanoinfer_proto::server::Stop;
use nanoinfer_proto::tls::ServerTls;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::rustls::ServerConfig;

use crate::config::HttpServerConfig;

/// What the HTTP port offers in the TLS handshake (most preferred first):
/// HTTP/2 for clients that speak it, HTTP/1.1 for the rest (the OpenAI
/// SDKs, `curl --http1.1`). The gRPC port offers `h2` alone.
pub const HTTP_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// How long a connection asked to close (a timeout) may take to say
/// goodbye (HTTP/2 GOAWAY) before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How often refused connections are logged while they keep coming.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Why the server closed a connection.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabel {
    /// `header_timeout`, `idle_timeout`, `body_timeout`, `max_requests`,
    /// `tls_handshake_timeout` or `tls_handshake_failed`.
    pub reason: &'static str,
}

/// The HTTP API's connection metrics.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// Open connections (TLS handshakes included).
    pub open: Gauge,
    /// Connections closed at accept: --http-max-connections were open.
    pub refused: Counter,
    /// Connections the server closed, by reason.
    pub closed: Family<CloseLabel, Counter>,
}

impl HttpMetrics {
    /// Registers the metrics under `nanoinfer_coordinator_http_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("nanoinfer_coordinator_http");
        r.register(
            "connections_open",
            "Open connections on the HTTP API port (TLS handshakes included)",
            self.open.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed as soon as accepted because --http-max-connections were open",
            self.refused.clone(),
        );
        r.register(
            "connections_closed",
            "HTTP API connections the server closed: header_timeout (slow request head), idle_timeout, body_timeout (slow request body, answered 400), max_requests, tls_handshake_timeout, tls_handshake_failed",
            self.closed.clone(),
        );
    }

    fn close(&self, reason: &'static str) {
        self.closed.get_or_create(&CloseLabel { reason }).inc();
    }
}

/// The rustls configuration of the HTTP port: the public port's (reloaded
/// when its files change) with [`HTTP_ALPN`]. The copy is made once per
/// reload, on the first connection that sees it.
struct TlsConfigs {
    source: Arc<ServerTls>,
    cached: Mutex<Option<(Arc<ServerConfig>, Arc<ServerConfig>)>>,
}

impl TlsConfigs {
    fn current(&self) -> Arc<ServerConfig> {
        let base = self.source.config();
        let mut cached = self.cached.lock().expect("tls cache lock");
        if let Some((seen, ours)) = &*cached {
            if Arc::ptr_eq(seen, &base) {
                return ours.clone();
            }
        }
        let mut ours = (*base).clone();
        ours.alpn_protocols = HTTP_ALPN.iter().map(|p| p.to_vec()).collect();
        let ours = Arc::new(ours);
        *cached = Some((base, ours.clone()));
        ours
    }
}

/// What every connection task shares.
struct Server {
    router: Router,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<TlsConfigs>,
    config: HttpServerConfig,
    metrics: Arc<HttpMetrics>,
}

/// Serves `router` on `listener` (over TLS with `tls`) as the "HTTP API"
/// [`nanoinfer_proto::server::Server`]: drained, it stops accepting, asks
/// every connection to close after its open requests (HTTP/1.1
/// `connection: close`, HTTP/2 GOAWAY) and ends when they have, within the
/// drain's bound; dropped, it closes every connection.
pub fn spawn(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<ServerTls>>,
    config: HttpServerConfig,
    metrics: Arc<HttpMetrics>,
) -> nanoinfer_proto::server::Server {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(None);
    builder.http2().timer(TokioTimer::new());
    let server = Arc::new(Server {
        router,
        builder,
        tls: tls.map(|source| TlsConfigs {
            source,
            cached: Mutex::new(None),
        }),
        config,
        metrics,
    });
    nanoinfer_proto::server::Server::spawn("HTTP API", |stop| async move {
        accept_loop(listener, server, stop).await;
        Ok::<(), Infallible>(())
    })
}

async fn accept_loop(listener: TcpListener, server: Arc<Server>, mut stop: Stop) {
    let slots = Arc::new(Semaphore::new(server.config.max_connections));
    let mut connections = JoinSet::new();
    let mut refusals = Refusals::default();
    let for_connections = stop.clone();
    loop {
        tokio::select! {
            _ = stop.requested() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        connections.spawn(connection(server.clone(), tcp, peer, slot, for_connections.clone()));
                    }
                    Err(_) => {
                        drop(tcp);
                        server.metrics.refused.inc();
                        refusals.note(server.config.max_connections);
                    }
                },
                Err(e) => {
                    // Out of file descriptors and the like: back off rather
                    // than spin.
                    tracing::warn!(error = %e, "HTTP API: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set stays as small as the
            // open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    tracing::info!(
        open = connections.len(),
        "HTTP API: stopped accepting; open connections finish their requests"
    );
    while connections.join_next().await.is_some() {}
}

/// Logs refused connections: the first at once, then a count at most every
/// [`REFUSAL_LOG_EVERY`], so a flood does not flood the log too.
#[derive(Default)]
struct Refusals {
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Refusals {
    fn note(&mut self, limit: usize) {
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_EVERY)
        {
            tracing::warn!(
                refused = self.unlogged,
                limit,
                "HTTP API: --http-max-connections connections are open; new connections are closed at once"
            );
            self.last_log = Some(now);
            self.unlogged = 0;
        }
    }
}

/// One accepted connection: the TLS handshake (bounded), then HTTP.
async fn connection(
    server: Arc<Server>,
    tcp: TcpStream,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
    mut stop: Stop,
) {
    server.metrics.open.inc();
    let _open = DecOnDrop(&server.metrics.open);
    // Tokens are small writes that must leave at once: no Nagle.
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &server.tls else {
        return serve(&server, tcp, peer, stop).await;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    let handshake = tokio::select! {
        h = tokio::time::timeout(server.config.tls_handshake_timeout, acceptor.accept(tcp)) => h,
        _ = stop.requested() => return,
    };
    match handshake {
        Ok(Ok(stream)) => serve(&server, stream, peer, stop).await,
        Ok(Err(e)) => {
            server.metrics.close("tls_handshake_failed");
            tracing::info!(%peer, error = %e, "HTTP API: TLS handshake refused");
        }
        Err(_) => {
            server.metrics.close("tls_handshake_timeout");
            tracing::debug!(%peer, "HTTP API: TLS handshake timed out");
        }
    }
}

struct DecOnDrop<'a>(&'a Gauge);

impl Drop for DecOnDrop<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// HTTP on an established connection, under the watchdog.
async fn serve<I>(server: &Server, io: I, peer: SocketAddr, mut stop: Stop)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = &server.config;
    let state = Arc::new(ConnState::new(Instant::now()));
    let service = Counted {
        inner: TowerToHyperService::new(server.router.clone()),
        state: state.clone(),
        max_requests: config.max_requests_per_connection,
        body_timeout: config.idle_timeout,
        metrics: server.metrics.clone(),
    };
    let io = TokioIo::new(Watched {
        inner: io,
        state: state.clone(),
    });
    let conn = server.builder.serve_connection(io, service);
    tokio::pin!(conn);
    // Set once the connection was asked to close; a timeout then also
    // bounds how long it may take.
    let mut closing = false;
    let mut hard_deadline: Option<Instant> = None;
    let mut stopping = false;
    loop {
        // Once a timeout asked the connection to close, only the grace
        // period is left.
        let wake = hard_deadline.or_else(|| state.deadline(config).map(|(at, _)| at));
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "HTTP API connection ended with an error");
                }
                return;
            }
            _ = state.changed.notified() => {
                if !closing && state.limit_reached.load(Ordering::Acquire) {
                    closing = true;
                    server.metrics.close("max_requests");
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = stop.requested(), if !stopping => {
                stopping = true;
                if !closing {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = sleep_until(wake), if wake.is_some() => {
                let now = Instant::now();
                if hard_deadline.is_some() {
                    return;
                }
                // Recomputed: a request may have started since.
                if let Some((at, reason)) = state.deadline(config) {
                    if now >= at {
                        server.metrics.close(reason);
                        tracing::debug!(%peer, reason, "HTTP API: closing the connection");
                        hard_deadline = Some(now + CLOSE_GRACE);
                        if !closing {
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What the watchdog knows of one connection.
struct ConnState {
    phase: Mutex<Phase>,
    /// Idle, and no byte read since: the next read starts the header clock.
    awaiting_bytes: AtomicBool,
    /// Requests started on this connection.
    requests: AtomicU64,
    /// The request limit was reached: close after the open requests.
    limit_reached: AtomicBool,
    /// Wakes the watchdog when a request starts or ends, or a byte comes.
    changed: Notify,
}

struct Phase {
    /// Requests whose response has not finished.
    in_flight: usize,
    /// No request has started yet.
    fresh: bool,
    /// When the last request finished (or the connection started).
    idle_since: Instant,
    /// The first byte read while idle: a next request is on its way.
    first_byte: Option<Instant>,
}

impl ConnState {
    fn new(now: Instant) -> Self {
        Self {
            phase: Mutex::new(Phase {
                in_flight: 0,
                fresh: true,
                idle_since: now,
                first_byte: None,
            }),
            awaiting_bytes: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            limit_reached: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    /// When the connection is to be closed, and why; `None` while a request
    /// is in flight.
    fn deadline(&self, config: &HttpServerConfig) -> Option<(Instant, &'static str)> {
        let phase = self.phase.lock().expect("connection state lock");
        if phase.in_flight > 0 {
            return None;
        }
        Some(if phase.fresh {
            (phase.idle_since + config.header_timeout, "header_timeout")
        } else if let Some(first) = phase.first_byte {
            (first + config.header_timeout, "header_timeout")
        } else {
            (phase.idle_since + config.idle_timeout, "idle_timeout")
        })
    }

    /// A request started; returns the guard that ends it.
    fn start_request(self: &Arc<Self>, max_requests: u64) -> (RequestGuard, bool) {
        {
            let mut phase = self.phase.lock().expect("connection state lock");
            phase.in_flight += 1;
            phase.fresh = false;
            phase.first_byte = None;
        }
        self.awaiting_bytes.store(false, Ordering::Release);
        let n = self.requests.fetch_add(1, Ordering::AcqRel) + 1;
        let last = n >= max_requests;
        if last {
            self.limit_reached.store(true, Ordering::Release);
        }
        self.changed.notify_one();
        (RequestGuard(self.clone()), last)
    }

    fn read_some(&self) {
        if self.awaiting_bytes.load(Ordering::Relaxed)
            && self.awaiting_bytes.swap(false, Ordering::AcqRel)
        {
            let mut phase = self.phase.lock().expect("connection state lock");
            if phase.in_flight == 0 && phase.first_byte.is_none() {
                phase.first_byte = Some(Instant::now());
            }
            drop(phase);
            self.changed.notify_one();
        }
    }
}

/// Ends its request when dropped: hyper drops a response body once it is
/// sent (or the connection is gone).
struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let idle = {
            let mut phase = self.0.phase.lock().expect("connection state lock");
            phase.in_flight -= 1;
            if phase.in_flight == 0 {
                phase.idle_since = Instant::now();
                phase.first_byte = None;
            }
            phase.in_flight == 0
        };
        if idle {
            self.0.awaiting_bytes.store(true, Ordering::Release);
        }
        self.0.changed.notify_one();
    }
}

/// The connection's IO, noting when bytes arrive.
struct Watched<I> {
    inner: I,
    state: Arc<ConnState>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.state.read_some();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The router as hyper's service, counting requests and holding each one's
/// guard until its response body is done.
struct Counted {
    inner: TowerToHyperService<Router>,
    state: Arc<ConnState>,
    max_requests: u64,
    /// A request body must have arrived in full this long after its head.
    body_timeout: Duration,
    metrics: Arc<HttpMetrics>,
}

type ServiceFuture =
    Pin<Box<dyn Future<Output = Result<Response<Tracked>, Infallible>> + Send + 'static>>;

impl hyper::service::Service<Request<Incoming>> for Counted {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let (guard, last) = self.state.start_request(self.max_requests);
        let http1 = request.version() <= Version::HTTP_11;
        let deadline = Instant::now() + self.body_timeout;
        let metrics = self.metrics.clone();
        let request = request.map(|body| {
            Body::new(TimedBody {
                body,
                deadline,
                sleep: None,
                metrics,
            })
        });
        let response = hyper::service::Service::call(&self.inner, request);
        Box::pin(async move {
            let mut response = response.await?;
            if last && http1 {
                // The client learns before its next request that this
                // connection ends (HTTP/2 gets a GOAWAY instead).
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response.map(|body| Tracked {
                body,
                _guard: guard,
            }))
        })
    }
}

/// A request body that fails once its deadline passes before its end: a
/// client trickling a body (slow POST) gets a 400 and loses the connection
/// instead of holding it.
struct TimedBody {
    body: Incoming,
    deadline: Instant,
    /// Made on the first wait, so bodies that arrive at once cost no timer.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    metrics: Arc<HttpMetrics>,
}

/// The error a [`TimedBody`] ends with.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimeout;

impl hyper::body::Body for TimedBody {
    type Data = axum::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let deadline = this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.metrics.close("body_timeout");
                        Poll::Ready(Some(Err(Box::new(BodyTimeout))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body that ends its request when dropped.
struct Tracked {
    body: Body,
    _guard: RequestGuard,
}

impl hyper::body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HttpServerConfig {
        HttpServerConfig {
            header_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(1),
            max_requests_per_connection: 2,
            max_connections: 4,
            cors_origins: Vec::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_follows_the_connection_phase() {
        let c = config();
        let start = Instant::now();
        let state = Arc::new(ConnState::new(start));
        // A fresh connection: the first head within the header timeout.
        assert_eq!(
            state.deadline(&c),
            Some((start + c.header_timeout, "header_timeout"))
        );
        // Bytes on a fresh connection change nothing.
        state.read_some();
        assert_eq!(state.deadline(&c).unwrap().0, start + c.header_timeout);

        tokio::time::advance(Duration::from_secs(1)).await;
        let (guard, last) = state.start_request(c.max_requests_per_connection);
        assert!(!last);
        assert_eq!(state.deadline(&c), None, "nothing runs out mid-request");
        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(state.deadline(&c), None);

        // Idle: the idle timeout, until a byte of the next request comes.
        drop(guard);
        let idle = Instant::now();
        assert_eq!(
            state.deadline(&c),
            Some((idle + c.idle_timeout, "idle_timeout"))
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        state.read_some();
        let first = Instant::now();
        assert_eq!(
            state.deadline(&c),
            Some((first + c.header_timeout, "header_timeout"))
        );
        // Later bytes do not push it out.
        tokio::time::advance(Duration::from_secs(1)).await;
        state.read_some();
        assert_eq!(state.deadline(&c).unwrap().0, first + c.header_timeout);

        // The second request is the last one allowed.
        let (guard, last) = state.start_request(c.max_requests_per_connection);
        assert!(last && state.limit_reached.load(Ordering::Acquire));
        drop(guard);
        assert_eq!(state.deadline(&c).unwrap().1, "idle_timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn overlapping_requests_keep_the_connection_busy() {
        let c = config();
        let state = Arc::new(ConnState::new(Instant::now()));
        let (a, _) = state.start_request(10);
        let (b, _) = state.start_request(10);
        drop(a);
        assert_eq!(state.deadline(&c), None, "one still in flight");
        drop(b);
        assert_eq!(state.deadline(&c).unwrap().1, "idle_timeout");
    }
}
