//! Whole-object registry access for tools (the converter): manifests and
//! indexes by tag or digest, streamed blob downloads, and pushes (blob
//! existence check, monolithic or chunked upload, manifest `PUT`).
//!
//! [`super::registry::RegistryClient`] is the data path for block reads (range
//! requests, mirrors, P2P, redirect caching); this client shares its options
//! ([`RegistryOptions`]: per-host plain HTTP, TLS, timeouts, retries,
//! credential files), the credential sources ([`super::creds`]) and the
//! challenge parsing and token cache ([`super::auth`]).
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

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::blocking::{Body, Client, Response};
use reqwest::header::{self, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use sha2::{Digest, Sha256};

use super::auth::{self, AuthCache, Scheme};
use super::creds::{self, CredentialSource, FileCredentials};
use super::registry::{HostOptions, RegistryOptions};
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

/// `sha256:<hex>` of `b`.
fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn err(url: &str, detail: impl Into<String>) -> Error {
    Error::Registry {
        url: url.to_string(),
        detail: detail.into(),
    }
}

/// Full error text including causes.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Why one attempt failed.
enum Fail {
    /// Worth another try (5xx, 429, 408, network).
    Retry(String),
    /// Final.
    Fatal(Error),
}

/// A request body that can be made again for a retry.
type BodyFn<'a> = &'a dyn Fn() -> Result<Body>;

/// The registry client for whole objects (see the module docs).
pub struct Distribution {
    opts: RegistryOptions,
    creds: Arc<dyn CredentialSource>,
    clients: Mutex<HashMap<String, Client>>,
    auth: AuthCache,
    /// Upload behaviour.
    pub push: PushOptions,
}

impl fmt::Debug for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Distribution")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl Distribution {
    /// A client reading credentials from the files named in `opts` (the
    /// docker config with its credential helpers, by default).
    pub fn new(opts: RegistryOptions) -> Result<Self> {
        let creds = FileCredentials {
            credential_file: opts.credential_file.clone(),
            docker_config: if opts.use_docker_config {
                opts.docker_config
                    .clone()
                    .or_else(creds::default_docker_config)
            } else {
                None
            },
        };
        Self::with_credentials(opts, Arc::new(creds))
    }

    /// A client with an explicit credential source.
    pub fn with_credentials(
        opts: RegistryOptions,
        creds: Arc<dyn CredentialSource>,
    ) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Self {
            opts,
            creds,
            clients: Mutex::new(HashMap::new()),
            auth: AuthCache::new(),
            push: PushOptions::default(),
        })
    }

    /// The options in use.
    pub fn options(&self) -> &RegistryOptions {
        &self.opts
    }

    /// Host options for `host[:port]`: the exact key, else the host alone.
    fn host_opts(&self, authority: &str) -> HostOptions {
        if let Some(o) = self.opts.hosts.get(authority) {
            return o.clone();
        }
        let bare = authority
            .rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(authority, |(h, _)| h);
        self.opts.hosts.get(bare).cloned().unwrap_or_default()
    }

    /// `scheme://api-host` for a reference host.
    fn base(&self, host: &str) -> String {
        let api = if creds::canonical_host(host) == "docker.io" {
            "registry-1.docker.io"
        } else {
            host
        };
        let scheme = if self.host_opts(host).plain_http {
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

    fn client(&self, host: &str) -> Result<Client> {
        if let Some(c) = self.clients.lock().unwrap().get(host) {
            return Ok(c.clone());
        }
        let ho = self.host_opts(host);
        let mut b = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_millis(self.opts.timeouts.connect_ms))
            .timeout(None)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(self.opts.user_agent.clone());
        if ho.insecure_skip_verify {
            b = b.tls_danger_accept_invalid_certs(true);
        }
        if let Some(ca) = &ho.ca_file {
            let pem = std::fs::read(ca).map_err(|e| Error::Io(e).in_file(ca))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| Error::ServiceConfig {
                    field: format!("hosts.{host}.ca_file"),
                    detail: e.to_string(),
                })?;
            b = b.tls_certs_merge(certs);
        }
        let c = b
            .build()
            .map_err(|e| err(host, format!("cannot build HTTP client: {}", chain(&e))))?;
        self.clients
            .lock()
            .unwrap()
            .insert(host.to_string(), c.clone());
        Ok(c)
    }

    fn auth_key(r: &ImageRef, push: bool) -> String {
        format!(
            "{}/{}#{}",
            creds::canonical_host(&r.host),
            r.repo,
            if push { "push" } else { "pull" }
        )
    }

    fn auth_error(r: &ImageRef, detail: String) -> Error {
        Error::Auth {
            registry: r.host.clone(),
            detail,
        }
    }

    /// The `Authorization` value for a known scheme (fetching a token if needed).
    fn authorization(&self, r: &ImageRef, scheme: &Scheme) -> Result<Option<String>> {
        match scheme {
            Scheme::Anonymous => Ok(None),
            Scheme::Basic => match self.creds.lookup(&r.host, &r.repo)? {
                Some(c) => Ok(Some(auth::basic_header(&c))),
                None => Err(Self::auth_error(
                    r,
                    format!(
                        "the registry asks for Basic auth and no credentials match {}/{} \
                         (docker config `auths`, `credHelpers` or `credsStore`)",
                        r.host, r.repo
                    ),
                )),
            },
            Scheme::Bearer {
                realm,
                service,
                scope,
            } => {
                if let Some(t) = self.auth.token(realm, service, scope) {
                    return Ok(Some(format!("Bearer {t}")));
                }
                let mut tu = Url::parse(realm)
                    .map_err(|e| Self::auth_error(r, format!("bad token realm {realm:?}: {e}")))?;
                {
                    let mut q = tu.query_pairs_mut();
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    if let Some(s) = scope {
                        q.append_pair("scope", s);
                    }
                }
                let host = tu.host_str().unwrap_or("").to_string();
                let mut rb = self
                    .client(&host)?
                    .get(tu.clone())
                    .timeout(Duration::from_millis(self.opts.timeouts.request_ms));
                if let Some(c) = self.creds.lookup(&r.host, &r.repo)? {
                    rb = rb.header(header::AUTHORIZATION, auth::basic_header(&c));
                }
                let resp = rb.send().map_err(|e| {
                    Self::auth_error(r, format!("token server {realm}: {}", chain(&e)))
                })?;
                let st = resp.status();
                if st != StatusCode::OK {
                    return Err(Self::auth_error(
                        r,
                        format!("token server {realm}: HTTP {st} (check the credentials)"),
                    ));
                }
                let body = resp
                    .bytes()
                    .map_err(|e| Self::auth_error(r, format!("token body: {}", chain(&e))))?;
                let (tok, ttl) = auth::parse_token_response(&r.host, &body)?;
                self.auth.put_token(realm, service, scope, tok.clone(), ttl);
                Ok(Some(format!("Bearer {tok}")))
            }
        }
    }

    /// Sends one request with auth, learning the scheme from a `401`, with
    /// retries for transient failures. Redirects are returned, not followed.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        r: &ImageRef,
        push: bool,
        method: Method,
        url: &str,
        headers: &[(header::HeaderName, String)],
        body: Option<BodyFn<'_>>,
        timeout: Duration,
    ) -> Result<Response> {
        let key = Self::auth_key(r, push);
        let tries = self.opts.retry.tries.max(1);
        let mut backoff = Duration::from_millis(self.opts.retry.backoff_ms);
        let mut authed = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = (|| -> std::result::Result<Response, Fail> {
                let scheme = self.auth.scheme(&key).unwrap_or(Scheme::Anonymous);
                let authz = self.authorization(r, &scheme).map_err(Fail::Fatal)?;
                let u =
                    Url::parse(url).map_err(|e| Fail::Fatal(err(url, format!("bad URL: {e}"))))?;
                let host = match u.port() {
                    Some(p) => format!("{}:{p}", u.host_str().unwrap_or("")),
                    None => u.host_str().unwrap_or("").to_string(),
                };
                let mut rb = self
                    .client(&host)
                    .map_err(Fail::Fatal)?
                    .request(method.clone(), u)
                    .timeout(timeout);
                for (k, v) in headers {
                    let hv = HeaderValue::from_str(v)
                        .map_err(|_| Fail::Fatal(err(url, format!("bad header value for {k}"))))?;
                    rb = rb.header(k, hv);
                }
                if let Some(a) = authz {
                    rb = rb.header(header::AUTHORIZATION, a);
                }
                if let Some(b) = body {
                    rb = rb.body(b().map_err(Fail::Fatal)?);
                }
                rb.send().map_err(|e| Fail::Retry(chain(&e.without_url())))
            })();
            let detail = match res {
                Ok(resp) => {
                    let st = resp.status();
                    if st == StatusCode::UNAUTHORIZED && !authed {
                        authed = true;
                        let ch: Vec<_> = resp
                            .headers()
                            .get_all(header::WWW_AUTHENTICATE)
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .flat_map(auth::parse_www_authenticate)
                            .collect();
                        let scheme = match Scheme::from_challenges(&ch) {
                            Some(Scheme::Bearer {
                                realm,
                                service,
                                scope,
                            }) => {
                                let want = format!(
                                    "repository:{}:{}",
                                    r.repo,
                                    if push { "pull,push" } else { "pull" }
                                );
                                // The challenge's scope names what this
                                // request needs; make sure pushes ask for push.
                                let scope = match scope {
                                    Some(s) if !push || s.contains("push") => Some(s),
                                    _ => Some(want),
                                };
                                Scheme::Bearer {
                                    realm,
                                    service,
                                    scope,
                                }
                            }
                            Some(s) => s,
                            None => {
                                return Err(Self::auth_error(
                                    r,
                                    format!("HTTP 401 for {url} without a usable challenge"),
                                ))
                            }
                        };
                        self.auth.invalidate(&key);
                        self.auth.set_scheme(&key, scheme);
                        attempt -= 1;
                        continue;
                    }
                    if st == StatusCode::UNAUTHORIZED || st == StatusCode::FORBIDDEN {
                        self.auth.invalidate(&key);
                        return Err(Self::auth_error(
                            r,
                            format!(
                                "HTTP {st} for {method} {url}{}",
                                if push { " (push access denied?)" } else { "" }
                            ),
                        ));
                    }
                    if st.is_server_error()
                        || st == StatusCode::TOO_MANY_REQUESTS
                        || st == StatusCode::REQUEST_TIMEOUT
                    {
                        format!("HTTP {st}")
                    } else {
                        return Ok(resp);
                    }
                }
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Retry(d)) => d,
            };
            if attempt >= tries {
                return Err(err(
                    url,
                    format!("{method}: {detail} (after {attempt} tries)"),
                ));
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(self.opts.retry.max_backoff_ms));
        }
    }

    fn small_timeout(&self) -> Duration {
        Duration::from_millis(self.opts.timeouts.request_ms)
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
        err(
            url,
            if body.is_empty() {
                format!("{what}: HTTP {st}")
            } else {
                format!("{what}: HTTP {st}: {body}")
            },
        )
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
        let resp = self.send(
            r,
            false,
            Method::GET,
            &url,
            &[(header::ACCEPT, MANIFEST_ACCEPT.into())],
            None,
            self.small_timeout(),
        )?;
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
        let digest = sha256(&bytes);
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
        let mut hdrs = Vec::new();
        if from > 0 {
            hdrs.push((header::RANGE, format!("bytes={from}-")));
        }
        let timeout = self.transfer_timeout(size.saturating_sub(from));
        let mut resp = self.send(r, false, Method::GET, &url, &hdrs, None, timeout)?;
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
            let host = target.host_str().unwrap_or("").to_string();
            let mut rb = self.client(&host)?.get(target).timeout(timeout);
            for (k, v) in &hdrs {
                rb = rb.header(k, v.as_str());
            }
            resp = rb.send().map_err(|e| {
                err(
                    &url,
                    format!("redirect target: {}", chain(&e.without_url())),
                )
            })?;
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
        let resp = self.send(r, true, Method::HEAD, &url, &[], None, self.small_timeout())?;
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
        let tries = self.opts.retry.tries.max(1);
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
        let resp = self.send(
            r,
            true,
            Method::POST,
            &start,
            &[(header::CONTENT_LENGTH, "0".into())],
            None,
            self.small_timeout(),
        )?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(Self::status_error(&start, "starting the upload", resp));
        }
        let mut loc = Self::location(&start, &resp)?;
        let octet = (header::CONTENT_TYPE, "application/octet-stream".to_string());
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
            self.send(
                r,
                true,
                Method::PUT,
                &final_url,
                &[octet.clone(), (header::CONTENT_LENGTH, size.to_string())],
                Some(&body),
                self.transfer_timeout(size),
            )?
        } else {
            let chunk = self.push.chunk_size.max(1 << 20);
            let mut off = 0;
            while off < size {
                let n = chunk.min(size - off);
                let url = loc.to_string();
                let body = || section(off, n);
                let resp = self.send(
                    r,
                    true,
                    Method::PATCH,
                    &url,
                    &[
                        octet.clone(),
                        (header::CONTENT_LENGTH, n.to_string()),
                        (header::CONTENT_RANGE, format!("{}-{}", off, off + n - 1)),
                    ],
                    Some(&body),
                    self.transfer_timeout(n),
                )?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(Self::status_error(&url, "uploading a chunk", resp));
                }
                loc = Self::location(&url, &resp)?;
                off += n;
            }
            final_url = Self::with_digest(loc, digest);
            self.send(
                r,
                true,
                Method::PUT,
                &final_url,
                &[octet, (header::CONTENT_LENGTH, "0".into())],
                None,
                self.small_timeout(),
            )?
        };
        if resp.status() != StatusCode::CREATED {
            return Err(Self::status_error(
                &final_url,
                &format!("finishing the upload of {digest}"),
                resp,
            ));
        }
        if let Some(d) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            if d != digest {
                return Err(err(
                    &final_url,
                    format!("the registry stored {d}, expected {digest}"),
                ));
            }
        }
        Ok(())
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
        let digest = sha256(bytes);
        let data = bytes.to_vec();
        let body = move || Ok(Body::from(data.clone()));
        let resp = self.send(
            r,
            true,
            Method::PUT,
            &url,
            &[(header::CONTENT_TYPE, media_type.to_string())],
            Some(&body),
            self.small_timeout(),
        )?;
        if resp.status() != StatusCode::CREATED && resp.status() != StatusCode::OK {
            return Err(Self::status_error(&url, "PUT manifest", resp));
        }
        if let Some(d) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            if d != digest {
                return Err(err(
                    &url,
                    format!("the registry stored {d}, expected {digest}"),
                ));
            }
        }
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
            if self.resumes > self.client.opts.retry.tries.max(1) {
                return Err(io::Error::other(format!(
                    "blob {}: {failure} (gave up after {} resumes)",
                    self.digest,
                    self.resumes - 1
                )));
            }
            std::thread::sleep(Duration::from_millis(self.client.opts.retry.backoff_ms));
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
