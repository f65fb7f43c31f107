//! The shop's gRPC code from the repository's protos (needs `protoc`:
//! scripts/setup.sh installs Debian's protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "../../proto/txmesh/v1/participant.proto",
        "../../proto/shop/v1/inventory.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure().compile_protos(&protos, &["../../proto"])?;
    Ok(())
}
