//! The `nanoinfer` command-line client and the benchmark program share this
//! small client library.
//!
//! # Layout
//! - [`connect`]: a channel to a coordinator (or worker) address.
//! - [`finish_reason_name`]: short names for the public finish reasons.

#![forbid(unsafe_code)]

use std::time::Duration;

use nanoinfer_proto::nanoinfer::FinishReason;
use tonic::transport::{Channel, Endpoint};

/// Connects to `addr` (`http://host:port` or `host:port`), failing within
/// a few seconds when nothing listens there.
pub async fn connect(addr: &str) -> Result<Channel, tonic::transport::Error> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect()
        .await
}

/// The finish reason as users read it (`LENGTH`, `STOP_SEQUENCE`, …).
pub fn finish_reason_name(reason: i32) -> &'static str {
    match FinishReason::try_from(reason) {
        Ok(FinishReason::Length) => "LENGTH",
        Ok(FinishReason::StopSequence) => "STOP_SEQUENCE",
        Ok(FinishReason::Eos) => "EOS",
        Ok(FinishReason::ContextLength) => "CONTEXT_LENGTH",
        Ok(FinishReason::Cancelled) => "CANCELLED",
        Ok(FinishReason::Unspecified) | Err(_) => "UNSPECIFIED",
    }
}
