//! The containerd snapshots v1 gRPC service over [`Snapshotter`].

use crate::error::Error;
use crate::meta::Kind;
use crate::proto::containerd::services::snapshots::v1 as api;
use crate::snapshotter::{Info, Snapshotter};
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

/// gRPC metadata key carrying the containerd namespace.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";

/// Namespace of requests without `containerd-namespace` metadata.
pub const NO_NAMESPACE: &str = "";

/// Infos per `ListSnapshotsResponse` message.
const LIST_BATCH: usize = 100;

/// The gRPC service.
#[derive(Clone)]
pub struct Service {
    sn: Arc<Snapshotter>,
}

impl Service {
    /// Wraps a snapshotter.
    pub fn new(sn: Arc<Snapshotter>) -> Self {
        Service { sn }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> api::snapshots_server::SnapshotsServer<Self> {
        api::snapshots_server::SnapshotsServer::new(self)
    }
}

/// The namespace of a request: the `containerd-namespace` gRPC metadata.
/// containerd 1.6's proxy plugin does not send it (its keys are already
/// namespaced, e.g. `default/12/extract-…`), so requests without it share
/// the namespace [`NO_NAMESPACE`].
fn namespace<T>(req: &Request<T>) -> Result<String, Status> {
    Ok(req
        .metadata()
        .get(NAMESPACE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(NO_NAMESPACE)
        .to_string())
}

/// Runs a blocking snapshotter call off the async runtime, logging it.
async fn run<T: Send + 'static>(
    method: &'static str,
    ns: &str,
    key: &str,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Status> {
    let t0 = Instant::now();
    let res = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("{method}: {e}")))?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    match &res {
        Ok(_) => tracing::debug!(method, ns, key, ms, "ok"),
        Err(e @ Error::AlreadyExists(_)) => tracing::debug!(method, ns, key, ms, error = %e),
        Err(e) => tracing::info!(method, ns, key, ms, error = %e, "failed"),
    }
    res.map_err(Status::from)
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn ts(t: crate::meta::Ts) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.secs,
        nanos: t.nanos as i32,
    }
}

fn to_api(i: Info) -> api::Info {
    let kind = match i.kind {
        Kind::View => api::Kind::View,
        Kind::Active => api::Kind::Active,
        Kind::Committed => api::Kind::Committed,
    };
    api::Info {
        name: i.name,
        parent: i.parent,
        kind: kind as i32,
        created_at: Some(ts(i.created)),
        updated_at: Some(ts(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<api::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl api::snapshots_server::Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let (n, k) = (ns.clone(), r.key.clone());
        let mounts = run("Prepare", &ns, &r.key, move || {
            sn.prepare(&n, &k, &r.parent, labels(r.labels))
        })
        .await?;
        Ok(Response::new(api::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        req: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let (n, k) = (ns.clone(), r.key.clone());
        let mounts = run("View", &ns, &r.key, move || {
            sn.view(&n, &k, &r.parent, labels(r.labels))
        })
        .await?;
        Ok(Response::new(api::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        req: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let (n, k) = (ns.clone(), r.key.clone());
        let mounts = run("Mounts", &ns, &r.key, move || sn.mounts(&n, &k)).await?;
        Ok(Response::new(api::MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        req: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let (n, k) = (ns.clone(), r.key.clone());
        run("Commit", &ns, &r.key, move || {
            sn.commit(&n, &r.name, &k, labels(r.labels))
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let (n, k) = (ns.clone(), r.key.clone());
        run("Remove", &ns, &r.key, move || sn.remove(&n, &k)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let (n, k) = (ns.clone(), r.key.clone());
        let info = run("Stat", &ns, &r.key, move || sn.stat(&n, &k)).await?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(to_api(info)),
        }))
    }

    async fn update(
        &self,
        req: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update: info is required"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let key = info.name.clone();
        let info = Info {
            name: info.name,
            parent: info.parent,
            kind: Kind::Active, // ignored: immutable
            labels: labels(info.labels),
            created: crate::meta::Ts { secs: 0, nanos: 0 },
            updated: crate::meta::Ts { secs: 0, nanos: 0 },
        };
        let sn = self.sn.clone();
        let n = ns.clone();
        let info = run("Update", &ns, &key, move || sn.update(&n, info, &paths)).await?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(to_api(info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let n = ns.clone();
        let infos = run("List", &ns, "", move || sn.list(&n, &r.filters)).await?;
        let mut batches = Vec::new();
        let mut it = infos.into_iter().map(to_api).peekable();
        while it.peek().is_some() {
            let info: Vec<api::Info> = it.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(api::ListSnapshotsResponse { info }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        req: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let (n, k) = (ns.clone(), r.key.clone());
        let u = run("Usage", &ns, &r.key, move || sn.usage(&n, &k)).await?;
        Ok(Response::new(api::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, req: Request<api::CleanupRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let sn = self.sn.clone();
        let removed = run("Cleanup", &ns, "", move || sn.cleanup()).await?;
        if !removed.is_empty() {
            tracing::info!(count = removed.len(), "cleanup removed orphan directories");
        }
        Ok(Response::new(()))
    }
}

/// Serves `svc` on a unix socket until `shutdown` resolves. A stale socket
/// file is replaced; the socket is removed on return.
pub async fn serve_unix(
    svc: Service,
    path: &std::path::Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("mkdir", dir, e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove stale socket", path, e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| Error::io("bind", path, e))?;
    tracing::info!(address = %path.display(), "serving containerd snapshots v1");
    let res = tonic::transport::Server::builder()
        .add_service(svc.into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await;
    let _ = std::fs::remove_file(path);
    res.map_err(|e| Error::io("serve", path, std::io::Error::other(e)))
}
