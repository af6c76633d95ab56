//! Verified lazy reads against a real `docker-registry` and lying sources:
//! an origin, mirror or P2P proxy that serves a different blob of the same
//! length under the honest digest, or the honest blob with one ZFile block
//! changed and its CRC recomputed (which the ZFile reader accepts). With a
//! piece table a reader gets honest bytes from the next source or an error
//! naming the blob, the range and the source, never wrong bytes; without one
//! the tampered block is read (the threat the tables close). The `[cache]
//! verify` policy decides what a layer without a table does.

mod support;

use std::sync::Arc;

use obd_remote::registry::RegistryOptions;
use obd_remote::service::{RegistrySource, ServiceConfig, VerifyPolicy};
use obd_remote::verity::PieceTable;
use obd_remote::{BlobRef, Priority, RangeFetcher};
use overlaybd_core::config::{Lower, Verity};
use overlaybd_core::source::{decode, LayerRef, LayerSource};
use support::http::{Action, Req, Resp, Server};
use support::Registry;
use zfile::ReadAt;

const REPO: &str = "obd/verity";
const PIECE: u64 = 64 << 10;

/// The honest layer: an upstream-made tar(ZFile(LSMT)) blob, its digest,
/// and its piece table pushed beside it.
struct Honest {
    reg: Registry,
    data: Vec<u8>,
    digest: String,
    table: Verity,
}

impl Honest {
    fn push() -> Option<Honest> {
        let reg = Registry::start()?;
        let (file, digest) = fixtures::STACK_LZ4[0];
        let data = std::fs::read(fixtures::interop().join(file)).unwrap();
        assert!(reg.push_blob(REPO, &data).ends_with(digest));
        let t = PieceTable::build(&data[..], PIECE).unwrap().encode();
        let url = reg.push_blob(REPO, &t);
        Some(Honest {
            reg,
            data,
            digest: digest.to_string(),
            table: Verity {
                digest: support::digest_of(&url),
                size: t.len() as u64,
            },
        })
    }

    fn lower(&self, verity: bool) -> Lower {
        Lower {
            digest: self.digest.clone(),
            size: self.data.len() as u64,
            verity: verity.then(|| self.table.clone()),
            ..Default::default()
        }
    }

    fn upstream(&self) -> String {
        self.reg.addr.clone()
    }

    /// The decoded LSMT bytes, from local bytes.
    fn lsmt(&self) -> Vec<u8> {
        read_all(Arc::new(self.data.clone()))
    }
}

fn read_all(blob: overlaybd_core::source::Blob) -> Vec<u8> {
    try_read_all(blob).unwrap()
}

fn try_read_all(blob: overlaybd_core::source::Blob) -> Result<Vec<u8>, String> {
    let d = decode(blob).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; d.lsmt.size() as usize];
    d.lsmt
        .read_exact_at(&mut out, 0)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// The honest blob with the last compressed byte of ZFile block `block`
/// changed and the block's CRC recomputed: a well-formed blob the ZFile
/// reader accepts (an LZ4 block ends in literals), with other content.
fn crc_tampered(data: &[u8], block: u64) -> Vec<u8> {
    let src: overlaybd_core::source::Blob = Arc::new(data.to_vec());
    let tar = overlaybd_core::tar::detect(&*src).unwrap().unwrap();
    let z = decode(src).unwrap().zfile.unwrap();
    let (off, len) = z.block_extent(block);
    let start = (tar.offset + off) as usize;
    let crc_at = start + len as usize - 4;
    let mut out = data.to_vec();
    out[crc_at - 1] ^= 0x20;
    let crc = zfile::crc32c_raw(100_007, &out[start..crc_at]);
    out[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    out
}

/// A different blob of the same length: the honest bytes with the second
/// half replaced.
fn substitute(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    let half = out.len() / 2;
    out[half..].copy_from_slice(&support::pattern(data.len() - half, 9));
    out
}

/// A server that answers range reads of the layer blob with `fake` and
/// forwards everything else (the table, the auth probe of other blobs) to
/// the real registry. Requests may come as registry paths (origin, mirror)
/// or as `/p2p/<full URL>` (P2P proxy).
fn liar(upstream: String, digest: &str, fake: Vec<u8>) -> Server {
    let digest = digest.to_string();
    Server::start(move |r: &Req| {
        let path = match r.target.strip_prefix("/p2p/") {
            Some(full) => reqwest::Url::parse(full).unwrap().path().to_string(),
            None => r.target.clone(),
        };
        let range = r.header("range").and_then(|v| v.strip_prefix("bytes="));
        match (path.ends_with(&digest), range) {
            (true, Some(range)) => {
                let (a, b) = range.split_once('-').unwrap();
                let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
                let b = b.min(fake.len() - 1);
                Action::Reply(
                    Resp::new(206)
                        .with_header("Content-Range", &format!("bytes {a}-{b}/{}", fake.len()))
                        .with_body(fake[a..=b].to_vec()),
                )
            }
            _ => Action::ForwardPath(upstream.clone(), path),
        }
    })
}

fn service(
    cache: &std::path::Path,
    verify: VerifyPolicy,
    registry: RegistryOptions,
) -> ServiceConfig {
    let mut s = ServiceConfig::default();
    s.cache.dir = cache.to_path_buf();
    s.cache.verify = verify;
    s.registry = registry;
    s
}

/// Opens `lower` from `repo_url` through `src` and reads its whole LSMT.
fn open_and_read(src: &RegistrySource, repo_url: &str, lower: &Lower) -> Result<Vec<u8>, String> {
    let opened = src
        .open(LayerRef {
            index: 0,
            lower,
            repo_blob_url: repo_url,
            base_dir: None,
            download: None,
        })
        .map_err(|e| e.to_string())?
        .expect("a remote lower");
    try_read_all(opened.blob)
}

fn repo_url(base: &str) -> String {
    format!("{base}/v2/{REPO}/blobs")
}

fn metric(src: &RegistrySource, needle: &str) -> u64 {
    src.metrics()
        .encode()
        .lines()
        .find(|l| l.starts_with(needle))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse().unwrap())
}

#[test]
fn a_recomputed_crc_passes_the_zfile_check_but_not_the_table() {
    let Some(h) = Honest::push() else { return };
    let honest = h.lsmt();
    let fake = crc_tampered(&h.data, 40);
    let origin = liar(h.upstream(), &h.digest, fake.clone());
    let opts = support::client_opts(5_000);

    // Without a table the tampered block is read: wrong bytes, no error.
    let dir = tempfile::tempdir().unwrap();
    let src =
        RegistrySource::new(&service(dir.path(), VerifyPolicy::IfPresent, opts.clone())).unwrap();
    let got = open_and_read(&src, &repo_url(&origin.url()), &h.lower(false)).unwrap();
    assert_eq!(got.len(), honest.len());
    assert_ne!(
        got, honest,
        "the tampered block should decode to other bytes"
    );

    // With the table: an error naming the blob, the piece's range and the
    // source, and the mismatch counted.
    let dir = tempfile::tempdir().unwrap();
    let src =
        RegistrySource::new(&service(dir.path(), VerifyPolicy::IfPresent, opts.clone())).unwrap();
    let e = open_and_read(&src, &repo_url(&origin.url()), &h.lower(true)).unwrap_err();
    let bad = fake.iter().zip(&h.data).position(|(a, b)| a != b).unwrap() as u64;
    let piece = bad / PIECE * PIECE;
    assert!(e.contains(&h.digest), "{e}");
    assert!(e.contains("origin"), "{e}");
    assert!(
        e.contains(&format!("bytes {piece}..{}", piece + PIECE)),
        "{e} (tampered byte {bad})"
    );
    assert!(e.contains("does not match its digest"), "{e}");
    let failures = format!(
        "obd_remote_verify_failures_total{{layer=\"{}\",source=\"origin\"}}",
        h.digest
    );
    assert_eq!(metric(&src, &failures), 3, "one per origin try");
    drop(src);

    // The honest registry then reads honest bytes through the same cache:
    // nothing of the lie was kept.
    let src = RegistrySource::new(&service(dir.path(), VerifyPolicy::IfPresent, opts)).unwrap();
    let got = open_and_read(&src, &repo_url(&h.reg.url()), &h.lower(true)).unwrap();
    assert!(got == honest);
}

#[test]
fn a_lying_mirror_gives_way_to_the_honest_origin() {
    let Some(h) = Honest::push() else { return };
    let honest = h.lsmt();
    let mirror = liar(h.upstream(), &h.digest, substitute(&h.data));
    let mut opts = support::client_opts(5_000);
    opts.mirrors.insert(h.upstream(), vec![mirror.url()]);
    let dir = tempfile::tempdir().unwrap();
    let src = RegistrySource::new(&service(dir.path(), VerifyPolicy::IfPresent, opts)).unwrap();
    let got = open_and_read(&src, &repo_url(&h.reg.url()), &h.lower(true)).unwrap();
    assert!(got == honest);
    let lies = mirror.count(|r| r.is_data_get() && r.target.ends_with(&h.digest));
    assert!(lies > 0, "the mirror was asked first");
    let failures = format!(
        "obd_remote_verify_failures_total{{layer=\"{}\",source=\"mirror\"}}",
        h.digest
    );
    assert!(metric(&src, &failures) > 0);

    // Open and read again: the blob's bytes come from the cache (only the
    // small table is fetched again, as at every open).
    let blob_gets = |s: &Server| s.count(|r| r.is_data_get() && r.target.ends_with(&h.digest));
    let before = blob_gets(&mirror);
    let got = open_and_read(&src, &repo_url(&h.reg.url()), &h.lower(true)).unwrap();
    assert!(got == honest);
    assert_eq!(blob_gets(&mirror), before);
}

#[test]
fn a_lying_p2p_proxy_gives_way_to_a_direct_read() {
    let Some(h) = Honest::push() else { return };
    let honest = h.lsmt();
    let p2p = liar(h.upstream(), &h.digest, crc_tampered(&h.data, 40));
    let mut opts = support::client_opts(5_000);
    opts.p2p.enable = true;
    opts.p2p.address = format!("{}/p2p", p2p.url());
    let dir = tempfile::tempdir().unwrap();
    let src = RegistrySource::new(&service(dir.path(), VerifyPolicy::IfPresent, opts)).unwrap();
    let got = open_and_read(&src, &repo_url(&h.reg.url()), &h.lower(true)).unwrap();
    assert!(got == honest);
    assert!(
        p2p.count(|r| r.is_data_get()) > 0,
        "reads went through the proxy"
    );
    let failures = format!(
        "obd_remote_verify_failures_total{{layer=\"{}\",source=\"p2p\"}}",
        h.digest
    );
    assert_eq!(
        metric(&src, &failures),
        1,
        "only the tampered piece's request"
    );
}

#[test]
fn unaligned_ranges_are_widened_to_whole_pieces() {
    let Some(h) = Honest::push() else { return };
    let upstream = h.upstream();
    let seen = Server::start(move |_r: &Req| Action::Forward(upstream.clone()));
    let c = obd_remote::registry::RegistryClient::new(support::client_opts(5_000)).unwrap();
    let table = PieceTable::build(&h.data[..], PIECE).unwrap();
    let blob = BlobRef {
        url: format!("{}/{}", repo_url(&seen.url()), h.digest),
        digest: h.digest.clone(),
        size: h.data.len() as u64,
        verity: Some(Arc::new(table)),
    };
    let (off, len) = (PIECE + 1000, 3 * PIECE);
    let got = c.fetch(&blob, off, len, Priority::Foreground).unwrap();
    assert!(got[..] == h.data[off as usize..(off + len) as usize]);
    // The tail of the blob: the last piece is short.
    let size = h.data.len() as u64;
    let got = c.fetch(&blob, size - 10, 10, Priority::Foreground).unwrap();
    assert!(got[..] == h.data[size as usize - 10..]);
    let ranges: Vec<String> = seen
        .requests()
        .iter()
        .filter(|r| r.is_data_get())
        .map(|r| r.header("range").unwrap().to_string())
        .collect();
    let last = size / PIECE * PIECE;
    assert_eq!(
        ranges,
        vec![
            format!("bytes={PIECE}-{}", 5 * PIECE - 1),
            format!("bytes={last}-{}", size - 1)
        ]
    );
}

#[test]
fn the_policy_decides_what_a_layer_without_a_table_does() {
    let Some(h) = Honest::push() else { return };
    let honest = h.lsmt();
    let url = repo_url(&h.reg.url());
    let opts = support::client_opts(5_000);
    let dir = tempfile::tempdir().unwrap();
    let src = |p| RegistrySource::new(&service(dir.path(), p, opts.clone())).unwrap();

    // required: no table, no open (a typed error naming the layer).
    let e = src(VerifyPolicy::Required)
        .open(LayerRef {
            index: 0,
            lower: &h.lower(false),
            repo_blob_url: &url,
            base_dir: None,
            download: None,
        })
        .err()
        .expect("refused");
    assert!(
        matches!(&e, overlaybd_core::Error::Verify { blob, .. } if *blob == h.digest),
        "{e}"
    );
    assert!(e.to_string().contains("required"), "{e}");
    // required with the table, if-present and off without: read.
    assert!(open_and_read(&src(VerifyPolicy::Required), &url, &h.lower(true)).unwrap() == honest);
    assert!(open_and_read(&src(VerifyPolicy::IfPresent), &url, &h.lower(false)).unwrap() == honest);
    assert!(open_and_read(&src(VerifyPolicy::Off), &url, &h.lower(true)).unwrap() == honest);

    // A table that is not this blob's, or a digest that is not the table's:
    // the layer does not open (no silent fall back to unchecked reads).
    let other = PieceTable::build(&h.data[..1000], PIECE).unwrap().encode();
    let other_url = h.reg.push_blob(REPO, &other);
    let mut l = h.lower(true);
    l.verity = Some(Verity {
        digest: support::digest_of(&other_url),
        size: other.len() as u64,
    });
    let e = open_and_read(&src(VerifyPolicy::IfPresent), &url, &l).unwrap_err();
    assert!(e.contains("describes blob"), "{e}");
    let mut l = h.lower(true);
    l.verity.as_mut().unwrap().digest = format!("sha256:{}", "0".repeat(64));
    let e = open_and_read(&src(VerifyPolicy::IfPresent), &url, &l).unwrap_err();
    assert!(e.contains("piece table"), "{e}");
    // A size no table of this blob can have is refused before any fetch.
    let mut l = h.lower(true);
    l.verity.as_mut().unwrap().size = 1 << 40;
    let e = open_and_read(&src(VerifyPolicy::IfPresent), &url, &l).unwrap_err();
    assert!(e.contains("at most"), "{e}");
}
