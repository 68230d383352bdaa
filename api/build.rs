//! Compiles the plan protocol with protox (pure Rust), so the build needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/weft/plan/v1/plan.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // Payloads are encoded once and shared between nodes without copying.
        .bytes(".weft.plan.v1.Resource.payload")
        .compile_fds(descriptors)?;
    Ok(())
}
