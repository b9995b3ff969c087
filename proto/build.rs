//! Generates the tonic/prost code for both contracts and, per contract, a
//! file descriptor set that the servers expose through gRPC reflection (so
//! each process lists only the services it serves).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    for (file, set) in [
        ("proto/inference.proto", "inference_descriptor.bin"),
        ("proto/worker.proto", "worker_descriptor.bin"),
    ] {
        tonic_prost_build::configure()
            // Small per-call buffers (src/lib.rs, `codec`).
            .codec_path("crate::codec::SmallBufferCodec")
            .file_descriptor_set_path(out_dir.join(set))
            .compile_protos(&[file], &["proto"])?;
    }
    Ok(())
}
