//! The containerd snapshots v1 gRPC service over [`Snapshotter`].

use crate::error::Error;
use crate::meta::Kind;
use crate::metrics;
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

/// Runs a blocking snapshotter call off the async runtime.
async fn blocking<T: Send + 'static>(
    method: &'static str,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("{method}: {e}")))?
        .map_err(Status::from)
}

/// The snake_case name of a gRPC code, as in the metrics' `code` label.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// Runs one RPC body: records its latency and result in
/// [`metrics::global`] and logs one event with `method`, `namespace`, `key`,
/// `duration_ms` and `result` (debug; warn for errors other than
/// `not_found` and `already_exists`, which are ordinary answers: existence
/// probes and the remote-snapshot handshake).
async fn rpc<T>(
    method: &'static str,
    namespace: &str,
    key: &str,
    body: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let t0 = Instant::now();
    let res = body.await;
    let secs = t0.elapsed().as_secs_f64();
    let duration_ms = secs * 1e3;
    let code = match &res {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    let result = code_name(code);
    metrics::global().observe(method, secs, result);
    match &res {
        Ok(_) => tracing::debug!(method, namespace, key, duration_ms, result, "rpc"),
        Err(s) if matches!(code, tonic::Code::NotFound | tonic::Code::AlreadyExists) => {
            tracing::debug!(
                method,
                namespace,
                key,
                duration_ms,
                result,
                error = s.message(),
                "rpc"
            )
        }
        Err(s) => {
            tracing::warn!(
                method,
                namespace,
                key,
                duration_ms,
                result,
                error = s.message(),
                "rpc failed"
            )
        }
    }
    res
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
        const M: &str = "Prepare";
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let (n, k) = (ns.clone(), r.key.clone());
        rpc(M, &ns, &r.key, async move {
            let mounts =
                blocking(M, move || sn.prepare(&n, &k, &r.parent, labels(r.labels))).await?;
            Ok(Response::new(api::PrepareSnapshotResponse { mounts }))
        })
        .await
    }

    async fn view(
        &self,
        req: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        const M: &str = "View";
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let (n, k) = (ns.clone(), r.key.clone());
        rpc(M, &ns, &r.key, async move {
            let mounts = blocking(M, move || sn.view(&n, &k, &r.parent, labels(r.labels))).await?;
            Ok(Response::new(api::ViewSnapshotResponse { mounts }))
        })
        .await
    }

    async fn mounts(
        &self,
        req: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        const M: &str = "Mounts";
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let (n, k) = (ns.clone(), r.key.clone());
        rpc(M, &ns, &r.key, async move {
            let mounts = blocking(M, move || sn.mounts(&n, &k)).await?;
            Ok(Response::new(api::MountsResponse { mounts }))
        })
        .await
    }

    async fn commit(
        &self,
        req: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        const M: &str = "Commit";
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let (n, k) = (ns.clone(), r.key.clone());
        rpc(M, &ns, &r.key, async move {
            blocking(M, move || sn.commit(&n, &r.name, &k, labels(r.labels))).await?;
            Ok(Response::new(()))
        })
        .await
    }

    async fn remove(
        &self,
        req: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        const M: &str = "Remove";
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let (n, k) = (ns.clone(), r.key.clone());
        rpc(M, &ns, &r.key, async move {
            let sn2 = sn.clone();
            let key = k.clone();
            let sweep = blocking(M, move || sn.remove_then_sweep(&n, &k)).await?;
            if sweep {
                // After the answer: `ctr run --rm` (and a pod's teardown) need
                // not wait for the image's device to detach.
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = sn2.sweep() {
                        tracing::warn!(key, error = %e, "releasing unused devices");
                    }
                });
            }
            Ok(Response::new(()))
        })
        .await
    }

    async fn stat(
        &self,
        req: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        const M: &str = "Stat";
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let (n, k) = (ns.clone(), r.key.clone());
        rpc(M, &ns, &r.key, async move {
            let info = blocking(M, move || sn.stat(&n, &k)).await?;
            Ok(Response::new(api::StatSnapshotResponse {
                info: Some(to_api(info)),
            }))
        })
        .await
    }

    async fn update(
        &self,
        req: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        const M: &str = "Update";
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let key = r.info.as_ref().map(|i| i.name.clone()).unwrap_or_default();
        let sn = self.sn.clone();
        let n = ns.clone();
        rpc(M, &ns, &key, async move {
            let info = r
                .info
                .ok_or_else(|| Status::invalid_argument("update: info is required"))?;
            let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
            let info = Info {
                name: info.name,
                parent: info.parent,
                kind: Kind::Active, // ignored: immutable
                labels: labels(info.labels),
                created: crate::meta::Ts { secs: 0, nanos: 0 },
                updated: crate::meta::Ts { secs: 0, nanos: 0 },
            };
            let info = blocking(M, move || sn.update(&n, info, &paths)).await?;
            Ok(Response::new(api::UpdateSnapshotResponse {
                info: Some(to_api(info)),
            }))
        })
        .await
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        const M: &str = "List";
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let n = ns.clone();
        rpc(M, &ns, "", async move {
            let infos = blocking(M, move || sn.list(&n, &r.filters)).await?;
            let mut batches = Vec::new();
            let mut it = infos.into_iter().map(to_api).peekable();
            while it.peek().is_some() {
                let info: Vec<api::Info> = it.by_ref().take(LIST_BATCH).collect();
                batches.push(Ok(api::ListSnapshotsResponse { info }));
            }
            let stream: Self::ListStream = Box::pin(tokio_stream::iter(batches));
            Ok(Response::new(stream))
        })
        .await
    }

    async fn usage(
        &self,
        req: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        const M: &str = "Usage";
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let sn = self.sn.clone();
        let (n, k) = (ns.clone(), r.key.clone());
        rpc(M, &ns, &r.key, async move {
            let u = blocking(M, move || sn.usage(&n, &k)).await?;
            Ok(Response::new(api::UsageResponse {
                size: u.size,
                inodes: u.inodes,
            }))
        })
        .await
    }

    async fn cleanup(&self, req: Request<api::CleanupRequest>) -> Result<Response<()>, Status> {
        const M: &str = "Cleanup";
        let ns = namespace(&req)?;
        let sn = self.sn.clone();
        rpc(M, &ns, "", async move {
            let removed = blocking(M, move || sn.cleanup()).await?;
            if !removed.is_empty() {
                tracing::info!(count = removed.len(), "cleanup removed orphan directories");
            }
            Ok(Response::new(()))
        })
        .await
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
