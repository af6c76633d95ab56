//! The CRI image-service proxy: how pull secrets reach lazy reads.
//!
//! containerd passes no registry credentials to snapshotters (they would
//! have to travel in snapshot labels, which containerd stores and logs), and
//! obd's device workers fetch the blocks of lazily pulled layers themselves.
//! So obd-snapshotter can serve CRI's `ImageService` on its own socket
//! (`cri_image_address`), with kubelet's `--image-service-endpoint` pointed
//! at it. Every call is forwarded unchanged to containerd
//! (`cri_runtime_address`); a `PullImage` that carries `auth` (a pod's
//! `imagePullSecrets`, or kubelet's credential providers) first records
//! that credential for the image's repository in [`Keychain`], the file
//! the device workers read before any other credential source
//! (`obd_device::state::Root::cri_credentials`). This is the CRI-proxy
//! design of the stargz and SOCI snapshotters; upstream overlaybd has only
//! node-level credentials (its `credentialConfig` file or HTTP endpoint).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};
use zfile::sync::MutexExt;

use crate::proto::runtime::v1 as cri;
use cri::image_service_client::ImageServiceClient;
use cri::image_service_server::{ImageService, ImageServiceServer};

/// A lazily connected gRPC channel to the unix socket `path` (containerd's
/// CRI socket; it may start after the snapshotter).
pub fn unix_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::from_static("http://cri.invalid").connect_with_connector_lazy(tower::service_fn(
        move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        },
    ))
}

/// The credentials CRI pulls carried, in a docker `config.json`-style file
/// (`{"auths": {"host/repo": {"auth": "<base64 user:password>"}}}`, mode
/// 0600), one entry per repository, the latest pull's winning; keys are
/// kept longest first, so a repository's own entry beats one of a parent
/// path.
#[derive(Debug)]
pub struct Keychain {
    path: PathBuf,
    lock: Mutex<()>,
}

/// Why a pull's credential was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum KeychainError {
    /// The image reference does not parse.
    #[error("image reference {image:?}: {detail}")]
    Reference {
        /// The reference as CRI sent it.
        image: String,
        /// What is wrong.
        detail: String,
    },
    /// `auth` holds no user and password (only tokens, or bad base64).
    #[error("pull auth for {image:?}: {detail}")]
    Auth {
        /// The reference as CRI sent it.
        image: String,
        /// What is wrong.
        detail: String,
    },
    /// The keychain file cannot be read or written.
    #[error("{}: {detail}", path.display())]
    File {
        /// The keychain file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

impl Keychain {
    /// The keychain in the file `path` (created at the first record).
    pub fn new(path: impl Into<PathBuf>) -> Keychain {
        Keychain {
            path: path.into(),
            lock: Mutex::new(()),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `auth` for the repository of `image`; returns the key
    /// (`host/repo`). Identity and registry tokens are not kept (the device
    /// workers speak Basic and token auth with a user and password only).
    pub fn record(&self, image: &str, auth: &cri::AuthConfig) -> Result<String, KeychainError> {
        let r = obd_remote::distribution::ImageRef::parse(image).map_err(|e| {
            KeychainError::Reference {
                image: image.into(),
                detail: e.to_string(),
            }
        })?;
        let key = format!("{}/{}", r.host, r.repo);
        let b64 = base64::engine::general_purpose::STANDARD;
        let (user, pass) = if !auth.username.is_empty() {
            (auth.username.clone(), auth.password.clone())
        } else if !auth.auth.is_empty() {
            let bad = |detail: &str| KeychainError::Auth {
                image: image.into(),
                detail: detail.into(),
            };
            let raw = b64
                .decode(auth.auth.trim())
                .map_err(|_| bad("`auth` is not base64"))?;
            let s = String::from_utf8(raw).map_err(|_| bad("`auth` is not UTF-8"))?;
            let (u, p) = s
                .split_once(':')
                .ok_or_else(|| bad("`auth` has no `:` between user and password"))?;
            (u.to_string(), p.to_string())
        } else {
            return Err(KeychainError::Auth {
                image: image.into(),
                detail: "no username/password or `auth` (identity and registry tokens are not \
                         supported for lazy reads)"
                    .into(),
            });
        };
        let entry = b64.encode(format!("{user}:{pass}"));
        let _g = self.lock.locked();
        let ferr = |detail: String| KeychainError::File {
            path: self.path.clone(),
            detail,
        };
        let mut entries: Vec<(String, String)> = obd_remote::creds::DockerConfig::load(&self.path)
            .map_err(|e| ferr(e.to_string()))?
            .auths
            .0
            .into_iter()
            .filter(|(k, _)| *k != key)
            .map(|(k, e)| (k, e.auth.unwrap_or_default()))
            .collect();
        entries.push((key.clone(), entry));
        entries.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        // Written by hand: serde_json's map would sort the keys.
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let body: Vec<String> = entries
            .iter()
            .map(|(k, a)| format!("    {}: {{\"auth\": {}}}", q(k), q(a)))
            .collect();
        let text = format!("{{\"auths\": {{\n{}\n}}}}\n", body.join(",\n"));
        overlaybd_core::regular::write_atomic_private(&self.path, text.as_bytes())
            .map_err(|e| ferr(e.to_string()))?;
        Ok(key)
    }
}

/// CRI `ImageService` forwarding to containerd, recording pull credentials.
#[derive(Debug, Clone)]
pub struct ImageProxy {
    upstream: ImageServiceClient<Channel>,
    keychain: std::sync::Arc<Keychain>,
}

impl ImageProxy {
    /// A proxy forwarding to the CRI socket `upstream`, recording into
    /// `keychain`.
    pub fn new(upstream: &Path, keychain: Keychain) -> ImageProxy {
        ImageProxy {
            upstream: ImageServiceClient::new(unix_channel(upstream))
                .max_decoding_message_size(64 << 20),
            keychain: std::sync::Arc::new(keychain),
        }
    }

    /// The tonic service.
    pub fn into_server(self) -> ImageServiceServer<ImageProxy> {
        ImageServiceServer::new(self).max_decoding_message_size(64 << 20)
    }
}

#[tonic::async_trait]
impl ImageService for ImageProxy {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        self.upstream.clone().list_images(req.into_inner()).await
    }

    type StreamImagesStream = tonic::Streaming<cri::StreamImagesResponse>;

    async fn stream_images(
        &self,
        req: Request<cri::StreamImagesRequest>,
    ) -> Result<Response<Self::StreamImagesStream>, Status> {
        self.upstream.clone().stream_images(req.into_inner()).await
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        self.upstream.clone().image_status(req.into_inner()).await
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let r = req.into_inner();
        if let (Some(img), Some(auth)) = (&r.image, &r.auth) {
            let kc = std::sync::Arc::clone(&self.keychain);
            let (image, auth) = (img.image.clone(), auth.clone());
            // File I/O off the async workers.
            let res = tokio::task::spawn_blocking(move || kc.record(&image, &auth))
                .await
                .map_err(|e| Status::internal(format!("recording pull credentials: {e}")))?;
            match res {
                Ok(key) => {
                    tracing::info!(repository = %key, "pull credentials recorded for lazy reads")
                }
                // The pull itself may still work (containerd has the auth);
                // lazy reads of a private registry will then fail to attach.
                Err(e) => tracing::warn!(error = %e, "pull credentials not recorded"),
            }
        }
        self.upstream.clone().pull_image(r).await
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        self.upstream.clone().remove_image(req.into_inner()).await
    }

    async fn image_fs_info(
        &self,
        req: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        self.upstream.clone().image_fs_info(req.into_inner()).await
    }
}

/// Serves `proxy` on the unix socket `path` until `shutdown` resolves (see
/// [`crate::service::bind_unix`]); the socket is removed on return.
pub async fn serve_unix(
    proxy: ImageProxy,
    path: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), crate::Error> {
    let listener = crate::service::bind_unix(path)?;
    tracing::info!(address = %path.display(), "serving the CRI image service proxy");
    let res = tonic::transport::Server::builder()
        .add_service(proxy.into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await;
    let _ = std::fs::remove_file(path);
    res.map_err(|e| crate::Error::io("serve", path, std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(user: &str, pass: &str) -> cri::AuthConfig {
        cri::AuthConfig {
            username: user.into(),
            password: pass.into(),
            ..Default::default()
        }
    }

    fn lookup(kc: &Keychain, host: &str, repo: &str) -> Option<(String, String)> {
        obd_remote::creds::DockerConfig::load(kc.path())
            .unwrap()
            .auths_lookup(host, repo)
            .unwrap()
            .map(|c| (c.username, c.password))
    }

    #[test]
    fn records_per_repository_latest_wins_private_file() {
        let d = tempfile::tempdir().unwrap();
        let kc = Keychain::new(d.path().join("cri-credentials.json"));
        assert_eq!(
            kc.record("reg:5000/a:v1", &auth("u1", "p1")).unwrap(),
            "reg:5000/a"
        );
        kc.record(
            &format!("reg:5000/a/b@sha256:{}", "0".repeat(64)),
            &auth("u2", "p:2"),
        )
        .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode("u3:p3");
        let a3 = cri::AuthConfig {
            auth: b64,
            ..Default::default()
        };
        assert_eq!(
            kc.record("busybox", &a3).unwrap(),
            "docker.io/library/busybox"
        );
        assert_eq!(
            lookup(&kc, "reg:5000", "a"),
            Some(("u1".into(), "p1".into()))
        );
        // The longer key wins over its parent path.
        assert_eq!(
            lookup(&kc, "reg:5000", "a/b"),
            Some(("u2".into(), "p:2".into()))
        );
        assert_eq!(
            lookup(&kc, "index.docker.io", "library/busybox"),
            Some(("u3".into(), "p3".into()))
        );
        assert_eq!(lookup(&kc, "reg:5000", "c"), None);
        kc.record("reg:5000/a:v2", &auth("u9", "p9")).unwrap();
        assert_eq!(
            lookup(&kc, "reg:5000", "a"),
            Some(("u9".into(), "p9".into()))
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(kc.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        let d = tempfile::tempdir().unwrap();
        let kc = Keychain::new(d.path().join("k.json"));
        let tok = cri::AuthConfig {
            identity_token: "t".into(),
            ..Default::default()
        };
        assert!(matches!(
            kc.record("reg/a", &tok),
            Err(KeychainError::Auth { .. })
        ));
        let bad = cri::AuthConfig {
            auth: "%%%".into(),
            ..Default::default()
        };
        assert!(matches!(
            kc.record("reg/a", &bad),
            Err(KeychainError::Auth { .. })
        ));
        assert!(matches!(
            kc.record("Bad Ref", &auth("u", "p")),
            Err(KeychainError::Reference { .. })
        ));
        assert!(!kc.path().exists());
    }
}
