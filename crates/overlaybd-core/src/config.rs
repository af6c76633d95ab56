//! `config.v1.json`: the per-device image config shared with upstream overlaybd
//! and the ACI snapshotter. The schema is upstream's; unknown keys are kept out
//! of the way (ignored on read), so either side's files can be swapped.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::source::{LayerRef, LocalFiles};

/// Most read-only layers one image may stack (the 8-bit LSMT tag).
pub const MAX_LAYERS: usize = 255;

/// The whole per-device config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ImageConfig {
    /// `https://<host>/v2/<repository>/blobs`; a blob URL is this + `/` + digest.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub repo_blob_url: String,
    /// Read-only layers, bottom to top.
    pub lowers: Vec<Lower>,
    /// The writable layer; both `index` and `data` set means read-write.
    #[serde(skip_serializing_if = "Upper::is_empty")]
    pub upper: Upper,
    /// Where the device service writes `success` or `failed:<reason>`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub result_file: String,
    /// The last lower is a trace (acceleration) layer.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub acceleration_layer: bool,
    /// Record/replay/priority-list trace file.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub record_trace_path: String,
    /// Per-image override of background download.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download: Option<Download>,
}

/// One read-only layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Lower {
    /// A local layer file (any blob nesting).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub file: String,
    /// Layer directory: `overlaybd.commit`, `.commit` or `overlaybd.sealed` inside it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub dir: String,
    /// Remote blob digest.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Remote blob size in bytes.
    #[serde(skip_serializing_if = "is_zero")]
    pub size: u64,
    /// TurboOCI: the original OCI layer file.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub target_file: String,
    /// TurboOCI: the original OCI layer digest.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub target_digest: String,
    /// TurboOCI over gzip: `gzip.meta`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub gzip_index: String,
    /// obd: the blob's piece table (a blob in the same repository), against
    /// which every lazily fetched byte is checked. Absent when the image has
    /// none, so configs are otherwise upstream's, byte for byte.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verity: Option<Verity>,
}

/// Where a remote lower's piece table is: a blob of the image's repository
/// (`docs/formats.md`, "Piece tables").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Verity {
    /// The table blob's digest, `sha256:<hex>`.
    pub digest: String,
    /// The table blob's size in bytes.
    pub size: u64,
}

/// The writable layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Upper {
    /// RW index file.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub index: String,
    /// RW data file.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub data: String,
    /// TurboOCI build only.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub target: String,
    /// TurboOCI build only.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub gzip_index: String,
    /// Informational size in GB (written by Go, ignored on read).
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub vsize: i64,
}

impl Upper {
    /// True when no key is set.
    pub fn is_empty(&self) -> bool {
        self == &Upper::default()
    }
    /// Both `index` and `data` are set: the device is read-write.
    pub fn is_writable(&self) -> bool {
        !self.index.is_empty() && !self.data.is_empty()
    }
}

/// Background download settings (upstream defaults apply to absent keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Download {
    /// Download whole blobs in the background.
    pub enable: bool,
    /// Seconds before starting.
    pub delay: u64,
    /// Random extra delay, seconds.
    pub delay_extra: u64,
    /// Rate limit in MB/s.
    #[serde(rename = "maxMBps")]
    pub max_mbps: u64,
    /// Attempts per blob.
    pub try_cnt: u32,
    /// Request size in bytes.
    pub block_size: u64,
}

impl Default for Download {
    fn default() -> Self {
        Download {
            enable: false,
            delay: 300,
            delay_extra: 30,
            max_mbps: 100,
            try_cnt: 5,
            block_size: 262_144,
        }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

impl ImageConfig {
    /// Parses and validates config JSON.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        let cfg: ImageConfig = serde_json::from_slice(bytes).map_err(|e| Error::Config {
            field: format!("line {} column {}", e.line(), e.column()),
            detail: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a config file: a regular file of at most
    /// [`crate::regular::MAX_CONFIG_SIZE`] bytes.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = crate::regular::read_config(path)?;
        Self::from_slice(&bytes).map_err(|e| e.in_file(path))
    }

    /// Checks the rules the device service relies on.
    pub fn validate(&self) -> Result<()> {
        if self.lowers.len() > MAX_LAYERS {
            return Err(Error::Config {
                field: "lowers".into(),
                detail: format!(
                    "{} layers; at most {MAX_LAYERS} can be stacked",
                    self.lowers.len()
                ),
            });
        }
        for (i, l) in self.lowers.iter().enumerate() {
            if l.file.is_empty() && l.dir.is_empty() && l.digest.is_empty() {
                return Err(Error::Config {
                    field: format!("lowers[{i}]"),
                    detail: "needs `file`, `dir` or `digest`".into(),
                });
            }
            if !l.digest.is_empty() {
                validate_digest(&l.digest).map_err(|detail| Error::Config {
                    field: format!("lowers[{i}].digest"),
                    detail,
                })?;
            }
            if let Some(v) = &l.verity {
                if !v.digest.starts_with("sha256:") {
                    return Err(Error::Config {
                        field: format!("lowers[{i}].verity.digest"),
                        detail: format!("`{}` is not a sha256 digest", v.digest),
                    });
                }
                validate_digest(&v.digest).map_err(|detail| Error::Config {
                    field: format!("lowers[{i}].verity.digest"),
                    detail,
                })?;
                if l.digest.is_empty() {
                    return Err(Error::Config {
                        field: format!("lowers[{i}].verity"),
                        detail: "a piece table needs the layer's `digest`".into(),
                    });
                }
            }
        }
        if self.acceleration_layer && !self.record_trace_path.is_empty() {
            return Err(Error::Config {
                field: "accelerationLayer".into(),
                detail: "cannot be combined with recordTracePath".into(),
            });
        }
        Ok(())
    }

    /// The lowers stacked into the disk, bottom to top: all of them, except
    /// that with `accelerationLayer` the last one is a trace, not a layer.
    pub fn stacked_lowers(&self) -> &[Lower] {
        match self.trace_lower() {
            Some(_) => &self.lowers[..self.lowers.len() - 1],
            None => &self.lowers,
        }
    }

    /// The acceleration (trace) layer: the last lower when `accelerationLayer`
    /// is set. It is replayed when the device opens, never stacked.
    pub fn trace_lower(&self) -> Option<&Lower> {
        self.lowers.last().filter(|_| self.acceleration_layer)
    }

    /// This config without its acceleration layer: the trace lower removed and
    /// `accelerationLayer` cleared (for a stack the trace no longer describes).
    pub fn without_trace(mut self) -> Self {
        if self.trace_lower().is_some() {
            self.lowers.pop();
        }
        self.acceleration_layer = false;
        self
    }

    /// Where each stacked lower is looked up (relative paths against `base`,
    /// the config file's folder), bottom to top.
    pub fn layer_refs<'a>(
        &'a self,
        base: Option<&'a Path>,
    ) -> impl Iterator<Item = LayerRef<'a>> + 'a {
        self.stacked_lowers()
            .iter()
            .enumerate()
            .map(move |(index, lower)| LayerRef {
                index,
                lower,
                repo_blob_url: &self.repo_blob_url,
                base_dir: base,
                download: self.download.as_ref(),
            })
    }

    /// Whether every stacked lower is a local file (relative paths against
    /// `base`), so the image opens without a registry.
    pub fn all_local(&self, base: Option<&Path>) -> bool {
        self.layer_refs(base)
            .all(|r| LocalFiles::locate(r).is_some())
    }

    /// Serialises as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    /// Writes the config atomically (temp file + rename), mode 0600.
    pub fn save_atomic(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        crate::regular::write_atomic_private(path, self.to_json().as_bytes())
            .map_err(|e| Error::Io(e).in_file(path))
    }
}

/// Checks `sha256:<64 lower-case hex>` (other algorithms: `<alg>:<hex>`).
pub fn validate_digest(d: &str) -> std::result::Result<(), String> {
    let Some((alg, hex)) = d.split_once(':') else {
        return Err(format!("`{d}` is not of the form <algorithm>:<hex>"));
    };
    let ok_hex =
        |len| hex.len() == len && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let ok = match alg {
        "sha256" => ok_hex(64),
        "sha512" => ok_hex(128),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("`{d}` is not a valid sha256/sha512 digest"))
    }
}

/// Resolves a path from a config: absolute paths stay; relative ones are taken
/// against `base` (the config file's folder), not the working directory.
pub fn resolve(base: Option<&Path>, p: &str) -> PathBuf {
    let p = Path::new(p);
    match base {
        Some(b) if p.is_relative() => b.join(p),
        _ => p.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream_example_and_ignores_unknown_keys() {
        let json = br#"{
          "repoBlobUrl": "https://registry-1.docker.io/v2/overlaybd/redis/blobs",
          "lowers": [
            {"digest": "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "size": 4737695, "dir": "/x/12/fs"},
            {"file": "layer1.tar", "someFutureKey": [1,2]}
          ],
          "upper": {},
          "resultFile": "/x/14/block/init-debug.log",
          "download": {"enable": true, "maxMBps": 50},
          "newTopLevelKey": {"a": 1}
        }"#;
        let c = ImageConfig::from_slice(json).unwrap();
        assert_eq!(c.lowers.len(), 2);
        assert_eq!(c.lowers[0].size, 4737695);
        assert!(!c.upper.is_writable());
        let d = c.download.as_ref().unwrap();
        assert_eq!(
            (d.enable, d.max_mbps, d.delay, d.block_size),
            (true, 50, 300, 262144)
        );
        // Round trip keeps the schema.
        let again = ImageConfig::from_slice(c.to_json().as_bytes()).unwrap();
        assert_eq!(again, c);
        assert!(c.to_json().contains("\"repoBlobUrl\""));
        assert!(!c.to_json().contains("\"upper\""));
    }

    #[test]
    fn verity_is_optional_and_checked() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        // Absent: the entry serialises exactly as before.
        let plain = ImageConfig {
            lowers: vec![Lower {
                digest: a.clone(),
                size: 7,
                ..Default::default()
            }],
            ..Default::default()
        };
        let keys: serde_json::Value = serde_json::from_str(&plain.to_json()).unwrap();
        assert_eq!(
            keys,
            serde_json::json!({"lowers":[{"digest": a, "size": 7}]})
        );
        let json = format!(
            r#"{{"lowers":[{{"digest":"{a}","size":7,"verity":{{"digest":"{b}","size":96}}}}]}}"#
        );
        let c = ImageConfig::from_slice(json.as_bytes()).unwrap();
        let v = c.lowers[0].verity.as_ref().unwrap();
        assert_eq!((v.digest.as_str(), v.size), (b.as_str(), 96));
        assert_eq!(ImageConfig::from_slice(c.to_json().as_bytes()).unwrap(), c);
        for (bad, field) in [
            (
                r#"{"lowers":[{"digest":"A","size":1,"verity":{"digest":"md5:1","size":1}}]}"#
                    .replace('A', &a),
                "lowers[0].verity.digest",
            ),
            (
                r#"{"lowers":[{"file":"x","verity":{"digest":"B","size":1}}]}"#.replace('B', &b),
                "lowers[0].verity",
            ),
        ] {
            let e = ImageConfig::from_slice(bad.as_bytes()).unwrap_err();
            assert!(
                matches!(&e, Error::Config { field: f, .. } if f == field),
                "{e}"
            );
        }
    }

    #[test]
    fn rejects_bad_configs_naming_the_field() {
        let too_many = ImageConfig {
            lowers: vec![
                Lower {
                    file: "x".into(),
                    ..Default::default()
                };
                256
            ],
            ..Default::default()
        };
        assert!(
            matches!(too_many.validate(), Err(Error::Config { field, .. }) if field == "lowers")
        );
        let err = ImageConfig::from_slice(br#"{"lowers":[{"size":3}]}"#).unwrap_err();
        assert!(err.to_string().contains("lowers[0]"), "{err}");
        let err = ImageConfig::from_slice(br#"{"lowers":[{"digest":"md5:zz"}]}"#).unwrap_err();
        assert!(err.to_string().contains("lowers[0].digest"), "{err}");
        let err = ImageConfig::from_slice(br#"{"lowers": 7}"#).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(ImageConfig::from_slice(b"").is_err());
    }

    fn lower_file(f: &str) -> Lower {
        Lower {
            file: f.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_acceleration_layer_is_the_last_lower_and_is_not_stacked() {
        let plain = ImageConfig {
            lowers: vec![lower_file("a"), lower_file("b")],
            ..Default::default()
        };
        assert_eq!(plain.stacked_lowers(), &plain.lowers[..]);
        assert_eq!(plain.trace_lower(), None);
        assert_eq!(plain.clone().without_trace(), plain);

        let accel = ImageConfig {
            acceleration_layer: true,
            lowers: vec![lower_file("a"), lower_file("b"), lower_file("trace")],
            ..Default::default()
        };
        assert_eq!(accel.stacked_lowers(), &accel.lowers[..2]);
        assert_eq!(accel.trace_lower(), Some(&lower_file("trace")));
        let refs: Vec<_> = accel.layer_refs(None).map(|r| (r.index, r.lower)).collect();
        assert_eq!(refs, vec![(0, &accel.lowers[0]), (1, &accel.lowers[1])]);
        let stripped = accel.clone().without_trace();
        assert!(!stripped.acceleration_layer);
        assert_eq!(stripped.lowers, accel.lowers[..2]);

        // The flag over no lowers: nothing to strip, nothing stacked.
        let empty = ImageConfig {
            acceleration_layer: true,
            ..Default::default()
        };
        assert!(empty.stacked_lowers().is_empty());
        assert_eq!(empty.trace_lower(), None);
        assert_eq!(empty.without_trace(), ImageConfig::default());
    }

    #[test]
    fn all_local_judges_the_stacked_lowers_against_the_config_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.tar"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/overlaybd.commit"), b"x").unwrap();
        let remote = Lower {
            digest: format!("sha256:{}", "a".repeat(64)),
            ..Default::default()
        };
        let dir_lower = Lower {
            dir: "d".into(),
            ..remote.clone()
        };
        let mut cfg = ImageConfig {
            lowers: vec![lower_file("a.tar"), dir_lower],
            ..Default::default()
        };
        let base = Some(dir.path());
        assert!(cfg.all_local(base));
        assert!(
            !cfg.all_local(None),
            "relative paths need the config folder"
        );
        // A remote lower is not local, unless it is the (unstacked) trace.
        cfg.lowers.push(remote);
        assert!(!cfg.all_local(base));
        cfg.acceleration_layer = true;
        assert!(cfg.all_local(base));
        cfg.lowers.insert(0, lower_file("missing.tar"));
        assert!(!cfg.all_local(base));
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        assert_eq!(
            resolve(Some(Path::new("/a/b")), "c.tar"),
            PathBuf::from("/a/b/c.tar")
        );
        assert_eq!(
            resolve(Some(Path::new("/a/b")), "/abs"),
            PathBuf::from("/abs")
        );
        assert_eq!(resolve(None, "rel"), PathBuf::from("rel"));
    }
}
