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

/// The key space of every request (see [`namespace`]).
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

/// The namespace of a request, for logs only: the `containerd-namespace`
/// gRPC metadata. containerd sends it when the calling context set it:
/// never on 1.6; on 1.7 for CRI's calls but not for an unpack that `ctr
/// image import` started, so one snapshot may be committed without it and
/// used as a parent with it; on 2.x for client calls but not for the
/// garbage collector's. The keys are namespaced already (containerd's
/// metadata store names them `<namespace>/<id>/<name>`), so every request
/// uses the one key space [`NO_NAMESPACE`], as containerd's own snapshotters
/// do.
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

impl Service {
    /// One RPC: the namespace from the request's metadata, then `f` (the
    /// snapshotter call) on a blocking thread, timed and logged by [`rpc`]
    /// under `method` and the key that `key` picks from the request.
    async fn call<R, T>(
        &self,
        method: &'static str,
        req: Request<R>,
        key: impl FnOnce(&R) -> String,
        f: impl FnOnce(&Snapshotter, &str, R) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status>
    where
        R: Send + 'static,
        T: Send + 'static,
    {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let key = key(&r);
        let sn = self.sn.clone();
        let k = key.clone();
        rpc(
            method,
            &ns,
            &key,
            blocking(method, move || {
                // One key space; a key that an earlier version kept under a
                // named namespace is still found.
                let n = sn.namespace_of(NO_NAMESPACE, &k)?;
                f(&sn, &n, r)
            }),
        )
        .await
    }

    /// Prepare and View: a new active snapshot or view.
    async fn create<R: CreateRequest>(
        &self,
        method: &'static str,
        req: Request<R>,
        kind: Kind,
    ) -> Result<Vec<crate::proto::containerd::types::Mount>, Status> {
        self.call(method, req, key_of, move |sn, n, r| {
            let (key, parent, l) = r.parts();
            sn.create(n, &key, &parent, labels(l), kind)
        })
        .await
    }
}

/// Prepare and View requests: key, parent, labels.
trait CreateRequest: KeyOf + Send + 'static {
    fn parts(self) -> (String, String, std::collections::HashMap<String, String>);
}

macro_rules! create_request {
    ($($t:ty),*) => {
        $(impl CreateRequest for $t {
            fn parts(self) -> (String, String, std::collections::HashMap<String, String>) {
                (self.key, self.parent, self.labels)
            }
        })*
    };
}
create_request!(api::PrepareSnapshotRequest, api::ViewSnapshotRequest);

fn key_of<R: KeyOf>(r: &R) -> String {
    r.key().to_string()
}

/// Requests addressed by a snapshot key.
trait KeyOf {
    fn key(&self) -> &str;
}

macro_rules! key_of {
    ($($t:ty),*) => {
        $(impl KeyOf for $t {
            fn key(&self) -> &str {
                &self.key
            }
        })*
    };
}
key_of!(
    api::PrepareSnapshotRequest,
    api::ViewSnapshotRequest,
    api::MountsRequest,
    api::CommitSnapshotRequest,
    api::RemoveSnapshotRequest,
    api::StatSnapshotRequest,
    api::UsageRequest
);

/// The snapshot an `Update` request names, as the snapshotter takes it.
fn update_info(info: Option<api::Info>) -> Result<Info, Error> {
    let info =
        info.ok_or_else(|| Error::InvalidArgument("update: info is required".to_string()))?;
    Ok(Info {
        name: info.name,
        parent: info.parent,
        kind: Kind::Active, // ignored: immutable
        labels: labels(info.labels),
        created: crate::meta::Ts { secs: 0, nanos: 0 },
        updated: crate::meta::Ts { secs: 0, nanos: 0 },
    })
}

#[tonic::async_trait]
impl api::snapshots_server::Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let mounts = self.create("Prepare", req, Kind::Active).await?;
        Ok(Response::new(api::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        req: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let mounts = self.create("View", req, Kind::View).await?;
        Ok(Response::new(api::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        req: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let mounts = self
            .call("Mounts", req, key_of, |sn, n, r| sn.mounts(n, &r.key))
            .await?;
        Ok(Response::new(api::MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        req: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        self.call("Commit", req, key_of, |sn, n, r| {
            sn.commit(n, &r.name, &r.key, labels(r.labels))
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let key = req.get_ref().key.clone();
        let sweep = self
            .call("Remove", req, key_of, |sn, n, r| {
                sn.remove_then_sweep(n, &r.key)
            })
            .await?;
        if sweep {
            // After the answer: `ctr run --rm` (and a pod's teardown) need
            // not wait for the image's device to detach.
            let sn = self.sn.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = sn.sweep() {
                    tracing::warn!(key, error = %e, "releasing unused devices");
                }
            });
        }
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let info = self
            .call("Stat", req, key_of, |sn, n, r| sn.stat(n, &r.key))
            .await?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(to_api(info)),
        }))
    }

    async fn update(
        &self,
        req: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let key = |r: &api::UpdateSnapshotRequest| {
            r.info.as_ref().map(|i| i.name.clone()).unwrap_or_default()
        };
        let info = self
            .call("Update", req, key, |sn, n, r| {
                let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
                sn.update(n, update_info(r.info)?, &paths)
            })
            .await?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(to_api(info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let infos = self
            .call(
                "List",
                req,
                |_| String::new(),
                |sn, n, r| sn.list(n, &r.filters),
            )
            .await?;
        let mut batches = Vec::new();
        let mut it = infos.into_iter().map(to_api).peekable();
        while it.peek().is_some() {
            let info: Vec<api::Info> = it.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(api::ListSnapshotsResponse { info }));
        }
        let stream: Self::ListStream = Box::pin(tokio_stream::iter(batches));
        Ok(Response::new(stream))
    }

    async fn usage(
        &self,
        req: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let u = self
            .call("Usage", req, key_of, |sn, n, r| sn.usage(n, &r.key))
            .await?;
        Ok(Response::new(api::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, req: Request<api::CleanupRequest>) -> Result<Response<()>, Status> {
        let removed = self
            .call("Cleanup", req, |_| String::new(), |sn, _, _| sn.cleanup())
            .await?;
        if !removed.is_empty() {
            tracing::info!(count = removed.len(), "cleanup removed orphan directories");
        }
        Ok(Response::new(()))
    }
}

/// Binds the unix socket `path` (its directory created, a stale socket
/// file replaced). Needs a tokio runtime.
pub fn bind_unix(path: &std::path::Path) -> Result<tokio::net::UnixListener, Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("mkdir", dir, e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove stale socket", path, e)),
    }
    tokio::net::UnixListener::bind(path).map_err(|e| Error::io("bind", path, e))
}

/// Serves `svc` on a unix socket until `shutdown` resolves (see
/// [`bind_unix`]); the socket is removed on return.
pub async fn serve_unix(
    svc: Service,
    path: &std::path::Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let listener = bind_unix(path)?;
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
