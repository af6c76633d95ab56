//! Whole-object registry access for tools (the converter): manifests and
//! indexes by tag or digest, streamed blob downloads, and pushes (blob
//! existence check, monolithic or chunked upload, manifest `PUT`).
//!
//! [`super::registry::RegistryClient`] is the data path for block reads (range
//! requests, mirrors, P2P, redirect caching); both run on the same transport
//! ([`super::http`]: [`RegistryOptions`] with per-host plain HTTP, TLS,
//! timeouts, retries, credential files; auth; failure classification).
//!
//! Authentication is learnt from the `401` of the request itself rather than
//! a separate probe, so the bearer token's scope is the one the registry asks
//! for that operation (`repository:<repo>:pull` for reads,
//! `repository:<repo>:pull,push` for uploads and manifest pushes). The scheme
//! and token that worked are remembered per host, repository and access
//! (pull or push) and sent up front on later requests.
//!
//! Request bodies are re-created for each attempt (uploads stream from files),
//! so a `401`, a `5xx`, a `429` or a dropped connection can be retried.
//! Downloads resume with `Range` after a dropped connection.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::blocking::{Body, Response};
use reqwest::header;
use reqwest::{Method, StatusCode, Url};

use super::creds::{self, CredentialSource};
use super::http::{self, Access, AuthScope, Class, Fail, Request, Retry, Transport};
use super::oci::sha256_digest;
use super::registry::RegistryOptions;
use overlaybd_core::error::{Error, Result};

pub use super::oci::{MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_MANIFEST};

/// The `Accept` header for manifest reads: every manifest and index type.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json;q=0.9";

/// Largest manifest accepted.
pub const MAX_MANIFEST: u64 = 4 << 20;

/// A registry image reference: `host[:port]/repo[:tag][@sha256:…]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]` as written (docker.io aliases kept).
    pub host: String,
    /// Repository path, e.g. `library/ubuntu`.
    pub repo: String,
    /// Tag, if any.
    pub tag: Option<String>,
    /// Digest, if any (`sha256:<hex>`).
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses `host[:port]/repo[:tag][@digest]`. A first component without a
    /// `.` or `:` (and not `localhost`) means Docker Hub, and one-component
    /// Hub names get `library/`.
    pub fn parse(s: &str) -> Result<ImageRef> {
        let bad = |d: &str| Error::BadRequest(format!("image reference `{s}`: {d}"));
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("only sha256 digests are supported"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return Err(bad("malformed digest"));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        // The tag follows the last `:` after the last `/`.
        let slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[slash..].rfind(':') {
            Some(i) => (&rest[..slash + i], Some(rest[slash + i + 1..].to_string())),
            None => (rest, None),
        };
        if let Some(t) = &tag {
            if t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            {
                return Err(bad("malformed tag"));
            }
        }
        let (host, repo) = match name.split_once('/') {
            Some((h, r)) if h.contains('.') || h.contains(':') || h == "localhost" => {
                (h.to_string(), r.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        let repo = if creds::canonical_host(&host) == "docker.io" && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo
        };
        if repo.is_empty()
            || repo.split('/').any(|c| {
                c.is_empty()
                    || !c.bytes().all(|b| {
                        b.is_ascii_lowercase()
                            || b.is_ascii_digit()
                            || matches!(b, b'_' | b'.' | b'-')
                    })
            })
        {
            return Err(bad("malformed repository name"));
        }
        Ok(ImageRef {
            host,
            repo,
            tag,
            digest,
        })
    }

    /// The manifest reference to resolve: the digest, else the tag, else `latest`.
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The same repository with another tag or digest.
    pub fn with_reference(&self, tag: Option<&str>, digest: Option<&str>) -> ImageRef {
        ImageRef {
            host: self.host.clone(),
            repo: self.repo.clone(),
            tag: tag.map(str::to_string),
            digest: digest.map(str::to_string),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.repo)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// A fetched manifest or index, digest-checked.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The raw bytes.
    pub bytes: Vec<u8>,
    /// `Content-Type` (or the document's `mediaType`).
    pub media_type: String,
    /// `sha256:` of the bytes.
    pub digest: String,
}

/// How blobs are uploaded.
#[derive(Clone, Debug)]
pub struct PushOptions {
    /// Blobs up to this size go in one `PUT`; larger ones in `PATCH` chunks.
    pub monolithic_max: u64,
    /// Chunk size of chunked uploads.
    pub chunk_size: u64,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self {
            monolithic_max: 256 << 20,
            chunk_size: 64 << 20,
        }
    }
}

/// The result of a manifest push.
#[derive(Clone, Debug)]
pub struct PushedManifest {
    /// The digest the registry stored.
    pub digest: String,
    /// The registry answered with `OCI-Subject` (it indexes referrers itself).
    pub subject_indexed: bool,
}

fn err(url: &str, detail: impl Into<String>) -> Error {
    Error::Registry {
        url: url.to_string(),
        detail: detail.into(),
    }
}

/// The registry client for whole objects (see the module docs).
pub struct Distribution {
    http: Transport,
    /// Upload behaviour.
    pub push: PushOptions,
}

impl fmt::Debug for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Distribution")
            .field("opts", self.options())
            .finish_non_exhaustive()
    }
}

impl Distribution {
    /// A client reading credentials from the files named in `opts` (the
    /// docker config with its credential helpers, by default).
    pub fn new(opts: RegistryOptions) -> Result<Self> {
        Ok(Self::with_transport(Transport::new(opts)?))
    }

    /// A client with an explicit credential source.
    pub fn with_credentials(
        opts: RegistryOptions,
        creds: Arc<dyn CredentialSource>,
    ) -> Result<Self> {
        Ok(Self::with_transport(Transport::with_credentials(
            opts, creds,
        )?))
    }

    fn with_transport(http: Transport) -> Self {
        Self {
            http,
            push: PushOptions::default(),
        }
    }

    /// The options in use.
    pub fn options(&self) -> &RegistryOptions {
        self.http.options()
    }

    /// `scheme://api-host` for a reference host.
    fn base(&self, host: &str) -> String {
        let api = if creds::canonical_host(host) == "docker.io" {
            "registry-1.docker.io"
        } else {
            host
        };
        let scheme = if self.http.host_opts(host).plain_http {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{api}")
    }

    /// `…/v2/<repo>/<kind>/<reference>`.
    fn url(&self, r: &ImageRef, kind: &str, reference: &str) -> String {
        format!("{}/v2/{}/{kind}/{reference}", self.base(&r.host), r.repo)
    }

    /// Sends `req` to `r`'s repository with `access` (the auth scheme learnt
    /// from the `401` of the request itself), retrying transient failures
    /// with back-off. Redirects are returned, not followed.
    fn send(&self, r: &ImageRef, access: Access, req: &Request<'_>) -> Result<Response> {
        self.send_with(r, access, req, Retry::new(&self.options().retry, None))
    }

    /// [`Self::send`] with the tries of `retry`.
    fn send_with(
        &self,
        r: &ImageRef,
        access: Access,
        req: &Request<'_>,
        retry: Retry,
    ) -> Result<Response> {
        let who = AuthScope {
            host: &r.host,
            repo: &r.repo,
            access,
            probe: None,
        };
        let what = req.what();
        let once = || {
            let resp = self
                .http
                .send_authed(&who, &what, None, |authz| self.http.send(req, authz))?;
            match http::classify(resp.status()) {
                Class::Retryable => Err(Fail::Retry(format!("HTTP {}", resp.status()))),
                _ => Ok(resp),
            }
        };
        retry.run(once, |_, _| true).map_err(|(n, f)| {
            f.into_error(|d| {
                err(
                    req.url(),
                    format!("{}: {d} (after {n} tries)", req.method()),
                )
            })
        })
    }

    fn small_timeout(&self) -> Duration {
        Duration::from_millis(self.options().timeouts.request_ms)
    }

    /// A deadline for moving `size` bytes: the request timeout plus 1 s per MiB.
    fn transfer_timeout(&self, size: u64) -> Duration {
        self.small_timeout() + Duration::from_secs(size >> 20)
    }

    fn status_error(url: &str, what: &str, resp: Response) -> Error {
        let st = resp.status();
        let mut body = String::new();
        let _ = resp.take(4096).read_to_string(&mut body);
        let body = body.trim();
        if let Some(d) = http::diagnose_status(url, st, body) {
            return err(url, format!("{what}: HTTP {st}: {d}"));
        }
        err(
            url,
            if body.is_empty() {
                format!("{what}: HTTP {st}")
            } else {
                format!("{what}: HTTP {st}: {body}")
            },
        )
    }

    /// Checks, before any work, that `r`'s registry answers on the scheme
    /// this client uses and grants `push` (or only `pull`) access to the
    /// repository: `GET /v2/` (reachability, scheme), then for `push` the
    /// start of an upload (`POST …/blobs/uploads/`, which needs push
    /// rights), cancelled at once (`DELETE` of the session, best effort).
    /// No retries: a set-up error says so at once, naming host, scheme and
    /// the fix.
    pub fn check_access(&self, r: &ImageRef, push: bool) -> Result<()> {
        let base = self.base(&r.host);
        let send = |req: &Request<'_>, access: Access| {
            let once = Retry::new(&self.options().retry, None).with_tries(1);
            self.send_with(r, access, req, once)
        };
        let v2 = format!("{base}/v2/");
        let req = Request::new(Method::GET, &v2, self.small_timeout());
        let resp = send(&req, Access::Pull)?;
        match resp.status() {
            StatusCode::OK => {}
            // `/v2/` may need credentials of its own; the repository
            // request below is what counts.
            s if http::classify(s) == Class::Auth => {}
            _ => return Err(Self::status_error(&v2, "GET /v2/", resp)),
        }
        if !push {
            return Ok(());
        }
        let start = format!("{base}/v2/{}/blobs/uploads/", r.repo);
        let req = Request::new(Method::POST, &start, self.small_timeout())
            .header(header::CONTENT_LENGTH, "0");
        let resp = send(&req, Access::Push)?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(Self::status_error(
                &start,
                &format!("checking push access to {}/{}", r.host, r.repo),
                resp,
            ));
        }
        if let Ok(loc) = Self::location(&start, &resp) {
            let loc = loc.to_string();
            let req = Request::new(Method::DELETE, &loc, self.small_timeout());
            let _ = send(&req, Access::Push);
        }
        Ok(())
    }

    /// Fetches the manifest or index `reference` (a tag or digest), checks
    /// its digest (against the reference when it is one, and against
    /// `Docker-Content-Digest` when the registry sends it).
    pub fn get_manifest(&self, r: &ImageRef, reference: &str) -> Result<Manifest> {
        self.get_manifest_opt(r, reference)?.ok_or_else(|| {
            err(
                &self.url(r, "manifests", reference),
                format!("manifest unknown: {r} has no `{reference}`"),
            )
        })
    }

    /// [`Self::get_manifest`], with `None` for a `404`.
    pub fn get_manifest_opt(&self, r: &ImageRef, reference: &str) -> Result<Option<Manifest>> {
        let url = self.url(r, "manifests", reference);
        let req = Request::new(Method::GET, &url, self.small_timeout())
            .header(header::ACCEPT, MANIFEST_ACCEPT);
        let resp = self.send(r, Access::Pull, &req)?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if resp.status() != StatusCode::OK {
            return Err(Self::status_error(&url, "GET manifest", resp));
        }
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let dcd = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut bytes = Vec::new();
        resp.take(MAX_MANIFEST + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| err(&url, format!("reading the manifest: {e}")))?;
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(err(&url, "manifest larger than 4 MiB"));
        }
        let digest = sha256_digest(&bytes);
        if reference.starts_with("sha256:") && digest != reference {
            return Err(err(
                &url,
                format!("manifest has digest {digest}, not the requested {reference}"),
            ));
        }
        if let Some(d) = dcd.filter(|d| d.starts_with("sha256:")) {
            if d != digest {
                return Err(err(
                    &url,
                    format!("manifest has digest {digest}, the registry says {d}"),
                ));
            }
        }
        let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.get("mediaType")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
            .unwrap_or(ct);
        Ok(Some(Manifest {
            bytes,
            media_type,
            digest,
        }))
    }

    /// Starts a GET of blob `digest` at byte `from`; follows redirects
    /// (without credentials). Returns the response (200 or 206).
    fn get_blob(&self, r: &ImageRef, digest: &str, from: u64, size: u64) -> Result<Response> {
        let url = self.url(r, "blobs", digest);
        let mut req = Request::new(
            Method::GET,
            &url,
            self.transfer_timeout(size.saturating_sub(from)),
        );
        if from > 0 {
            req = req.header(header::RANGE, format!("bytes={from}-"));
        }
        let mut resp = self.send(r, Access::Pull, &req)?;
        let mut hops = 0;
        while resp.status().is_redirection() {
            hops += 1;
            let loc = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| err(&url, "redirect without Location"))?;
            let target = Url::parse(&url)
                .and_then(|b| b.join(loc))
                .map_err(|e| err(&url, format!("bad Location {loc:?}: {e}")))?;
            if hops > 5 {
                return Err(err(&url, "too many redirects"));
            }
            let target = target.to_string();
            resp = self
                .http
                .send(&req.to(&target), None)
                .map_err(|f| f.into_error(|d| err(&url, format!("redirect target: {d}"))))?;
        }
        match resp.status() {
            StatusCode::OK if from == 0 => Ok(resp),
            StatusCode::PARTIAL_CONTENT if from > 0 => Ok(resp),
            StatusCode::NOT_FOUND => Err(err(&url, format!("blob unknown to {r}"))),
            _ => Err(Self::status_error(&url, "GET blob", resp)),
        }
    }

    /// Streams blob `digest` (of `size` bytes, 0 if unknown). A dropped
    /// connection resumes with `Range` (bounded tries). The stream ends with
    /// an error if it is longer or shorter than `size`; the caller checks the
    /// digest.
    pub fn open_blob(
        self: &Arc<Self>,
        r: &ImageRef,
        digest: &str,
        size: u64,
    ) -> Result<Box<dyn Read + Send>> {
        let resp = self.get_blob(r, digest, 0, size)?;
        Ok(Box::new(BlobReader {
            client: self.clone(),
            r: r.clone(),
            digest: digest.to_string(),
            size,
            pos: 0,
            resp: Some(resp),
            resumes: 0,
        }))
    }

    /// `HEAD` of a blob: its size when the repository has it.
    pub fn blob_exists(&self, r: &ImageRef, digest: &str) -> Result<Option<u64>> {
        let url = self.url(r, "blobs", digest);
        let req = Request::new(Method::HEAD, &url, self.small_timeout());
        let resp = self.send(r, Access::Push, &req)?;
        match resp.status() {
            StatusCode::OK => Ok(resp.content_length().or_else(|| {
                resp.headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
            })),
            StatusCode::NOT_FOUND => Ok(None),
            // Some registries redirect HEAD to storage: the blob exists.
            s if s.is_redirection() => Ok(Some(0)),
            _ => Err(Self::status_error(&url, "HEAD blob", resp)),
        }
    }

    /// The absolute upload URL from a `Location` header.
    fn location(url: &str, resp: &Response) -> Result<Url> {
        let loc = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| err(url, "upload response without Location"))?;
        Url::parse(url)
            .and_then(|b| b.join(loc))
            .map_err(|e| err(url, format!("bad upload Location {loc:?}: {e}")))
    }

    fn with_digest(mut u: Url, digest: &str) -> String {
        u.query_pairs_mut().append_pair("digest", digest);
        u.to_string()
    }

    /// Uploads the file `path` as blob `digest` unless the repository has it
    /// already. Monolithic `PUT` up to [`PushOptions::monolithic_max`], else
    /// `PATCH` chunks then `PUT ?digest=`. A failed upload restarts from a new
    /// session (bounded). Returns whether bytes were sent.
    pub fn push_blob(&self, r: &ImageRef, digest: &str, path: &Path) -> Result<bool> {
        let size = std::fs::metadata(path)
            .map_err(|e| Error::Io(e).in_file(path))?
            .len();
        if let Some(n) = self.blob_exists(r, digest)? {
            if n == size || n == 0 {
                return Ok(false);
            }
        }
        let tries = self.options().retry.tries.max(1);
        let mut last = None;
        for _ in 0..tries {
            match self.upload_once(r, digest, path, size) {
                Ok(()) => return Ok(true),
                Err(e @ Error::Auth { .. }) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one try"))
    }

    fn upload_once(&self, r: &ImageRef, digest: &str, path: &Path, size: u64) -> Result<()> {
        let start = format!("{}/v2/{}/blobs/uploads/", self.base(&r.host), r.repo);
        let req = Request::new(Method::POST, &start, self.small_timeout())
            .header(header::CONTENT_LENGTH, "0");
        let resp = self.send(r, Access::Push, &req)?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(Self::status_error(&start, "starting the upload", resp));
        }
        let mut loc = Self::location(&start, &resp)?;
        const OCTET: &str = "application/octet-stream";
        let section = |off: u64, len: u64| -> Result<Body> {
            let mut f = File::open(path).map_err(|e| Error::Io(e).in_file(path))?;
            f.seek(SeekFrom::Start(off))
                .map_err(|e| Error::Io(e).in_file(path))?;
            Ok(Body::sized(f.take(len), len))
        };
        let final_url;
        let resp = if size <= self.push.monolithic_max {
            final_url = Self::with_digest(loc, digest);
            let body = || section(0, size);
            let req = Request::new(Method::PUT, &final_url, self.transfer_timeout(size))
                .header(header::CONTENT_TYPE, OCTET)
                .header(header::CONTENT_LENGTH, size.to_string())
                .body(&body);
            self.send(r, Access::Push, &req)?
        } else {
            let chunk = self.push.chunk_size.max(1 << 20);
            let mut off = 0;
            while off < size {
                let n = chunk.min(size - off);
                let url = loc.to_string();
                let body = || section(off, n);
                let req = Request::new(Method::PATCH, &url, self.transfer_timeout(n))
                    .header(header::CONTENT_TYPE, OCTET)
                    .header(header::CONTENT_LENGTH, n.to_string())
                    .header(header::CONTENT_RANGE, format!("{}-{}", off, off + n - 1))
                    .body(&body);
                let resp = self.send(r, Access::Push, &req)?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(Self::status_error(&url, "uploading a chunk", resp));
                }
                loc = Self::location(&url, &resp)?;
                off += n;
            }
            final_url = Self::with_digest(loc, digest);
            let req = Request::new(Method::PUT, &final_url, self.small_timeout())
                .header(header::CONTENT_TYPE, OCTET)
                .header(header::CONTENT_LENGTH, "0");
            self.send(r, Access::Push, &req)?
        };
        if resp.status() != StatusCode::CREATED {
            return Err(Self::status_error(
                &final_url,
                &format!("finishing the upload of {digest}"),
                resp,
            ));
        }
        Self::check_stored(&final_url, &resp, digest)
    }

    /// The digest the registry says it stored (`Docker-Content-Digest`, when
    /// it sends one) must be `digest`.
    fn check_stored(url: &str, resp: &Response, digest: &str) -> Result<()> {
        match resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            Some(d) if d != digest => Err(err(
                url,
                format!("the registry stored {d}, expected {digest}"),
            )),
            _ => Ok(()),
        }
    }

    /// Uploads an in-memory blob (configs) by way of a temporary file.
    pub fn push_blob_bytes(
        &self,
        r: &ImageRef,
        digest: &str,
        bytes: &[u8],
        tmp: &Path,
    ) -> Result<bool> {
        let p = tmp.join(format!("upload-{}", digest.replace(':', "-")));
        std::fs::write(&p, bytes).map_err(|e| Error::Io(e).in_file(&p))?;
        let res = self.push_blob(r, digest, &p);
        let _ = std::fs::remove_file(&p);
        res
    }

    /// `PUT`s a manifest or index under `reference` (a tag or its digest).
    pub fn put_manifest(
        &self,
        r: &ImageRef,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<PushedManifest> {
        let url = self.url(r, "manifests", reference);
        let digest = sha256_digest(bytes);
        let data = bytes.to_vec();
        let body = move || Ok(Body::from(data.clone()));
        let req = Request::new(Method::PUT, &url, self.small_timeout())
            .header(header::CONTENT_TYPE, media_type)
            .body(&body);
        let resp = self.send(r, Access::Push, &req)?;
        if resp.status() != StatusCode::CREATED && resp.status() != StatusCode::OK {
            return Err(Self::status_error(&url, "PUT manifest", resp));
        }
        Self::check_stored(&url, &resp, &digest)?;
        Ok(PushedManifest {
            digest,
            subject_indexed: resp.headers().contains_key("oci-subject"),
        })
    }
}

/// A streamed blob download that resumes after a dropped connection.
struct BlobReader {
    client: Arc<Distribution>,
    r: ImageRef,
    digest: String,
    size: u64,
    pos: u64,
    resp: Option<Response>,
    resumes: u32,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let failure = match self.resp.as_mut() {
                Some(resp) => match resp.read(buf) {
                    Ok(0) if self.size > 0 && self.pos < self.size => {
                        format!("the body ended at {} of {} bytes", self.pos, self.size)
                    }
                    Ok(n) => {
                        self.pos += n as u64;
                        if self.size > 0 && self.pos > self.size {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("blob {} is longer than {} bytes", self.digest, self.size),
                            ));
                        }
                        return Ok(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => e.to_string(),
                },
                None => "no response".to_string(),
            };
            self.resp = None;
            self.resumes += 1;
            let retry = &self.client.options().retry;
            if self.resumes > retry.tries.max(1) {
                return Err(io::Error::other(format!(
                    "blob {}: {failure} (gave up after {} resumes)",
                    self.digest,
                    self.resumes - 1
                )));
            }
            std::thread::sleep(Duration::from_millis(retry.backoff_ms));
            match self
                .client
                .get_blob(&self.r, &self.digest, self.pos, self.size)
            {
                Ok(r) => self.resp = Some(r),
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "blob {}: {failure}; resuming: {e}",
                        self.digest
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = ImageRef::parse("127.0.0.1:5000/ns/app:v1").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repo.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "ns/app", Some("v1"))
        );
        assert_eq!(r.reference(), "v1");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("reg.example/app@{d}")).unwrap();
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.reference(), d);
        assert_eq!(r.tag, None);
        let r = ImageRef::parse("ubuntu").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repo.as_str()),
            ("docker.io", "library/ubuntu")
        );
        assert_eq!(r.reference(), "latest");
        let r = ImageRef::parse("localhost:5000/x:t@".to_string().trim_end_matches('@'));
        assert_eq!(r.unwrap().host, "localhost:5000");
        let r = ImageRef::parse("user/app:1.0").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repo.as_str()),
            ("docker.io", "user/app")
        );
        assert!(ImageRef::parse("reg.example/App").is_err());
        assert!(ImageRef::parse("reg.example/app@sha256:12").is_err());
        assert!(ImageRef::parse("reg.example/app:").is_err());
        assert_eq!(
            ImageRef::parse("reg:1/a/b:t").unwrap().to_string(),
            "reg:1/a/b:t"
        );
    }

    #[test]
    fn plain_http_by_host_or_authority() {
        use crate::registry::HostOptions;
        let mut o = RegistryOptions::default();
        o.hosts.insert(
            "127.0.0.1:5000".into(),
            HostOptions {
                plain_http: true,
                ..Default::default()
            },
        );
        o.hosts.insert(
            "localhost".into(),
            HostOptions {
                plain_http: true,
                ..Default::default()
            },
        );
        let d = Distribution::with_credentials(o, Arc::new(creds::Anonymous)).unwrap();
        assert_eq!(d.base("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(d.base("127.0.0.1:5001"), "https://127.0.0.1:5001");
        assert_eq!(d.base("localhost:9"), "http://localhost:9");
        assert_eq!(d.base("docker.io"), "https://registry-1.docker.io");
    }
}
