//! Streamed bulk fetches ([`RemoteBlob::stream_into_cache`], what a
//! whole-image flatten's read-ahead uses) against a real `docker-registry`
//! behind a scriptable front: a run of units is one request whose units go
//! to the cache and to waiting readers as they arrive; a stream that breaks
//! off or carries wrong bytes is taken over by ranged reads, so readers get
//! the blob's exact bytes and the cache holds nothing else; unverified bytes
//! stay in their origin's cache scope. In pass-through mode the units go to
//! the readers through memory instead, and only what no reader takes in
//! time goes to the cache.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use obd_remote::blob::{PassThrough, RemoteBlob, RemoteOptions};
use obd_remote::cache::{BlockCache, CacheOptions};
use obd_remote::registry::RegistryClient;
use obd_remote::sched::Scheduler;
use obd_remote::verity::PieceTable;
use obd_remote::{BlobRef, Priority, RangeFetcher};
use support::http::{Action, Fault, Req, Resp, Server};
use support::Registry;
use zfile::ReadAt;

const REPO: &str = "obd/stream";
const UNIT: u64 = 256 << 10;
const PIECE: u64 = 64 << 10;
/// 13 units, the last one short.
const LEN: usize = (3 << 20) + 12_345;

/// The blob in a registry, with its piece table.
struct Blob {
    reg: Registry,
    data: Vec<u8>,
    digest: String,
    table: Arc<PieceTable>,
}

fn push() -> Option<Blob> {
    let reg = Registry::start()?;
    let data = support::pattern(LEN, 3);
    let digest = support::digest_of(&reg.push_blob(REPO, &data));
    let table = Arc::new(PieceTable::build(&data[..], PIECE).unwrap());
    Some(Blob {
        reg,
        data,
        digest,
        table,
    })
}

/// The length of a ranged GET (0 for none).
fn range_len(r: &Req) -> u64 {
    let Some((a, b)) = r
        .header("range")
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
    else {
        return 0;
    };
    b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1
}

/// A data GET of the blob longer than one unit: a stream.
fn is_stream(r: &Req, digest: &str) -> bool {
    r.is_data_get() && r.target.ends_with(digest) && range_len(r) > UNIT
}

/// A 206 for `r`'s range with the bytes of `data`.
fn reply(r: &Req, data: &[u8]) -> Action {
    let (a, b) = r
        .header("range")
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .unwrap();
    let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
    Action::Reply(
        Resp::new(206)
            .with_header("Content-Range", &format!("bytes {a}-{b}/{}", data.len()))
            .with_body(data[a..=b].to_vec()),
    )
}

/// The blob with bytes from the middle on changed (same length).
fn forged(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    for b in &mut out[LEN / 2..] {
        *b ^= 0x5a;
    }
    out
}

/// A `RemoteBlob` of the blob at `url` (256 KiB units), cached in `dir`,
/// checked against the piece table when `verified`.
fn remote(
    b: &Blob,
    url: &str,
    fetcher: Arc<dyn RangeFetcher>,
    dir: &Path,
    verified: bool,
) -> RemoteBlob {
    let mut blob = BlobRef::new(
        format!("{url}/v2/{REPO}/blobs/{}", b.digest),
        b.digest.clone(),
        LEN as u64,
    );
    if verified {
        blob.verity = Some(b.table.clone());
    }
    let cache = BlockCache::open(CacheOptions::new(dir)).unwrap();
    let opts = RemoteOptions {
        min_fetch: UNIT,
        max_request: UNIT,
    };
    RemoteBlob::new(blob, fetcher, cache, Arc::new(Scheduler::new(4)), opts).unwrap()
}

fn client() -> Arc<RegistryClient> {
    Arc::new(RegistryClient::new(support::client_opts(5_000)).unwrap())
}

/// A fetcher with no network: a read through it succeeds only from the cache.
struct Offline;

impl RangeFetcher for Offline {
    fn fetch(
        &self,
        b: &BlobRef,
        offset: u64,
        len: u64,
        _p: Priority,
    ) -> overlaybd_core::Result<Vec<u8>> {
        Err(overlaybd_core::Error::Remote {
            url: b.url.clone(),
            offset,
            end: offset + len,
            detail: "offline".into(),
        })
    }
    fn blob_size(&self, _url: &str) -> overlaybd_core::Result<u64> {
        Ok(LEN as u64)
    }
}

/// How many units of the blob the cache in `dir` serves to a reader of
/// origin `url`; each one served must be the blob's exact bytes.
fn cached_units(b: &Blob, url: &str, dir: &Path, verified: bool) -> usize {
    let rb = remote(b, url, Arc::new(Offline), dir, verified);
    let mut n = 0;
    for at in (0..LEN as u64).step_by(UNIT as usize) {
        let len = UNIT.min(LEN as u64 - at) as usize;
        let mut buf = vec![0u8; len];
        if rb.read_exact_at(&mut buf, at).is_ok() {
            assert!(
                buf == b.data[at as usize..at as usize + len],
                "wrong cached bytes at {at}"
            );
            n += 1;
        }
    }
    n
}

fn read_all(rb: &RemoteBlob) -> Vec<u8> {
    let mut out = vec![0u8; LEN];
    for (k, chunk) in out.chunks_mut(64 << 10).enumerate() {
        rb.read_exact_at(chunk, (k as u64) * (64 << 10)).unwrap();
    }
    out
}

/// A front that forwards every request to the blob's registry.
fn forwarding(b: &Blob) -> Server {
    let up = b.reg.addr.clone();
    Server::start(move |_: &Req| Action::Forward(up.clone()))
}

fn data_gets(s: &Server, digest: &str) -> usize {
    s.count(|r| r.is_data_get() && r.target.ends_with(digest))
}

#[test]
fn a_run_is_one_request_whose_units_reach_waiting_readers_and_the_cache() {
    let Some(b) = push() else { return };
    let front = forwarding(&b);
    let dir = tempfile::tempdir().unwrap();
    let rb = remote(&b, &front.url(), client(), dir.path(), false);
    std::thread::scope(|s| {
        let stream = s.spawn(|| rb.stream_into_cache(0, LEN as u64, Priority::Prefetch));
        // Once the request is out, every unit is the stream's: readers
        // wait for it instead of asking themselves.
        let deadline = Instant::now() + Duration::from_secs(10);
        while front.count(|r| is_stream(r, &b.digest)) == 0 && !stream.is_finished() {
            assert!(Instant::now() < deadline, "no streamed request");
            std::thread::yield_now();
        }
        let readers: Vec<_> = (0..3).map(|_| s.spawn(|| read_all(&rb))).collect();
        for r in readers {
            assert!(r.join().unwrap() == b.data);
        }
        stream.join().unwrap().unwrap();
    });
    assert_eq!(data_gets(&front, &b.digest), 1);
    assert_eq!(front.count(|r| is_stream(r, &b.digest)), 1);
    assert_eq!(rb.stats().fetched_bytes, LEN as u64);
    assert_eq!(cached_units(&b, &front.url(), dir.path(), false), 13);
    // Nothing left to stream: no request.
    rb.stream_into_cache(0, LEN as u64, Priority::Prefetch)
        .unwrap();
    assert_eq!(data_gets(&front, &b.digest), 1);
}

#[test]
fn a_stream_that_breaks_off_is_finished_by_ranged_reads() {
    let Some(b) = push() else { return };
    for fault in [Fault::Truncate, Fault::ResetMidBody] {
        let (up, digest) = (b.reg.addr.clone(), b.digest.clone());
        let f = fault.clone();
        let front = Server::start(move |r: &Req| match is_stream(r, &digest) {
            true => Action::Faulty(up.clone(), f.clone()),
            false => Action::Forward(up.clone()),
        });
        for verified in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let rb = remote(&b, &front.url(), client(), dir.path(), verified);
            let before = data_gets(&front, &b.digest);
            rb.stream_into_cache(0, LEN as u64, Priority::Prefetch)
                .unwrap_or_else(|e| panic!("{fault:?}: {e}"));
            let gets = data_gets(&front, &b.digest) - before;
            // The stream, then one ranged read per unit it did not deliver
            // (about half of them).
            assert!((2..=13).contains(&(gets - 1)), "{fault:?}: {gets} requests");
            assert_eq!(rb.stats().errors, 1, "{fault:?}");
            assert!(read_all(&rb) == b.data, "{fault:?}");
            assert_eq!(data_gets(&front, &b.digest) - before, gets, "{fault:?}");
            assert_eq!(cached_units(&b, &front.url(), dir.path(), verified), 13);
        }
    }
}

#[test]
fn wrong_bytes_in_a_stream_fail_the_piece_table_and_are_fetched_again() {
    let Some(b) = push() else { return };
    let (up, digest, fake) = (b.reg.addr.clone(), b.digest.clone(), forged(&b.data));
    let front = Server::start(move |r: &Req| match is_stream(r, &digest) {
        true => reply(r, &fake),
        false => Action::Forward(up.clone()),
    });
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let rb = remote(&b, &front.url(), c.clone(), dir.path(), true);
    rb.stream_into_cache(0, LEN as u64, Priority::Prefetch)
        .unwrap();
    assert_eq!(c.stats(&rb.blob().url).verify_failures, 1);
    assert!(read_all(&rb) == b.data);
    assert_eq!(cached_units(&b, &front.url(), dir.path(), true), 13);
}

#[test]
fn a_source_that_always_lies_gives_an_error_and_caches_only_checked_bytes() {
    let Some(b) = push() else { return };
    let (up, digest, fake) = (b.reg.addr.clone(), b.digest.clone(), forged(&b.data));
    let front =
        Server::start(
            move |r: &Req| match r.is_data_get() && r.target.ends_with(&digest) {
                true => reply(r, &fake),
                false => Action::Forward(up.clone()),
            },
        );
    let dir = tempfile::tempdir().unwrap();
    let rb = remote(&b, &front.url(), client(), dir.path(), true);
    let e = rb
        .stream_into_cache(0, LEN as u64, Priority::Prefetch)
        .unwrap_err()
        .to_string();
    assert!(e.contains("verification") && e.contains(&b.digest), "{e}");
    // The honest first half is kept; nothing of the forged half is.
    let kept = cached_units(&b, &front.url(), dir.path(), true);
    assert_eq!(kept, LEN / 2 / UNIT as usize);
}

#[test]
fn unverified_streamed_bytes_stay_in_their_origin_scope() {
    let Some(b) = push() else { return };
    let front = forwarding(&b);
    let dir = tempfile::tempdir().unwrap();
    let rb = remote(&b, &front.url(), client(), dir.path(), false);
    rb.stream_into_cache(0, LEN as u64, Priority::Prefetch)
        .unwrap();
    drop(rb);
    assert_eq!(cached_units(&b, &front.url(), dir.path(), false), 13);
    // Another registry serving the same digest sees none of them.
    assert_eq!(cached_units(&b, &b.reg.url(), dir.path(), false), 0);
}

/// Reads the blob as a flatten does: `n` readers at once, each reading its
/// own 64 KiB chunks (chunk k by reader k % n) in order.
fn read_split(rb: &RemoteBlob, n: usize) -> Vec<u8> {
    const CHUNK: usize = 64 << 10;
    let parts: Vec<Vec<(usize, Vec<u8>)>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                s.spawn(move || {
                    (0..LEN.div_ceil(CHUNK))
                        .filter(|k| k % n == i)
                        .map(|k| {
                            let at = k * CHUNK;
                            let mut buf = vec![0u8; CHUNK.min(LEN - at)];
                            rb.read_exact_at(&mut buf, at as u64).unwrap();
                            (at, buf)
                        })
                        .collect()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut out = vec![0u8; LEN];
    for (at, buf) in parts.into_iter().flatten() {
        out[at..at + buf.len()].copy_from_slice(&buf);
    }
    out
}

/// A window of two units ahead, which the 13-unit blob overruns.
fn window(idle: Duration) -> Option<PassThrough> {
    Some(PassThrough {
        ahead: 2 * UNIT,
        behind: LEN as u64,
        idle,
    })
}

#[test]
fn pass_through_hands_streamed_units_to_readers_and_caches_none_of_them() {
    let Some(b) = push() else { return };
    let front = forwarding(&b);
    for verified in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let rb = remote(&b, &front.url(), client(), dir.path(), verified)
            .with_pass_through(window(Duration::from_secs(60)));
        let before = data_gets(&front, &b.digest);
        std::thread::scope(|s| {
            let stream = s.spawn(|| rb.stream_into_cache(0, LEN as u64, Priority::Prefetch));
            let deadline = Instant::now() + Duration::from_secs(10);
            while front.count(|r| is_stream(r, &b.digest)) == before && !stream.is_finished() {
                assert!(Instant::now() < deadline, "no streamed request");
                std::thread::yield_now();
            }
            // The stream waits for the readers two units ahead of them,
            // the whole way.
            assert!(read_split(&rb, 2) == b.data, "verified: {verified}");
            stream.join().unwrap().unwrap();
        });
        assert_eq!(data_gets(&front, &b.digest) - before, 1);
        assert_eq!(rb.stats().fetched_bytes, LEN as u64);
        assert_eq!(cached_units(&b, &front.url(), dir.path(), verified), 0);
    }
}

#[test]
fn a_pass_through_stream_nobody_reads_caches_what_it_cannot_hold() {
    let Some(b) = push() else { return };
    let front = forwarding(&b);
    let dir = tempfile::tempdir().unwrap();
    let rb = remote(&b, &front.url(), client(), dir.path(), false)
        .with_pass_through(window(Duration::from_millis(50)));
    // Units 0 and 1 are held; the stream waits for readers before unit 2,
    // none read, so it caches units 2 to 12 and ends.
    rb.stream_into_cache(0, LEN as u64, Priority::Prefetch)
        .unwrap();
    assert_eq!(cached_units(&b, &front.url(), dir.path(), false), 11);
    // A reader then gets all of it without another request.
    assert!(read_all(&rb) == b.data);
    assert_eq!(data_gets(&front, &b.digest), 1);
    assert_eq!(rb.stats().fetched_bytes, LEN as u64);
    // A held unit found corrupt is dropped: the next read fetches it.
    let dir2 = tempfile::tempdir().unwrap();
    let rb2 = remote(&b, &front.url(), client(), dir2.path(), false)
        .with_pass_through(window(Duration::from_millis(50)));
    rb2.stream_into_cache(0, 2 * UNIT, Priority::Prefetch)
        .unwrap();
    assert_eq!(data_gets(&front, &b.digest), 2);
    assert!(rb2.invalidate(0, 1));
    let mut buf = vec![0u8; UNIT as usize];
    rb2.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == b.data[..UNIT as usize]);
    assert_eq!(data_gets(&front, &b.digest), 3);
    assert_eq!(rb2.stats().fetched_bytes, 3 * UNIT);
}
