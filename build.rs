//! Compiles the proto contract without a system `protoc`: protox parses `proto/` in pure Rust,
//! tonic-prost-build generates messages, servers and clients, and the encoded descriptor set
//! (custom options such as `google.api.http` included) is kept for reflection and the REST edge.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // The console's built bundle is embedded (`api::console`); a new file in it must rebuild.
    println!("cargo:rerun-if-changed=assets/console");
    // So are the migrations (`sqlx::migrate!`): a new one must rebuild, or a build from a tree
    // that only gained a migration file would ship without it.
    println!("cargo:rerun-if-changed=migrations");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut proto_files: Vec<PathBuf> = std::fs::read_dir("proto/turbocat/v1")?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()?;
    proto_files.retain(|path| path.extension().is_some_and(|extension| extension == "proto"));
    proto_files.sort();

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    for path in &proto_files {
        compiler.open_file(path.strip_prefix("proto")?)?;
    }
    std::fs::write(out_dir.join("turbocat_descriptor.bin"), compiler.encode_file_descriptor_set())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        // A message that does not decode is INVALID_ARGUMENT, not INTERNAL (`proto::codec`).
        .codec_path("crate::proto::codec::InvalidArgumentCodec")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
