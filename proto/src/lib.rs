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
//!   server uses, with small per-call buffers.
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

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

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
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
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
