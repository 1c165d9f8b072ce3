//! Compiles the .proto files with protox (pure Rust, no system protoc) and generates Rust types.
//! The tonic service stubs are generated only with the `grpc` feature, so `talon-core` (which uses the
//! messages) stays free of tonic and tokio.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/comms.proto",
        "proto/cluster.proto",
        "proto/api.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(grpc)
        .build_client(grpc)
        .build_transport(false)
        .bytes(".")
        // Maps as BTreeMap: encodings (persisted tasks, hashes) must not depend on hash order.
        .btree_map(".")
        // Small starting buffers per stream (see `codec` in lib.rs): memory per connected client.
        .codec_path("crate::codec::SmallCodec")
        .compile_fds(fds)?;
    Ok(())
}
