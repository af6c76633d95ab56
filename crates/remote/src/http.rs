//! The one HTTP transport of obd-remote, under both the range fetcher
//! ([`super::registry::RegistryClient`]) and the distribution client
//! ([`super::distribution::Distribution`]):
//!
//! - **clients**: one pooled reqwest client per scheme + host, built with that
//!   host's [`HostOptions`] (plain HTTP, insecure, extra CA file; looked up by
//!   `host:port`, then by the host alone). Clients never follow redirects:
//!   the callers decide where a `Location` goes and with which credentials.
//! - **auth**: the scheme per host, repository and access (pull, or push:
//!   the bearer scope asked for), learnt either from a probe before the first
//!   request (the range fetcher) or from the `401` of the request itself (the
//!   distribution client, so the registry names the scope of the operation).
//!   Basic uses the credential source; Bearer tokens are fetched and cached
//!   per realm, service and scope. Requests that start together wait for
//!   one probe and one token fetch (`AuthCache::single_flight`). A `401`/`403` drops the scheme and token,
//!   learns the response's challenge and the request goes once more; a second
//!   one is [`Error::Auth`].
//! - **failures**: one classification of statuses (retryable, auth, not
//!   found, fatal) and of attempts (connect, retry, fatal), and bounded
//!   retries with exponential back-off within an optional deadline.
//!
//! The transport itself is crate-internal; its public part is the options,
//! [`RegistryOptions`] and the types it holds (also re-exported from
//! [`super::registry`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use reqwest::blocking::{Body, Client, Response};
use reqwest::header::{self, HeaderName, HeaderValue};
use reqwest::{Certificate, Method, StatusCode, Url};
use serde::Deserialize;

use super::auth::{self, AuthCache, Scheme};
use super::creds::{self, CredentialSource, FileCredentials};
use overlaybd_core::error::{Error, Result};
use zfile::sync::MutexExt;

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
    /// Per-host settings, keyed by `host[:port]` as in the blob URL (a key
    /// without a port applies to every port of the host without its own key).
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
    /// Credentials recorded from CRI pulls (`{"auths": {"host/repo": ...}}`,
    /// written by obd-snapshotter's CRI image proxy), read first. A device
    /// root sets it to `<root>/cri-credentials.json`.
    pub cri_credential_file: Option<PathBuf>,
    /// Upstream-style credential file (`{"auths": {...}}`), read next.
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
            cri_credential_file: None,
            credential_file: None,
            use_docker_config: true,
            docker_config: None,
            redirect_ttl_secs: 300,
        }
    }
}

/// What a response status means to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// 2xx.
    Success,
    /// 3xx: the caller follows `Location`, or not.
    Redirect,
    /// 401 or 403: credentials missing, wrong or expired.
    Auth,
    /// 404.
    NotFound,
    /// 5xx, 429, 408: worth another try.
    Retryable,
    /// Anything else: final.
    Fatal,
}

/// Classifies a response status.
pub(crate) fn classify(st: StatusCode) -> Class {
    match st {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Class::Auth,
        StatusCode::NOT_FOUND => Class::NotFound,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT => Class::Retryable,
        s if s.is_server_error() => Class::Retryable,
        s if s.is_success() => Class::Success,
        s if s.is_redirection() => Class::Redirect,
        _ => Class::Fatal,
    }
}

/// Why one attempt failed.
#[derive(Debug)]
pub(crate) enum Fail {
    /// The endpoint cannot be reached: another endpoint may do better.
    Connect(String),
    /// Transient (a retryable status, a timeout, a reset, bad framing): retry
    /// after back-off.
    Retry(String),
    /// The endpoint is set up differently from what the client was told
    /// (scheme, TLS trust): no retry of it helps, another endpoint may. The
    /// text names host, scheme and the fix ([`diagnose`]).
    Setup(String),
    /// Final.
    Fatal(Error),
}

impl Fail {
    /// Classifies a failed `send` to `u`.
    fn from_reqwest(e: reqwest::Error, u: &Url) -> Fail {
        let e = e.without_url();
        let text = chain(&e);
        if let Some(d) = diagnose(u, &text) {
            return match d.kind {
                Diagnosis::Setup => Fail::Setup(d.text),
                Diagnosis::Unreachable => Fail::Connect(d.text),
            };
        }
        if e.is_connect() {
            Fail::Connect(format!("cannot connect to {}: {text}", origin(u)))
        } else if e.is_timeout() {
            Fail::Retry(format!("timed out: {text}"))
        } else {
            Fail::Retry(format!("request failed: {text}"))
        }
    }

    /// The final error: a [`Fail::Fatal`]'s own, else `wrap(detail)`.
    pub(crate) fn into_error(self, wrap: impl FnOnce(String) -> Error) -> Error {
        match self {
            Fail::Fatal(e) => e,
            Fail::Connect(d) | Fail::Retry(d) | Fail::Setup(d) => wrap(d),
        }
    }
}

/// How a failed connection reads, once [`diagnose`]d.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Diagnosis {
    /// The client's settings for the host are wrong ([`Fail::Setup`]).
    Setup,
    /// Nothing answers there ([`Fail::Connect`]).
    Unreachable,
}

/// A failed connection explained: the text names host and scheme and says
/// what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Diagnosed {
    pub kind: Diagnosis,
    pub text: String,
}

/// Where credentials for `host` come from, said as the fix for a refusal.
pub fn creds_fix(host: &str) -> String {
    format!(
        "give credentials for {host} with push/pull rights: `docker login {host}` (the docker \
         config and its helpers), or `--credential-file FILE` (service config: `credential_file`)"
    )
}

/// `scheme://host[:port]` of a URL.
pub(crate) fn origin(u: &Url) -> String {
    format!("{}://{}", u.scheme(), authority(u))
}

/// How to turn on plain HTTP for `host`, on the command line and in the
/// service config (what the snapshotter's devices read).
pub fn plain_http_fix(host: &str) -> String {
    format!(
        "add `--plain-http {host}` (service config: `[registry.hosts.\"{host}\"] plain_http = true`)"
    )
}

/// Explains the failure `text` (the error chain) of a connection to `u`
/// when it has a known cause: a TLS handshake answered in plain HTTP, an
/// untrusted certificate, a refused connection, a name that does not
/// resolve. The one place these are recognised.
pub(crate) fn diagnose(u: &Url, text: &str) -> Option<Diagnosed> {
    let host = authority(u);
    let https = u.scheme() == "https";
    let has = |pats: &[&str]| pats.iter().any(|p| text.contains(p));
    let (kind, text) = if https && has(&["InvalidContentType", "corrupt message"]) {
        // rustls reads the first bytes of an HTTP response as a TLS record.
        (
            Diagnosis::Setup,
            format!(
                "{host} answered plain HTTP to a TLS handshake (https://{host}); {}",
                plain_http_fix(&host)
            ),
        )
    } else if https
        && has(&[
            "invalid peer certificate",
            "UnknownIssuer",
            "NotValidForName",
        ])
    {
        (
            Diagnosis::Setup,
            format!(
                "https://{host}: the registry's TLS certificate is not trusted ({}); trust its CA \
                 (service config: `[registry.hosts.\"{host}\"] ca_file = \"/path/ca.pem\"`) or, \
                 for testing only, add `--insecure {host}`",
                text.rsplit(": ").next().unwrap_or(text)
            ),
        )
    } else if has(&["Connection refused", "connection refused"]) {
        (
            Diagnosis::Unreachable,
            format!(
                "{}://{host}: connection refused: no registry listens there; check the host and port",
                u.scheme()
            ),
        )
    } else if has(&["dns error", "failed to lookup address"]) {
        (
            Diagnosis::Unreachable,
            format!(
                "{}://{host}: the name {} does not resolve; check the host name",
                u.scheme(),
                u.host_str().unwrap_or("")
            ),
        )
    } else {
        return None;
    };
    Some(Diagnosed { kind, text })
}

/// Explains a final response `status` with `body` from `url` when it
/// says the request went to the wrong scheme: an HTTPS server answering
/// plain HTTP with `400` (Go: "Client sent an HTTP request to an HTTPS
/// server", nginx: "The plain HTTP request was sent to HTTPS port").
pub(crate) fn diagnose_status(url: &str, status: StatusCode, body: &str) -> Option<String> {
    let u = Url::parse(url).ok()?;
    let b = body.to_ascii_lowercase();
    if u.scheme() == "http"
        && status == StatusCode::BAD_REQUEST
        && (b.contains("http request to an https server") || b.contains("sent to https port"))
    {
        let host = authority(&u);
        return Some(format!(
            "{host} speaks HTTPS, not plain HTTP (http://{host}); drop `--plain-http {host}` \
             (service config: `plain_http = false` for it)"
        ));
    }
    None
}

/// Full error text including causes (reqwest hides the interesting part there).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `host[:port]` of a URL.
pub(crate) fn authority(u: &Url) -> String {
    let h = u.host_str().unwrap_or("");
    match u.port() {
        Some(p) => format!("{h}:{p}"),
        None => h.to_string(),
    }
}

/// Bounded tries with exponential back-off, within an optional deadline.
#[derive(Debug, Clone)]
pub(crate) struct Retry {
    tries: u32,
    backoff: Duration,
    max_backoff: Duration,
    deadline: Option<Instant>,
}

impl Retry {
    /// `opts.tries` tries (at least 1), ending early at `deadline`.
    pub(crate) fn new(opts: &RetryOptions, deadline: Option<Instant>) -> Self {
        Self {
            tries: opts.tries.max(1),
            backoff: Duration::from_millis(opts.backoff_ms),
            max_backoff: Duration::from_millis(opts.max_backoff_ms),
            deadline,
        }
    }

    /// The same with `tries` tries (at least 1).
    pub(crate) fn with_tries(mut self, tries: u32) -> Self {
        self.tries = tries.max(1);
        self
    }

    /// Runs `attempt` until it succeeds. Each failure is shown to
    /// `failed(try number, &fail)`, which says whether another try may help;
    /// a [`Fail::Fatal`], the last try and the deadline end it too. Between
    /// tries it sleeps the back-off (never past the deadline), doubled each
    /// time up to the cap. Returns the last failure and its try number.
    pub(crate) fn run<T>(
        &self,
        mut attempt: impl FnMut() -> std::result::Result<T, Fail>,
        mut failed: impl FnMut(u32, &Fail) -> bool,
    ) -> std::result::Result<T, (u32, Fail)> {
        let mut backoff = self.backoff;
        let mut n = 0;
        loop {
            n += 1;
            let f = match attempt() {
                Ok(v) => return Ok(v),
                Err(f) => f,
            };
            let go_on = failed(n, &f) && !matches!(f, Fail::Fatal(_) | Fail::Setup(_));
            let left = self
                .deadline
                .map(|d| d.saturating_duration_since(Instant::now()));
            if !go_on || n >= self.tries || left.is_some_and(|l| l.is_zero()) {
                return Err((n, f));
            }
            std::thread::sleep(left.map_or(backoff, |l| backoff.min(l)));
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }
}

/// A request body that can be made again for a retry.
pub(crate) type BodyFn<'a> = &'a dyn Fn() -> Result<Body>;

/// One request, re-sendable: the body is made anew for each send.
pub(crate) struct Request<'a> {
    method: Method,
    url: &'a str,
    headers: Vec<(HeaderName, String)>,
    body: Option<BodyFn<'a>>,
    timeout: Duration,
}

impl<'a> Request<'a> {
    /// `method url`, to be done within `timeout` (body included).
    pub(crate) fn new(method: Method, url: &'a str, timeout: Duration) -> Self {
        Self {
            method,
            url,
            headers: Vec::new(),
            body: None,
            timeout,
        }
    }

    /// Adds a header.
    pub(crate) fn header(mut self, name: HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// Sets the body maker.
    pub(crate) fn body(mut self, body: BodyFn<'a>) -> Self {
        self.body = Some(body);
        self
    }

    /// The URL.
    pub(crate) fn url(&self) -> &'a str {
        self.url
    }

    /// The method.
    pub(crate) fn method(&self) -> &Method {
        &self.method
    }

    /// `METHOD url`, for messages.
    pub(crate) fn what(&self) -> String {
        format!("{} {}", self.method, self.url)
    }

    /// The same request to another URL.
    pub(crate) fn to(&self, url: &'a str) -> Self {
        Self {
            method: self.method.clone(),
            url,
            headers: self.headers.clone(),
            body: self.body,
            timeout: self.timeout,
        }
    }
}

/// Read or write access to a repository: the bearer scope a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Reads: `repository:<repo>:pull`.
    Pull,
    /// Uploads and manifest pushes: `repository:<repo>:pull,push`.
    Push,
}

/// Whom a request authenticates as, and how the scheme is learnt.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AuthScope<'a> {
    /// `host[:port]` the credentials are looked up for.
    pub host: &'a str,
    /// Repository, e.g. `library/ubuntu`.
    pub repo: &'a str,
    /// What the request does.
    pub access: Access,
    /// Learn the scheme by probing this URL (`GET`, `Range: bytes=0-0`, no
    /// credentials, no redirects) before the first request. Without it the
    /// first request goes anonymous and its own `401` names the scheme.
    pub probe: Option<&'a str>,
}

impl AuthScope<'_> {
    /// The auth cache key: canonical host, repository and access.
    fn key(&self) -> String {
        let access = match self.access {
            Access::Pull => "pull",
            Access::Push => "push",
        };
        format!(
            "{}/{}#{access}",
            creds::canonical_host(self.host),
            self.repo
        )
    }

    /// The scope this access needs.
    fn wanted_scope(&self) -> String {
        match self.access {
            Access::Pull => format!("repository:{}:pull", self.repo),
            Access::Push => format!("repository:{}:pull,push", self.repo),
        }
    }

    fn fail(&self, detail: String) -> Fail {
        Fail::Fatal(Error::Auth {
            registry: self.host.to_string(),
            detail,
        })
    }
}

fn ensure_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only when a provider is already installed, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The certificates of a host's `ca_file`; a config error names the host.
fn load_ca(host: &str, ca: &std::path::Path) -> Result<Vec<Certificate>> {
    let pem = overlaybd_core::regular::read_config(ca)?;
    let bad = |detail: String| Error::ServiceConfig {
        field: format!("hosts.{host}.ca_file"),
        detail,
    };
    let certs =
        Certificate::from_pem_bundle(&pem).map_err(|e| bad(format!("{}: {e}", ca.display())))?;
    if certs.is_empty() {
        return Err(bad(format!("{}: no PEM certificates", ca.display())));
    }
    Ok(certs)
}

/// Where clients over `opts` look credentials up: `cri_credential_file`,
/// `credential_file`, then the docker config (with its helpers) unless
/// `use_docker_config` is off.
pub fn credential_source(opts: &RegistryOptions) -> FileCredentials {
    FileCredentials {
        cri_credential_file: opts.cri_credential_file.clone(),
        credential_file: opts.credential_file.clone(),
        docker_config: if opts.use_docker_config {
            opts.docker_config
                .clone()
                .or_else(creds::default_docker_config)
        } else {
            None
        },
    }
}

/// Clients, auth state and credentials shared by every request of one
/// registry client (see the module docs).
pub(crate) struct Transport {
    opts: RegistryOptions,
    creds: Arc<dyn CredentialSource>,
    /// Parsed `ca_file`s, by `hosts` key.
    cas: HashMap<String, Vec<Certificate>>,
    /// By `scheme://host[:port]`.
    clients: Mutex<HashMap<String, Client>>,
    auth: AuthCache,
}

impl Transport {
    /// A transport reading credentials from the files named in `opts` (the
    /// docker config with its credential helpers, by default).
    pub(crate) fn new(opts: RegistryOptions) -> Result<Self> {
        let creds = credential_source(&opts);
        Self::with_credentials(opts, Arc::new(creds))
    }

    /// A transport with an explicit credential source. Every `ca_file` is
    /// read now: a bad one is an [`Error::ServiceConfig`] naming its host.
    pub(crate) fn with_credentials(
        opts: RegistryOptions,
        creds: Arc<dyn CredentialSource>,
    ) -> Result<Self> {
        ensure_crypto_provider();
        let mut cas = HashMap::new();
        for (host, o) in &opts.hosts {
            if let Some(ca) = &o.ca_file {
                cas.insert(host.clone(), load_ca(host, ca)?);
            }
        }
        Ok(Self {
            opts,
            creds,
            cas,
            clients: Mutex::new(HashMap::new()),
            auth: AuthCache::new(),
        })
    }

    /// The options in use.
    pub(crate) fn options(&self) -> &RegistryOptions {
        &self.opts
    }

    /// The `hosts` key for `host[:port]`: the exact key, else the host alone.
    fn host_key<'k>(&self, authority: &'k str) -> &'k str {
        if self.opts.hosts.contains_key(authority) {
            return authority;
        }
        authority
            .rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(authority, |(h, _)| h)
    }

    /// Host options for `host[:port]`: the exact key, else the host alone.
    pub(crate) fn host_opts(&self, authority: &str) -> HostOptions {
        let key = self.host_key(authority);
        self.opts.hosts.get(key).cloned().unwrap_or_default()
    }

    /// `timeouts.request_ms`, cut to what is left before `deadline`.
    pub(crate) fn timeout(&self, deadline: Option<Instant>) -> std::result::Result<Duration, Fail> {
        let request = Duration::from_millis(self.opts.timeouts.request_ms);
        let Some(deadline) = deadline else {
            return Ok(request);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(Fail::Retry("read deadline passed".into()))
        } else {
            Ok(left.min(request))
        }
    }

    /// Builds (and keeps) the client for `url`'s scheme and host now, so
    /// that the first request there does not wait for it (an HTTPS client
    /// loads the system's TLS roots: ~5 ms, ~30 ms with a cold page cache).
    /// An error is left for that request to report.
    pub(crate) fn prepare(&self, url: &str) {
        if let Ok(u) = Url::parse(url) {
            let _ = self.client(&u);
        }
    }

    fn client(&self, u: &Url) -> Result<Client> {
        let host = authority(u);
        let key = format!("{}://{host}", u.scheme());
        // Built under the lock: a request racing `prepare` waits for that
        // client instead of building (and loading the roots) again.
        let mut clients = self.clients.locked();
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let hkey = self.host_key(&host);
        let ho = self.opts.hosts.get(hkey).cloned().unwrap_or_default();
        let mut b = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_millis(self.opts.timeouts.connect_ms))
            .timeout(None)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(self.opts.user_agent.clone());
        if u.scheme() == "http" {
            // Plain HTTP never handshakes: no roots, so building the client
            // does not read the system's certificate store (tens of ms with a
            // cold page cache, on every pull and device attach).
            b = b.tls_certs_only(Vec::new());
        } else {
            if ho.insecure_skip_verify {
                b = b.tls_danger_accept_invalid_certs(true);
            }
            if let Some(certs) = self.cas.get(hkey) {
                b = b.tls_certs_merge(certs.iter().cloned());
            }
        }
        let c = b.build().map_err(|e| Error::Registry {
            url: key.clone(),
            detail: format!("cannot build HTTP client: {}", chain(&e)),
        })?;
        clients.insert(key, c.clone());
        Ok(c)
    }

    /// Sends `req` once, with `authorization` if given. No redirects are
    /// followed; any status is a response.
    pub(crate) fn send(
        &self,
        req: &Request<'_>,
        authorization: Option<&str>,
    ) -> std::result::Result<Response, Fail> {
        let bad = |detail: String| {
            Fail::Fatal(Error::Registry {
                url: req.url.to_string(),
                detail,
            })
        };
        let u = Url::parse(req.url).map_err(|e| bad(format!("bad URL: {e}")))?;
        let c = self.client(&u).map_err(Fail::Fatal)?;
        let mut rb = c
            .request(req.method.clone(), u.clone())
            .timeout(req.timeout);
        let value = |k: &HeaderName, v: &str| {
            HeaderValue::from_str(v).map_err(|_| bad(format!("bad header value for {k}")))
        };
        for (k, v) in &req.headers {
            rb = rb.header(k, value(k, v)?);
        }
        if let Some(a) = authorization {
            rb = rb.header(header::AUTHORIZATION, value(&header::AUTHORIZATION, a)?);
        }
        if let Some(b) = req.body {
            rb = rb.body(b().map_err(Fail::Fatal)?);
        }
        rb.send().map_err(|e| Fail::from_reqwest(e, &u))
    }

    /// Sends a request as `who` through `send(authorization)`: the
    /// `Authorization` comes from the learnt scheme (probing and fetching a
    /// token as needed). A `401`/`403` drops the cached scheme and token,
    /// learns the response's challenge and sends once more; a second one is
    /// an [`Error::Auth`] naming `what` (`METHOD url`).
    pub(crate) fn send_authed(
        &self,
        who: &AuthScope<'_>,
        what: &str,
        deadline: Option<Instant>,
        mut send: impl FnMut(Option<&str>) -> std::result::Result<Response, Fail>,
    ) -> std::result::Result<Response, Fail> {
        // After the first 401/403: the scheme its challenge asked for (its
        // retry uses it, not the shared cache: another request's 401 may
        // have dropped it from there meanwhile), or `None` without one.
        let mut renewed: Option<Option<Scheme>> = None;
        loop {
            let scheme = match &renewed {
                Some(Some(s)) => s.clone(),
                _ => self.scheme(who, deadline)?,
            };
            let authz = self.header_for(who, &scheme, deadline)?;
            let resp = send(authz.as_deref())?;
            let st = resp.status();
            if classify(st) != Class::Auth {
                return Ok(resp);
            }
            if let Some(challenged) = renewed {
                let how = if challenged.is_some() {
                    "after re-authenticating"
                } else {
                    "without a usable WWW-Authenticate challenge"
                };
                let hint = match who.access {
                    Access::Push => " (push access denied?)",
                    Access::Pull => "",
                };
                return Err(who.fail(format!(
                    "HTTP {st} for {what} {how}{hint}; {}",
                    creds_fix(who.host)
                )));
            }
            let key = who.key();
            // Only the scheme this request used is dropped: one another
            // request has learnt since stays.
            self.auth.invalidate_if(&key, &scheme);
            // Without a usable challenge the next try probes again (or goes
            // anonymous): the second 401/403 then reports.
            let learnt = self.challenge(who, &resp);
            if let Some(s) = &learnt {
                self.auth.set_scheme(&key, s.clone());
            }
            renewed = Some(learnt);
        }
    }

    /// The scheme a 401/403 asks for, with the bearer scope `who` needs: the
    /// challenge's own, unless it has none or a push needs `push` and it
    /// does not grant it.
    fn challenge(&self, who: &AuthScope<'_>, resp: &Response) -> Option<Scheme> {
        let ch: Vec<_> = resp
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(auth::parse_www_authenticate)
            .collect();
        match Scheme::from_challenges(&ch)? {
            Scheme::Bearer {
                realm,
                service,
                scope,
            } => {
                let scope = match scope {
                    Some(s) if who.access == Access::Pull || s.contains("push") => s,
                    _ => who.wanted_scope(),
                };
                Some(Scheme::Bearer {
                    realm,
                    service,
                    scope: Some(scope),
                })
            }
            s => Some(s),
        }
    }

    /// The probe: `GET` with `Range: bytes=0-0`, no credentials.
    fn probe(
        &self,
        who: &AuthScope<'_>,
        url: &str,
        deadline: Option<Instant>,
    ) -> std::result::Result<Scheme, Fail> {
        let req = Request::new(Method::GET, url, self.timeout(deadline)?)
            .header(header::RANGE, "bytes=0-0");
        let resp = self.send(&req, None)?;
        let st = resp.status();
        match classify(st) {
            Class::Auth => self.challenge(who, &resp).ok_or_else(|| {
                who.fail(format!(
                    "HTTP {st} without a usable WWW-Authenticate challenge"
                ))
            }),
            Class::Retryable => Err(Fail::Retry(format!("auth probe: HTTP {st}"))),
            _ => Ok(Scheme::Anonymous),
        }
    }

    /// The `Authorization` value for `who`, probing and fetching a token as
    /// needed.
    pub(crate) fn authorization(
        &self,
        who: &AuthScope<'_>,
        deadline: Option<Instant>,
    ) -> std::result::Result<Option<String>, Fail> {
        let scheme = self.scheme(who, deadline)?;
        self.header_for(who, &scheme, deadline)
    }

    /// The scheme learnt for `who`'s repository, probing once (per
    /// repository, whoever asks) if `who` has a probe URL; anonymous if not.
    fn scheme(
        &self,
        who: &AuthScope<'_>,
        deadline: Option<Instant>,
    ) -> std::result::Result<Scheme, Fail> {
        let key = who.key();
        Ok(match (self.auth.scheme(&key), who.probe) {
            (Some(s), _) => s,
            (None, Some(url)) => self.auth.single_flight(
                &format!("scheme {key}"),
                || self.auth.scheme(&key),
                || {
                    let s = self.probe(who, url, deadline)?;
                    self.auth.set_scheme(&key, s.clone());
                    Ok(s)
                },
            )?,
            (None, None) => Scheme::Anonymous,
        })
    }

    /// The `Authorization` value `scheme` gives `who` (fetching a token as
    /// needed); `None` when anonymous.
    fn header_for(
        &self,
        who: &AuthScope<'_>,
        scheme: &Scheme,
        deadline: Option<Instant>,
    ) -> std::result::Result<Option<String>, Fail> {
        match scheme {
            Scheme::Anonymous => Ok(None),
            Scheme::Basic => match self.lookup_creds(who)? {
                Some(c) => Ok(Some(auth::basic_header(&c))),
                None => Err(who.fail(format!(
                    "the registry asks for Basic auth and no credentials match {}/{} \
                     (docker config `auths`, `credHelpers` or `credsStore`); {}",
                    who.host,
                    who.repo,
                    creds_fix(who.host)
                ))),
            },
            Scheme::Bearer {
                realm,
                service,
                scope,
            } => {
                let t = self.token(who, realm, service, scope, deadline)?;
                Ok(Some(format!("Bearer {t}")))
            }
        }
    }

    fn lookup_creds(
        &self,
        who: &AuthScope<'_>,
    ) -> std::result::Result<Option<creds::Credential>, Fail> {
        self.creds.lookup(who.host, who.repo).map_err(Fail::Fatal)
    }

    /// A bearer token: cached, or fetched from `realm` with the credentials
    /// (Basic) if there are any. Transient token-server failures are retried
    /// by the caller; refusals are [`Error::Auth`].
    fn token(
        &self,
        who: &AuthScope<'_>,
        realm: &str,
        service: &Option<String>,
        scope: &Option<String>,
        deadline: Option<Instant>,
    ) -> std::result::Result<String, Fail> {
        self.auth.single_flight(
            &format!("token {realm} {service:?} {scope:?}"),
            || self.auth.token(realm, service, scope),
            || self.fetch_token(who, realm, service, scope, deadline),
        )
    }

    /// Fetches a bearer token from the token server and caches it.
    fn fetch_token(
        &self,
        who: &AuthScope<'_>,
        realm: &str,
        service: &Option<String>,
        scope: &Option<String>,
        deadline: Option<Instant>,
    ) -> std::result::Result<String, Fail> {
        let mut tu =
            Url::parse(realm).map_err(|e| who.fail(format!("bad token realm {realm:?}: {e}")))?;
        {
            let mut q = tu.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            if let Some(s) = scope {
                q.append_pair("scope", s);
            }
        }
        let basic = self.lookup_creds(who)?.map(|c| auth::basic_header(&c));
        let req = Request::new(Method::GET, tu.as_str(), self.timeout(deadline)?);
        let resp = self.send(&req, basic.as_deref())?;
        let st = resp.status();
        if st != StatusCode::OK {
            let detail = format!("token server {realm}: HTTP {st}");
            return Err(match classify(st) {
                Class::Retryable => Fail::Retry(detail),
                Class::Auth => who.fail(format!("{detail}; {}", creds_fix(who.host))),
                _ => who.fail(detail),
            });
        }
        let body = resp
            .bytes()
            .map_err(|e| Fail::Retry(format!("token body: {}", chain(&e.without_url()))))?;
        let (tok, ttl) = auth::parse_token_response(who.host, &body).map_err(Fail::Fatal)?;
        self.auth.put_token(realm, service, scope, tok.clone(), ttl);
        Ok(tok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let c = |n: u16| classify(StatusCode::from_u16(n).unwrap());
        assert_eq!(c(200), Class::Success);
        assert_eq!(c(206), Class::Success);
        assert_eq!(c(307), Class::Redirect);
        assert_eq!(c(401), Class::Auth);
        assert_eq!(c(403), Class::Auth);
        assert_eq!(c(404), Class::NotFound);
        assert_eq!(c(408), Class::Retryable);
        assert_eq!(c(429), Class::Retryable);
        assert_eq!(c(503), Class::Retryable);
        assert_eq!(c(400), Class::Fatal);
    }

    #[test]
    fn retry_counts_stops_and_backs_off() {
        let opts = RetryOptions {
            tries: 3,
            backoff_ms: 1,
            max_backoff_ms: 2,
        };
        let mut calls = 0;
        let r: std::result::Result<(), _> = Retry::new(&opts, None).run(
            || {
                calls += 1;
                Err(Fail::Retry("x".into()))
            },
            |_, _| true,
        );
        assert!(matches!(r, Err((3, Fail::Retry(_)))));
        assert_eq!(calls, 3);
        // Fatal and a "no" from `failed` end at once.
        let r: std::result::Result<(), _> = Retry::new(&opts, None).run(
            || Err(Fail::Fatal(Error::BadRequest("x".into()))),
            |_, _| true,
        );
        assert!(matches!(r, Err((1, Fail::Fatal(_)))));
        let r: std::result::Result<(), _> = Retry::new(&opts, None)
            .with_tries(5)
            .run(|| Err(Fail::Connect("x".into())), |n, _| n < 2);
        assert!(matches!(r, Err((2, Fail::Connect(_)))));
        // A passed deadline ends after the first try.
        let r: std::result::Result<(), _> = Retry::new(&opts, Some(Instant::now()))
            .run(|| Err(Fail::Retry("x".into())), |_, _| true);
        assert!(matches!(r, Err((1, _))));
        let mut n = 0;
        let r = Retry::new(&opts, None).run(
            || {
                n += 1;
                if n < 2 {
                    Err(Fail::Retry("x".into()))
                } else {
                    Ok(n)
                }
            },
            |_, _| true,
        );
        assert_eq!(r.unwrap(), 2);
    }

    #[test]
    fn host_options_by_authority_then_host() {
        let mut o = RegistryOptions::default();
        o.hosts.insert(
            "a:5000".into(),
            HostOptions {
                plain_http: true,
                ..Default::default()
            },
        );
        o.hosts.insert(
            "b".into(),
            HostOptions {
                insecure_skip_verify: true,
                ..Default::default()
            },
        );
        let t = Transport::with_credentials(o, Arc::new(creds::Anonymous)).unwrap();
        assert!(t.host_opts("a:5000").plain_http);
        assert!(!t.host_opts("a:5001").plain_http);
        assert!(t.host_opts("b:1").insecure_skip_verify);
        assert!(t.host_opts("b").insecure_skip_verify);
        assert!(!t.host_opts("c").insecure_skip_verify);
    }

    #[test]
    fn prepare_builds_each_client_once() {
        let t = Transport::with_credentials(RegistryOptions::default(), Arc::new(creds::Anonymous))
            .unwrap();
        t.prepare("http://127.0.0.1:9/v2/r/blobs/sha256:00");
        t.prepare("not a url");
        let keys = |t: &Transport| t.clients.locked().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&t), ["http://127.0.0.1:9"]);
        let u = Url::parse("http://127.0.0.1:9/v2/").unwrap();
        t.client(&u).unwrap();
        assert_eq!(keys(&t), ["http://127.0.0.1:9"]);
    }

    #[test]
    fn connection_failures_name_host_scheme_and_fix() {
        let u = |s: &str| Url::parse(s).unwrap();
        let d = diagnose(
            &u("https://127.0.0.1:5000/v2/"),
            "error sending request: client error (Connect): received corrupt message of type InvalidContentType",
        )
        .unwrap();
        assert_eq!(d.kind, Diagnosis::Setup);
        assert_eq!(
            d.text,
            "127.0.0.1:5000 answered plain HTTP to a TLS handshake (https://127.0.0.1:5000); add \
             `--plain-http 127.0.0.1:5000` (service config: `[registry.hosts.\"127.0.0.1:5000\"] \
             plain_http = true`)"
        );
        let d = diagnose(
            &u("https://r.example/v2/"),
            "client error (Connect): invalid peer certificate: UnknownIssuer",
        )
        .unwrap();
        assert_eq!(d.kind, Diagnosis::Setup);
        assert!(d.text.starts_with(
            "https://r.example: the registry's TLS certificate is not trusted (UnknownIssuer)"
        ));
        assert!(d.text.contains("`--insecure r.example`"), "{}", d.text);
        let d = diagnose(
            &u("http://127.0.0.1:9/v2/"),
            "tcp connect error: Connection refused (os error 111)",
        )
        .unwrap();
        assert_eq!(d.kind, Diagnosis::Unreachable);
        assert!(d.text.starts_with("http://127.0.0.1:9: connection refused"));
        let d = diagnose(
            &u("https://nohost.invalid/v2/"),
            "dns error: failed to lookup address information",
        )
        .unwrap();
        assert!(d.text.contains("the name nohost.invalid does not resolve"));
        assert!(diagnose(&u("https://a/v2/"), "connection reset by peer").is_none());
        // The plain-HTTP side: a TLS port answering 400.
        let s = diagnose_status(
            "http://r:443/v2/",
            StatusCode::BAD_REQUEST,
            "Client sent an HTTP request to an HTTPS server.",
        )
        .unwrap();
        assert!(s.starts_with("r:443 speaks HTTPS, not plain HTTP"), "{s}");
        assert!(diagnose_status("https://r/v2/", StatusCode::BAD_REQUEST, "x").is_none());
    }

    #[test]
    fn scope_per_access() {
        let pull = AuthScope {
            host: "index.docker.io",
            repo: "a/b",
            access: Access::Pull,
            probe: None,
        };
        let push = AuthScope {
            access: Access::Push,
            ..pull
        };
        assert_eq!(pull.key(), "docker.io/a/b#pull");
        assert_eq!(push.key(), "docker.io/a/b#push");
        assert_eq!(pull.wanted_scope(), "repository:a/b:pull");
        assert_eq!(push.wanted_scope(), "repository:a/b:pull,push");
    }
}
