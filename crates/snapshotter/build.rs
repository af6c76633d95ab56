//! Generates containerd's gRPC services from containerd's own .proto files
//! (copied into `vendor/proto/` from Debian's golang-github-containerd-containerd-dev)
//! with protox, so no `protoc` is needed.
//!
//! - snapshots v1: server (the proxy snapshotter) and client.
//! - content, images, leases, diff v1: clients (`obd pull`).
//! - CRI runtime v1 (`vendor/proto/k8s.io/cri-api`, from Debian's
//!   golang-k8s-cri-api-dev 0.36.4): server and client, for the CRI
//!   image-service proxy that hands pull credentials to lazy reads, and
//!   the CRI test client.
//!
//! Two passes, because tonic-build's server/client switches are per pass.
//! Both write `containerd.types.rs`; the second pass (whose protos import
//! every type the first one does, plus more) runs last, so the file holds
//! every type.

const API: &str = "vendor/proto/github.com/containerd/containerd/api";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=vendor/proto");
    let snapshots = format!("{API}/services/snapshots/v1/snapshots.proto");
    let fds = protox::compile([snapshots], ["vendor/proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;

    let clients = [
        "services/content/v1/content.proto",
        "services/images/v1/images.proto",
        "services/leases/v1/leases.proto",
        "services/diff/v1/diff.proto",
        "types/descriptor.proto",
        "types/mount.proto",
        "types/platform.proto",
    ]
    .map(|p| format!("{API}/{p}"));
    let fds = protox::compile(clients, ["vendor/proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;

    let cri = "vendor/proto/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto";
    let fds = protox::compile([cri], ["vendor/proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
