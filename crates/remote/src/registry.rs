//! The registry client: range reads of OCI blobs over HTTP(S), with auth,
//! redirect caching, mirrors, a P2P proxy, timeouts and bounded retries. The
//! HTTP clients, TLS options, auth and retry policy are the shared transport's
//! ([`super::http`]); this module is the range semantics and where a range is
//! read from.
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
//! 6. When the blob has a piece table ([`BlobRef::verity`]), the range asked
//!    for is widened to whole pieces and every attempt's bytes are checked
//!    against the table before they are returned ([`crate::verity`]). A
//!    mismatch fails that attempt like a bad response: a mirror's moves to
//!    the next endpoint, a P2P proxy's is fetched again direct, the origin's
//!    is retried; each is counted (`verify_failures`), and when every source
//!    lied the read fails naming the blob, the range and each source.
//!
//! Every request has a deadline: `timeouts.request_ms` per request, and
//! `timeouts.total_ms` for a whole read including retries and failover.

use std::collections::HashMap;
use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::blocking::Response;
use reqwest::header;
use reqwest::{Method, StatusCode, Url};

use super::creds::{self, CredentialSource};
use super::http::{self, Access, AuthScope, Class, Fail, Request, Retry, Transport};
use super::metrics::Metrics;
use super::verity::{PieceTable, VerityError};
use super::{BlobRef, Priority, RangeFetcher, UnitSink};
use overlaybd_core::error::{Error, Result};
use zfile::sync::MutexExt;

pub use super::http::{HostOptions, P2pOptions, RegistryOptions, RetryOptions, Timeouts};

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
    /// Responses whose bytes did not match the blob's piece table.
    pub verify_failures: AtomicU64,
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
    /// Responses that failed the piece-table check.
    pub verify_failures: u64,
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
    /// `mirror` or `origin` (metrics and logs).
    kind: &'static str,
}

impl Endpoint {
    /// Reads authenticate per endpoint, learning the scheme from a probe of
    /// the blob itself.
    fn auth(&self) -> AuthScope<'_> {
        AuthScope {
            host: &self.host,
            repo: &self.repo,
            access: Access::Pull,
            probe: Some(&self.url),
        }
    }
}

/// The range one read wants: `[offset, offset + len)`, `len > 0`, and the
/// blob's size when known.
#[derive(Debug, Clone, Copy)]
struct Want {
    offset: u64,
    len: u64,
    total: Option<u64>,
}

impl Want {
    fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// The `Range` header value.
    fn header(&self) -> String {
        format!("bytes={}-{}", self.offset, self.end() - 1)
    }
}

/// How one attempt's data request may travel, and how it did.
struct Route {
    /// The P2P proxy may be used (when enabled and up).
    p2p: bool,
    /// The last request went through the P2P proxy.
    via_p2p: std::cell::Cell<bool>,
}

impl Default for Route {
    fn default() -> Self {
        Route {
            p2p: true,
            via_p2p: std::cell::Cell::new(false),
        }
    }
}

/// What fetched bytes are checked against: the blob's piece table.
struct Check<'a> {
    table: &'a PieceTable,
    /// The blob's digest (metrics and logs).
    digest: &'a str,
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
    let host = http::authority(&u);
    Ok((u, host, repo, path[v2..].to_string()))
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

/// The failed attempts of one read, for its error: same failures in a row
/// are one entry ("origin tries 1-3: ...").
#[derive(Default)]
struct Failures(Vec<(String, u32, u32, String)>);

impl Failures {
    fn push(&mut self, who: &str, attempt: u32, detail: String) {
        match self.0.last_mut() {
            Some((w, _, last, d)) if w == who && *d == detail => *last = attempt,
            _ => self.0.push((who.to_string(), attempt, attempt, detail)),
        }
    }

    /// A note without an endpoint (the deadline).
    fn note(&mut self, detail: String) {
        self.0.push((String::new(), 0, 0, detail));
    }

    fn text(&self) -> String {
        let text: Vec<String> = self
            .0
            .iter()
            .map(|(w, a, b, d)| match (w.is_empty(), a == b) {
                (true, _) => d.clone(),
                (false, true) => format!("{w} try {a}: {d}"),
                (false, false) => format!("{w} tries {a}-{b}: {d}"),
            })
            .collect();
        text.join("; ")
    }
}

/// A synchronous registry client. Cheap to share (`Arc`); one pooled HTTP
/// client per scheme + host.
pub struct RegistryClient {
    http: Transport,
    redirects: Mutex<HashMap<String, (String, Instant)>>,
    stats: Mutex<HashMap<String, Arc<BlobCounters>>>,
    /// P2P reachability: (reachable, checked at).
    p2p_state: Mutex<Option<(bool, Instant)>>,
    /// Mirrors that refused a connection, skipped until the instant.
    mirror_down: Mutex<HashMap<String, Instant>>,
    /// Where piece-table mismatches are counted, if anywhere.
    metrics: Option<Metrics>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("opts", self.options())
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
        Self::validate(&opts)?;
        Ok(Self::with_transport(Transport::new(opts)?))
    }

    /// A client with an explicit credential source.
    pub fn with_credentials(
        opts: RegistryOptions,
        creds: Arc<dyn CredentialSource>,
    ) -> Result<Self> {
        Self::validate(&opts)?;
        Ok(Self::with_transport(Transport::with_credentials(
            opts, creds,
        )?))
    }

    /// The checks of the range fetcher's own options (the transport checks
    /// the rest).
    fn validate(opts: &RegistryOptions) -> Result<()> {
        if opts.p2p.enable {
            Url::parse(&opts.p2p.address).map_err(|e| Error::ServiceConfig {
                field: "p2p.address".into(),
                detail: format!("{:?}: {e}", opts.p2p.address),
            })?;
        }
        Ok(())
    }

    fn with_transport(http: Transport) -> Self {
        Self {
            http,
            redirects: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            p2p_state: Mutex::new(None),
            mirror_down: Mutex::new(HashMap::new()),
            metrics: None,
        }
    }

    /// Counts piece-table mismatches in `metrics` too.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The options in use.
    pub fn options(&self) -> &RegistryOptions {
        self.http.options()
    }

    /// Counters for `blob_url` (zero if never read).
    pub fn stats(&self, blob_url: &str) -> BlobStats {
        match self.stats.locked().get(blob_url) {
            Some(c) => BlobStats {
                requests: c.requests.load(Ordering::Relaxed),
                bytes: c.bytes.load(Ordering::Relaxed),
                retries: c.retries.load(Ordering::Relaxed),
                http2: c.http2.load(Ordering::Relaxed),
                verify_failures: c.verify_failures.load(Ordering::Relaxed),
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
        let mut m = self.redirects.locked();
        match m.get(blob_url) {
            Some((loc, exp)) if Instant::now() < *exp => Some(loc.clone()),
            Some(_) => {
                m.remove(blob_url);
                None
            }
            None => None,
        }
    }

    fn cache_redirect(&self, blob_url: &str, location: &str) {
        let ttl = Duration::from_secs(self.options().redirect_ttl_secs);
        self.redirects.locked().insert(
            blob_url.to_string(),
            (location.to_string(), Instant::now() + ttl),
        );
    }

    fn drop_redirect(&self, blob_url: &str) {
        self.redirects.locked().remove(blob_url);
    }

    /// The endpoints for `url`: mirrors first, then the origin.
    fn endpoints(&self, url: &str) -> Result<Vec<Endpoint>> {
        let (u, host, repo, v2path) = split_blob_url(url)?;
        let mut out = Vec::new();
        let canon = creds::canonical_host(&host);
        let mirrors = &self.options().mirrors;
        let mirrors = mirrors.get(&host).or_else(|| {
            mirrors
                .iter()
                .find(|(k, _)| creds::canonical_host(k) == canon)
                .map(|(_, v)| v)
        });
        for m in mirrors.into_iter().flatten() {
            let murl = format!("{}{v2path}", m.trim_end_matches('/'));
            match Url::parse(&murl) {
                Ok(mu) => out.push(self.endpoint_from(mu, repo.clone(), "mirror")),
                Err(_) => continue,
            }
        }
        out.push(self.endpoint_from(u, repo, "origin"));
        Ok(out)
    }

    fn endpoint_from(&self, mut u: Url, repo: String, kind: &'static str) -> Endpoint {
        let host = http::authority(&u);
        if u.scheme() == "https" && self.http.host_opts(&host).plain_http {
            let _ = u.set_scheme("http");
        }
        Endpoint {
            url: u.to_string(),
            host,
            repo,
            kind,
        }
    }

    /// Whether data requests should go through the P2P proxy now.
    fn p2p_active(&self) -> bool {
        if !self.options().p2p.enable {
            return false;
        }
        let mut st = self.p2p_state.locked();
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
        let Ok(u) = Url::parse(&self.options().p2p.address) else {
            return false;
        };
        let (Some(h), Some(p)) = (u.host_str(), u.port_or_known_default()) else {
            return false;
        };
        let to = Duration::from_millis(self.options().timeouts.connect_ms.min(1_000));
        let Ok(addrs) = (h, p).to_socket_addrs() else {
            return false;
        };
        addrs
            .into_iter()
            .any(|a| TcpStream::connect_timeout(&a, to).is_ok())
    }

    fn mirror_is_down(&self, host: &str) -> bool {
        let mut m = self.mirror_down.locked();
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
        *self.p2p_state.locked() = Some((false, Instant::now()));
    }

    fn p2p_url(&self, target: &str) -> String {
        format!(
            "{}/{target}",
            self.options().p2p.address.trim_end_matches('/')
        )
    }

    /// Sends the data request for `want` to `target`, through the P2P proxy
    /// when `route.p2p` allows it and the proxy is up (direct when it cannot
    /// be reached), and counts it; `route.via_p2p` tells which it was.
    fn send_data(
        &self,
        target: &str,
        authorization: Option<&str>,
        want: Want,
        (counters, route): (&BlobCounters, &Route),
        deadline: Instant,
    ) -> std::result::Result<Response, Fail> {
        loop {
            let via_p2p = route.p2p && self.p2p_active();
            route.via_p2p.set(via_p2p);
            let url = if via_p2p {
                self.p2p_url(target)
            } else {
                target.to_string()
            };
            let req = Request::new(Method::GET, &url, self.http.timeout(Some(deadline))?)
                .header(header::RANGE, want.header());
            counters.requests.fetch_add(1, Ordering::Relaxed);
            match self.http.send(&req, authorization) {
                Ok(resp) => {
                    if resp.version() == reqwest::Version::HTTP_2 {
                        counters.http2.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(resp);
                }
                // The proxy went away: go direct.
                Err(Fail::Connect(_)) if via_p2p => self.mark_p2p_down(),
                Err(e) => return Err(e),
            }
        }
    }

    /// The response with the data of `want` from `ep`: auth, P2P, and
    /// redirects followed (and cached) without `Authorization`.
    fn request_range(
        &self,
        ep: &Endpoint,
        (counters, route): (&BlobCounters, &Route),
        want: Want,
        deadline: Instant,
    ) -> std::result::Result<Response, Fail> {
        let mut redirected = self.cached_redirect(&ep.url);
        let mut hops = 0;
        loop {
            let resp = match &redirected {
                None => {
                    let what = format!("GET {}", ep.url);
                    self.http
                        .send_authed(&ep.auth(), &what, Some(deadline), |authz| {
                            self.send_data(&ep.url, authz, want, (counters, route), deadline)
                        })?
                }
                Some(target) => {
                    let resp = self.send_data(target, None, want, (counters, route), deadline)?;
                    if http::classify(resp.status()) == Class::Auth {
                        // An expired presigned URL: drop it and resolve again.
                        self.drop_redirect(&ep.url);
                        let st = resp.status();
                        return Err(Fail::Retry(format!("HTTP {st} from redirect target")));
                    }
                    resp
                }
            };
            let st = resp.status();
            if !st.is_redirection() {
                return Ok(resp);
            }
            let loc = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| Fail::Retry(format!("HTTP {st} without Location")))?;
            let base = redirected.as_deref().unwrap_or(&ep.url);
            let base = Url::parse(base).map_err(|e| Fail::Retry(e.to_string()))?;
            let loc = base
                .join(loc)
                .map_err(|e| Fail::Retry(format!("bad Location {loc:?}: {e}")))?
                .to_string();
            hops += 1;
            if hops > 3 {
                return Err(Fail::Retry("too many redirects".into()));
            }
            self.cache_redirect(&ep.url, &loc);
            redirected = Some(loc);
        }
    }

    /// One attempt at `want` from `ep`. Returns the bytes and the blob's total
    /// size. With a piece table (`want` is then whole pieces), the bytes are
    /// checked against it; bytes a P2P proxy served that fail the check are
    /// fetched once more direct, in the same attempt.
    fn try_once(
        &self,
        ep: &Endpoint,
        (counters, check): (&BlobCounters, Option<&Check<'_>>),
        want: Want,
        deadline: Instant,
    ) -> std::result::Result<(Vec<u8>, u64), Fail> {
        let mut route = Route::default();
        let mut p2p_lied = None;
        loop {
            let resp = self.request_range(ep, (counters, &route), want, deadline)?;
            let (data, total, verdict) = match resp.status() {
                StatusCode::PARTIAL_CONTENT => read_206(resp, want, check.map(|c| c.table))?,
                StatusCode::OK => {
                    let (d, t) = read_200(resp, want)?;
                    (d, t, None)
                }
                s if http::classify(s) == Class::Retryable => {
                    return Err(Fail::Retry(format!("HTTP {s}")))
                }
                s => {
                    return Err(Fail::Fatal(Error::Remote {
                        url: ep.url.clone(),
                        offset: want.offset,
                        end: want.end(),
                        detail: format!("HTTP {s}"),
                    }))
                }
            };
            let Some(c) = check else {
                return Ok((data, total));
            };
            let verdict = verdict.unwrap_or_else(|| c.table.verify(want.offset, &data));
            let Err(e) = verdict else {
                return Ok((data, total));
            };
            let via_p2p = route.via_p2p.get();
            let source = if via_p2p { "p2p" } else { ep.kind };
            self.verify_failed((counters, c), want, (source, &ep.url), &e);
            if via_p2p {
                // The proxy served wrong bytes: this endpoint once more, direct.
                p2p_lied = Some(e);
                route = Route {
                    p2p: false,
                    ..Route::default()
                };
                continue;
            }
            let mut detail = format!("bytes failed verification: {e}");
            if let Some(p) = p2p_lied {
                detail = format!(
                    "P2P proxy {}: {p}; direct: {detail}",
                    self.options().p2p.address
                );
            }
            return Err(Fail::Retry(detail));
        }
    }

    /// Counts and logs bytes of `want` from `source` (`url`) that failed the
    /// piece-table check.
    fn verify_failed(
        &self,
        (counters, c): (&BlobCounters, &Check<'_>),
        want: Want,
        (source, url): (&str, &str),
        e: &VerityError,
    ) {
        counters.verify_failures.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.verify_failure(c.digest, source);
        }
        tracing::warn!(blob = c.digest, offset = want.offset, end = want.end(), source, url = %url, "{e}");
    }

    /// [`RangeFetcher::fetch_stream`] over one request to the first endpoint
    /// that is not known to be down (a mirror, else the origin), without
    /// retries: a failed stream is taken over by ranged reads, which retry
    /// and fail over. Each piece is checked against the piece table, when
    /// there is one, before the sink sees it.
    fn stream(
        &self,
        blob: &BlobRef,
        want: Want,
        unit: u64,
        sink: &mut dyn UnitSink,
    ) -> std::result::Result<(), String> {
        let endpoints = self.endpoints(&blob.url).map_err(|e| e.to_string())?;
        let ep = endpoints
            .iter()
            .find(|ep| !self.mirror_is_down(&ep.host))
            .or(endpoints.last())
            .ok_or("no endpoint")?;
        let counters = self.counters(&blob.url);
        let deadline = Instant::now() + Duration::from_millis(self.options().timeouts.total_ms);
        let route = Route::default();
        let resp = self
            .request_range(ep, (&counters, &route), want, deadline)
            .map_err(|f| match f {
                Fail::Connect(d) | Fail::Retry(d) | Fail::Setup(d) => d,
                Fail::Fatal(e) => e.to_string(),
            })?;
        let mut body = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                check_206(&resp, want)?;
                resp
            }
            // The whole blob: fine when the range starts at 0.
            StatusCode::OK if want.offset == 0 => resp,
            s => return Err(format!("HTTP {s}")),
        };
        let check = blob.verity.as_deref().map(|table| Check {
            table,
            digest: &blob.digest,
        });
        let source = if route.via_p2p.get() { "p2p" } else { ep.kind };
        let mut at = want.offset;
        while at < want.end() {
            let n = unit.min(want.end() - at);
            // A reused buffer is filled as it is, without zeroing it first
            // (`read_to_end` zeroes the spare capacity of every call: 3 % of
            // a cold flatten's CPU); only a length it lacks is zeroed. A
            // fresh one is allocated zeroed (calloc: fresh pages, no memset),
            // so only the body's copy writes it: 9 % less user CPU in a cold
            // flatten (docs/BENCHMARKS.md).
            let mut buf = sink.buffer();
            if buf.capacity() < n as usize {
                buf = vec![0; n as usize];
            } else {
                buf.resize(n as usize, 0);
            }
            let got = super::read_full(&mut body, &mut buf)
                .map_err(|e| format!("reading body: {}", http::chain(&e)))?;
            if got as u64 != n {
                return Err(format!(
                    "body ended at {} of {}",
                    at + got as u64,
                    want.end()
                ));
            }
            if let Some(c) = &check {
                if let Err(e) = c.table.verify(at, &buf) {
                    let piece = Want {
                        offset: at,
                        len: n,
                        total: want.total,
                    };
                    self.verify_failed((&counters, c), piece, (source, &ep.url), &e);
                    return Err(format!("bytes failed verification: {e}"));
                }
            }
            // A 206 longer than its range is broken: its last piece is not
            // handed out. (A 200's rest is dropped with the connection.)
            if at + n == want.end() && body.status() == StatusCode::PARTIAL_CONTENT {
                let mut extra = [0u8; 1];
                if body.read(&mut extra).map_err(|e| e.to_string())? > 0 {
                    return Err(format!("body longer than the {} bytes asked for", want.len));
                }
            }
            counters.bytes.fetch_add(n, Ordering::Relaxed);
            if !sink.unit(at, buf) {
                break;
            }
            at += n;
        }
        Ok(())
    }

    /// Reads `want` of the blob at `url`, with retries and failover, checking
    /// every attempt's bytes against `check` when given. Returns the bytes
    /// and the blob's total size (0 if unknown).
    fn fetch_range(
        &self,
        url: &str,
        want: Want,
        check: Option<&Check<'_>>,
    ) -> Result<(Vec<u8>, u64)> {
        let endpoints = self.endpoints(url)?;
        let counters = self.counters(url);
        let total_ms = self.options().timeouts.total_ms;
        let deadline = Instant::now() + Duration::from_millis(total_ms);
        let retry = Retry::new(&self.options().retry, Some(deadline));
        let mut failures = Failures::default();
        for (i, ep) in endpoints.iter().enumerate() {
            let is_last = i + 1 == endpoints.len();
            if !is_last && self.mirror_is_down(&ep.host) {
                continue;
            }
            let who = if ep.url == url {
                "origin"
            } else {
                ep.url.as_str()
            };
            // A mirror gets one try: on any failure the next endpoint is as good.
            let retry = if is_last {
                retry.clone()
            } else {
                retry.clone().with_tries(1)
            };
            let res = retry.run(
                || self.try_once(ep, (&counters, check), want, deadline),
                |attempt, f| {
                    self.drop_redirect(&ep.url);
                    counters.retries.fetch_add(1, Ordering::Relaxed);
                    let (detail, go_on) = match f {
                        Fail::Fatal(Error::Remote { detail, .. }) => (detail.clone(), false),
                        Fail::Fatal(e) => (e.to_string(), false),
                        Fail::Connect(d) => {
                            if !is_last {
                                self.mark_mirror_down(&ep.host);
                            }
                            (d.clone(), is_last)
                        }
                        Fail::Setup(d) => {
                            if !is_last {
                                self.mark_mirror_down(&ep.host);
                            }
                            (d.clone(), false)
                        }
                        Fail::Retry(d) => (d.clone(), true),
                    };
                    failures.push(who, attempt, detail);
                    go_on
                },
            );
            match res {
                Ok(got) => {
                    counters.bytes.fetch_add(want.len, Ordering::Relaxed);
                    return Ok(got);
                }
                Err((_, Fail::Fatal(e))) if is_last && !matches!(e, Error::Remote { .. }) => {
                    return Err(e)
                }
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                failures.note(format!("gave up after the {total_ms} ms read deadline"));
                break;
            }
        }
        Err(Error::Remote {
            url: url.to_string(),
            offset: want.offset,
            end: want.end(),
            detail: failures.text(),
        })
    }

    /// `HEAD` on the origin: the `Content-Length` of a 200.
    fn head_size(&self, url: &str) -> Option<u64> {
        let ep = self.endpoints(url).ok()?.pop()?;
        let authz = self.http.authorization(&ep.auth(), None).ok()?;
        let req = Request::new(Method::HEAD, &ep.url, self.http.timeout(None).ok()?);
        let resp = self.http.send(&req, authz.as_deref()).ok()?;
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

/// The checks of a request for `[offset, offset + len)` of `blob`: inside
/// the blob, and a piece table, if any, of the blob's size. Returns the blob
/// size when known.
fn check_request(blob: &BlobRef, offset: u64, len: u64) -> Result<Option<u64>> {
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
    if let Some(table) = blob.verity.as_deref() {
        if table.blob_size() != blob.size {
            return Err(Error::Verify {
                blob: blob.digest.clone(),
                detail: format!(
                    "the piece table describes {} bytes, the blob has {}",
                    table.blob_size(),
                    blob.size
                ),
            });
        }
    }
    Ok((blob.size > 0).then_some(blob.size))
}

/// A body read: its bytes, the blob's total size (0 if unknown), and the
/// piece-table verdict when the bytes were checked while being read.
type Body = (Vec<u8>, u64, Option<std::result::Result<(), VerityError>>);

/// A 206 must carry exactly the range asked for (and the blob's size, when
/// known) and exactly that many bytes. With `table` (`want` is then whole
/// pieces) each piece is checked as soon as it has arrived, while the next
/// ones are still coming; the first mismatch ends the read.
fn read_206(
    mut resp: Response,
    want: Want,
    table: Option<&PieceTable>,
) -> std::result::Result<Body, Fail> {
    let Want { len, total, .. } = want;
    let got_total = check_206(&resp, want).map_err(Fail::Retry)?;
    // Read straight into a buffer of the expected size: one copy out of the
    // HTTP client's chunks, no intermediate buffer. One byte more than asked
    // for is read to detect a longer body.
    let read_err = |e: std::io::Error| Fail::Retry(format!("reading body: {}", http::chain(&e)));
    let mut rest = (&mut resp).take(len + 1);
    let total = got_total.or(total).unwrap_or(0);
    if let Some(t) = table {
        return read_checked(&mut rest, want, t).map(|(b, v)| (b, total, Some(v)));
    }
    let mut body = Vec::with_capacity(len as usize);
    rest.read_to_end(&mut body).map_err(read_err)?;
    check_len(body.len() as u64, len)?;
    Ok((body, total, None))
}

/// A 206 must carry exactly the range asked for (and the blob's size, when
/// known); returns the total size it names.
fn check_206(resp: &Response, want: Want) -> std::result::Result<Option<u64>, String> {
    let cr = resp
        .headers()
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_default();
    let Some((a, b, got_total)) = parse_content_range(&cr) else {
        return Err(format!("206 with bad Content-Range {cr:?}"));
    };
    if a != want.offset || b != want.end() - 1 {
        return Err(format!(
            "206 Content-Range {cr:?} does not match the requested {}",
            want.header()
        ));
    }
    if let (Some(t), Some(e)) = (got_total, want.total) {
        if t != e {
            return Err(format!(
                "Content-Range total {t} differs from the blob size {e}"
            ));
        }
    }
    Ok(got_total)
}

/// A body of `got` bytes (at most `len + 1` read) must be `len` bytes.
fn check_len(got: u64, len: u64) -> std::result::Result<(), Fail> {
    if got != len {
        return Err(Fail::Retry(format!(
            "body has {}{} bytes, expected {len}",
            if got > len { "more than " } else { "" },
            got.min(len)
        )));
    }
    Ok(())
}

/// Reads the `want.len` bytes of a checked range (whole pieces of `table`
/// from `want.offset`) in large reads, checking each piece as soon as it has
/// arrived, while the next ones are still coming. The first mismatch ends
/// the read with that verdict.
fn read_checked(
    r: &mut impl Read,
    want: Want,
    table: &PieceTable,
) -> std::result::Result<(Vec<u8>, std::result::Result<(), VerityError>), Fail> {
    let len = want.len as usize;
    let piece = table.piece_size() as usize;
    // Zeroed pages straight from the allocator: no extra pass for large
    // buffers.
    let mut body = vec![0u8; len];
    let (mut filled, mut checked) = (0, 0);
    loop {
        let n = if filled < len {
            match r.read(&mut body[filled..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fail::Retry(format!("reading body: {}", http::chain(&e)))),
            }
        } else {
            0
        };
        filled += n;
        while checked < filled && (filled - checked >= piece || filled == len) {
            let end = (checked + piece).min(len);
            if let Err(e) = table.verify(want.offset + checked as u64, &body[checked..end]) {
                return Ok((body, Err(e)));
            }
            checked = end;
        }
        if n == 0 {
            break;
        }
    }
    // One byte more than asked for tells a longer body.
    let mut extra = [0u8; 1];
    let more = loop {
        match r.read(&mut extra) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other.unwrap_or(0),
        }
    };
    check_len((filled + more) as u64, want.len)?;
    Ok((body, Ok(())))
}

/// A 200 is the whole blob (the server ignored the range): stream past
/// `offset`, keep only `len` bytes, and drop the rest with the connection, so
/// memory stays bounded by the request size.
fn read_200(mut body: Response, want: Want) -> std::result::Result<(Vec<u8>, u64), Fail> {
    let Want { offset, len, total } = want;
    let got_total = body.content_length().or(total);
    if let (Some(t), Some(e)) = (body.content_length(), total) {
        if t != e {
            return Err(Fail::Retry(format!(
                "200 body has {t} bytes, the blob has {e}"
            )));
        }
    }
    if let Some(t) = got_total {
        if t < offset + len {
            return Err(Fail::Retry(format!(
                "200 body has {t} bytes, the range ends at {}",
                offset + len
            )));
        }
    }
    let skipped = std::io::copy(&mut (&mut body).take(offset), &mut std::io::sink())
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
    Ok((out, got_total.unwrap_or(0)))
}

impl RangeFetcher for RegistryClient {
    /// The clients of the blob's mirrors and origin.
    fn prepare(&self, blob_url: &str) {
        for ep in self.endpoints(blob_url).unwrap_or_default() {
            self.http.prepare(&ep.url);
        }
    }

    fn fetch(&self, blob: &BlobRef, offset: u64, len: u64, _prio: Priority) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let total = check_request(blob, offset, len)?;
        let Some(table) = blob.verity.as_deref() else {
            return self
                .fetch_range(&blob.url, Want { offset, len, total }, None)
                .map(|r| r.0);
        };
        // Only whole pieces can be checked: fetch them, hand back the range.
        let (wo, wl) = table.widen(offset, len);
        let check = Check {
            table,
            digest: &blob.digest,
        };
        let want = Want {
            offset: wo,
            len: wl,
            total,
        };
        let (mut data, _) = self.fetch_range(&blob.url, want, Some(&check))?;
        if (wo, wl) != (offset, len) {
            let skip = (offset - wo) as usize;
            data.drain(..skip);
            data.truncate(len as usize);
        }
        Ok(data)
    }

    /// One request for the whole range (see [`RegistryClient::stream`]);
    /// with a piece table, the pieces must be whole table pieces, else the
    /// range is fetched piece by piece.
    fn fetch_stream(
        &self,
        blob: &BlobRef,
        (offset, len, unit): (u64, u64, u64),
        prio: Priority,
        sink: &mut dyn UnitSink,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let total = check_request(blob, offset, len)?;
        if let Some(t) = blob.verity.as_deref() {
            let p = t.piece_size();
            let end = offset + len;
            if offset % p != 0 || unit % p != 0 || (end % p != 0 && end != blob.size) {
                return super::stream_by_pieces(self, blob, (offset, len, unit), prio, sink);
            }
        }
        let want = Want { offset, len, total };
        self.stream(blob, want, unit.max(1), sink)
            .map_err(|detail| Error::Remote {
                url: blob.url.clone(),
                offset,
                end: offset + len,
                detail: format!("streamed read: {detail}"),
            })
    }

    fn blob_size(&self, blob_url: &str) -> Result<u64> {
        if let Some(n) = self.head_size(blob_url) {
            return Ok(n);
        }
        let want = Want {
            offset: 0,
            len: 1,
            total: None,
        };
        let (_, total) = self.fetch_range(blob_url, want, None)?;
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
