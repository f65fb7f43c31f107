//! The shop's gRPC code from the repository's protos (needs `protoc`:
//! scripts/setup.sh installs Debian's protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/txmesh/v1/participant.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_client(false)
        .compile_protos(&[proto], &["../../proto"])?;
    Ok(())
}
