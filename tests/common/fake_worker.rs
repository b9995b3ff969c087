//! A programmable test-double worker: speaks `nanoinfer.worker.v1` and
//! `grpc.health.v1`, registers in a real etcd under a lease like a real
//! worker (or nowhere, for an in-process coordinator's static worker set),
//! and fails on command. It runs on its own tokio runtime, so
//! [`FakeWorker::kill`] is a process death as the coordinator sees it: every
//! connection drops at once and the lease keep-alive stops. Built with
//! [`Builder::local`] it runs on the test's own runtime instead (what a
//! test with paused time needs: a clock that only moves when every task,
//! the fake's included, is waiting), and a kill closes every connection it
//! accepted.
//!
//! Its tokens are predictable: token `i` has id `1000 + i` and text `t{i} `,
//! and a call with `resume_token_ids` continues at index `len(ids)`, so a
//! stream stitched from two workers reads exactly like one uninterrupted.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use nanoinfer_proto::worker::worker_service_server::{WorkerService, WorkerServiceServer};
use nanoinfer_proto::worker::{
    FinishReason, Finished, GenerateRequest, GenerateResponse, LoadRequest, LoadResponse,
    WorkerLoad,
};
use tonic::{Request, Response, Status};

/// What the fake does with its calls.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Serve normally.
    None,
    /// A fresh call sends this many tokens, then the whole "process" dies;
    /// a resumed call is served normally.
    DieAfter(u32),
    /// Accept calls, admit them, but never send a token (a running request
    /// that makes no progress: hung).
    Hang,
    /// Hold each fresh call in the "queue" this long (no message at all, as
    /// a real worker busy with other requests), then admit and serve it.
    Queued(Duration),
    /// Refuse with RESOURCE_EXHAUSTED.
    Exhausted,
    /// Wait this long before the first token.
    SlowStart(Duration),
}

/// One `Generate` call as the fake received it.
#[derive(Debug, Clone)]
pub struct Call {
    pub request_id: String,
    pub max_tokens: u32,
    pub resume_token_ids: Vec<i32>,
    /// The `grpc-timeout` it carried.
    pub timeout: Option<Duration>,
    /// The caller's address (one per connection).
    pub peer: Option<std::net::SocketAddr>,
}

/// What the fake's streams share with the test.
#[derive(Default)]
struct Shared {
    /// How it paces and labels its tokens.
    pace: Pace,
    fault: Mutex<Option<Fault>>,
    calls: Mutex<Vec<Call>>,
    /// Streams dropped before their end (the caller went away).
    abandoned: Mutex<u32>,
    /// What a `DieAfter` stream calls to die.
    die: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// The load its final messages report (none unless set).
    load: Mutex<Option<WorkerLoad>>,
    /// What its `grpc.health.v1` answers: SERVING unless set otherwise.
    not_serving: std::sync::atomic::AtomicBool,
    /// When each health check came (the runtime's clock).
    health_checks: Mutex<Vec<tokio::time::Instant>>,
}

pub struct FakeWorker {
    pub id: String,
    pub addr: String,
    capacity: (u32, u32),
    shared: Arc<Shared>,
    /// Its own runtime (none when local, or once dead).
    runtime: Arc<Mutex<Option<tokio::runtime::Runtime>>>,
    /// True once it is dead (killed, or died by its fault).
    killed: Arc<tokio::sync::watch::Sender<bool>>,
}

/// Text of fake token `i`.
pub fn token_text(i: u32) -> String {
    format!("t{i} ")
}

/// The text of `n` fake tokens.
pub fn fake_text(n: u32) -> String {
    (0..n).map(token_text).collect()
}

/// Interval between fake tokens.
const TOKEN_INTERVAL: Duration = Duration::from_millis(5);

/// How a fake paces and labels its tokens.
#[derive(Debug, Clone, Copy)]
struct Pace {
    interval: Duration,
    /// Each token's text is its send time (`nanoinfer::stamp`), for the
    /// router benchmark; else [`token_text`].
    stamp: bool,
    /// Record every call (tests read them back); a benchmark's millions
    /// of calls are not kept.
    record: bool,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            interval: TOKEN_INTERVAL,
            stamp: false,
            record: true,
        }
    }
}

/// How to start a [`FakeWorker`]: where it listens and registers, its TLS,
/// pace and capacity. The defaults are the tests': a loopback port of its
/// own, a token every 5 ms, 64 slots and 64 queued, calls recorded.
pub struct Builder<'a> {
    id: &'a str,
    etcd: Option<(String, i64)>,
    tls: Option<nanoinfer_proto::tls::ServerTlsFiles>,
    listen: std::net::SocketAddr,
    pace: Pace,
    capacity: (u32, u32),
    local: bool,
}

impl<'a> Builder<'a> {
    /// Runs on the runtime of the test that starts it (for tests with
    /// paused time), without TLS.
    pub fn local(mut self) -> Self {
        self.local = true;
        self
    }

    /// Registers in etcd at `endpoint` under a lease of `ttl` seconds
    /// (kept alive until it dies); without this it registers nowhere.
    pub fn etcd(mut self, endpoint: &str, ttl: i64) -> Self {
        self.etcd = Some((endpoint.to_string(), ttl));
        self
    }

    /// Serves TLS with these files.
    pub fn tls(mut self, files: Option<nanoinfer_proto::tls::ServerTlsFiles>) -> Self {
        self.tls = files;
        self
    }

    /// Listens on `addr` instead of a free loopback port.
    pub fn listen(mut self, addr: std::net::SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// A token every `interval`; `stamp`: each token's text is its send
    /// time; calls are not recorded (a benchmark's load).
    pub fn paced(mut self, interval: Duration, stamp: bool) -> Self {
        self.pace = Pace {
            interval,
            stamp,
            record: false,
        };
        self
    }

    /// The slots and queue it registers (what the coordinator lets it hold).
    pub fn capacity(mut self, slots: u32, queue: u32) -> Self {
        self.capacity = (slots, queue);
        self
    }

    pub async fn start(self) -> FakeWorker {
        FakeWorker::spawn(self).await
    }
}

struct Svc(Arc<Shared>);

/// Counts a stream dropped before its final message.
struct Abandon(Arc<Shared>, bool);

impl Drop for Abandon {
    fn drop(&mut self) {
        if !self.1 {
            *self.0.abandoned.lock().unwrap() += 1;
        }
    }
}

type GenStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for Svc {
    type GenerateStream = GenStream;
    type KvEventsStream =
        Pin<Box<dyn Stream<Item = Result<nanoinfer_proto::worker::KvEventBatch, Status>> + Send>>;

    /// A test double has no KV cache to publish: like a worker from before
    /// KV events, it answers UNIMPLEMENTED (routed by load alone).
    async fn kv_events(
        &self,
        _: Request<nanoinfer_proto::worker::KvEventsRequest>,
    ) -> Result<Response<Self::KvEventsStream>, Status> {
        Err(Status::unimplemented("no KV events from a test double"))
    }

    type VocabularyStream = Pin<
        Box<dyn Stream<Item = Result<nanoinfer_proto::worker::VocabularyChunk, Status>> + Send>,
    >;

    /// A test double has no model: UNIMPLEMENTED (the coordinator then
    /// routes it by load alone).
    async fn vocabulary(
        &self,
        _: Request<nanoinfer_proto::worker::VocabularyRequest>,
    ) -> Result<Response<Self::VocabularyStream>, Status> {
        Err(Status::unimplemented("no vocabulary from a test double"))
    }

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenStream>, Status> {
        let timeout = nanoinfer_proto::deadline::from_metadata(request.metadata());
        let peer = request.remote_addr();
        let req = request.into_inner();
        if self.0.pace.record {
            self.0.calls.lock().unwrap().push(Call {
                request_id: req.request_id.clone(),
                max_tokens: req.max_tokens,
                resume_token_ids: req.resume_token_ids.clone(),
                timeout,
                peer,
            });
        }
        let fault = self.0.fault.lock().unwrap().clone().unwrap_or(Fault::None);
        if fault == Fault::Exhausted {
            return Err(Status::resource_exhausted("worker queue is full (fake)"));
        }
        let shared = self.0.clone();
        let start = req.resume_token_ids.len() as u32;
        let n = req.max_tokens;
        let stream = async_stream(shared, fault, start, n);
        Ok(Response::new(stream))
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        Ok(Response::new(LoadResponse::default()))
    }

    async fn tokenize(
        &self,
        _: Request<nanoinfer_proto::worker::TokenizeRequest>,
    ) -> Result<Response<nanoinfer_proto::worker::TokenizeResponse>, Status> {
        Err(Status::unimplemented("a test double has no tokenizer"))
    }

    async fn detokenize(
        &self,
        _: Request<nanoinfer_proto::worker::DetokenizeRequest>,
    ) -> Result<Response<nanoinfer_proto::worker::DetokenizeResponse>, Status> {
        Err(Status::unimplemented("a test double has no tokenizer"))
    }
}

fn async_stream(shared: Arc<Shared>, fault: Fault, start: u32, n: u32) -> GenStream {
    let guard = Abandon(shared.clone(), false);
    let state = (start, 0u32, guard, false);
    Box::pin(futures::stream::unfold(Some(state), move |state| {
        let shared = shared.clone();
        let fault = fault.clone();
        async move {
            let (i, sent, mut guard, admitted) = state?;
            if !admitted {
                // As a real worker: `admitted` when the request leaves the
                // queue, before any token.
                if let Fault::Queued(d) = &fault {
                    tokio::time::sleep(*d).await;
                }
                let msg = GenerateResponse {
                    admitted: true,
                    ..Default::default()
                };
                return Some((Ok(msg), Some((i, sent, guard, true))));
            }
            if sent == 0 {
                match &fault {
                    Fault::Hang => std::future::pending::<()>().await,
                    Fault::SlowStart(d) => tokio::time::sleep(*d).await,
                    _ => {}
                }
            }
            if let Fault::DieAfter(k) = fault {
                if start == 0 && sent == k {
                    // Dies a token's time after its last token, which has
                    // left by then (as a process's last write would have).
                    tokio::time::sleep(shared.pace.interval).await;
                    let die = shared.die.lock().unwrap().take();
                    if let Some(die) = die {
                        die();
                    }
                    std::future::pending::<()>().await;
                }
            }
            tokio::time::sleep(shared.pace.interval).await;
            if i < n {
                let text = if shared.pace.stamp {
                    nanoinfer::stamp::text(nanoinfer::stamp::unix_nanos())
                } else {
                    token_text(i)
                };
                let msg = GenerateResponse {
                    text,
                    token_id: Some(1000 + i as i32),
                    index: i,
                    finished: None,
                    ..Default::default()
                };
                return Some((Ok(msg), Some((i + 1, sent + 1, guard, true))));
            }
            guard.1 = true;
            let last = GenerateResponse {
                text: String::new(),
                token_id: None,
                index: n,
                finished: Some(Finished {
                    reason: FinishReason::Length as i32,
                    prompt_tokens: 3,
                    generated_tokens: n,
                    load: *shared.load.lock().unwrap(),
                    cached_tokens: 0,
                }),
                ..Default::default()
            };
            Some((Ok(last), None))
        }
    }))
}

impl FakeWorker {
    /// Starts a fake worker `id` and registers it in `etcd` under a lease of
    /// `ttl` seconds.
    pub async fn start(etcd: &str, id: &str, ttl: i64) -> Self {
        Self::builder(id).etcd(etcd, ttl).start().await
    }

    /// Like [`FakeWorker::start`], serving TLS with `tls` when given.
    pub async fn start_with(
        etcd: &str,
        id: &str,
        ttl: i64,
        tls: Option<nanoinfer_proto::tls::ServerTlsFiles>,
    ) -> Self {
        Self::builder(id).etcd(etcd, ttl).tls(tls).start().await
    }

    /// A fake worker `id` to configure before it starts.
    pub fn builder(id: &str) -> Builder<'_> {
        Builder {
            id,
            etcd: None,
            tls: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            pace: Pace::default(),
            capacity: (64, 64),
            local: false,
        }
    }

    /// The record a real worker would publish for it.
    pub fn info(&self) -> nanoinfer_registry::WorkerInfo {
        serde_json::from_value(Self::record(&self.id, &self.addr, self.capacity)).unwrap()
    }

    fn record(id: &str, addr: &str, (slots, queue): (u32, u32)) -> serde_json::Value {
        serde_json::json!({
            "id": id,
            "address": addr,
            "model": "fake",
            "capacity": {"slots": slots, "queue": queue, "context_length": 4096},
            "version": "test",
        })
    }

    async fn spawn(builder: Builder<'_>) -> Self {
        let Builder {
            id,
            etcd,
            tls,
            listen,
            pace,
            capacity,
            local,
        } = builder;
        let listener = std::net::TcpListener::bind(listen).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared {
            pace,
            ..Shared::default()
        });
        let killed = Arc::new(tokio::sync::watch::channel(false).0);
        let runtime = Arc::new(Mutex::new(None));
        let registration = etcd.map(|(endpoint, ttl)| Registration {
            endpoint,
            ttl,
            key: format!("/nanoinfer/workers/{id}"),
            record: Self::record(id, &addr, capacity).to_string(),
        });
        let (registered_tx, registered) = tokio::sync::oneshot::channel();
        if local {
            assert!(tls.is_none(), "a local fake worker serves plaintext only");
            let to_kill = killed.clone();
            *shared.die.lock().unwrap() = Some(Box::new(move || {
                to_kill.send_replace(true);
            }));
            let (svc, rx) = (Svc(shared.clone()), killed.subscribe());
            tokio::spawn(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let incoming = killable::incoming(listener, rx.clone());
                tokio::spawn(routes(svc).await.serve_with_incoming(incoming));
                keep_registered(registration, registered_tx, rx).await;
            });
        } else {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let (svc, rx) = (Svc(shared.clone()), killed.subscribe());
            rt.spawn(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let routes = routes(svc).await;
                match tls {
                    Some(files) => {
                        let tls = nanoinfer_proto::tls::ServerTls::load(files, "fake").unwrap();
                        tokio::spawn(
                            routes
                                .serve_with_incoming(nanoinfer_proto::tls::incoming(listener, tls)),
                        )
                    }
                    None => {
                        // Tokens are small writes that must leave at once, as
                        // a real worker's: no Nagle.
                        tokio::spawn(
                            routes.serve_with_incoming(
                                tonic::transport::server::TcpIncoming::from(listener)
                                    .with_nodelay(Some(true)),
                            ),
                        )
                    }
                };
                keep_registered(registration, registered_tx, rx).await;
            });
            *runtime.lock().unwrap() = Some(rt);
            // A runtime cannot stop itself from inside: a thread of its own
            // kills it when a `DieAfter` stream asks.
            let (die_tx, died) = std::sync::mpsc::channel::<()>();
            *shared.die.lock().unwrap() = Some(Box::new(move || {
                let _ = die_tx.send(());
            }));
            let (killer, to_kill) = (runtime.clone(), killed.clone());
            std::thread::spawn(move || {
                if died.recv().is_ok() {
                    to_kill.send_replace(true);
                    if let Some(rt) = killer.lock().unwrap().take() {
                        rt.shutdown_background();
                    }
                }
            });
        }
        registered.await.expect("fake worker registered");
        Self {
            id: id.to_string(),
            addr,
            capacity,
            shared,
            runtime,
            killed,
        }
    }

    /// Whether the fake is dead (killed, or died by its fault).
    pub fn is_dead(&self) -> bool {
        *self.killed.borrow()
    }

    pub fn set_fault(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = Some(fault);
    }

    /// Makes its final messages report `running` and `queued` requests, as
    /// if other coordinators kept it busy.
    pub fn report_load(&self, running: u32, queued: u32) {
        *self.shared.load.lock().unwrap() = Some(WorkerLoad {
            running,
            queued,
            slots: 4,
            kv_cache_usage: 0.5,
            ..Default::default()
        });
    }

    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.lock().unwrap().clone()
    }

    /// Makes its health service answer SERVING (`true`) or NOT_SERVING.
    pub fn set_serving(&self, serving: bool) {
        self.shared
            .not_serving
            .store(!serving, std::sync::atomic::Ordering::SeqCst);
    }

    /// When each health check came, on the runtime's clock.
    pub fn health_checks(&self) -> Vec<tokio::time::Instant> {
        self.shared.health_checks.lock().unwrap().clone()
    }

    /// Streams dropped by their caller before the end.
    pub fn abandoned(&self) -> u32 {
        *self.shared.abandoned.lock().unwrap()
    }

    /// Dies like a killed process: connections dropped, keep-alive stopped.
    pub fn kill(&self) {
        self.killed.send_replace(true);
        if let Some(rt) = self.runtime.lock().unwrap().take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where a fake registers, and what.
struct Registration {
    endpoint: String,
    ttl: i64,
    key: String,
    record: String,
}

/// Its gRPC services.
async fn routes(svc: Svc) -> tonic::transport::server::Router {
    let health = Health(svc.0.clone());
    tonic::transport::Server::builder()
        .initial_connection_window_size(nanoinfer_proto::windows::CONNECTION)
        .add_service(tonic_health::pb::health_server::HealthServer::new(health))
        .add_service(WorkerServiceServer::new(svc))
}

/// Its `grpc.health.v1`: SERVING unless told otherwise, each check noted.
struct Health(Arc<Shared>);

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for Health {
    async fn check(
        &self,
        _: Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<Response<tonic_health::pb::HealthCheckResponse>, Status> {
        use tonic_health::pb::health_check_response::ServingStatus;
        self.0
            .health_checks
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        let status = if self.0.not_serving.load(std::sync::atomic::Ordering::SeqCst) {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        Ok(Response::new(tonic_health::pb::HealthCheckResponse {
            status: status as i32,
        }))
    }

    type WatchStream =
        Pin<Box<dyn Stream<Item = Result<tonic_health::pb::HealthCheckResponse, Status>> + Send>>;

    async fn watch(
        &self,
        _: Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("a test double answers Check only"))
    }
}

/// Registers (when asked to) under a lease, says so on `registered`, and
/// keeps the lease alive until the fake is killed.
async fn keep_registered(
    registration: Option<Registration>,
    registered: tokio::sync::oneshot::Sender<()>,
    mut killed: tokio::sync::watch::Receiver<bool>,
) {
    let Some(Registration {
        endpoint,
        ttl,
        key,
        record,
    }) = registration
    else {
        let _ = registered.send(());
        return;
    };
    let mut client = etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap();
    let lease = client.lease_grant(ttl, None).await.unwrap().id();
    client
        .put(
            key,
            record,
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let _ = registered.send(());
    let (mut keeper, _responses) = client.lease_keep_alive(lease).await.unwrap();
    loop {
        tokio::select! {
            _ = killed.wait_for(|k| *k) => return,
            _ = tokio::time::sleep(Duration::from_millis(ttl as u64 * 300)) => {}
        }
        if keeper.keep_alive().await.is_err() {
            return;
        }
    }
}

/// A local fake's connections: each fails (and so closes) the moment the
/// fake is killed, as a dead process's would.
mod killable {
    use std::future::Future;
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures::Stream;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;
    use tonic::transport::server::{Connected, TcpConnectInfo};

    /// The connections `listener` accepts, until the fake is killed.
    pub fn incoming(
        listener: TcpListener,
        killed: watch::Receiver<bool>,
    ) -> impl Stream<Item = io::Result<Conn>> {
        futures::stream::unfold((listener, killed), |(listener, mut killed)| async move {
            let accepted = tokio::select! {
                _ = killed.wait_for(|k| *k) => return None,
                accepted = listener.accept() => accepted,
            };
            let conn = accepted.map(|(tcp, _)| {
                let _ = tcp.set_nodelay(true);
                Conn::new(tcp, killed.clone())
            });
            Some((conn, (listener, killed)))
        })
    }

    /// A connection that errors out once the fake is killed.
    pub struct Conn {
        io: TcpStream,
        killed: Pin<Box<dyn Future<Output = ()> + Send>>,
        dead: bool,
    }

    impl Conn {
        fn new(io: TcpStream, mut killed: watch::Receiver<bool>) -> Self {
            Self {
                io,
                killed: Box::pin(async move {
                    let _ = killed.wait_for(|k| *k).await;
                }),
                dead: false,
            }
        }

        /// Whether the fake is dead (registering for the wake-up if not).
        fn dead(&mut self, cx: &mut Context<'_>) -> bool {
            if !self.dead && self.killed.as_mut().poll(cx).is_ready() {
                self.dead = true;
            }
            self.dead
        }
    }

    fn reset<T>() -> Poll<io::Result<T>> {
        Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
    }

    impl AsyncRead for Conn {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.dead(cx) {
                return reset();
            }
            Pin::new(&mut this.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Conn {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.dead(cx) {
                return reset();
            }
            Pin::new(&mut this.io).poll_write(cx, buf)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.dead(cx) {
                return reset();
            }
            Pin::new(&mut this.io).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }
    }

    impl Connected for Conn {
        type ConnectInfo = TcpConnectInfo;

        fn connect_info(&self) -> TcpConnectInfo {
            self.io.connect_info()
        }
    }
}
