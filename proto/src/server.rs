//! One shape for a process's gRPC server: [`GrpcServer`] binds a tonic
//! router to a listener (plaintext without Nagle, or TLS), serves it on a
//! task of its own, and ends it in one of two ways: it stops by itself (a
//! transport error, or a panic, each reported as what it is:
//! [`ServeError`]), or the process drains it ([`GrpcServer::drain`]: stop
//! accepting, let open streams finish within a bound, then close them).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::{Router, TcpIncoming};

use crate::tls::ServerTls;

/// Why a gRPC server ended by itself.
#[derive(Debug)]
pub enum ServeError {
    /// The transport failed (accepting, TLS, HTTP/2).
    Transport(tonic::transport::Error),
    /// The server's task panicked: a bug, with its message.
    Panicked(String),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::Transport(e) => write!(f, "gRPC server: {e}"),
            ServeError::Panicked(m) => write!(f, "gRPC server task panicked: {m}"),
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

/// A gRPC server running on its own task.
pub struct GrpcServer {
    stop: Option<oneshot::Sender<()>>,
    /// `None` once it has ended.
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl GrpcServer {
    /// Serves `routes` on `listener`: over `tls` when given (its handshakes
    /// on a task of their own, [`crate::tls::incoming`]), else plaintext with
    /// `TCP_NODELAY` (tokens are small writes that must leave at once).
    pub fn spawn(routes: Router, listener: TcpListener, tls: Option<Arc<ServerTls>>) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let stopped = async {
            let _ = stopped.await;
        };
        let task = match tls {
            Some(tls) => tokio::spawn(
                routes.serve_with_incoming_shutdown(crate::tls::incoming(listener, tls), stopped),
            ),
            None => tokio::spawn(routes.serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                stopped,
            )),
        };
        Self {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Completes when the server ends by itself (it only does on a
    /// transport error or a panic); cancel-safe, for `select!`. Once it has
    /// ended, it never completes again.
    pub async fn ended(&mut self) -> Result<(), ServeError> {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let res = task.await;
        self.task = None;
        match res {
            Ok(res) => res.map_err(ServeError::Transport),
            Err(e) => Err(ServeError::Panicked(panic_message(e))),
        }
    }

    /// Stops accepting and lets open streams finish (tonic's graceful
    /// shutdown) for at most `bound`, then closes what is left. `Ok(true)`
    /// when every stream finished in time (or it had already ended).
    pub async fn drain(mut self, bound: Duration) -> Result<bool, ServeError> {
        if self.task.is_none() {
            return Ok(true);
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(bound, self.ended()).await {
            Ok(res) => res.map(|()| true),
            // Drop aborts the task.
            Err(_) => Ok(false),
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
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
    async fn a_drained_server_stops_accepting_and_reports_it_finished() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_, health) = tonic_health::server::health_reporter();
        let routes = tonic::transport::Server::builder().add_service(health);
        let server = GrpcServer::spawn(routes, listener, None);
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
