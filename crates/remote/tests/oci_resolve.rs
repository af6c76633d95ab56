//! `oci::resolve` against a real `docker-registry`: index → platform (the
//! arm64 ≡ arm64/v8 rule) → manifest → config, and the typed errors for a
//! missing platform, a config that does not match its layers, a malformed
//! diff_id and a missing image.

mod support;

use std::sync::Arc;

use obd_remote::creds::Anonymous;
use obd_remote::distribution::{Distribution, ImageRef};
use obd_remote::oci::{self, Platform, ResolveError, MT_OCI_CONFIG, MT_OCI_INDEX, MT_OCI_MANIFEST};
use obd_remote::registry::{HostOptions, RegistryOptions};
use serde_json::{json, Value};
use support::Registry;

fn client(reg: &Registry) -> Arc<Distribution> {
    let mut o = RegistryOptions::default();
    o.hosts.insert(
        reg.addr.clone(),
        HostOptions {
            plain_http: true,
            ..Default::default()
        },
    );
    Arc::new(Distribution::with_credentials(o, Arc::new(Anonymous)).unwrap())
}

/// Pushes `layers` (small blobs), a config with `diff_ids` (resolve does
/// not check them against the layers) and the manifest. Returns the
/// manifest's descriptor.
fn push_image(d: &Distribution, r: &ImageRef, diff_ids: &[&str], layers: &[&[u8]]) -> Value {
    let tmp = tempfile::tempdir().unwrap();
    let layers: Vec<Value> = layers
        .iter()
        .map(|b| {
            let ld = oci::sha256_digest(b);
            d.push_blob_bytes(r, &ld, b, tmp.path()).unwrap();
            json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": b.len()})
        })
        .collect();
    let cfg =
        serde_json::to_vec(&json!({"rootfs": {"type": "layers", "diff_ids": diff_ids}})).unwrap();
    let cd = oci::sha256_digest(&cfg);
    d.push_blob_bytes(r, &cd, &cfg, tmp.path()).unwrap();
    let m = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": cd, "size": cfg.len()},
        "layers": layers}))
    .unwrap();
    let md = d
        .put_manifest(r, &oci::sha256_digest(&m), MT_OCI_MANIFEST, &m)
        .unwrap();
    json!({"mediaType": MT_OCI_MANIFEST, "digest": md.digest, "size": m.len()})
}

#[test]
fn resolve_follows_the_index_to_the_platform_config() {
    let Some(reg) = Registry::start() else { return };
    let d = client(&reg);
    let r = ImageRef::parse(&format!("{}/test/oci:multi", reg.addr)).unwrap();
    let diff = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let amd = push_image(&d, &r, &[&diff('a')], &[b"a"]);
    let arm = push_image(&d, &r, &[&diff('b'), &diff('c')], &[b"b", b"c"]);
    let plat = |os: &str, arch: &str| json!({"os": os, "architecture": arch});
    let mut entries = vec![amd.clone(), arm.clone()];
    entries[0]["platform"] = plat("linux", "amd64");
    entries[1]["platform"] = plat("linux", "arm64");
    let idx = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": MT_OCI_INDEX,
        "manifests": entries}))
    .unwrap();
    let pushed = d.put_manifest(&r, "multi", MT_OCI_INDEX, &idx).unwrap();

    let res = oci::resolve(&d, &r, &Platform::parse("linux/arm64/v8").unwrap()).unwrap();
    assert_eq!(res.indexes.len(), 1);
    assert_eq!(res.indexes[0].0.digest, pushed.digest);
    assert_eq!(res.indexes[0].1.digest, arm["digest"]);
    assert_eq!(res.manifest_doc.digest, arm["digest"]);
    assert_eq!(res.manifest.layers.len(), 2);
    assert_eq!(res.config.rootfs.diff_ids, [diff('b'), diff('c')]);
    assert_eq!(
        oci::sha256_digest(&res.config_bytes),
        res.manifest.config.digest
    );
    let amd_res = oci::resolve(&d, &r, &Platform::parse("linux/amd64").unwrap()).unwrap();
    assert_eq!(amd_res.manifest_doc.digest, amd["digest"]);

    // No such platform: the index, the wanted platform and the ones present.
    let e = oci::resolve(&d, &r, &Platform::parse("linux/s390x").unwrap()).unwrap_err();
    assert!(matches!(e, ResolveError::Platform { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&pushed.digest)
            && msg.contains("linux/s390x")
            && msg.contains("linux/amd64, linux/arm64"),
        "{msg}"
    );

    // A config with fewer diff_ids than layers names the config.
    let bad = ImageRef::parse(&format!("{}/test/oci:bad", reg.addr)).unwrap();
    let m = push_image(&d, &bad, &[&diff('a')], &[b"a", b"b"]);
    let bytes = d
        .get_manifest(&bad, m["digest"].as_str().unwrap())
        .unwrap()
        .bytes;
    d.put_manifest(&bad, "bad", MT_OCI_MANIFEST, &bytes)
        .unwrap();
    let e = oci::resolve(&d, &bad, &Platform::parse("linux/amd64").unwrap()).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, ResolveError::Image { what: "config", .. })
            && msg.contains("1 diff_ids for 2 layers"),
        "{msg}"
    );

    // A malformed diff_id is refused.
    let odd = ImageRef::parse(&format!("{}/test/oci:odd", reg.addr)).unwrap();
    let m = push_image(&d, &odd, &["sha256:../../etc"], &[b"a"]);
    let bytes = d
        .get_manifest(&odd, m["digest"].as_str().unwrap())
        .unwrap()
        .bytes;
    d.put_manifest(&odd, "odd", MT_OCI_MANIFEST, &bytes)
        .unwrap();
    let e = oci::resolve(&d, &odd, &Platform::parse("linux/amd64").unwrap()).unwrap_err();
    assert!(e.to_string().contains("malformed diff_id"), "{e}");

    // A registry failure names what was fetched.
    let missing = ImageRef::parse(&format!("{}/test/oci:nope", reg.addr)).unwrap();
    let e = oci::resolve(&d, &missing, &Platform::parse("linux/amd64").unwrap()).unwrap_err();
    assert!(matches!(e, ResolveError::Registry { .. }), "{e}");
}
