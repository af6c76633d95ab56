//! Prometheus metrics of the snapshotter (OpenMetrics text via
//! prometheus-client) and a minimal `GET /metrics` HTTP endpoint.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `obd_snapshotter_grpc_request_duration_seconds` | histogram | `method` |
//! | `obd_snapshotter_grpc_requests_total` | counter | `method`, `code` |
//! | `obd_snapshotter_grpc_errors_total` | counter | `method`, `code` |
//! | `obd_snapshotter_devices` | gauge | |
//! | `obd_snapshotter_device_attach_duration_seconds` | histogram | |
//! | `obd_snapshotter_device_attach_failures_total` | counter | |
//! | `obd_snapshotter_device_restarts_total` | counter | |
//! | `obd_snapshotter_device_restart_duration_seconds` | histogram | |
//! | `obd_snapshotter_device_failures_total` | counter | |
//! | `obd_snapshotter_fallbacks_total` | counter | `reason` |
//! | `obd_snapshotter_cache_bytes`, `…_cache_budget_bytes` | gauge | |
//! | `obd_snapshotter_cache_{hits,misses,fetched_bytes,evicted_bytes}` | gauge | |
//! | `obd_snapshotter_cache_blob_{cached_bytes,hits,misses,fetched_bytes,evicted_bytes}` | gauge | `digest`, `scope` |
//!
//! The cache figures are host-wide (every device worker shares the cache) and
//! cumulative over the cache's life; they are read from the cache files at
//! each scrape.
//! `code` is `ok` or the snake_case gRPC code (`not_found`, …).

use std::future::Future;
use std::sync::{Arc, OnceLock};

use obd_remote::cache::BlockCache;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Labels of per-method series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

/// Labels of per-method, per-result series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    method: String,
    code: String,
}

/// Labels of the fallback counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// Labels of per-blob cache series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BlobLabels {
    digest: String,
    scope: String,
}

/// The block-cache series.
#[derive(Default)]
struct CacheSeries {
    bytes: Gauge,
    budget: Gauge,
    hits: Gauge,
    misses: Gauge,
    fetched: Gauge,
    evicted: Gauge,
    blob_cached: Family<BlobLabels, Gauge>,
    blob_hits: Family<BlobLabels, Gauge>,
    blob_misses: Family<BlobLabels, Gauge>,
    blob_fetched: Family<BlobLabels, Gauge>,
    blob_evicted: Family<BlobLabels, Gauge>,
}

impl CacheSeries {
    fn register(&self, r: &mut Registry) {
        let g = |r: &mut Registry, n: &str, h: &str, m: &Gauge| r.register(n, h, m.clone());
        g(
            r,
            "cache_bytes",
            "Bytes in the host-wide block cache",
            &self.bytes,
        );
        g(
            r,
            "cache_budget_bytes",
            "Byte budget of the block cache",
            &self.budget,
        );
        g(
            r,
            "cache_hits",
            "Reads served from the block cache",
            &self.hits,
        );
        g(
            r,
            "cache_misses",
            "Reads the block cache missed",
            &self.misses,
        );
        g(
            r,
            "cache_fetched_bytes",
            "Bytes fetched into the block cache",
            &self.fetched,
        );
        g(
            r,
            "cache_evicted_bytes",
            "Bytes evicted from the block cache",
            &self.evicted,
        );
        let f = |r: &mut Registry, n: &str, h: &str, m: &Family<BlobLabels, Gauge>| {
            r.register(n, h, m.clone())
        };
        f(
            r,
            "cache_blob_cached_bytes",
            "Bytes cached per blob",
            &self.blob_cached,
        );
        f(r, "cache_blob_hits", "Cache hits per blob", &self.blob_hits);
        f(
            r,
            "cache_blob_misses",
            "Cache misses per blob",
            &self.blob_misses,
        );
        f(
            r,
            "cache_blob_fetched_bytes",
            "Bytes fetched per blob",
            &self.blob_fetched,
        );
        f(
            r,
            "cache_blob_evicted_bytes",
            "Bytes evicted per blob",
            &self.blob_evicted,
        );
    }

    /// Reads the figures from `cache`'s files.
    fn refresh(&self, cache: &BlockCache) {
        let Ok(blobs) = cache.list() else {
            return;
        };
        let fams = [
            &self.blob_cached,
            &self.blob_hits,
            &self.blob_misses,
            &self.blob_fetched,
            &self.blob_evicted,
        ];
        fams.iter().for_each(|f| f.clear());
        let mut tot = [0u64; 4];
        for b in &blobs {
            let l = BlobLabels {
                digest: b.digest.clone(),
                scope: b.scope.clone().unwrap_or_default(),
            };
            let vals = [b.cached, b.hits, b.misses, b.fetched, b.evicted];
            for (f, v) in fams.iter().zip(vals) {
                f.get_or_create(&l).set(v as i64);
            }
            for (t, v) in tot.iter_mut().zip(&vals[1..]) {
                *t += v;
            }
        }
        self.bytes.set(cache.usage() as i64);
        self.budget.set(cache.budget() as i64);
        for (g, v) in [&self.hits, &self.misses, &self.fetched, &self.evicted]
            .into_iter()
            .zip(tot)
        {
            g.set(v as i64);
        }
    }
}

/// The snapshotter's metric set (see the module docs for the names).
pub struct Metrics {
    registry: Registry,
    grpc_latency: Family<MethodLabels, Histogram>,
    grpc_requests: Family<CodeLabels, Counter>,
    grpc_errors: Family<CodeLabels, Counter>,
    devices: Gauge,
    attach_latency: Histogram,
    attach_failures: Counter,
    restarts: Counter,
    restart_latency: Histogram,
    device_failures: Counter,
    fallbacks: Family<ReasonLabels, Counter>,
    cache_series: CacheSeries,
    cache: OnceLock<Arc<BlockCache>>,
}

/// The process-wide metric set, created on first use.
pub fn global() -> &'static Metrics {
    static GLOBAL: OnceLock<Metrics> = OnceLock::new();
    GLOBAL.get_or_init(Metrics::new)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh metric set registered under the `obd_snapshotter` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("obd_snapshotter");
        // 100 µs × 2^k, 20 buckets (up to ~52 s), as upstream's snapshotter.
        let grpc_latency = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 20))
        });
        let grpc_requests = Family::<CodeLabels, Counter>::default();
        let grpc_errors = Family::<CodeLabels, Counter>::default();
        let devices = Gauge::default();
        // 1 ms × 2^k, 18 buckets (up to ~131 s): attach includes the image
        // open, which may fetch the layers' headers from a registry.
        let attach_latency = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let attach_failures = Counter::default();
        let restarts = Counter::default();
        let restart_latency = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let device_failures = Counter::default();
        let fallbacks = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "grpc_request_duration_seconds",
            "Latency of snapshots v1 gRPC requests per method",
            grpc_latency.clone(),
        );
        registry.register(
            "grpc_requests",
            "snapshots v1 gRPC requests per method and result code",
            grpc_requests.clone(),
        );
        registry.register(
            "grpc_errors",
            "Failed snapshots v1 gRPC requests per method and gRPC code",
            grpc_errors.clone(),
        );
        registry.register("devices", "Block devices attached now", devices.clone());
        registry.register(
            "device_attach_duration_seconds",
            "Latency of device attaches (successful or not)",
            attach_latency.clone(),
        );
        registry.register(
            "device_attach_failures",
            "Device attaches that failed",
            attach_failures.clone(),
        );
        registry.register(
            "device_restarts",
            "Device workers replaced after a crash or a handover (the device stayed up)",
            restarts.clone(),
        );
        registry.register(
            "device_restart_duration_seconds",
            "From a worker's death to its successor serving the device",
            restart_latency.clone(),
        );
        registry.register(
            "device_failures",
            "Devices whose worker died and could not be replaced (their I/O fails)",
            device_failures.clone(),
        );
        registry.register(
            "fallbacks",
            "Layers that fell back from lazy pull to a full download, per reason",
            fallbacks.clone(),
        );
        let cache_series = CacheSeries::default();
        cache_series.register(&mut registry);
        Metrics {
            cache_series,
            cache: OnceLock::new(),
            registry,
            grpc_latency,
            grpc_requests,
            grpc_errors,
            devices,
            attach_latency,
            attach_failures,
            restarts,
            restart_latency,
            device_failures,
            fallbacks,
        }
    }

    /// Records one gRPC request: `method` (e.g. `Prepare`), its latency, and
    /// `code`: `ok` or the snake_case gRPC code name (e.g. `not_found`).
    pub fn observe(&self, method: &str, seconds: f64, code: &str) {
        self.grpc_latency
            .get_or_create(&MethodLabels {
                method: method.into(),
            })
            .observe(seconds);
        let labels = CodeLabels {
            method: method.into(),
            code: code.into(),
        };
        self.grpc_requests.get_or_create(&labels).inc();
        if code != "ok" {
            self.grpc_errors.get_or_create(&labels).inc();
        }
    }

    /// Records a layer that fell back to a full download, and why.
    pub fn fallback(&self, reason: &str) {
        self.fallbacks
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Sets the number of attached devices.
    pub fn set_devices(&self, n: i64) {
        self.devices.set(n);
    }

    /// Records one device attach: its latency and whether it succeeded.
    pub fn device_attach(&self, seconds: f64, ok: bool) {
        self.attach_latency.observe(seconds);
        if !ok {
            self.attach_failures.inc();
        }
    }

    /// Records what device supervision did.
    pub fn device_event(&self, e: &obd_device::service::Event) {
        use obd_device::service::Event;
        match e {
            Event::Restarted { took, .. } => {
                self.restarts.inc();
                self.restart_latency.observe(took.as_secs_f64());
            }
            Event::Failed { .. } => {
                self.device_failures.inc();
            }
        }
    }

    /// Reports the figures of `cache` (read at each [`Metrics::encode`]).
    pub fn watch_cache(&self, cache: Arc<BlockCache>) {
        let _ = self.cache.set(cache);
    }

    /// The OpenMetrics text exposition (ends with `# EOF`).
    pub fn encode(&self) -> String {
        if let Some(c) = self.cache.get() {
            self.cache_series.refresh(c);
        }
        let mut out = String::new();
        // Writing into a String cannot fail; on a (theoretical) error the
        // partial text is still returned rather than panicking.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Content type of [`Metrics::encode`]'s output.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Largest request head read.
const MAX_HEAD: usize = 8192;
/// A client gets this long to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` (the [`global`] metrics) over HTTP/1.1 on a TCP
/// listener bound to `addr` (`host:port`) until `shutdown` resolves. One
/// request per connection; other paths get 404, other methods 405. Errors
/// only if `addr` cannot be bound.
pub async fn serve(addr: &str, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("metrics endpoint: bind {addr}: {e}"))
    })?;
    tracing::info!(address = %listener.local_addr()?, "serving metrics on GET /metrics");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            acc = listener.accept() => match acc {
                Ok((conn, _)) => {
                    tokio::spawn(async move {
                        if let Err(e) = handle(conn).await {
                            tracing::debug!(error = %e, "metrics connection");
                        }
                    });
                }
                Err(e) => {
                    // E.g. EMFILE: keep serving, but do not spin on it.
                    tracing::warn!(error = %e, "metrics endpoint: accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Answers one request on `conn`.
async fn handle(mut conn: TcpStream) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut conn)).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    let (status, ctype, body) = respond(&head);
    let mut msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head.starts_with("HEAD ") {
        msg.extend_from_slice(body.as_bytes());
    }
    conn.write_all(&msg).await?;
    conn.shutdown().await
}

/// Reads up to the end of the request head (`\r\n\r\n`), at most
/// [`MAX_HEAD`] bytes.
async fn read_head(conn: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_HEAD {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Status line, content type and body for a request head.
fn respond(head: &str) -> (&'static str, &'static str, String) {
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    const TEXT: &str = "text/plain; charset=utf-8";
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", CONTENT_TYPE, global().encode()),
        ("GET" | "HEAD", _) => ("404 Not Found", TEXT, "not found; try /metrics\n".into()),
        _ => ("405 Method Not Allowed", TEXT, "only GET\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line starting with `prefix` (name + labels).
    fn sample(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn encode_has_every_family_and_counts() {
        let m = Metrics::new();
        m.observe("Prepare", 0.002, "ok");
        m.observe("Prepare", 0.003, "already_exists");
        m.observe("Stat", 0.0001, "not_found");
        m.observe("Stat", 0.0001, "ok");
        m.observe("Stat", 0.0001, "ok");
        m.fallback("no_image_ref");
        m.fallback("no_image_ref");
        m.set_devices(3);
        m.device_attach(0.5, true);
        m.device_attach(1.5, false);
        m.device_event(&obd_device::service::Event::Restarted {
            id: "s1".into(),
            took: Duration::from_millis(40),
        });
        m.device_event(&obd_device::service::Event::Failed {
            id: "s2".into(),
            reason: "blobs gone".into(),
        });
        let t = m.encode();
        let v = |p: &str| sample(&t, p).unwrap_or_else(|| panic!("no `{p}` in\n{t}"));
        assert_eq!(
            v(r#"obd_snapshotter_grpc_requests_total{method="Prepare",code="ok"}"#),
            1.0
        );
        assert_eq!(
            v(r#"obd_snapshotter_grpc_requests_total{method="Stat",code="ok"}"#),
            2.0
        );
        assert_eq!(
            v(r#"obd_snapshotter_grpc_errors_total{method="Stat",code="not_found"}"#),
            1.0
        );
        assert_eq!(
            v(r#"obd_snapshotter_grpc_errors_total{method="Prepare",code="already_exists"}"#),
            1.0
        );
        // Successes are not errors.
        assert!(!t.contains(r#"grpc_errors_total{method="Stat",code="ok"}"#));
        assert_eq!(
            v(r#"obd_snapshotter_grpc_request_duration_seconds_count{method="Stat"}"#),
            3.0
        );
        assert_eq!(
            v(r#"obd_snapshotter_grpc_request_duration_seconds_count{method="Prepare"}"#),
            2.0
        );
        assert!(
            (v(r#"obd_snapshotter_grpc_request_duration_seconds_sum{method="Prepare"}"#) - 0.005)
                .abs()
                < 1e-9
        );
        // The 100 µs bucket holds the three Stat calls.
        assert_eq!(
            v(r#"obd_snapshotter_grpc_request_duration_seconds_bucket{le="0.0001",method="Stat"}"#),
            3.0
        );
        assert_eq!(v("obd_snapshotter_devices "), 3.0);
        assert_eq!(
            v("obd_snapshotter_device_attach_duration_seconds_count "),
            2.0
        );
        assert_eq!(v("obd_snapshotter_device_attach_failures_total "), 1.0);
        assert_eq!(v("obd_snapshotter_device_restarts_total "), 1.0);
        assert_eq!(v("obd_snapshotter_device_failures_total "), 1.0);
        assert_eq!(
            v("obd_snapshotter_device_restart_duration_seconds_count "),
            1.0
        );
        assert_eq!(
            v(r#"obd_snapshotter_fallbacks_total{reason="no_image_ref"}"#),
            2.0
        );
        assert!(t.contains("# TYPE obd_snapshotter_grpc_request_duration_seconds histogram"));
        assert!(t.contains("# TYPE obd_snapshotter_devices gauge"));
        assert!(t.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn fresh_set_exports_the_gauge_and_unlabelled_series() {
        let t = Metrics::new().encode();
        assert_eq!(sample(&t, "obd_snapshotter_devices "), Some(0.0));
        assert_eq!(
            sample(&t, "obd_snapshotter_device_attach_failures_total "),
            Some(0.0)
        );
        // Labelled families have no series before their first observation.
        assert!(!t.contains("obd_snapshotter_grpc_requests_total{"));
        assert!(!t.contains("obd_snapshotter_fallbacks_total{"));
    }

    #[test]
    fn devices_gauge_follows_set_devices() {
        let m = Metrics::new();
        m.set_devices(2);
        m.set_devices(1);
        assert_eq!(sample(&m.encode(), "obd_snapshotter_devices "), Some(1.0));
    }

    #[test]
    fn http_routes() {
        assert_eq!(
            respond("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").0,
            "200 OK"
        );
        assert_eq!(respond("GET /metrics?x=1 HTTP/1.1\r\n\r\n").0, "200 OK");
        assert_eq!(respond("GET / HTTP/1.1\r\n\r\n").0, "404 Not Found");
        assert_eq!(
            respond("POST /metrics HTTP/1.1\r\n\r\n").0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond("").0, "405 Method Not Allowed");
        assert_eq!(respond("\u{fffd}\u{fffd}").0, "405 Method Not Allowed");
    }

    #[tokio::test]
    async fn serve_answers_over_tcp_and_stops() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap().to_string();
        drop(probe);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn({
            let addr = addr.clone();
            async move {
                serve(&addr, async {
                    let _ = rx.await;
                })
                .await
            }
        });
        global().set_devices(0);
        let get = |path: &'static str| {
            let addr = addr.clone();
            async move {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                let mut conn = loop {
                    match TcpStream::connect(&addr).await {
                        Ok(c) => break c,
                        Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
                        Err(_) => tokio::task::yield_now().await,
                    }
                };
                conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                let mut out = String::new();
                conn.read_to_string(&mut out).await.unwrap();
                out
            }
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("application/openmetrics-text"));
        assert!(ok.contains("\nobd_snapshotter_devices "), "{ok}");
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404 "));
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn serve_reports_a_bad_address() {
        let e = serve("not-an-address", std::future::pending())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not-an-address"), "{e}");
    }
}
