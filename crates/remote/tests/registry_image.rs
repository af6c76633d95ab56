//! An upstream-made image served by a real `docker-registry`: flattening it
//! lazily through the registry source and the block cache gives the same disk
//! sha256 as from local files; a second open over the same cache fetches
//! nothing; 8 concurrent readers of the same blocks cause one fetch per block;
//! layers opened ahead (a snapshotter, at each layer's commit) open again in
//! another source over the same cache with no request, and layers fetched
//! whole ahead read with none.

mod support;

use std::sync::Arc;

use obd_remote::service::{RegistrySource, ServiceConfig};
use overlaybd_core::config::{ImageConfig, Lower};
use overlaybd_core::image::Image;
use overlaybd_core::source::{LayerSource, LocalFiles};
use sha2::{Digest, Sha256};
use support::http::{Action, Req, Server};
use support::Registry;

const STACK: [(&str, &str); 3] = fixtures::STACK_LZ4;
const DISK_SHA256: &str = "5f991ff760855d103d3b44d0249e97e393fc97231bbf1d201bab8f04ac863461";

fn disk_sha256(img: &Image) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0;
    while at < img.virtual_size() {
        let n = img.read_at(&mut buf, at).unwrap();
        h.update(&buf[..n]);
        at += n as u64;
    }
    hex::encode(h.finalize())
}

fn service(cache: &std::path::Path) -> ServiceConfig {
    let mut s = ServiceConfig::default();
    s.cache.dir = cache.to_path_buf();
    s.registry.use_docker_config = false;
    s
}

/// The upstream stack pushed to `repo` of `reg` behind a counting
/// forwarder: the forwarder, the image config naming the blobs through it,
/// and the blobs' total size.
fn stack_behind_proxy(reg: &Registry, repo: &str) -> (Server, ImageConfig, u64) {
    let mut lowers = Vec::new();
    let mut total = 0u64;
    for (file, digest) in STACK {
        let data = std::fs::read(fixtures::interop().join(file)).unwrap();
        let url = reg.push_blob(repo, &data);
        assert!(url.ends_with(digest));
        total += data.len() as u64;
        lowers.push(Lower {
            digest: digest.into(),
            size: data.len() as u64,
            ..Default::default()
        });
    }
    let upstream = reg.url().trim_start_matches("http://").to_string();
    let proxy = Server::start(move |_r: &Req| Action::Forward(upstream.clone()));
    let cfg = ImageConfig {
        repo_blob_url: format!("{}/v2/{repo}/blobs", proxy.url()),
        lowers,
        ..Default::default()
    };
    (proxy, cfg, total)
}

#[test]
fn remote_image_flattens_to_the_local_digest_and_the_cache_survives_a_restart() {
    let Some(reg) = Registry::start() else { return };
    support::init_tls();
    let (proxy, cfg, total) = stack_behind_proxy(&reg, "obd/stack");
    let cache = tempfile::tempdir().unwrap();
    let data_gets = |p: &Server| {
        p.count(|r: &Req| r.method == "GET" && r.header("range").is_some_and(|v| v != "bytes=0-0"))
    };

    let src = RegistrySource::new(&service(cache.path())).unwrap();
    assert_eq!(src.local_bytes(), Some((0, 0)));
    let img = Image::open(&cfg, None, &[&LocalFiles, &src]).unwrap();
    let (opened, size) = src.local_bytes().unwrap();
    assert_eq!(size, total);
    assert!(opened < total, "{opened} of {total} cached after the open");
    assert_eq!(img.virtual_size(), 1 << 30);
    assert_eq!(disk_sha256(&img), DISK_SHA256);
    let (read, _) = src.local_bytes().unwrap();
    assert!(read > opened, "{read} cached after reading everything");
    let first = data_gets(&proxy);
    assert!(first > 0);
    let fetched: u64 = proxy
        .requests()
        .iter()
        .filter_map(|r| {
            r.header("range")
                .and_then(|v| v.strip_prefix("bytes="))
                .map(str::to_string)
        })
        .filter_map(|v| {
            v.split_once('-')
                .map(|(a, b)| b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1)
        })
        .sum();
    assert!(
        fetched <= total + 3 * (256 << 10),
        "fetched {fetched} of {total} blob bytes"
    );
    drop(img);
    drop(src);

    // Restart: a new source over the same cache dir serves everything locally.
    let src = RegistrySource::new(&service(cache.path())).unwrap();
    let img = Image::open(&cfg, None, &[&LocalFiles, &src]).unwrap();
    assert_eq!(src.local_bytes(), Some((read, total)));
    assert_eq!(disk_sha256(&img), DISK_SHA256);
    assert_eq!(
        data_gets(&proxy),
        first,
        "the restarted cache fetched again"
    );

    // Eight readers of the same range at once on a cold cache: one fetch per block.
    let cold = tempfile::tempdir().unwrap();
    let src = RegistrySource::new(&service(cold.path())).unwrap();
    let img = Arc::new(Image::open(&cfg, None, &[&LocalFiles, &src]).unwrap());
    let before = data_gets(&proxy);
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (img, barrier) = (img.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                barrier.wait();
                img.read_at(&mut buf, 0).unwrap();
                hex::encode(Sha256::digest(&buf))
            })
        })
        .collect();
    let sums: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(sums.windows(2).all(|w| w[0] == w[1]));
    assert_no_range_twice(&proxy, before);
}

/// No data GET after the first `skip` asked for a range twice (data GETs as
/// `data_gets` counts them: not the client's 1-byte scheme probes, which
/// two first requests to a host may both send).
fn assert_no_range_twice(proxy: &Server, skip: usize) {
    let ranges: Vec<String> = proxy
        .requests()
        .iter()
        .filter(|r| r.method == "GET")
        .filter_map(|r| r.header("range").map(|h| (r, h)))
        .filter(|(_, h)| *h != "bytes=0-0")
        .map(|(r, h)| format!("{} {h}", r.target))
        .skip(skip)
        .collect();
    let mut unique = ranges.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        ranges.len(),
        "a range was fetched twice: {ranges:?}"
    );
}

#[test]
fn layers_opened_ahead_open_again_from_the_cache_alone() {
    let Some(reg) = Registry::start() else { return };
    support::init_tls();
    let (proxy, cfg, _) = stack_behind_proxy(&reg, "obd/ahead");
    let cache = tempfile::tempdir().unwrap();

    // The snapshotter's source: each layer opened ahead, nothing kept open.
    let ahead = RegistrySource::new(&service(cache.path())).unwrap();
    for r in cfg.layer_refs(None) {
        assert!(ahead.open_ahead(r).unwrap().is_some(), "{}", r.lower.digest);
    }
    assert_eq!(ahead.local_bytes(), Some((0, 0)), "open_ahead kept a blob");
    let fetched = proxy.requests().len();
    assert!(fetched >= STACK.len(), "{fetched} requests for the opens");
    // A lower with no digest is not a remote layer.
    let local = ImageConfig {
        lowers: vec![Lower {
            file: "/nonexistent/layer".into(),
            ..Default::default()
        }],
        ..cfg.clone()
    };
    let r = local.layer_refs(None).next().unwrap();
    assert!(ahead.open_ahead(r).unwrap().is_none());

    // The device worker's source, another process over the same cache: its
    // open asks the registry for nothing; its reads are right.
    let worker = RegistrySource::new(&service(cache.path())).unwrap();
    let img = Image::open(&cfg, None, &[&LocalFiles, &worker]).unwrap();
    assert_eq!(
        proxy.requests().len(),
        fetched,
        "the open after open_ahead fetched: {:?}",
        &proxy.requests()[fetched..]
    );
    assert_eq!(disk_sha256(&img), DISK_SHA256);
}

#[test]
fn layers_fetched_whole_ahead_read_with_no_request() {
    let Some(reg) = Registry::start() else { return };
    support::init_tls();
    let (proxy, cfg, total) = stack_behind_proxy(&reg, "obd/whole");
    let cache = tempfile::tempdir().unwrap();

    // The snapshotter's source: each layer opened, then fetched whole.
    let ahead = RegistrySource::new(&service(cache.path())).unwrap();
    for r in cfg.layer_refs(None) {
        let blob = ahead.open_ahead(r).unwrap().expect("a remote layer");
        blob.prefetch_in_order(512 << 10, 2).unwrap();
        assert_eq!(blob.cached_bytes(), blob.blob().size, "{}", r.lower.digest);
    }
    // No byte came twice: the opens' ends are not fetched again.
    assert_no_range_twice(&proxy, 0);
    let fetched = proxy.requests().len();

    // The device worker's source over the same cache reads the whole disk
    // with no request, and right.
    let worker = RegistrySource::new(&service(cache.path())).unwrap();
    let img = Image::open(&cfg, None, &[&LocalFiles, &worker]).unwrap();
    assert_eq!(disk_sha256(&img), DISK_SHA256);
    assert_eq!(
        proxy.requests().len(),
        fetched,
        "the worker fetched after the blobs were fetched whole: {:?}",
        &proxy.requests()[fetched..]
    );
    assert_eq!(worker.local_bytes(), Some((total, total)));
}

#[test]
fn background_download_switches_layers_to_verified_local_copies() {
    let Some(reg) = Registry::start() else { return };
    support::init_tls();
    let upstream = reg.url().trim_start_matches("http://").to_string();
    let proxy = Server::start(move |_r: &Req| Action::Forward(upstream.clone()));
    let dl_dir = tempfile::tempdir().unwrap();
    let mut lowers = Vec::new();
    for (i, (file, digest)) in STACK.iter().enumerate() {
        let data = std::fs::read(fixtures::interop().join(file)).unwrap();
        reg.push_blob("obd/dl", &data);
        lowers.push(Lower {
            digest: digest.to_string(),
            size: data.len() as u64,
            // The bottom layer names its own dir, the others use the service's.
            dir: if i == 0 {
                dl_dir.path().join("own").to_string_lossy().into_owned()
            } else {
                String::new()
            },
            ..Default::default()
        });
    }
    let cfg = ImageConfig {
        repo_blob_url: format!("{}/v2/obd/dl/blobs", proxy.url()),
        lowers,
        ..Default::default()
    };
    let cache = tempfile::tempdir().unwrap();
    let mut svc = service(cache.path());
    svc.download.enable = true;
    svc.download.delay = 0;
    svc.download.delay_extra = 0;
    svc.download.max_mbps = 0;
    svc.download.dir = dl_dir.path().join("svc");
    let src = RegistrySource::new(&svc).unwrap();
    let img = Image::open(&cfg, None, &[&LocalFiles, &src]).unwrap();
    let done = src.wait_downloads();
    assert_eq!(done.len(), 3);
    for (digest, r) in &done {
        let r = r.as_ref().unwrap_or_else(|e| panic!("{digest}: {e}"));
        assert!(r.path.ends_with("overlaybd.commit"), "{r:?}");
    }
    assert!(dl_dir.path().join("own/overlaybd.commit").is_file());
    let hex1 = STACK[1].1.trim_start_matches("sha256:");
    assert!(dl_dir
        .path()
        .join("svc")
        .join(hex1)
        .join("overlaybd.commit")
        .is_file());
    // Every read is local now: the whole disk reads right with no request.
    let before = proxy.requests().len();
    assert_eq!(disk_sha256(&img), DISK_SHA256);
    assert_eq!(
        proxy.requests().len(),
        before,
        "reads went remote after the switch"
    );
    drop(img);
    drop(src);

    // A new image over the committed dirs opens the bottom layer from its own
    // dir (`overlaybd.commit`) through LocalFiles, with no download at all.
    let src2 = RegistrySource::new(&service(cache.path())).unwrap();
    let img = Image::open(&cfg, None, &[&LocalFiles, &src2]).unwrap();
    assert!(
        img.layers()[0].name.ends_with("overlaybd.commit"),
        "{}",
        img.layers()[0].name
    );
    assert!(src2.wait_downloads().is_empty());
}
