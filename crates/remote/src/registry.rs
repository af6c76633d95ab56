//! The registry client: range reads of OCI blobs over HTTP(S), with auth,
//! redirect caching, mirrors, a P2P proxy, timeouts and bounded retries.
//!
//! Request flow for one [`RangeFetcher::fetch`]:
//! 1. The endpoints are the configured mirrors of the blob's host, in order,
//!    then the origin. A mirror gets one try: any failure moves to the next
//!    endpoint, and a mirror that cannot be connected to is skipped for 30 s.
//!    The origin gets `retry.tries` tries.
//! 2. The first request to a repository is the auth probe (`GET`,
//!    `Range: bytes=0-0`, no redirects, no `Authorization`); a 401/403 with
//!    `WWW-Authenticate` selects Basic or Bearer for it (see [`super::auth`]).
//! 3. The data request is a `GET` with `Range: bytes=a-b` and the
//!    `Authorization` header, redirects not followed. A 3xx caches `Location`
//!    for the blob (default 300 s) and the data is fetched from there **without**
//!    `Authorization`; later reads go straight to the cached location. Any error
//!    drops the cached location.
//! 4. 206 must carry exactly `Content-Range: bytes a-b/total`; 200 is the
//!    whole blob and the range is sliced out. The body length is checked. A
//!    5xx/429/408, a timeout, a reset or truncated body, or a wrong
//!    `Content-Range` is retried with exponential back-off; a 401/403 after a
//!    request with credentials drops the cached token, reloads credentials and
//!    retries once.
//! 5. With P2P enabled and its port reachable, each data request goes to
//!    `<address>/<full resolved URL>` (keeping `Range`, and `Authorization`
//!    unless the URL is a redirect target); if the proxy cannot be reached the
//!    request goes direct.
//!
//! Every request has a deadline: `timeouts.request_ms` per request, and
//! `timeouts.total_ms` for a whole read including retries and failover.

use std::collections::HashMap;
use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, Response};
use reqwest::header::{self, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;

use super::auth::{self, AuthCache, Scheme};
use super::creds::{self, CredentialSource, FileCredentials};
use super::{BlobRef, Priority, RangeFetcher};
use overlaybd_core::error::{Error, Result};

/// TLS and scheme settings for one registry host.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HostOptions {
    /// Talk plain HTTP to this host even when the URL says `https`.
    pub plain_http: bool,
    /// Accept any server certificate (testing only).
    pub insecure_skip_verify: bool,
    /// Extra PEM CA bundle trusted for this host.
    pub ca_file: Option<PathBuf>,
}

/// The P2P proxy (upstream `p2pConfig`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct P2pOptions {
    /// Send data requests through the proxy.
    pub enable: bool,
    /// Proxy prefix, e.g. `http://localhost:9731/accelerator`; requests go to
    /// `<address>/<full blob URL>`.
    pub address: String,
}

/// Deadlines, in milliseconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Timeouts {
    /// TCP + TLS connect. Default 5 000.
    pub connect_ms: u64,
    /// One request, from connecting until the body is read. Default 30 000.
    pub request_ms: u64,
    /// One read, including all retries and failover. Default 120 000.
    pub total_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect_ms: 5_000,
            request_ms: 30_000,
            total_ms: 120_000,
        }
    }
}

/// Bounded retries with exponential back-off.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RetryOptions {
    /// Attempts per endpoint (at least 1). Default 3.
    pub tries: u32,
    /// First back-off, doubled after each failed attempt. Default 100.
    pub backoff_ms: u64,
    /// Back-off cap. Default 2 000.
    pub max_backoff_ms: u64,
}

impl Default for RetryOptions {
    fn default() -> Self {
        Self {
            tries: 3,
            backoff_ms: 100,
            max_backoff_ms: 2_000,
        }
    }
}

/// Registry client settings. Every field has a default; unknown keys are
/// ignored so configs can grow.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RegistryOptions {
    /// Per-host settings, keyed by `host[:port]` as in the blob URL.
    pub hosts: HashMap<String, HostOptions>,
    /// Mirrors per registry host (`host[:port]`; docker.io aliases are one key),
    /// tried in order before the origin. Each is a base URL
    /// (`https://mirror.example` or `http://127.0.0.1:5001/prefix`); the blob
    /// path `/v2/<repo>/blobs/<digest>` is appended.
    pub mirrors: HashMap<String, Vec<String>>,
    /// The P2P proxy.
    pub p2p: P2pOptions,
    /// Deadlines.
    pub timeouts: Timeouts,
    /// Retries.
    pub retry: RetryOptions,
    /// `User-Agent`. Default `obd/<version>`.
    pub user_agent: String,
    /// Upstream-style credential file (`{"auths": {...}}`), read first.
    pub credential_file: Option<PathBuf>,
    /// Read the docker `config.json` (helpers, store, `auths`). Default true.
    pub use_docker_config: bool,
    /// The docker config path; default `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// How long a redirect `Location` is reused, in seconds. Default 300.
    pub redirect_ttl_secs: u64,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            hosts: HashMap::new(),
            mirrors: HashMap::new(),
            p2p: P2pOptions::default(),
            timeouts: Timeouts::default(),
            retry: RetryOptions::default(),
            user_agent: format!("obd/{}", env!("CARGO_PKG_VERSION")),
            credential_file: None,
            use_docker_config: true,
            docker_config: None,
            redirect_ttl_secs: 300,
        }
    }
}

/// Request and byte counts for one blob.
#[derive(Debug, Default)]
pub struct BlobCounters {
    /// HTTP data requests sent (including retries and redirects).
    pub requests: AtomicU64,
    /// Payload bytes returned to callers.
    pub bytes: AtomicU64,
    /// Failed attempts (each then retried, failed over, or reported).
    pub retries: AtomicU64,
    /// Data responses that came over HTTP/2.
    pub http2: AtomicU64,
}

/// A snapshot of [`BlobCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlobStats {
    /// HTTP data requests sent.
    pub requests: u64,
    /// Payload bytes returned.
    pub bytes: u64,
    /// Failed attempts.
    pub retries: u64,
    /// Data responses over HTTP/2.
    pub http2: u64,
}

/// Why one attempt failed.
#[derive(Debug)]
enum Fail {
    /// The endpoint cannot be reached: fail over at once.
    Connect(String),
    /// Transient: retry after back-off.
    Retry(String),
    /// Give up on this endpoint.
    Fatal(Error),
}

/// One place a blob can be read from.
#[derive(Debug, Clone)]
struct Endpoint {
    /// The blob URL on this endpoint.
    url: String,
    /// `host[:port]`.
    host: String,
    /// `ns/repo`.
    repo: String,
}

impl Endpoint {
    fn key(&self) -> String {
        format!("{}/{}", self.host, self.repo)
    }
}

fn authority(u: &Url) -> String {
    let h = u.host_str().unwrap_or("");
    match u.port() {
        Some(p) => format!("{h}:{p}"),
        None => h.to_string(),
    }
}

/// Splits a blob URL into (parsed URL, `host[:port]`, repo, path from `/v2/`).
fn split_blob_url(url: &str) -> Result<(Url, String, String, String)> {
    let bad = |detail: &str| Error::Remote {
        url: url.to_string(),
        offset: 0,
        end: 0,
        detail: detail.to_string(),
    };
    let u = Url::parse(url).map_err(|e| bad(&format!("bad URL: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(bad("not an http(s) URL"));
    }
    let path = u.path().to_string();
    let v2 = path
        .find("/v2/")
        .ok_or_else(|| bad("no /v2/ in the blob URL"))?;
    let rest = &path[v2 + 4..];
    let repo = match rest.rfind("/blobs/") {
        Some(i) => rest[..i].to_string(),
        None => rest.rsplit_once('/').map(|x| x.0).unwrap_or("").to_string(),
    };
    let host = authority(&u);
    Ok((u, host, repo, path[v2..].to_string()))
}

fn ensure_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only when a provider is already installed, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Parses `bytes a-b/total` (`total` may be `*`).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let v = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = v.split_once('/')?;
    let (a, b) = range.trim().split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?, total))
}

fn classify(e: &reqwest::Error) -> Fail {
    if e.is_connect() {
        Fail::Connect(format!("cannot connect: {e}"))
    } else if e.is_timeout() {
        Fail::Retry(format!("timed out: {e}"))
    } else {
        Fail::Retry(format!("request failed: {e}"))
    }
}

/// Full error text including causes (reqwest hides the interesting part there).
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

/// A synchronous registry client. Cheap to share (`Arc`); one pooled HTTP
/// client per scheme + host.
pub struct RegistryClient {
    opts: RegistryOptions,
    creds: Arc<dyn CredentialSource>,
    clients: Mutex<HashMap<String, Client>>,
    auth: AuthCache,
    redirects: Mutex<HashMap<String, (String, Instant)>>,
    stats: Mutex<HashMap<String, Arc<BlobCounters>>>,
    /// P2P reachability: (reachable, checked at).
    p2p_state: Mutex<Option<(bool, Instant)>>,
    /// Mirrors that refused a connection, skipped until the instant.
    mirror_down: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// How long a P2P reachability verdict is kept.
const P2P_RECHECK: Duration = Duration::from_secs(30);
/// How long a mirror that refused a connection is skipped.
const MIRROR_RECHECK: Duration = Duration::from_secs(30);

impl RegistryClient {
    /// A client reading credentials from the files named in `opts`.
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
        ensure_crypto_provider();
        if opts.p2p.enable {
            Url::parse(&opts.p2p.address).map_err(|e| Error::ServiceConfig {
                field: "p2p.address".into(),
                detail: format!("{:?}: {e}", opts.p2p.address),
            })?;
        }
        for (host, o) in &opts.hosts {
            if let Some(ca) = &o.ca_file {
                let pem = std::fs::read(ca).map_err(|e| Error::Io(e).in_file(ca))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    Error::ServiceConfig {
                        field: format!("hosts.{host}.ca_file"),
                        detail: format!("{}: {e}", ca.display()),
                    }
                })?;
                if certs.is_empty() {
                    return Err(Error::ServiceConfig {
                        field: format!("hosts.{host}.ca_file"),
                        detail: format!("{}: no PEM certificates", ca.display()),
                    });
                }
            }
        }
        Ok(Self {
            opts,
            creds,
            clients: Mutex::new(HashMap::new()),
            auth: AuthCache::new(),
            redirects: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            p2p_state: Mutex::new(None),
            mirror_down: Mutex::new(HashMap::new()),
        })
    }

    /// The options in use.
    pub fn options(&self) -> &RegistryOptions {
        &self.opts
    }

    /// Counters for `blob_url` (zero if never read).
    pub fn stats(&self, blob_url: &str) -> BlobStats {
        match self.stats.lock().unwrap().get(blob_url) {
            Some(c) => BlobStats {
                requests: c.requests.load(Ordering::Relaxed),
                bytes: c.bytes.load(Ordering::Relaxed),
                retries: c.retries.load(Ordering::Relaxed),
                http2: c.http2.load(Ordering::Relaxed),
            },
            None => BlobStats::default(),
        }
    }

    /// The live counters for `blob_url`.
    pub fn counters(&self, blob_url: &str) -> Arc<BlobCounters> {
        self.stats
            .lock()
            .unwrap()
            .entry(blob_url.to_string())
            .or_default()
            .clone()
    }

    /// The redirect `Location` cached for `blob_url` on its origin, if any.
    pub fn cached_redirect(&self, blob_url: &str) -> Option<String> {
        let mut m = self.redirects.lock().unwrap();
        match m.get(blob_url) {
            Some((loc, exp)) if Instant::now() < *exp => Some(loc.clone()),
            Some(_) => {
                m.remove(blob_url);
                None
            }
            None => None,
        }
    }

    fn drop_redirect(&self, blob_url: &str) {
        self.redirects.lock().unwrap().remove(blob_url);
    }

    fn host_opts(&self, host: &str) -> HostOptions {
        self.opts.hosts.get(host).cloned().unwrap_or_default()
    }

    fn client_for(&self, u: &Url) -> Result<Client> {
        let host = authority(u);
        let key = format!("{}://{host}", u.scheme());
        if let Some(c) = self.clients.lock().unwrap().get(&key) {
            return Ok(c.clone());
        }
        let ho = self.host_opts(&host);
        let mut b = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_millis(self.opts.timeouts.connect_ms))
            .timeout(Duration::from_millis(self.opts.timeouts.request_ms))
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
        let c = b.build().map_err(|e| Error::Remote {
            url: key.clone(),
            offset: 0,
            end: 0,
            detail: format!("cannot build HTTP client: {}", chain(&e)),
        })?;
        self.clients.lock().unwrap().insert(key, c.clone());
        Ok(c)
    }

    /// The endpoints for `url`: mirrors first, then the origin.
    fn endpoints(&self, url: &str) -> Result<Vec<Endpoint>> {
        let (u, host, repo, v2path) = split_blob_url(url)?;
        let mut out = Vec::new();
        let canon = creds::canonical_host(&host);
        let mirrors = self.opts.mirrors.get(&host).or_else(|| {
            self.opts
                .mirrors
                .iter()
                .find(|(k, _)| creds::canonical_host(k) == canon)
                .map(|(_, v)| v)
        });
        for m in mirrors.into_iter().flatten() {
            let murl = format!("{}{v2path}", m.trim_end_matches('/'));
            match Url::parse(&murl) {
                Ok(mu) => out.push(self.endpoint_from(mu, repo.clone())),
                Err(_) => continue,
            }
        }
        out.push(self.endpoint_from(u, repo));
        Ok(out)
    }

    fn endpoint_from(&self, mut u: Url, repo: String) -> Endpoint {
        let host = authority(&u);
        if u.scheme() == "https" && self.host_opts(&host).plain_http {
            let _ = u.set_scheme("http");
        }
        Endpoint {
            url: u.to_string(),
            host,
            repo,
        }
    }

    /// Whether data requests should go through the P2P proxy now.
    fn p2p_active(&self) -> bool {
        if !self.opts.p2p.enable {
            return false;
        }
        let mut st = self.p2p_state.lock().unwrap();
        if let Some((up, at)) = *st {
            if up || at.elapsed() < P2P_RECHECK {
                return up;
            }
        }
        let up = self.p2p_reachable();
        *st = Some((up, Instant::now()));
        up
    }

    fn p2p_reachable(&self) -> bool {
        let Ok(u) = Url::parse(&self.opts.p2p.address) else {
            return false;
        };
        let (Some(h), Some(p)) = (u.host_str(), u.port_or_known_default()) else {
            return false;
        };
        let to = Duration::from_millis(self.opts.timeouts.connect_ms.min(1_000));
        let Ok(addrs) = (h, p).to_socket_addrs() else {
            return false;
        };
        addrs
            .into_iter()
            .any(|a| TcpStream::connect_timeout(&a, to).is_ok())
    }

    fn mirror_is_down(&self, host: &str) -> bool {
        let mut m = self.mirror_down.lock().unwrap();
        match m.get(host) {
            Some(until) if Instant::now() < *until => true,
            Some(_) => {
                m.remove(host);
                false
            }
            None => false,
        }
    }

    fn mark_mirror_down(&self, host: &str) {
        self.mirror_down
            .lock()
            .unwrap()
            .insert(host.to_string(), Instant::now() + MIRROR_RECHECK);
    }

    fn mark_p2p_down(&self) {
        *self.p2p_state.lock().unwrap() = Some((false, Instant::now()));
    }

    fn p2p_url(&self, target: &str) -> String {
        format!("{}/{target}", self.opts.p2p.address.trim_end_matches('/'))
    }

    fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(header::HeaderName, String)],
        timeout: Duration,
    ) -> std::result::Result<Response, Fail> {
        let u = Url::parse(url).map_err(|e| {
            Fail::Fatal(Error::Remote {
                url: url.to_string(),
                offset: 0,
                end: 0,
                detail: format!("bad URL: {e}"),
            })
        })?;
        let c = self.client_for(&u).map_err(Fail::Fatal)?;
        let mut rb = c.request(method, u).timeout(timeout);
        for (k, v) in headers {
            let hv = HeaderValue::from_str(v).map_err(|_| {
                Fail::Fatal(Error::Remote {
                    url: url.to_string(),
                    offset: 0,
                    end: 0,
                    detail: format!("bad header value for {k}"),
                })
            })?;
            rb = rb.header(k, hv);
        }
        rb.send()
            .map_err(|e| e.without_url())
            .map_err(|e| match classify(&e) {
                Fail::Connect(_) => Fail::Connect(format!("cannot connect: {}", chain(&e))),
                Fail::Retry(_) if e.is_timeout() => {
                    Fail::Retry(format!("timed out: {}", chain(&e)))
                }
                _ => Fail::Retry(format!("request failed: {}", chain(&e))),
            })
    }

    fn auth_err(host: &str, detail: String) -> Fail {
        Fail::Fatal(Error::Auth {
            registry: host.to_string(),
            detail,
        })
    }

    /// The probe: `GET` with `Range: bytes=0-0`, no credentials, no redirects.
    fn probe(&self, ep: &Endpoint, timeout: Duration) -> std::result::Result<Scheme, Fail> {
        let resp = self.send(
            Method::GET,
            &ep.url,
            &[(header::RANGE, "bytes=0-0".into())],
            timeout,
        )?;
        let st = resp.status();
        if st == StatusCode::UNAUTHORIZED || st == StatusCode::FORBIDDEN {
            let ch: Vec<_> = resp
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(auth::parse_www_authenticate)
                .collect();
            return Scheme::from_challenges(&ch).ok_or_else(|| {
                Self::auth_err(
                    &ep.host,
                    format!("HTTP {st} without a usable WWW-Authenticate challenge"),
                )
            });
        }
        if st.is_server_error() {
            return Err(Fail::Retry(format!("auth probe: HTTP {st}")));
        }
        Ok(Scheme::Anonymous)
    }

    fn lookup_creds(&self, ep: &Endpoint) -> std::result::Result<Option<creds::Credential>, Fail> {
        self.creds.lookup(&ep.host, &ep.repo).map_err(Fail::Fatal)
    }

    /// The `Authorization` value for `ep`, probing and fetching a token as needed.
    fn auth_header(
        &self,
        ep: &Endpoint,
        timeout: Duration,
    ) -> std::result::Result<Option<String>, Fail> {
        let key = ep.key();
        let scheme = match self.auth.scheme(&key) {
            Some(s) => s,
            None => {
                let s = self.probe(ep, timeout)?;
                self.auth.set_scheme(&key, s.clone());
                s
            }
        };
        match scheme {
            Scheme::Anonymous => Ok(None),
            Scheme::Basic => match self.lookup_creds(ep)? {
                Some(c) => Ok(Some(auth::basic_header(&c))),
                None => Err(Self::auth_err(
                    &ep.host,
                    "registry asks for Basic auth and no credentials match".into(),
                )),
            },
            Scheme::Bearer {
                realm,
                service,
                scope,
            } => {
                if let Some(t) = self.auth.token(&realm, &service, &scope) {
                    return Ok(Some(format!("Bearer {t}")));
                }
                let mut tu = Url::parse(&realm).map_err(|e| {
                    Self::auth_err(&ep.host, format!("bad token realm {realm:?}: {e}"))
                })?;
                {
                    let mut q = tu.query_pairs_mut();
                    if let Some(s) = &service {
                        q.append_pair("service", s);
                    }
                    if let Some(s) = &scope {
                        q.append_pair("scope", s);
                    }
                }
                let mut hdrs = Vec::new();
                if let Some(c) = self.lookup_creds(ep)? {
                    hdrs.push((header::AUTHORIZATION, auth::basic_header(&c)));
                }
                let resp = self.send(Method::GET, tu.as_str(), &hdrs, timeout)?;
                let st = resp.status();
                if st.is_server_error() {
                    return Err(Fail::Retry(format!("token server {realm}: HTTP {st}")));
                }
                if st != StatusCode::OK {
                    return Err(Self::auth_err(
                        &ep.host,
                        format!("token server {realm}: HTTP {st}"),
                    ));
                }
                let body = resp
                    .bytes()
                    .map_err(|e| Fail::Retry(format!("token body: {}", chain(&e.without_url()))))?;
                let (tok, ttl) =
                    auth::parse_token_response(&ep.host, &body).map_err(Fail::Fatal)?;
                self.auth
                    .put_token(&realm, &service, &scope, tok.clone(), ttl);
                Ok(Some(format!("Bearer {tok}")))
            }
        }
    }

    /// One attempt at `[offset, offset+len)` from `ep`. Returns the bytes and the
    /// blob's total size.
    fn try_once(
        &self,
        ep: &Endpoint,
        counters: &BlobCounters,
        offset: u64,
        len: u64,
        expect_total: Option<u64>,
        deadline: Instant,
    ) -> std::result::Result<(Vec<u8>, u64), Fail> {
        let timeout_left = || {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(Fail::Retry("read deadline passed".into()))
            } else {
                Ok(left.min(Duration::from_millis(self.opts.timeouts.request_ms)))
            }
        };
        let (mut target, mut with_auth) = match self.cached_redirect(&ep.url) {
            Some(l) => (l, false),
            None => (ep.url.clone(), true),
        };
        let mut auth_retried = false;
        let mut hops = 0;
        let range = format!("bytes={}-{}", offset, offset + len - 1);
        loop {
            let timeout = timeout_left()?;
            let mut hdrs = vec![(header::RANGE, range.clone())];
            if with_auth {
                if let Some(a) = self.auth_header(ep, timeout)? {
                    hdrs.push((header::AUTHORIZATION, a));
                }
            }
            let via_p2p = self.p2p_active();
            let req_url = if via_p2p {
                self.p2p_url(&target)
            } else {
                target.clone()
            };
            let timeout = timeout_left()?;
            counters.requests.fetch_add(1, Ordering::Relaxed);
            let resp = match self.send(Method::GET, &req_url, &hdrs, timeout) {
                Ok(r) => r,
                Err(Fail::Connect(_)) if via_p2p => {
                    // The proxy went away: go direct.
                    self.mark_p2p_down();
                    continue;
                }
                Err(e) => return Err(e),
            };
            if resp.version() == reqwest::Version::HTTP_2 {
                counters.http2.fetch_add(1, Ordering::Relaxed);
            }
            let st = resp.status();
            if st.is_redirection() {
                let loc = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| Fail::Retry(format!("HTTP {st} without Location")))?;
                let base = Url::parse(&target).map_err(|e| Fail::Retry(e.to_string()))?;
                let loc = base
                    .join(loc)
                    .map_err(|e| Fail::Retry(format!("bad Location {loc:?}: {e}")))?
                    .to_string();
                hops += 1;
                if hops > 3 {
                    return Err(Fail::Retry("too many redirects".into()));
                }
                let ttl = Duration::from_secs(self.opts.redirect_ttl_secs);
                self.redirects
                    .lock()
                    .unwrap()
                    .insert(ep.url.clone(), (loc.clone(), Instant::now() + ttl));
                target = loc;
                with_auth = false;
                continue;
            }
            if st == StatusCode::UNAUTHORIZED || st == StatusCode::FORBIDDEN {
                if !with_auth {
                    // An expired presigned URL: drop it and resolve again.
                    self.drop_redirect(&ep.url);
                    return Err(Fail::Retry(format!("HTTP {st} from redirect target")));
                }
                if auth_retried {
                    return Err(Self::auth_err(
                        &ep.host,
                        format!("HTTP {st} for {} after re-authenticating", ep.url),
                    ));
                }
                auth_retried = true;
                // Drop the token, learn the (new) challenge, reload credentials.
                self.auth.invalidate(&ep.key());
                let ch: Vec<_> = resp
                    .headers()
                    .get_all(header::WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(auth::parse_www_authenticate)
                    .collect();
                if let Some(s) = Scheme::from_challenges(&ch) {
                    self.auth.set_scheme(&ep.key(), s);
                }
                continue;
            }
            return match st {
                StatusCode::PARTIAL_CONTENT => {
                    let cr = resp
                        .headers()
                        .get(header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                        .unwrap_or_default();
                    let Some((a, b, total)) = parse_content_range(&cr) else {
                        return Err(Fail::Retry(format!("206 with bad Content-Range {cr:?}")));
                    };
                    if a != offset || b != offset + len - 1 {
                        return Err(Fail::Retry(format!(
                            "206 Content-Range {cr:?} does not match the requested {range}"
                        )));
                    }
                    if let (Some(t), Some(e)) = (total, expect_total) {
                        if t != e {
                            return Err(Fail::Retry(format!(
                                "Content-Range total {t} differs from the blob size {e}"
                            )));
                        }
                    }
                    // Read straight into a buffer of the expected size: one copy
                    // out of the HTTP client's chunks, no intermediate buffer. One
                    // byte more than asked for is read to detect a longer body.
                    let mut body = Vec::with_capacity(len as usize);
                    let mut resp = resp;
                    (&mut resp)
                        .take(len + 1)
                        .read_to_end(&mut body)
                        .map_err(|e| Fail::Retry(format!("reading body: {}", chain(&e))))?;
                    if body.len() as u64 != len {
                        return Err(Fail::Retry(format!(
                            "body has {}{} bytes, expected {len}",
                            if body.len() as u64 > len {
                                "more than "
                            } else {
                                ""
                            },
                            body.len().min(len as usize)
                        )));
                    }
                    Ok((body, total.or(expect_total).unwrap_or(0)))
                }
                StatusCode::OK => {
                    // The server ignored the range and sends the whole blob: stream
                    // past `offset`, keep only `len` bytes, and drop the rest with
                    // the connection, so memory stays bounded by the request size.
                    let total = resp.content_length().or(expect_total);
                    if let (Some(t), Some(e)) = (resp.content_length(), expect_total) {
                        if t != e {
                            return Err(Fail::Retry(format!(
                                "200 body has {t} bytes, the blob has {e}"
                            )));
                        }
                    }
                    if let Some(t) = total {
                        if t < offset + len {
                            return Err(Fail::Retry(format!(
                                "200 body has {t} bytes, the range ends at {}",
                                offset + len
                            )));
                        }
                    }
                    let mut body = resp;
                    let skipped =
                        std::io::copy(&mut (&mut body).take(offset), &mut std::io::sink())
                            .map_err(|e| Fail::Retry(format!("reading 200 body: {e}")))?;
                    if skipped != offset {
                        return Err(Fail::Retry(format!(
                            "200 body ended at {skipped} bytes, before the range start {offset}"
                        )));
                    }
                    let mut out = vec![0u8; len as usize];
                    body.read_exact(&mut out).map_err(|e| {
                        Fail::Retry(format!(
                            "200 body ended before the range end {}: {e}",
                            offset + len
                        ))
                    })?;
                    Ok((out, total.unwrap_or(0)))
                }
                s if s.is_server_error()
                    || s == StatusCode::TOO_MANY_REQUESTS
                    || s == StatusCode::REQUEST_TIMEOUT =>
                {
                    Err(Fail::Retry(format!("HTTP {s}")))
                }
                s => Err(Fail::Fatal(Error::Remote {
                    url: target.clone(),
                    offset,
                    end: offset + len,
                    detail: format!("HTTP {s}"),
                })),
            };
        }
    }

    /// Reads `[offset, offset+len)` of the blob at `url`, with retries and
    /// failover. Returns the bytes and the blob's total size (0 if unknown).
    fn fetch_range(
        &self,
        url: &str,
        offset: u64,
        len: u64,
        expect_total: Option<u64>,
    ) -> Result<(Vec<u8>, u64)> {
        let remote = |u: &str, detail: String| Error::Remote {
            url: u.to_string(),
            offset,
            end: offset + len,
            detail,
        };
        let endpoints = self.endpoints(url)?;
        let counters = self.counters(url);
        let deadline = Instant::now() + Duration::from_millis(self.opts.timeouts.total_ms);
        let tries = self.opts.retry.tries.max(1);
        // (endpoint, first try, last try, detail)
        let mut failures: Vec<(String, u32, u32, String)> = Vec::new();
        for (i, ep) in endpoints.iter().enumerate() {
            let is_last = i + 1 == endpoints.len();
            if !is_last && self.mirror_is_down(&ep.host) {
                continue;
            }
            let mut backoff = Duration::from_millis(self.opts.retry.backoff_ms);
            // A mirror gets one try: on any failure the next endpoint is as good.
            let tries = if is_last { tries } else { 1 };
            for attempt in 1..=tries {
                match self.try_once(ep, &counters, offset, len, expect_total, deadline) {
                    Ok((data, total)) => {
                        counters.bytes.fetch_add(len, Ordering::Relaxed);
                        return Ok((data, total));
                    }
                    Err(f) => {
                        self.drop_redirect(&ep.url);
                        counters.retries.fetch_add(1, Ordering::Relaxed);
                        let (detail, go_on) = match f {
                            Fail::Fatal(Error::Remote { detail, .. }) => (detail, false),
                            Fail::Fatal(e) if is_last => return Err(e),
                            Fail::Fatal(e) => (e.to_string(), false),
                            Fail::Connect(d) => {
                                if !is_last {
                                    self.mark_mirror_down(&ep.host);
                                }
                                (d, is_last)
                            }
                            Fail::Retry(d) => (d, true),
                        };
                        let who = if ep.url == url {
                            "origin"
                        } else {
                            ep.url.as_str()
                        };
                        match failures.last_mut() {
                            // The same failure again: "tries 1-3: ...".
                            Some((w, _, last, d)) if w == who && *d == detail => *last = attempt,
                            _ => failures.push((who.to_string(), attempt, attempt, detail)),
                        }
                        let left = deadline.saturating_duration_since(Instant::now());
                        if !go_on || attempt == tries || left.is_zero() {
                            break;
                        }
                        std::thread::sleep(backoff.min(left));
                        backoff = (backoff * 2)
                            .min(Duration::from_millis(self.opts.retry.max_backoff_ms));
                    }
                }
            }
            if Instant::now() >= deadline {
                failures.push((
                    String::new(),
                    0,
                    0,
                    format!(
                        "gave up after the {} ms read deadline",
                        self.opts.timeouts.total_ms
                    ),
                ));
                break;
            }
        }
        let text: Vec<String> = failures
            .iter()
            .map(|(w, a, b, d)| match (w.is_empty(), a == b) {
                (true, _) => d.clone(),
                (false, true) => format!("{w} try {a}: {d}"),
                (false, false) => format!("{w} tries {a}-{b}: {d}"),
            })
            .collect();
        Err(remote(url, text.join("; ")))
    }

    /// `HEAD` on the origin: the `Content-Length` of a 200.
    fn head_size(&self, url: &str) -> Option<u64> {
        let ep = self.endpoints(url).ok()?.pop()?;
        let timeout = Duration::from_millis(self.opts.timeouts.request_ms);
        let mut hdrs = Vec::new();
        if let Some(a) = self.auth_header(&ep, timeout).ok()? {
            hdrs.push((header::AUTHORIZATION, a));
        }
        let resp = self.send(Method::HEAD, &ep.url, &hdrs, timeout).ok()?;
        if resp.status() != StatusCode::OK {
            return None;
        }
        resp.headers()
            .get(header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse()
            .ok()
    }
}

impl RangeFetcher for RegistryClient {
    fn fetch(&self, blob: &BlobRef, offset: u64, len: u64, _prio: Priority) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset.checked_add(len).ok_or_else(|| Error::Remote {
            url: blob.url.clone(),
            offset,
            end: u64::MAX,
            detail: "range overflows".into(),
        })?;
        if blob.size > 0 && end > blob.size {
            return Err(Error::Remote {
                url: blob.url.clone(),
                offset,
                end,
                detail: format!("range past the blob end ({} bytes)", blob.size),
            });
        }
        let expect = (blob.size > 0).then_some(blob.size);
        self.fetch_range(&blob.url, offset, len, expect)
            .map(|r| r.0)
    }

    fn blob_size(&self, blob_url: &str) -> Result<u64> {
        if let Some(n) = self.head_size(blob_url) {
            return Ok(n);
        }
        let (_, total) = self.fetch_range(blob_url, 0, 1, None)?;
        if total == 0 {
            return Err(Error::Remote {
                url: blob_url.to_string(),
                offset: 0,
                end: 1,
                detail: "the range response gave no total size".into(),
            });
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some((0, 9, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn blob_url_split() {
        let (_, h, r, p) = split_blob_url("https://reg:5000/v2/ns/repo/blobs/sha256:ab").unwrap();
        assert_eq!((h.as_str(), r.as_str()), ("reg:5000", "ns/repo"));
        assert_eq!(p, "/v2/ns/repo/blobs/sha256:ab");
        assert!(split_blob_url("ftp://x/v2/a/blobs/b").is_err());
    }

    #[test]
    fn options_default_from_empty_toml() {
        let o: RegistryOptions = toml::from_str("").unwrap();
        assert_eq!(o.retry.tries, 3);
        assert_eq!(o.redirect_ttl_secs, 300);
        assert!(o.user_agent.starts_with("obd/"));
        let o: RegistryOptions = serde_json::from_str(
            r#"{"mirrors":{"docker.io":["http://m:5000"]},"p2p":{"enable":true,"address":"http://p:1/acc"},"timeouts":{"request_ms":5}}"#,
        )
        .unwrap();
        assert_eq!(o.timeouts.request_ms, 5);
        assert_eq!(o.timeouts.connect_ms, 5_000);
        assert!(o.p2p.enable);
    }
}
