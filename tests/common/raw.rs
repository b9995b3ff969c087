//! Raw gRPC calls: bytes sent as they are (for messages no generated
//! client would produce, such as a string field that is not UTF-8), replies
//! read as bytes.

use nanoinfer_proto::prost::bytes::Bytes;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// Calls the server-streaming method `path` at `addr` with `body` as the
/// request message and drains the reply.
pub async fn call(addr: &str, path: &'static str, body: Vec<u8>) -> Result<(), Status> {
    let channel = nanoinfer::connect(addr).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    let mut stream = grpc
        .server_streaming(tonic::Request::new(body), path, RawCodec)
        .await?
        .into_inner();
    while stream.message().await?.is_some() {}
    Ok(())
}

struct RawCodec;
struct Raw;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use nanoinfer_proto::prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        use nanoinfer_proto::prost::bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
