//! Prometheus metrics of remote layers (OpenMetrics text via prometheus-client):
//! bytes and requests per layer and priority, fetch latency histograms,
//! failures, piece-table mismatches per layer and source, and the block
//! cache's usage and resets.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::{BlobRef, Priority, RangeFetcher, UnitSink};
use overlaybd_core::error::Result;

/// Labels of per-layer series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LayerLabels {
    /// Blob digest.
    pub layer: String,
    /// `foreground`, `prefetch` or `background`.
    pub priority: String,
}

/// Labels of piece-table mismatch series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// Blob digest.
    pub layer: String,
    /// Who served the bytes: `mirror`, `origin` or `p2p`.
    pub source: String,
}

/// Labels of latency series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PrioLabels {
    /// `foreground`, `prefetch` or `background`.
    pub priority: String,
}

/// The metric set; cheap to clone (shared handles).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Remote requests per layer and priority.
    pub requests: Family<LayerLabels, Counter>,
    /// Bytes fetched per layer and priority.
    pub bytes: Family<LayerLabels, Counter>,
    /// Failed fetches (after retries) per layer and priority.
    pub failures: Family<LayerLabels, Counter>,
    /// Fetch latency in seconds per priority.
    pub latency: Family<PrioLabels, Histogram>,
    /// Bytes held by the block cache.
    pub cache_bytes: Gauge,
    /// Cache reads served locally / needing a fetch.
    pub cache_hits: Counter,
    /// Cache reads that needed a fetch.
    pub cache_misses: Counter,
    /// Responses whose bytes did not match the blob's piece table, per layer
    /// and source (each then failed over, retried or reported).
    pub verify_failures: Family<SourceLabels, Counter>,
}

fn prio_name(p: Priority) -> &'static str {
    match p {
        Priority::Foreground => "foreground",
        Priority::Prefetch => "prefetch",
        Priority::Background => "background",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh metric set registered under the `obd_remote` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("obd_remote");
        let requests = Family::<LayerLabels, Counter>::default();
        let bytes = Family::<LayerLabels, Counter>::default();
        let failures = Family::<LayerLabels, Counter>::default();
        let latency = Family::<PrioLabels, Histogram>::new_with_constructor(|| {
            // 100 µs .. ~26 s
            Histogram::new(exponential_buckets(0.0001, 2.0, 19))
        });
        let cache_bytes = Gauge::default();
        let cache_hits = Counter::default();
        let cache_misses = Counter::default();
        let verify_failures = Family::<SourceLabels, Counter>::default();
        registry.register("requests", "Remote range requests", requests.clone());
        registry.register("bytes", "Bytes fetched from remote blobs", bytes.clone());
        registry.register(
            "failures",
            "Fetches that failed after retries",
            failures.clone(),
        );
        registry.register(
            "fetch_latency_seconds",
            "Latency of remote fetches",
            latency.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes held by the block cache",
            cache_bytes.clone(),
        );
        registry.register(
            "cache_hits",
            "Reads served from the block cache",
            cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Reads that needed a remote fetch",
            cache_misses.clone(),
        );
        registry.register(
            "verify_failures",
            "Fetched ranges that did not match the blob's piece table",
            verify_failures.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            requests,
            bytes,
            failures,
            latency,
            cache_bytes,
            cache_hits,
            cache_misses,
            verify_failures,
        }
    }

    /// Counts one piece-table mismatch of `layer`'s bytes from `source`.
    pub fn verify_failure(&self, layer: &str, source: &str) {
        self.verify_failures
            .get_or_create(&SourceLabels {
                layer: layer.to_string(),
                source: source.to_string(),
            })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding into a String cannot fail");
        out
    }
}

/// A [`RangeFetcher`] that records every fetch in [`Metrics`].
pub struct MeteredFetcher {
    inner: Arc<dyn RangeFetcher>,
    metrics: Metrics,
}

impl MeteredFetcher {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn RangeFetcher>, metrics: Metrics) -> Self {
        MeteredFetcher { inner, metrics }
    }
}

impl MeteredFetcher {
    /// Records one request of `blob` at `prio`, started at `t`: its
    /// latency, `bytes` delivered, and a failure unless `ok`.
    fn record(&self, (blob, prio): (&BlobRef, Priority), t: Instant, bytes: u64, ok: bool) {
        let labels = LayerLabels {
            layer: blob.digest.clone(),
            priority: prio_name(prio).into(),
        };
        self.metrics
            .latency
            .get_or_create(&PrioLabels {
                priority: labels.priority.clone(),
            })
            .observe(t.elapsed().as_secs_f64());
        self.metrics.requests.get_or_create(&labels).inc();
        if !ok {
            self.metrics.failures.get_or_create(&labels).inc();
        }
        // A failed stream may have delivered some units.
        if ok || bytes > 0 {
            self.metrics.bytes.get_or_create(&labels).inc_by(bytes);
        }
    }
}

impl RangeFetcher for MeteredFetcher {
    fn fetch(&self, blob: &BlobRef, offset: u64, len: u64, prio: Priority) -> Result<Vec<u8>> {
        let t = Instant::now();
        let res = self.inner.fetch(blob, offset, len, prio);
        let bytes = res.as_ref().map_or(0, |d| d.len() as u64);
        self.record((blob, prio), t, bytes, res.is_ok());
        res
    }

    fn blob_size(&self, blob_url: &str) -> Result<u64> {
        self.inner.blob_size(blob_url)
    }

    fn prepare(&self, blob_url: &str) {
        self.inner.prepare(blob_url)
    }

    /// One request; its bytes counted as they are delivered.
    fn fetch_stream(
        &self,
        blob: &BlobRef,
        range: (u64, u64, u64),
        prio: Priority,
        sink: &mut dyn UnitSink,
    ) -> Result<()> {
        struct Counted<'a> {
            sink: &'a mut dyn UnitSink,
            bytes: u64,
        }
        impl UnitSink for Counted<'_> {
            fn buffer(&mut self) -> Vec<u8> {
                self.sink.buffer()
            }
            fn unit(&mut self, offset: u64, bytes: Vec<u8>) -> bool {
                self.bytes += bytes.len() as u64;
                self.sink.unit(offset, bytes)
            }
        }
        let t = Instant::now();
        let mut counted = Counted { sink, bytes: 0 };
        let res = self.inner.fetch_stream(blob, range, prio, &mut counted);
        self.record((blob, prio), t, counted.bytes, res.is_ok());
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>);
    impl RangeFetcher for Mem {
        fn fetch(&self, b: &BlobRef, offset: u64, len: u64, _p: Priority) -> Result<Vec<u8>> {
            if offset + len > self.0.len() as u64 {
                return Err(overlaybd_core::Error::Remote {
                    url: b.url.clone(),
                    offset,
                    end: offset + len,
                    detail: "past the end".into(),
                });
            }
            Ok(self.0[offset as usize..(offset + len) as usize].to_vec())
        }
        fn blob_size(&self, _: &str) -> Result<u64> {
            Ok(self.0.len() as u64)
        }
    }

    #[test]
    fn fetches_show_up_in_the_exposition() {
        let m = Metrics::new();
        let f = MeteredFetcher::new(Arc::new(Mem(vec![1; 1000])), m.clone());
        let b = BlobRef::new("http://r/v2/x/blobs/sha256:ab", "sha256:ab", 1000);
        f.fetch(&b, 0, 100, Priority::Foreground).unwrap();
        f.fetch(&b, 100, 200, Priority::Background).unwrap();
        assert!(f.fetch(&b, 900, 200, Priority::Foreground).is_err());
        let text = m.encode();
        assert!(
            text.contains(r#"obd_remote_bytes_total{layer="sha256:ab",priority="foreground"} 100"#),
            "{text}"
        );
        assert!(
            text.contains(r#"obd_remote_bytes_total{layer="sha256:ab",priority="background"} 200"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"obd_remote_failures_total{layer="sha256:ab",priority="foreground"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"obd_remote_requests_total{layer="sha256:ab",priority="foreground"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains("obd_remote_fetch_latency_seconds_bucket"),
            "{text}"
        );
        m.verify_failure("sha256:ab", "mirror");
        let text = m.encode();
        assert!(
            text.contains(
                r#"obd_remote_verify_failures_total{layer="sha256:ab",source="mirror"} 1"#
            ),
            "{text}"
        );
    }
}
