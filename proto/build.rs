//! Generates the tonic/prost code for both contracts and a file descriptor
//! set that the servers expose through gRPC reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("nanoinfer_descriptor.bin"))
        .compile_protos(&["proto/inference.proto", "proto/worker.proto"], &["proto"])?;
    Ok(())
}
