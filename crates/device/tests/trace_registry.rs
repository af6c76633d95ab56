//! Recording over remote lowers (a private docker-registry): the image's own
//! `download` section asks for background download, but while recording it
//! is off (upstream: the trace must see the container's reads, not a local
//! copy's); without a recording the same config downloads.
//!
//! Needs `docker-registry` and `curl`; otherwise prints `SKIPPED` and passes.

use std::path::Path;

use obd_device::open::{open_image, TracePlan};
use obd_remote::service::{RegistrySource, ServiceConfig};
use overlaybd_core::config::{Download, ImageConfig, Lower};
use tcmu_target::BlockBackend;

const STACK: [(&str, &str); 3] = fixtures::STACK_LZ4;

fn source(dir: &Path) -> RegistrySource {
    let mut s = ServiceConfig::default();
    s.cache.dir = dir.join("cache");
    s.download.dir = dir.join("download");
    s.registry.use_docker_config = false;
    RegistrySource::new(&s).unwrap()
}

#[test]
fn background_download_is_off_while_recording() {
    for p in ["docker-registry", "curl"] {
        if !fixtures::registry::have(p) {
            eprintln!("SKIPPED: {p} is not installed");
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg_dir = tmp.path().join("registry");
    std::fs::create_dir(&reg_dir).unwrap();
    let reg = fixtures::registry::Registry::start(&reg_dir).unwrap();
    let mut lowers = Vec::new();
    for (file, digest) in STACK {
        let p = fixtures::interop().join(file);
        reg.push("obd/trace", &p, digest).unwrap();
        lowers.push(Lower {
            digest: digest.into(),
            size: std::fs::metadata(&p).unwrap().len(),
            ..Default::default()
        });
    }
    let cfg = ImageConfig {
        repo_blob_url: reg.repo_blob_url("obd/trace"),
        lowers,
        record_trace_path: "trace".into(),
        download: Some(Download {
            enable: true,
            delay: 0,
            delay_extra: 0,
            max_mbps: 0,
            ..Default::default()
        }),
        ..Default::default()
    };
    let cfg_path = tmp.path().join("config.v1.json");
    cfg.save_atomic(&cfg_path).unwrap();

    // Recording: the reads are remote and recorded; nothing is downloaded.
    std::fs::write(tmp.path().join("trace"), b"").unwrap();
    let src = source(&tmp.path().join("a"));
    let o = open_image(&cfg_path, Some(&src)).unwrap();
    let TracePlan::Record(rec) = &o.trace else {
        panic!("expected recording, got {:?}", o.trace);
    };
    let mut buf = vec![0u8; 1 << 20];
    o.backend.read_at(&mut buf, 0).unwrap();
    assert!(!rec.is_empty());
    assert!(
        src.wait_downloads().is_empty(),
        "downloaded while recording"
    );
    rec.finish().unwrap();
    drop(o);

    // Not recording (the trace is written: replay): the config's download runs.
    let src = source(&tmp.path().join("b"));
    let o = open_image(&cfg_path, Some(&src)).unwrap();
    assert!(matches!(o.trace, TracePlan::Replay { .. }), "{:?}", o.trace);
    let done = src.wait_downloads();
    assert_eq!(done.len(), 3);
    assert!(done.iter().all(|(_, r)| r.is_ok()));
}
