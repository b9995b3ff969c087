//! gRPC contracts of nanoinfer.
//!
//! # Layout
//! - [`nanoinfer`]: the public API (`proto/inference.proto`, package `nanoinfer`)
//!   served by the coordinator.
//! - [`worker`]: the internal API (`proto/worker.proto`, package
//!   `nanoinfer.worker.v1`) between coordinator and workers.
//! - [`INFERENCE_DESCRIPTOR_SET`], [`WORKER_DESCRIPTOR_SET`] and
//!   [`add_reflection`]: gRPC reflection for each process's own services.
//! - [`codec::SmallBufferCodec`]: the prost codec every generated client and
//!   server uses, with small per-call buffers; a message that does not decode
//!   (invalid UTF-8 in a string field, a truncated field) is
//!   `INVALID_ARGUMENT`, not prost's `INTERNAL`.
//! - [`deadline`]: the standard `grpc-timeout` header, read and written.
//! - [`limits`]: the request limits both processes apply, with one set of
//!   messages.
//! - [`kv`]: KV-cache blocks and their chained hashes, as workers publish
//!   them and coordinators match them.
//! - [`schema`]: the JSON a structured-output constraint produces, one rule
//!   for both processes.
//! - [`windows`]: the HTTP/2 flow-control windows of the cluster's gRPC
//!   connections.
//! - [`server`]: [`server::Server`], one shape for serving, draining and
//!   ending each of a process's listeners (gRPC, the HTTP API, metrics and
//!   probes; a panicked task reported as a panic, naming the server).
//! - [`tls`]: TLS servers with certificate reload, client configurations,
//!   and the cluster's mutual-TLS naming contract.
//!
//! The tonic and prost crates are re-exported so users of the generated code
//! need no direct dependency with a matching version.

#![forbid(unsafe_code)]

pub use prost;
pub use tonic;

pub mod codec {
    //! The protobuf codec of every nanoinfer call: prost's, with per-call
    //! buffers that start at 1 KiB instead of tonic's 8 KiB. Token messages
    //! are a few dozen bytes, and a coordinator holds an encode buffer
    //! (towards its client) and a decode buffer (from its worker) for every
    //! open stream, so the default would cost about 16 KiB a stream for
    //! nothing; larger messages (a long prompt) still grow the buffer.

    use std::marker::PhantomData;
    use std::sync::atomic::{AtomicU64, Ordering};

    use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
    use tonic::{Code, Status};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    static DECODE_ERRORS: AtomicU64 = AtomicU64::new(0);

    /// Messages this process could not decode since it started (the
    /// processes export it as a metric).
    pub fn decode_errors() -> u64 {
        DECODE_ERRORS.load(Ordering::Relaxed)
    }

    /// Initial size of each call's encode and decode buffer.
    pub const BUFFER_SIZE: usize = 1024;
    /// Encoded bytes after which a server stream yields (tonic's default).
    pub const YIELD_THRESHOLD: usize = 32 * 1024;

    /// prost encoding with [`BUFFER_SIZE`] buffers.
    #[derive(Debug, Clone)]
    pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for SmallBufferCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Codec for SmallBufferCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = InvalidArgumentDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
        }

        fn decoder(&mut self) -> Self::Decoder {
            InvalidArgumentDecoder(ProstCodec::<T, U>::raw_decoder(BufferSettings::new(
                BUFFER_SIZE,
                YIELD_THRESHOLD,
            )))
        }
    }

    /// prost's decoder, with decode failures as `INVALID_ARGUMENT`: the
    /// sender's message is malformed (prost names the field, e.g.
    /// `InferRequest.prompt: invalid string value: data is not UTF-8
    /// encoded`), which is the caller's error, not the server's.
    #[derive(Debug)]
    pub struct InvalidArgumentDecoder<U>(ProstDecoder<U>);

    impl<U: prost::Message + Default> Decoder for InvalidArgumentDecoder<U> {
        type Item = U;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
            self.0.decode(src).map_err(|status| {
                if status.code() != Code::Internal {
                    return status;
                }
                DECODE_ERRORS.fetch_add(1, Ordering::Relaxed);
                let message = format!("malformed message: {}", status.message());
                tracing::info!(error = %message.escape_debug(), "message refused");
                Status::invalid_argument(message)
            })
        }

        fn buffer_settings(&self) -> BufferSettings {
            self.0.buffer_settings()
        }
    }
}

/// The canonical name of a gRPC status code, as the gRPC spec, grpcurl,
/// the coordinator's metrics and `nanoinfer-load` write it (`RESOURCE_EXHAUSTED`, `UNAVAILABLE`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

pub mod kv;
pub mod limits;
pub mod schema;
pub mod server;
pub mod tls;

pub mod windows {
    //! HTTP/2 flow-control windows of the cluster's gRPC connections.
    //!
    //! Tokens travel as small DATA frames (a few dozen bytes each). h2
    //! keeps a budget of framing overhead per connection for small frames
    //! it holds that the application has not read yet (256 bytes less the
    //! payload, for each one) and closes the connection with
    //! ENHANCE_YOUR_CALM when the budget runs out. The budget is half the
    //! connection's receive window, which neither hyper nor tonic let a
    //! program set directly. With the defaults (1 MiB on a server, 5 MiB on
    //! a client) about 2,000 unread request frames on a worker (a burst of
    //! stream opens) or 11,000 unread tokens on the coordinator (a few
    //! clients that stopped reading) closed the whole worker connection,
    //! and with it every stream on it.
    //!
    //! So connection windows are large (the budget grows with them; no
    //! memory is allocated up front), and the coordinator's window per
    //! worker stream is small: it bounds what one stream whose client stopped
    //! reading leaves buffered (8 KiB: a few hundred tokens, about 80 KB of
    //! the budget), so about 400 such streams fit in one connection's budget
    //! at once, more than any real worker's slots.

    /// Receive window of every connection, client and server side: its
    /// budget for small unread frames is half of it.
    pub const CONNECTION: u32 = 64 * 1024 * 1024;
    /// The coordinator's receive window per worker stream.
    pub const UPSTREAM_STREAM: u32 = 8 * 1024;
}

pub mod deadline {
    //! The standard `grpc-timeout` request header: how long the caller
    //! waits for the whole call. The coordinator reads the client's and
    //! forwards what is left of it to the worker; the worker reads it to drop
    //! or stop a request whose caller has given up.

    use std::time::Duration;

    use tonic::metadata::MetadataMap;

    /// The header's name.
    pub const HEADER: &str = "grpc-timeout";

    /// The timeout the caller sent, if any (a malformed value counts as
    /// none, as gRPC servers do).
    pub fn from_metadata(metadata: &MetadataMap) -> Option<Duration> {
        parse(metadata.get(HEADER)?.to_str().ok()?)
    }

    /// Parses a `grpc-timeout` value: at most 8 digits and a unit (H, M, S,
    /// m, u, n).
    pub fn parse(value: &str) -> Option<Duration> {
        if value.len() < 2 || value.len() > 9 {
            return None;
        }
        let (digits, unit) = value.split_at(value.len() - 1);
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = digits.parse().ok()?;
        Some(match unit {
            "H" => Duration::from_secs(n * 3600),
            "M" => Duration::from_secs(n * 60),
            "S" => Duration::from_secs(n),
            "m" => Duration::from_millis(n),
            "u" => Duration::from_micros(n),
            "n" => Duration::from_nanos(n),
            _ => return None,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_every_unit_and_refuses_junk() {
            assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
            assert_eq!(parse("1500m"), Some(Duration::from_millis(1500)));
            assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
            assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
            assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
            assert_eq!(parse("9n"), Some(Duration::from_nanos(9)));
            for bad in ["", "S", "12", "1x", "-1S", "123456789S", "1.5S"] {
                assert_eq!(parse(bad), None, "{bad:?}");
            }
        }
    }
}

/// Public API, package `nanoinfer`.
#[allow(clippy::all)]
pub mod nanoinfer {
    tonic::include_proto!("nanoinfer");
}

/// Internal coordinator ↔ worker API, package `nanoinfer.worker.v1`.
#[allow(clippy::all)]
pub mod worker {
    tonic::include_proto!("nanoinfer.worker.v1");
}

/// Encoded `FileDescriptorSet` of `inference.proto` (the coordinator's API).
pub const INFERENCE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("inference_descriptor");

/// Encoded `FileDescriptorSet` of `worker.proto` (the worker's API).
pub const WORKER_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("worker_descriptor");

/// Adds gRPC server reflection (v1 and the v1alpha that older grpcurl
/// releases use) for the contract in `descriptor_set` and `grpc.health.v1`,
/// so `grpcurl list` / `describe` work against any nanoinfer process.
pub fn add_reflection(
    router: tonic::transport::server::Router,
    descriptor_set: &'static [u8],
) -> tonic::transport::server::Router {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(descriptor_set)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("embedded descriptor sets are valid");
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(descriptor_set)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("embedded descriptor sets are valid");
    router.add_service(v1).add_service(v1alpha)
}

#[cfg(test)]
mod tests {
    #[test]
    fn code_names_are_the_specs_upper_snake_case() {
        for n in 0..=16 {
            let code = tonic::Code::from_i32(n);
            let mut expected = String::new();
            for (i, c) in format!("{code:?}").chars().enumerate() {
                if c.is_uppercase() && i > 0 {
                    expected.push('_');
                }
                expected.push(c.to_ascii_uppercase());
            }
            assert_eq!(super::code_name(code), expected);
        }
    }

    #[test]
    fn reflection_builds_from_the_embedded_descriptors() {
        for set in [
            super::INFERENCE_DESCRIPTOR_SET,
            super::WORKER_DESCRIPTOR_SET,
        ] {
            let router = tonic::transport::Server::builder()
                .add_service(tonic_health::server::health_reporter().1);
            let _ = super::add_reflection(router, set);
        }
    }
}
