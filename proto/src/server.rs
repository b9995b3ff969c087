//! One shape for a process's servers: a [`Server`] owns one listener's
//! serving task (the gRPC ports, the HTTP API, the metrics and probes
//! endpoint) and ends in one of two ways: it stops by itself (an error or a
//! panic, each reported as what it is, naming the server: [`ServeError`]),
//! or the process drains it ([`Server::drain`]: stop accepting, let open
//! requests finish within a bound, then close them). [`Server::grpc`]
//! serves a tonic router; [`Server::spawn`] any accept loop that stops when
//! its [`Stop`] says so.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::{Router, TcpIncoming};

use crate::tls::ServerTls;

/// Any error a serving task ends with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a server ended by itself.
#[derive(Debug)]
pub enum ServeError {
    /// Serving failed (accepting, TLS, HTTP/2 ...).
    Failed {
        /// Which server: "gRPC server", "HTTP API", "metrics endpoint".
        server: &'static str,
        /// What failed.
        error: BoxError,
    },
    /// The server's task panicked: a bug, with its message.
    Panicked {
        /// Which server.
        server: &'static str,
        /// What `panic!` was given.
        message: String,
    },
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::Failed { server, error } => write!(f, "{server}: {error}"),
            ServeError::Panicked { server, message } => {
                write!(f, "{server} task panicked: {message}")
            }
        }
    }
}

impl std::error::Error for ServeError {}

/// A panicked task's message (what `panic!` was given, when it was text).
pub fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(a panic without a message)".into()),
        Err(e) => e.to_string(),
    }
}

/// What a serving task watches to know the process wants it to stop
/// accepting (cloned into each connection, so open ones can close after
/// their requests).
#[derive(Clone, Debug)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// Completes once a stop is asked for (at once if it already was, or if
    /// the [`Server`] is gone).
    pub async fn requested(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// A server running on its own task.
pub struct Server {
    name: &'static str,
    stop: watch::Sender<bool>,
    /// `None` once it has ended.
    task: Option<JoinHandle<Result<(), BoxError>>>,
}

impl Server {
    /// Runs `serve` on a task of its own: the accept loop of the server
    /// called `name`, which returns once its [`Stop`] is requested and its
    /// open requests are done (or with the error that ended it).
    pub fn spawn<F, E>(name: &'static str, serve: impl FnOnce(Stop) -> F) -> Self
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let (stop, stopped) = watch::channel(false);
        let serving = serve(Stop(stopped));
        let task = tokio::spawn(async move { serving.await.map_err(Into::into) });
        Self {
            name,
            stop,
            task: Some(task),
        }
    }

    /// Serves the gRPC `routes` on `listener`: over `tls` when given (its
    /// handshakes on a task of their own, [`crate::tls::incoming`]), else
    /// plaintext with `TCP_NODELAY` (tokens are small writes that must
    /// leave at once).
    pub fn grpc(routes: Router, listener: TcpListener, tls: Option<Arc<ServerTls>>) -> Self {
        Self::spawn("gRPC server", move |mut stop| async move {
            let stopped = async move { stop.requested().await };
            match tls {
                Some(tls) => {
                    routes
                        .serve_with_incoming_shutdown(crate::tls::incoming(listener, tls), stopped)
                        .await
                }
                None => {
                    routes
                        .serve_with_incoming_shutdown(
                            TcpIncoming::from(listener).with_nodelay(Some(true)),
                            stopped,
                        )
                        .await
                }
            }
        })
    }

    /// Completes when the server ends by itself (on an error or a panic,
    /// or an accept loop that returned without being asked); cancel-safe,
    /// for `select!`. Once it has ended, it never completes again.
    pub async fn ended(&mut self) -> Result<(), ServeError> {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let res = task.await;
        self.task = None;
        let server = self.name;
        match res {
            Ok(res) => res.map_err(|error| ServeError::Failed { server, error }),
            Err(e) => Err(ServeError::Panicked {
                server,
                message: panic_message(e),
            }),
        }
    }

    /// Stops accepting and lets open requests finish for at most `bound`,
    /// then closes what is left. `Ok(true)` when every request finished in
    /// time (or it had already ended).
    pub async fn drain(mut self, bound: Duration) -> Result<bool, ServeError> {
        if self.task.is_none() {
            return Ok(true);
        }
        self.stop.send_replace(true);
        match tokio::time::timeout(bound, self.ended()).await {
            Ok(res) => res.map(|()| true),
            // Drop aborts the task.
            Err(_) => Ok(false),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// [`Server::ended`] of an optional server: never completes for `None`.
pub async fn ended(server: &mut Option<Server>) -> Result<(), ServeError> {
    match server {
        Some(server) => server.ended().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicked_task_is_reported_as_a_panic_with_its_message() {
        let task = tokio::spawn(async { panic!("boom at step 3") });
        let e = task.await.unwrap_err();
        assert_eq!(panic_message(e), "boom at step 3");
        let n = 7;
        let task = tokio::spawn(async move { panic!("formatted {n}") });
        assert_eq!(panic_message(task.await.unwrap_err()), "formatted 7");
    }

    #[tokio::test]
    async fn a_server_that_ends_by_itself_says_which_and_why() {
        let mut failed = Server::spawn("HTTP API", |_stop| async {
            Err::<(), _>(std::io::Error::other("accept: too many open files"))
        });
        let e = failed.ended().await.unwrap_err();
        assert!(matches!(
            e,
            ServeError::Failed {
                server: "HTTP API",
                ..
            }
        ));
        assert_eq!(e.to_string(), "HTTP API: accept: too many open files");
        let mut panicked = Server::spawn("metrics endpoint", |_stop| async {
            if true {
                panic!("encoder state");
            }
            Ok::<(), BoxError>(())
        });
        let e = panicked.ended().await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "metrics endpoint task panicked: encoder state"
        );
        // Ended once: never again (a select! loop would spin otherwise).
        let again = tokio::time::timeout(Duration::from_millis(50), panicked.ended()).await;
        assert!(again.is_err());
    }

    #[tokio::test]
    async fn drain_asks_the_accept_loop_to_stop_and_bounds_the_wait() {
        // An accept loop that stops when asked and closes its connections.
        let (seen_tx, seen) = tokio::sync::oneshot::channel();
        let server = Server::spawn("test loop", |mut stop| async move {
            stop.requested().await;
            let _ = seen_tx.send(());
            Ok::<(), BoxError>(())
        });
        assert!(server.drain(Duration::from_secs(5)).await.unwrap());
        // The loop saw the request and returned by itself.
        assert!(seen.await.is_ok());
        // One that takes longer than the bound to finish its requests.
        let (dropped_tx, dropped) = tokio::sync::oneshot::channel::<()>();
        let slow = Server::spawn("slow loop", |mut stop| async move {
            let _dropped = dropped_tx;
            stop.requested().await;
            std::future::pending::<()>().await;
            Ok::<(), BoxError>(())
        });
        assert!(!slow.drain(Duration::from_millis(50)).await.unwrap());
        // Past the bound, its task (and what it holds) is gone.
        assert!(dropped.await.is_err());
    }

    #[tokio::test]
    async fn a_drained_server_stops_accepting_and_reports_it_finished() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_, health) = tonic_health::server::health_reporter();
        let routes = tonic::transport::Server::builder().add_service(health);
        let server = Server::grpc(routes, listener, None);
        // It serves: a health check answers.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        client
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
        drop(client);
        assert!(server.drain(Duration::from_secs(5)).await.unwrap());
        // Nothing accepts on the port any more.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
