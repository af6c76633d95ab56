//! [`RemoteBlob`]: a remote blob as a [`ReadAt`], backed by the block cache.
//!
//! A read is served from the [`BlockCache`] when every byte of it is cached.
//! Otherwise the read is split into *fetch units* (`min_fetch`-aligned ranges,
//! 256 KiB by default, upstream's `refillSize`); units already cached are read
//! from the cache, the missing ones are fetched through the [`RangeFetcher`]
//! (less the cache blocks at a request's ends that are cached already):
//! - consecutive missing units of one read are merged into one request of at
//!   most `max_request` bytes (4 MiB by default); the requests of a larger
//!   read run in parallel, up to the scheduler's limit;
//! - **single flight**: a unit being fetched by another thread (through this
//!   or any other `RemoteBlob` of the same digest and cache) is not fetched
//!   again; the reader waits for that request and shares its bytes (or
//!   error), raising its priority if the reader is more urgent — except a
//!   long, less urgent exact request (trace prefetch): a reader fetches its
//!   unit itself rather than wait for all of it;
//! - requests are admitted by the [`Scheduler`]: foreground reads at
//!   [`Priority::Foreground`], [`RemoteBlob::prefetch`] at
//!   [`Priority::Prefetch`], [`RemoteBlob::fetch_into_cache`] at any;
//! - fetched bytes are written to the cache, then copied to the caller
//!   straight from the fetch buffer (so a read succeeds even when the cache
//!   cannot keep the data);
//! - pass-through ([`RemoteBlob::with_pass_through`], a flatten's
//!   read-ahead): streamed units are held in memory until the readers have
//!   taken them, instead of being written to the cache and read back.
//!
//! Self-healing: [`ReadAt::invalidate`] evicts the covering cache blocks, so a
//! ZFile reader that finds a corrupt block (bad CRC, undecodable) re-reads it
//! from the registry (up to 3 tries, in `zfile`); [`RemoteBlob::retry_open`]
//! does the same for metadata parsed at open (tar/ZFile header, jump table,
//! LSMT index). Errors from the fetcher reach `read_at` callers as an
//! `io::Error` carrying [`Error::Remote`] (URL and range).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use zfile::ReadAt;

use super::cache::{BlockCache, CachedBlob};
use super::sched::{PrioCell, Scheduler};
use super::{BlobRef, Priority, RangeFetcher, UnitSink};
use overlaybd_core::error::{Error, Result};
use zfile::sync::{recover, MutexExt};

/// Default minimum (and alignment of every) remote request: 256 KiB, upstream's
/// `refillSize`.
pub const DEFAULT_MIN_FETCH: u64 = 256 << 10;
/// Default largest single remote request: 4 MiB.
pub const DEFAULT_MAX_REQUEST: u64 = 4 << 20;

/// Request shaping of a [`RemoteBlob`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteOptions {
    /// A read's request covers whole multiples of this, aligned (except at
    /// the end of the blob), less the whole cache blocks at either end that
    /// are cached already (exact fetches, [`RemoteBlob::fetch_exact`], leave
    /// such blocks). Must be a multiple of the cache block size. Default
    /// [`DEFAULT_MIN_FETCH`] (256 KiB).
    pub min_fetch: u64,
    /// Upper bound of one request; rounded down to a multiple of `min_fetch`
    /// (at least one unit). Default [`DEFAULT_MAX_REQUEST`] (4 MiB).
    pub max_request: u64,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            min_fetch: DEFAULT_MIN_FETCH,
            max_request: DEFAULT_MAX_REQUEST,
        }
    }
}

/// Tries of [`RemoteBlob::retry_open`] (the first included).
pub const OPEN_TRIES: u32 = 3;

/// Whether `e` is (or wraps, or carries as an I/O payload) a remote fetch
/// failure.
fn is_remote(e: &Error) -> bool {
    fn io_remote(e: &io::Error) -> bool {
        e.get_ref()
            .and_then(|x| x.downcast_ref::<Error>())
            .is_some_and(is_remote)
    }
    match e {
        Error::Remote { .. } | Error::Auth { .. } => true,
        Error::InFile { inner, .. } | Error::InLayer { inner, .. } => is_remote(inner),
        Error::Io(io) => io_remote(io),
        Error::ZFile(zfile::Error::Io(io)) => io_remote(io),
        _ => false,
    }
}

/// Counters of one [`RemoteBlob`] (since it was created).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// Reads and prefetches asked for.
    pub loads: u64,
    /// Of those, served entirely from the cache without a request.
    pub cache_hits: u64,
    /// Remote requests made.
    pub requests: u64,
    /// Bytes received from those requests.
    pub fetched_bytes: u64,
    /// Units a reader got by joining another reader's request.
    pub joined: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Ranges dropped through [`ReadAt::invalidate`] (corrupt data).
    pub invalidations: u64,
}

#[derive(Debug, Default)]
struct Counters {
    loads: AtomicU64,
    cache_hits: AtomicU64,
    requests: AtomicU64,
    fetched_bytes: AtomicU64,
    joined: AtomicU64,
    errors: AtomicU64,
    invalidations: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Outcome of one request: `(request offset, bytes)` or the error.
type FlightResult = std::result::Result<(u64, Arc<Vec<u8>>), Arc<Error>>;

/// One in-progress request; readers of any of its units wait on it.
#[derive(Debug)]
struct Flight {
    done: Mutex<Option<FlightResult>>,
    cv: Condvar,
    /// Raised by more urgent readers joining while the request is queued.
    prio: PrioCell,
    /// The scheduler the request is queued in (to nudge after a raise).
    sched: Arc<Scheduler>,
    /// The priority the request was made at.
    origin: Priority,
    /// Bytes the request covers (grows while its leader plans it).
    span: AtomicU64,
    /// A streamed request ([`RemoteBlob::stream_into_cache`]).
    streamed: AtomicBool,
}

/// The in-flight table of one blob.
type FlightMap = Mutex<HashMap<(u64, u64), Arc<Flight>>>;

impl Flight {
    fn new(prio: Priority, sched: &Arc<Scheduler>, span: u64) -> Arc<Self> {
        Arc::new(Flight {
            done: Mutex::new(None),
            cv: Condvar::new(),
            prio: PrioCell::new(prio),
            sched: Arc::clone(sched),
            origin: prio,
            span: AtomicU64::new(span),
            streamed: AtomicBool::new(false),
        })
    }

    /// Whether a reader at `prio` should fetch a `unit`-byte unit itself
    /// rather than wait for this request: one made at a lower priority and
    /// more than two units long takes a share of the link several times as
    /// long as the reader's own request would.
    fn too_slow_for(&self, prio: Priority, unit: u64) -> bool {
        prio < self.origin && self.span.load(Ordering::Relaxed) > 2 * unit
    }

    fn wait(&self) -> FlightResult {
        let mut g = self.done.locked();
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = recover(self.cv.wait(g));
        }
    }
}

/// What one read does for each of its units.
enum Unit {
    /// Copied from the cache (or the held units) already.
    Cached,
    /// Fetched by this reader, in its request number `usize`.
    Lead(usize),
    /// Fetched by someone else.
    Wait(Arc<Flight>),
    /// Partly being fetched by exact requests ([`RemoteBlob::fetch_exact`],
    /// cache-block keys): wait for them, then read the unit again.
    Parts(Vec<Arc<Flight>>),
}

/// One read being served ([`RemoteBlob::load`]): `[offset, end)` at `prio`,
/// how each of its units is served (from the first unit on), and the
/// requests it leads.
struct Plan<'a> {
    offset: u64,
    end: u64,
    prio: Priority,
    /// Wait for exact requests covering part of a unit ([`Unit::Parts`]).
    parts: bool,
    units: Vec<Unit>,
    leads: Vec<Lead<'a>>,
}

impl Plan<'_> {
    /// The part of the unit `[us, ue)` this read covers.
    fn part(&self, (us, ue): (u64, u64)) -> (u64, u64) {
        (us.max(self.offset), ue.min(self.end))
    }
}

/// A request this reader leads; publishes an error if dropped unfinished (a
/// panicking fetcher), so waiters never hang.
struct Lead<'a> {
    blob: &'a RemoteBlob,
    /// Size of the units in `units` (the in-flight keys): `min_fetch`, or the
    /// cache block size for an exact request.
    unit: u64,
    offset: u64,
    len: u64,
    units: Vec<u64>,
    flight: Arc<Flight>,
    result: OnceLock<FlightResult>,
}

impl<'a> Lead<'a> {
    /// A request for unit `key.1` (units of `key.0` bytes) spanning
    /// `[s, e)`, entered in the in-flight `map`.
    fn start(
        blob: &'a RemoteBlob,
        map: &mut HashMap<(u64, u64), Arc<Flight>>,
        key: (u64, u64),
        (s, e): (u64, u64),
        prio: Priority,
    ) -> Self {
        let flight = Flight::new(prio, &blob.sched, e - s);
        map.insert(key, Arc::clone(&flight));
        Lead {
            blob,
            unit: key.0,
            offset: s,
            len: e - s,
            units: vec![key.1],
            flight,
            result: OnceLock::new(),
        }
    }

    /// Adds the next unit `u`, ending at `e`, to the request.
    fn extend(&mut self, map: &mut HashMap<(u64, u64), Arc<Flight>>, u: u64, e: u64) {
        map.insert((self.unit, u), Arc::clone(&self.flight));
        self.units.push(u);
        self.len = e - self.offset;
        self.flight.span.store(self.len, Ordering::Relaxed);
    }

    /// Records the outcome, wakes the waiters and clears the in-flight entries.
    fn publish(&self, r: FlightResult) {
        if self.result.set(r.clone()).is_err() {
            return;
        }
        *self.flight.done.locked() = Some(r);
        self.flight.cv.notify_all();
        let mut map = self.blob.lock_inflight();
        for &u in &self.units {
            let key = (self.unit, u);
            if map.get(&key).is_some_and(|f| Arc::ptr_eq(f, &self.flight)) {
                map.remove(&key);
            }
        }
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if self.result.get().is_none() {
            let e = self.blob.remote_err(
                self.offset,
                self.len,
                "fetch abandoned (the fetching thread panicked)".into(),
            );
            self.publish(Err(Arc::new(e)));
        }
    }
}

/// A remote blob, read through the block cache; a [`ReadAt`].
pub struct RemoteBlob {
    blob: BlobRef,
    fetcher: Arc<dyn RangeFetcher>,
    cache: Arc<BlockCache>,
    cached: Arc<CachedBlob>,
    sched: Arc<Scheduler>,
    unit: u64,
    max_units: u64,
    /// (unit size, unit index) → request fetching it; shared by every
    /// RemoteBlob of this digest (through [`CachedBlob::shared`]).
    inflight: Arc<FlightMap>,
    counters: Counters,
    /// Unit buffers of streamed fetches, reused once no reader holds them.
    pool: Mutex<Vec<Arc<Vec<u8>>>>,
    /// Pass-through: streamed units are held here for the readers instead
    /// of being written to the cache ([`RemoteBlob::with_pass_through`]).
    held: Option<Held>,
}

/// Unit buffers a [`RemoteBlob`] keeps for reuse by streamed fetches.
const POOL_BUFFERS: usize = 4;

/// The window of a pass-through [`RemoteBlob`]
/// ([`RemoteBlob::with_pass_through`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassThrough {
    /// How far ahead of the furthest unit its readers want a stream may
    /// hold units. Default 32 MiB.
    pub ahead: u64,
    /// How far behind that unit held units are kept for slower readers.
    /// Default 32 MiB.
    pub behind: u64,
    /// How long a stream waits for room while its readers read nothing of
    /// the blob; then it stops waiting and caches the rest of its run (the
    /// readers are done, or stuck elsewhere). Default 50 ms.
    pub idle: Duration,
}

impl Default for PassThrough {
    fn default() -> Self {
        PassThrough {
            ahead: 32 << 20,
            behind: 32 << 20,
            idle: Duration::from_millis(50),
        }
    }
}

/// The streamed units a pass-through [`RemoteBlob`] holds in memory for its
/// readers, from [`PassThrough::behind`] behind the furthest streamed unit
/// readers have asked for (the *front*) to [`PassThrough::ahead`] ahead of
/// it: a stream waits before holding a unit further ahead. A unit leaves
/// once readers have copied as many bytes out of it as it has, or when the
/// front has moved `behind` past it (a one-pass reader has moved on; what
/// it skipped is data later layers replace, or a late reader fetches it
/// again).
struct Held {
    state: Mutex<HeldState>,
    /// Signalled when the front moves.
    moved: Condvar,
    /// The window in units (at least 1 each way).
    ahead: u64,
    behind: u64,
    idle: Duration,
}

#[derive(Default)]
struct HeldState {
    units: BTreeMap<u64, HeldUnit>,
    front: u64,
    /// Reads of streamed units so far (progress, for a waiting stream).
    reads: u64,
}

struct HeldUnit {
    data: Arc<Vec<u8>>,
    /// Bytes not read yet.
    left: u64,
}

/// Bytes the pass-through blobs of this process hold at most together
/// (their windows bound each blob; this bounds an image of many layers). A
/// stream holds no unit past it: the unit goes to the cache.
pub const HELD_MAX: u64 = 256 << 20;

/// Bytes held now by every pass-through blob of the process.
static HELD_TOTAL: AtomicU64 = AtomicU64::new(0);

impl HeldUnit {
    /// `data`, counted in [`HELD_TOTAL`]; `None` when that would pass
    /// [`HELD_MAX`].
    fn new(data: &Arc<Vec<u8>>) -> Option<Self> {
        let n = data.len() as u64;
        if HELD_TOTAL.fetch_add(n, Ordering::AcqRel) + n > HELD_MAX {
            HELD_TOTAL.fetch_sub(n, Ordering::AcqRel);
            return None;
        }
        Some(HeldUnit {
            data: Arc::clone(data),
            left: n,
        })
    }
}

impl Drop for HeldUnit {
    fn drop(&mut self) {
        HELD_TOTAL.fetch_sub(self.data.len() as u64, Ordering::AcqRel);
    }
}

impl Held {
    fn new(p: PassThrough, unit: u64) -> Self {
        Held {
            state: Mutex::new(HeldState::default()),
            moved: Condvar::new(),
            ahead: (p.ahead / unit).max(1),
            behind: (p.behind / unit).max(1),
            idle: p.idle,
        }
    }

    /// The held unit `u`, if any.
    fn get(&self, u: u64) -> Option<Arc<Vec<u8>>> {
        let g = self.state.locked();
        g.units.get(&u).map(|x| Arc::clone(&x.data))
    }

    /// Holds unit `u` once it is less than `ahead` units past the front,
    /// waiting while readers make progress, unless `no_wait`; false (not
    /// held) when readers read nothing for `idle`, which also sets
    /// `no_wait`, or when the process holds [`HELD_MAX`] already.
    fn put(&self, u: u64, data: &Arc<Vec<u8>>, no_wait: &mut bool) -> bool {
        let mut g = self.state.locked();
        let mut seen = g.reads;
        let mut deadline = Instant::now() + self.idle;
        while u >= g.front + self.ahead {
            if *no_wait {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                if g.reads == seen {
                    *no_wait = true;
                    return false;
                }
                seen = g.reads;
                deadline = now + self.idle;
            }
            g = recover(self.moved.wait_timeout(g, deadline - now)).0;
        }
        // Readers moved past it already: not held (it goes to the cache).
        if u + self.behind < g.front {
            return false;
        }
        let Some(unit) = HeldUnit::new(data) else {
            return false;
        };
        g.units.insert(u, unit);
        true
    }

    /// A reader wants streamed unit `u` (held or being streamed): the front
    /// moves up to it, releasing what falls too far behind.
    fn want(&self, u: u64) {
        let mut g = self.state.locked();
        g.reads += 1;
        if u > g.front {
            g.front = u;
            let keep = u.saturating_sub(self.behind);
            g.units.retain(|&k, _| k >= keep);
            self.moved.notify_all();
        }
    }

    /// Drops the held units `first..=last` (their bytes were found corrupt:
    /// the next read fetches them again).
    fn forget(&self, first: u64, last: u64) {
        self.state
            .locked()
            .units
            .retain(|&k, _| k < first || k > last);
    }

    /// Counts `n` bytes read out of unit `u` (when `data` is the held one):
    /// a unit read whole leaves.
    fn read(&self, u: u64, data: &Arc<Vec<u8>>, n: u64) {
        let mut g = self.state.locked();
        let Some(x) = g.units.get_mut(&u).filter(|x| Arc::ptr_eq(&x.data, data)) else {
            return;
        };
        x.left = x.left.saturating_sub(n);
        if x.left == 0 {
            g.units.remove(&u);
        }
    }
}

/// The [`UnitSink`] of one streamed run of units: each unit that arrives is
/// inserted into the cache (or held, pass-through) and handed to the readers
/// waiting for it.
struct Deliver<'r, 'a> {
    blob: &'a RemoteBlob,
    /// The run's requests, one per unit; `None` once published.
    run: &'r mut [Option<Lead<'a>>],
    /// Pass-through: a wait for room timed out, so the rest of the run
    /// does not wait (readers are slow or done).
    no_wait: bool,
}

impl UnitSink for Deliver<'_, '_> {
    fn buffer(&mut self) -> Vec<u8> {
        let mut pool = self.blob.pool.locked();
        let free = pool.iter().position(|b| Arc::strong_count(b) == 1);
        free.and_then(|i| Arc::try_unwrap(pool.swap_remove(i)).ok())
            .unwrap_or_default()
    }

    fn unit(&mut self, offset: u64, bytes: Vec<u8>) -> bool {
        let b = self.blob;
        let slot = self
            .run
            .iter_mut()
            .find(|l| l.as_ref().is_some_and(|l| l.offset == offset));
        // Not ours (another process had it cached): skip it.
        let Some(slot) = slot else {
            return true;
        };
        let lead = slot.take().expect("found above");
        if bytes.len() as u64 != lead.len {
            *slot = Some(lead);
            return false;
        }
        bump(&b.counters.fetched_bytes, lead.len);
        let bytes = Arc::new(bytes);
        // Held (or cached) before the flight is published: a reader that
        // finds neither the flight nor the cache finds the unit here.
        let held = b.held.as_ref();
        let held = held.is_some_and(|h| h.put(offset / b.unit, &bytes, &mut self.no_wait));
        if !held {
            // A full or failing cache must not fail the read: the bytes are here.
            let _ = b.cache.insert(&b.cached, offset, &bytes);
        }
        {
            let mut pool = b.pool.locked();
            // Held units keep their buffers out of use: keep enough.
            let keep = POOL_BUFFERS + b.held.as_ref().map_or(0, |h| (h.ahead + h.behind) as usize);
            if pool.len() >= keep {
                pool.remove(0);
            }
            pool.push(Arc::clone(&bytes));
        }
        lead.publish(Ok((offset, bytes)));
        true
    }
}

impl std::fmt::Debug for RemoteBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteBlob")
            .field("blob", &self.blob)
            .field("min_fetch", &self.unit)
            .field("max_units", &self.max_units)
            .finish_non_exhaustive()
    }
}

impl RemoteBlob {
    /// A remote blob of `blob.size` bytes fetched by `fetcher`, cached in
    /// `cache`, with fetches admitted by `sched`.
    pub fn new(
        blob: BlobRef,
        fetcher: Arc<dyn RangeFetcher>,
        cache: Arc<BlockCache>,
        sched: Arc<Scheduler>,
        opts: RemoteOptions,
    ) -> Result<Self> {
        let bs = cache.block_size();
        if opts.min_fetch == 0 || opts.min_fetch % bs != 0 {
            return Err(Error::ServiceConfig {
                field: "remote.min_fetch".into(),
                detail: format!(
                    "{} is not a positive multiple of the cache block size {bs}",
                    opts.min_fetch
                ),
            });
        }
        let cached = cache.blob_scoped(&blob.digest, blob.size, blob.cache_scope().as_deref())?;
        let inflight = cached.shared::<FlightMap>();
        Ok(Self {
            unit: opts.min_fetch,
            max_units: (opts.max_request / opts.min_fetch).max(1),
            blob,
            fetcher,
            cache,
            cached,
            sched,
            inflight,
            counters: Counters::default(),
            pool: Mutex::new(Vec::new()),
            held: None,
        })
    }

    /// With a `window`, streamed units ([`RemoteBlob::stream_into_cache`])
    /// pass through memory instead of the cache: each is held for the
    /// readers until they have read it or moved past it, and a stream waits
    /// while it is [`PassThrough::ahead`] of them; a stream whose readers
    /// stop reading the blob caches the rest of its run instead. For a
    /// reader that reads the blob once, mostly in order (a flatten): it
    /// saves writing every byte to the cache and reading it back, and leaves
    /// the cache to what devices use. Bytes fetched any other way are cached
    /// as usual.
    pub fn with_pass_through(mut self, window: Option<PassThrough>) -> Self {
        self.held = window.map(|p| Held::new(p, self.unit));
        self
    }

    /// The held unit `u`, if any.
    fn held_unit(&self, u: u64) -> Option<Arc<Vec<u8>>> {
        self.held.as_ref()?.get(u)
    }

    /// Counts `n` bytes read out of unit `u` ([`Held::read`]).
    fn held_read(&self, u: u64, data: &Arc<Vec<u8>>, n: u64) {
        if let Some(h) = &self.held {
            h.read(u, data, n);
        }
    }

    /// Serves `[lo, hi)` of unit `u` from the held units: copies it to `out`
    /// (if given) and counts it read. False when `u` is not held.
    fn read_held(&self, u: u64, out: Option<&mut [u8]>, (lo, hi): (u64, u64)) -> bool {
        let Some(h) = &self.held else {
            return false;
        };
        let Some(data) = h.get(u) else {
            return false;
        };
        if let Some(buf) = out {
            h.want(u);
            let base = u * self.unit;
            buf.copy_from_slice(&data[(lo - base) as usize..(hi - base) as usize]);
            h.read(u, &data, hi - lo);
        }
        true
    }

    /// The blob.
    pub fn blob(&self) -> &BlobRef {
        &self.blob
    }

    /// The cache this blob is read through.
    pub fn cache(&self) -> &Arc<BlockCache> {
        &self.cache
    }

    /// Counters since creation.
    pub fn stats(&self) -> RemoteStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RemoteStats {
            loads: g(&c.loads),
            cache_hits: g(&c.cache_hits),
            requests: g(&c.requests),
            fetched_bytes: g(&c.fetched_bytes),
            joined: g(&c.joined),
            errors: g(&c.errors),
            invalidations: g(&c.invalidations),
        }
    }

    fn lock_inflight(&self) -> MutexGuard<'_, HashMap<(u64, u64), Arc<Flight>>> {
        self.inflight.locked()
    }

    fn remote_err(&self, offset: u64, len: u64, detail: String) -> Error {
        Error::Remote {
            url: self.blob.url.clone(),
            offset,
            end: offset + len,
            detail,
        }
    }

    /// The error a reader of `[offset, offset + len)` reports for a failed
    /// request: the fetcher's own `Remote` error, or one naming this range.
    fn share_err(&self, e: &Error, offset: u64, len: u64) -> Error {
        match e {
            Error::Remote {
                url,
                offset,
                end,
                detail,
            } => Error::Remote {
                url: url.clone(),
                offset: *offset,
                end: *end,
                detail: detail.clone(),
            },
            other => self.remote_err(offset, len, other.to_string()),
        }
    }

    /// Runs `open` (which parses structures of this blob, e.g. the tar header,
    /// ZFile header, trailer and jump table, or the LSMT index) up to
    /// [`OPEN_TRIES`] times. Between tries the blob's cached bytes are evicted,
    /// so metadata corrupted in the cache is fetched again instead of failing
    /// the layer for good (upstream evicts and retries a failed jump-table
    /// load, formats.md 3.9; its header region is never healed, OBD #239).
    /// Remote errors are returned at once (re-fetching would not help); when
    /// every try fails, [`Error::Integrity`] names the blob and the last
    /// failure.
    pub fn retry_open<T>(&self, mut open: impl FnMut() -> Result<T>) -> Result<T> {
        let mut tries = 0;
        loop {
            tries += 1;
            let e = match open() {
                Ok(t) => return Ok(t),
                Err(e) => e,
            };
            if is_remote(&e) {
                return Err(e);
            }
            if tries >= OPEN_TRIES {
                return Err(Error::Integrity {
                    what: self.blob.url.clone(),
                    offset: 0,
                    tries,
                    detail: e.to_string(),
                });
            }
            bump(&self.counters.invalidations, 1);
            if let Some(h) = &self.held {
                h.forget(0, u64::MAX);
            }
            self.cache.evict_in(&self.cached, 0, u64::MAX)?;
        }
    }

    /// Bytes of this blob in the host's block cache now.
    pub fn cached_bytes(&self) -> u64 {
        self.cache.cached_bytes(&self.cached)
    }

    /// Reads `buf.len()` bytes at `offset` (clamped to the blob); returns the
    /// count. Admitted at this thread's [`super::read_priority`]
    /// (foreground unless under [`super::with_read_priority`]).
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if offset >= self.blob.size || buf.is_empty() {
            return Ok(0);
        }
        let n = (self.blob.size - offset).min(buf.len() as u64) as usize;
        self.load(
            Some(&mut buf[..n]),
            offset,
            n as u64,
            super::read_priority(),
            true,
        )?;
        Ok(n)
    }

    /// Fetches `[offset, offset + len)` into the cache at
    /// [`Priority::Prefetch`], unless already cached or being fetched.
    pub fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        self.fetch_into_cache(offset, len, Priority::Prefetch)
    }

    /// Fetches the whole blob into the cache at [`Priority::Prefetch`],
    /// front to back, in requests of about `request` bytes (whole fetch
    /// units), `in_flight` at a time: for a blob a start will read in that
    /// order (a packed working set), fetched before its device exists.
    /// What is cached or in flight here or in another process sharing the
    /// cache is not fetched again.
    pub fn prefetch_in_order(&self, request: u64, in_flight: usize) -> Result<()> {
        let request = request.clamp(self.unit, self.max_units * self.unit) / self.unit * self.unit;
        let next = AtomicU64::new(0);
        let fetcher = || -> Result<()> {
            loop {
                let at = next.fetch_add(request, Ordering::Relaxed);
                if at >= self.blob.size {
                    return Ok(());
                }
                self.fetch_into_cache(at, request, Priority::Prefetch)?;
            }
        };
        std::thread::scope(|sc| {
            let hs: Vec<_> = (1..in_flight.max(1)).map(|_| sc.spawn(fetcher)).collect();
            let mut res = fetcher();
            for h in hs {
                let r = h.join().unwrap_or_else(|_| {
                    Err(Error::Io(std::io::Error::other("prefetch thread panicked")))
                });
                res = res.and(r);
            }
            res
        })
    }

    /// [`RemoteBlob::prefetch`] at any priority (e.g. `Background` for a
    /// whole-blob download).
    pub fn fetch_into_cache(&self, offset: u64, len: u64, prio: Priority) -> Result<()> {
        if offset >= self.blob.size || len == 0 {
            return Ok(());
        }
        let len = len.min(self.blob.size - offset);
        self.load(None, offset, len, prio, true)
    }

    /// [`RemoteBlob::fetch_into_cache`] for a reader that will read all of
    /// `[offset, offset + len)` in order (a whole-image flatten): each run of
    /// units neither cached nor being fetched comes in one streamed request
    /// ([`RangeFetcher::fetch_stream`]), and each unit, checked, goes into
    /// the cache and straight to the readers waiting for it, who need not
    /// read it back. Units a failed stream did not deliver are fetched by
    /// ranged requests, with their retries: readers see only checked bytes,
    /// and an error only when those requests fail too.
    pub fn stream_into_cache(&self, offset: u64, len: u64, prio: Priority) -> Result<()> {
        if offset >= self.blob.size || len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len).min(self.blob.size);
        bump(&self.counters.loads, 1);
        let bs = self.cache.block_size();
        let mut leads: Vec<Option<Lead<'_>>> = Vec::new();
        {
            let mut map = self.lock_inflight();
            for u in offset / self.unit..=(end - 1) / self.unit {
                let (s, e) = self.unit_range(u);
                let busy = map.contains_key(&(self.unit, u))
                    || (bs != self.unit
                        && (s / bs..=(e - 1) / bs).any(|i| map.contains_key(&(bs, i))))
                    || self.held_unit(u).is_some()
                    || self.cache.contains(&self.cached, s, e - s);
                if !busy {
                    let lead = Lead::start(self, &mut map, (self.unit, u), (s, e), prio);
                    lead.flight.streamed.store(true, Ordering::Relaxed);
                    leads.push(Some(lead));
                }
            }
        }
        if leads.is_empty() {
            bump(&self.counters.cache_hits, 1);
            return Ok(());
        }
        // One stream per run of adjacent units.
        let mut i = 0;
        while i < leads.len() {
            let mut j = i + 1;
            let adjacent = |a: &Option<Lead<'_>>, b: &Option<Lead<'_>>| match (a, b) {
                (Some(a), Some(b)) => a.offset + a.len == b.offset,
                _ => false,
            };
            while j < leads.len() && adjacent(&leads[j - 1], &leads[j]) {
                j += 1;
            }
            self.stream_run(&mut leads[i..j]);
            i = j;
        }
        // What the streams did not deliver: ranged requests.
        let rest: Vec<Lead<'_>> = leads.into_iter().flatten().collect();
        self.run_leads(&rest);
        for l in &rest {
            if let Some(Err(e)) = l.result.get() {
                return Err(self.share_err(e, offset, end - offset));
            }
        }
        Ok(())
    }

    /// Streams one run of adjacent units (`run`, all unpublished) and
    /// publishes each as it arrives; what it cannot deliver stays in `run`.
    fn stream_run<'a>(&'a self, run: &mut [Option<Lead<'a>>]) {
        let span = |run: &[Option<Lead<'_>>]| {
            let mut it = run.iter().flatten();
            let first = it.next().map(|l| l.offset)?;
            let last = run.iter().flatten().last().map(|l| l.offset + l.len)?;
            Some((first, last))
        };
        let Some((s, e)) = span(run) else {
            return;
        };
        // Host-wide single flight: what another process fetched meanwhile
        // comes from the cache.
        let _claim = self.cache.claim(&self.cached, s, e - s);
        for slot in run.iter_mut() {
            let Some(l) = slot.as_ref() else { continue };
            if !self.cache.contains(&self.cached, l.offset, l.len) {
                continue;
            }
            let mut have = vec![0u8; l.len as usize];
            if let Ok(true) = self.cache.read(&self.cached, &mut have, l.offset) {
                let l = slot.take().expect("checked");
                l.publish(Ok((l.offset, Arc::new(have))));
            }
        }
        let Some((s, e)) = span(run) else {
            return;
        };
        let first = run.iter().flatten().next().expect("span");
        let prio = Arc::clone(&first.flight);
        bump(&self.counters.requests, 1);
        let log = super::timeline::enabled();
        let t_ask = log.then(super::timeline::now_us);
        let permit = self.sched.acquire_dyn(&prio.prio);
        let t_go = log.then(super::timeline::now_us);
        let p = permit.priority();
        let mut sink = Deliver {
            blob: self,
            run,
            no_wait: false,
        };
        let r = self
            .fetcher
            .fetch_stream(&self.blob, (s, e - s, self.unit), p, &mut sink);
        drop(permit);
        if e == self.blob.size {
            // The blob's last run: buffers no reader holds are not needed.
            self.pool.locked().retain(|b| Arc::strong_count(b) > 1);
        }
        if let (Some(a), Some(g)) = (t_ask, t_go) {
            self.log_fetch((s, e - s, p), (a, g), r.is_ok());
        }
        if let Err(e) = r {
            bump(&self.counters.errors, 1);
            tracing::debug!(blob = %self.blob.url, "streamed read failed, ranged reads take over: {e}");
        }
    }

    /// One line of the fetch timeline ([`super::timeline`]).
    fn log_fetch(
        &self,
        (offset, len, p): (u64, u64, Priority),
        (asked, granted): (u128, u128),
        ok: bool,
    ) {
        super::timeline::line(&format!(
            "{} {offset} {len} {p:?} {asked} {granted} {} {ok}",
            self.blob.digest,
            super::timeline::now_us(),
        ));
    }

    /// Fetches into the cache exactly the cache blocks covering
    /// `[offset, offset + len)` that are neither cached nor being fetched, at
    /// `prio`, without rounding to `min_fetch`: each run of consecutive
    /// missing blocks is one request of at most `max_request` bytes. For
    /// trace-guided prefetch, which knows the compressed blocks it needs; the
    /// cache records presence per block, so the fetched bytes are kept. A
    /// reader of a unit that is partly being fetched this way waits for those
    /// requests instead of fetching the unit again. Returns when the requests
    /// this call made are done (not those of others it skipped).
    pub fn fetch_exact(&self, offset: u64, len: u64, prio: Priority) -> Result<()> {
        self.fetch_exact_ranges(&[(offset, len)], prio)
    }

    /// [`RemoteBlob::fetch_exact`] of several ranges `(offset, len)` at once:
    /// their requests run in parallel (up to the scheduler's limit), so
    /// ranges far apart (a layer's two ends) cost one round trip.
    pub fn fetch_exact_ranges(&self, ranges: &[(u64, u64)], prio: Priority) -> Result<()> {
        let ranges: Vec<(u64, u64)> = ranges
            .iter()
            .filter(|&&(o, l)| o < self.blob.size && l > 0)
            .map(|&(o, l)| (o, l.min(self.blob.size - o)))
            .collect();
        if ranges.is_empty() {
            return Ok(());
        }
        bump(&self.counters.loads, 1);
        if ranges
            .iter()
            .all(|&(o, l)| self.cache.contains(&self.cached, o, l))
        {
            bump(&self.counters.cache_hits, 1);
            return Ok(());
        }
        let bs = self.cache.block_size();
        // Each lead, and the range it was asked for (errors name that range).
        let mut leads: Vec<Lead<'_>> = Vec::new();
        let mut asked: Vec<(u64, u64)> = Vec::new();
        {
            let mut map = self.lock_inflight();
            for &(offset, len) in &ranges {
                let runs = exact_runs(offset, len, self.blob.size, bs, self.max_units * self.unit);
                for (first, last) in runs {
                    for i in first..=last {
                        let (s, e) = (i * bs, ((i + 1) * bs).min(self.blob.size));
                        let busy = map.contains_key(&(bs, i))
                            || map.contains_key(&(self.unit, s / self.unit))
                            || self.cache.contains(&self.cached, s, e - s);
                        let extend = !busy
                            && i != first
                            && leads.last().is_some_and(|l| {
                                l.offset + l.len == s && l.units.last() == Some(&(i - 1))
                            });
                        if busy {
                            continue;
                        }
                        if extend {
                            leads.last_mut().expect("checked").extend(&mut map, i, e);
                        } else {
                            leads.push(Lead::start(self, &mut map, (bs, i), (s, e), prio));
                            asked.push((offset, len));
                        }
                    }
                }
            }
        }
        self.run_leads(&leads);
        for (l, &(offset, len)) in leads.iter().zip(&asked) {
            if let Some(Err(e)) = l.result.get() {
                return Err(self.share_err(e, offset, len));
            }
        }
        Ok(())
    }

    /// Runs `leads` and publishes their results; several run in parallel, up
    /// to the scheduler's limit.
    fn run_leads(&self, leads: &[Lead<'_>]) {
        let run = |l: &Lead<'_>| l.publish(self.fetch_request(l.offset, l.len, &l.flight.prio));
        let workers = leads.len().min(self.sched.limit());
        if workers <= 1 {
            leads.iter().for_each(run);
        } else {
            let next = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..workers {
                    s.spawn(|| {
                        while let Some(l) = leads.get(next.fetch_add(1, Ordering::Relaxed)) {
                            run(l);
                        }
                    });
                }
            });
        }
    }

    /// Makes `[offset, offset + len)` available, copying it to `out` if given.
    /// With `parts`, a unit partly being fetched by [`RemoteBlob::fetch_exact`]
    /// waits for those requests and is then read again (without `parts`).
    fn load(
        &self,
        mut out: Option<&mut [u8]>,
        offset: u64,
        len: u64,
        prio: Priority,
        parts: bool,
    ) -> Result<()> {
        bump(&self.counters.loads, 1);
        // Fast path: all cached.
        let hit = match out.as_deref_mut() {
            Some(buf) => self.cache_read(buf, offset),
            None => self.cache.contains(&self.cached, offset, len),
        };
        if hit {
            bump(&self.counters.cache_hits, 1);
            return Ok(());
        }

        let end = offset + len;
        let (first, last) = (offset / self.unit, (end - 1) / self.unit);
        let mut plan = Plan {
            offset,
            end,
            prio,
            parts,
            units: Vec::with_capacity((last - first + 1) as usize),
            leads: Vec::new(),
        };
        for u in first..=last {
            let (lo, hi) = plan.part(self.unit_range(u));
            let sub = out
                .as_deref_mut()
                .map(|b| &mut b[(lo - offset) as usize..(hi - offset) as usize]);
            let unit = self.plan_unit(&mut plan, sub, u);
            plan.units.push(unit);
        }

        // Run our own requests first (never waiting on others while leading,
        // so readers cannot deadlock on each other), then collect. Several
        // requests (a read larger than `max_request`) run in parallel, up to
        // the scheduler's limit.
        self.run_leads(&plan.leads);
        self.collect(&plan, out)
    }

    /// How unit `u` of `plan`'s read is served: copied from the cache into
    /// `out` (its part of the read) when it is there, else by joining a
    /// request in flight, else by leading one (extending the read's previous
    /// request when adjacent and not full).
    fn plan_unit<'a>(&'a self, plan: &mut Plan<'a>, mut out: Option<&mut [u8]>, u: u64) -> Unit {
        let (us, ue) = self.unit_range(u);
        let (lo, hi) = plan.part((us, ue));
        let mut tries = 0;
        loop {
            tries += 1;
            if self.read_held(u, out.as_deref_mut(), (lo, hi)) {
                return Unit::Cached;
            }
            let cached = match out.as_deref_mut() {
                Some(buf) => self.cache_read(buf, lo),
                None => self.cache.contains(&self.cached, lo, hi - lo),
            };
            if cached {
                return Unit::Cached;
            }
            let mut map = self.lock_inflight();
            if let Some(f) = map.get(&(self.unit, u)) {
                let f = Arc::clone(f);
                drop(map);
                // Don't wait behind a less urgent queued request: raise it.
                if f.prio.raise(plan.prio) {
                    f.sched.nudge();
                }
                // A reader waiting for a stream moves a pass-through front.
                if let Some(h) = self.held.as_ref().filter(|_| out.is_some()) {
                    if f.streamed.load(Ordering::Relaxed) {
                        h.want(u);
                    }
                }
                bump(&self.counters.joined, 1);
                return Unit::Wait(f);
            }
            // A request may have finished since the cache check: leaders
            // insert into the cache (or hold the unit) before leaving the
            // map, so re-check under the lock (once; then fetch regardless).
            if tries == 1
                && (self.held_unit(u).is_some() || self.cache.contains(&self.cached, lo, hi - lo))
            {
                continue;
            }
            if plan.parts {
                let flights = self.exact_flights(&map, lo, hi, plan.prio);
                if !flights.is_empty() {
                    bump(&self.counters.joined, 1);
                    return Unit::Parts(flights);
                }
            }
            let leads = &mut plan.leads;
            let extend = match (plan.units.last(), leads.last()) {
                (Some(Unit::Lead(k)), Some(l)) => {
                    *k == leads.len() - 1 && (l.units.len() as u64) < self.max_units
                }
                _ => false,
            };
            if extend {
                leads.last_mut().expect("checked").extend(&mut map, u, ue);
            } else {
                let lead = Lead::start(self, &mut map, (self.unit, u), (us, ue), plan.prio);
                leads.push(lead);
            }
            return Unit::Lead(leads.len() - 1);
        }
    }

    /// Waits for the units of `plan` and copies them to `out`; the first
    /// error is returned (naming the whole read).
    fn collect(&self, plan: &Plan<'_>, mut out: Option<&mut [u8]>) -> Result<()> {
        let (offset, len) = (plan.offset, plan.end - plan.offset);
        let first = offset / self.unit;
        let mut first_err = None;
        for (k, unit) in plan.units.iter().enumerate() {
            let u = first + k as u64;
            let (lo, hi) = plan.part(self.unit_range(u));
            let sub = out
                .as_deref_mut()
                .map(|b| &mut b[(lo - offset) as usize..(hi - offset) as usize]);
            let r = match unit {
                Unit::Cached => continue,
                Unit::Parts(flights) => {
                    flights.iter().for_each(|f| drop(f.wait()));
                    if let Err(e) = self.load(sub, lo, hi - lo, plan.prio, false) {
                        first_err.get_or_insert(e);
                    }
                    continue;
                }
                Unit::Lead(i) => plan.leads[*i].result.get().cloned().expect("fetched"),
                Unit::Wait(f) => f.wait(),
            };
            match r {
                Ok((base, data)) => {
                    if let Some(buf) = sub {
                        buf.copy_from_slice(&data[(lo - base) as usize..(hi - base) as usize]);
                        self.held_read(u, &data, hi - lo);
                    }
                }
                Err(e) => {
                    first_err.get_or_insert_with(|| self.share_err(&e, offset, len));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The exact requests ([`RemoteBlob::fetch_exact`]) fetching cache blocks
    /// of `[lo, hi)`, raised to `prio`; empty when the cache block size is the
    /// unit (exact requests then share the unit keys), when there are none,
    /// or when one of them is a long, less urgent request (trace prefetch):
    /// then the reader fetches the unit itself instead of waiting for all of
    /// that request (its bytes come a second time; the container's reads go
    /// first).
    fn exact_flights(
        &self,
        map: &HashMap<(u64, u64), Arc<Flight>>,
        lo: u64,
        hi: u64,
        prio: Priority,
    ) -> Vec<Arc<Flight>> {
        let bs = self.cache.block_size();
        if bs == self.unit {
            return Vec::new();
        }
        let mut out: Vec<Arc<Flight>> = Vec::new();
        for i in lo / bs..=(hi - 1) / bs {
            if let Some(f) = map.get(&(bs, i)) {
                if f.too_slow_for(prio, self.unit) {
                    return Vec::new();
                }
                if !out.iter().any(|g| Arc::ptr_eq(g, f)) {
                    out.push(Arc::clone(f));
                }
            }
        }
        for f in &out {
            if f.prio.raise(prio) {
                f.sched.nudge();
            }
        }
        out
    }

    /// Blob range of unit `u`.
    fn unit_range(&self, u: u64) -> (u64, u64) {
        let s = u * self.unit;
        (s, (s + self.unit).min(self.blob.size))
    }

    /// Reads from the cache; a cache I/O error counts as a miss and drops the
    /// range from the cache.
    fn cache_read(&self, buf: &mut [u8], offset: u64) -> bool {
        match self.cache.read(&self.cached, buf, offset) {
            Ok(hit) => hit,
            Err(_) => {
                let _ = self.cache.evict_in(&self.cached, offset, buf.len() as u64);
                false
            }
        }
    }

    /// One remote request, then the cache insert (best effort).
    fn fetch_request(&self, offset: u64, len: u64, prio: &PrioCell) -> FlightResult {
        // Host-wide single flight: while another process fetches these
        // blocks, wait for it, then take them from the cache.
        let _claim = self.cache.claim(&self.cached, offset, len);
        if self.cache.contains(&self.cached, offset, len) {
            let mut have = vec![0u8; len as usize];
            if let Ok(true) = self.cache.read(&self.cached, &mut have, offset) {
                return Ok((offset, Arc::new(have)));
            }
        }
        // Whole cache blocks at either end that are cached already (an exact
        // fetch got them: a layer's two ends at open) are not fetched again:
        // they are read from the cache now and `[lo, hi)` is fetched.
        let (asked, end) = (offset, offset + len);
        let (mut lo, mut hi) = self.uncached_core(offset, end);
        let mut whole = Vec::new();
        if (lo, hi) != (offset, end) {
            whole = vec![0u8; len as usize];
            let (head, rest) = whole.split_at_mut((lo - offset) as usize);
            let tail = &mut rest[(hi - lo) as usize..];
            let ends = matches!(self.cache.read(&self.cached, head, offset), Ok(true))
                && matches!(self.cache.read(&self.cached, tail, hi), Ok(true));
            if !ends {
                (lo, hi, whole) = (offset, end, Vec::new());
            }
        }
        // The request: `[lo, hi)` (all that was asked, when no end is cached).
        let (offset, len) = (lo, hi - lo);
        bump(&self.counters.requests, 1);
        let log = super::timeline::enabled();
        let t_ask = log.then(super::timeline::now_us);
        let data = {
            let permit = self.sched.acquire_dyn(prio);
            let t_go = log.then(super::timeline::now_us);
            let p = permit.priority();
            let d = self.fetcher.fetch(&self.blob, offset, len, p);
            if let (Some(a), Some(g)) = (t_ask, t_go) {
                self.log_fetch((offset, len, p), (a, g), d.is_ok());
            }
            d
        };
        if let Ok(d) = &data {
            bump(&self.counters.fetched_bytes, d.len() as u64);
        }
        let data = match data {
            Ok(d) if d.len() as u64 == len => d,
            Ok(d) => {
                bump(&self.counters.errors, 1);
                return Err(Arc::new(self.remote_err(
                    offset,
                    len,
                    format!("fetcher returned {} bytes, expected {len}", d.len()),
                )));
            }
            Err(e) => {
                bump(&self.counters.errors, 1);
                return Err(Arc::new(self.share_err(&e, offset, len)));
            }
        };
        // A full or failing cache must not fail the read: the bytes are here.
        let _ = self.cache.insert(&self.cached, offset, &data);
        if whole.is_empty() {
            return Ok((offset, Arc::new(data)));
        }
        let at = (offset - asked) as usize;
        whole[at..at + data.len()].copy_from_slice(&data);
        Ok((asked, Arc::new(whole)))
    }
}

impl RemoteBlob {
    /// `[offset, end)` without the whole cache blocks at either end that are
    /// cached (all of it when every block is).
    fn uncached_core(&self, offset: u64, end: u64) -> (u64, u64) {
        let bs = self.cache.block_size();
        let (mut lo, mut hi) = (offset, end);
        while lo < hi && lo % bs == 0 {
            let e = (lo + bs).min(hi);
            if e - lo < bs && e != self.blob.size {
                break;
            }
            if !self.cache.contains(&self.cached, lo, e - lo) {
                break;
            }
            lo = e;
        }
        while lo < hi {
            let s = ((hi - 1) / bs) * bs;
            if s < lo || !(hi % bs == 0 || hi == self.blob.size) {
                break;
            }
            if !self.cache.contains(&self.cached, s, hi - s) {
                break;
            }
            hi = s;
        }
        if lo >= hi {
            // All cached after all (raced with an insert): fetch as asked.
            return (offset, end);
        }
        (lo, hi)
    }
}

/// The cache blocks (index ranges, inclusive) an exact fetch of
/// `[offset, offset + len)` of a `size`-byte blob covers, cut so that no run
/// spans more than `max_request` bytes (at least one block per run).
pub(crate) fn exact_runs(
    offset: u64,
    len: u64,
    size: u64,
    block: u64,
    max_request: u64,
) -> Vec<(u64, u64)> {
    if offset >= size || len == 0 || block == 0 {
        return Vec::new();
    }
    let end = offset.saturating_add(len).min(size);
    let (first, last) = (offset / block, (end - 1) / block);
    let per = (max_request / block).max(1);
    let mut out = Vec::new();
    let mut at = first;
    while at <= last {
        let stop = last.min(at + per - 1);
        out.push((at, stop));
        at = stop + 1;
    }
    out
}

impl ReadAt for RemoteBlob {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.read(buf, offset).map_err(Error::into_io)
    }

    fn size(&self) -> u64 {
        self.blob.size
    }

    /// Evicts the cache blocks (and held units) covering the range; the next
    /// read re-fetches them. True for any range inside the blob (a re-read always goes back to
    /// the registry, even when the bytes were served without being cached).
    fn invalidate(&self, offset: u64, len: u64) -> bool {
        if offset >= self.blob.size || len == 0 {
            return false;
        }
        bump(&self.counters.invalidations, 1);
        if let Some(h) = &self.held {
            let end = offset.saturating_add(len).min(self.blob.size);
            h.forget(offset / self.unit, (end - 1) / self.unit);
        }
        let _ = self.cache.evict_in(&self.cached, offset, len);
        true
    }

    /// Fetches the range into the cache at [`Priority::Prefetch`]. A range of
    /// whole `min_fetch` units goes through the unit path, streamed
    /// ([`RemoteBlob::stream_into_cache`]) when longer than `max_request`
    /// (flatten's read-ahead); any other range (e.g. the compressed blocks behind a
    /// trace record) is fetched exactly ([`RemoteBlob::fetch_exact`]), so
    /// prefetch does not pull in the rest of each unit.
    fn will_need(&self, offset: u64, len: u64) {
        if offset >= self.blob.size || len == 0 {
            return;
        }
        let end = offset.saturating_add(len).min(self.blob.size);
        let aligned = offset % self.unit == 0 && (end % self.unit == 0 || end == self.blob.size);
        let _ = if aligned && end - offset > self.max_units * self.unit {
            self.stream_into_cache(offset, len, Priority::Prefetch)
        } else if aligned {
            self.fetch_into_cache(offset, len, Priority::Prefetch)
        } else {
            self.fetch_exact(offset, len, Priority::Prefetch)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::exact_runs;

    #[test]
    fn exact_runs_cover_the_range_in_blocks_cut_at_max_request() {
        const K: u64 = 1024;
        // One block, unaligned inside it.
        assert_eq!(exact_runs(5, 10, 1 << 20, 4 * K, 4 << 20), vec![(0, 0)]);
        // Crossing a block boundary.
        assert_eq!(
            exact_runs(4 * K - 1, 2, 1 << 20, 4 * K, 4 << 20),
            vec![(0, 1)]
        );
        // Cut at max_request (3 blocks per run).
        assert_eq!(
            exact_runs(0, 28 * K, 1 << 20, 4 * K, 12 * K),
            vec![(0, 2), (3, 5), (6, 6)]
        );
        // max_request below a block: one block per run.
        assert_eq!(
            exact_runs(0, 8 * K, 1 << 20, 4 * K, 1),
            vec![(0, 0), (1, 1)]
        );
        // Clamped to the blob; empty, past the end, or zero block: nothing.
        assert_eq!(
            exact_runs(9 * K, 100 * K, 10 * K, 4 * K, 4 << 20),
            vec![(2, 2)]
        );
        assert!(exact_runs(0, 0, 10, 4, 4).is_empty());
        assert!(exact_runs(10, 5, 10, 4, 4).is_empty());
        assert!(exact_runs(0, 5, 10, 0, 4).is_empty());
        assert_eq!(
            exact_runs(0, u64::MAX, 10, 4, 4),
            vec![(0, 0), (1, 1), (2, 2)]
        );
    }
}
