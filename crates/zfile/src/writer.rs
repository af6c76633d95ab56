//! Streaming writer: [`ZFileWriter`], plus the [`compress`] / [`decompress`] helpers.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::codec::{compress_into_level, max_compressed_len};
use crate::crc::{crc32c_raw, BLOCK_CRC_SEED};
use crate::error::{Error, Result};
use crate::header::{flags, Algorithm, Header, HEADER_SIZE, STRUCT_SIZE};
use crate::reader::{Info, ZFileReader};
use crate::source::ReadAt;
use crate::sync::{recover, MutexExt};

/// Uncompressed bytes per compression job (a multiple of every block size).
const JOB_BYTES: usize = 1 << 20;

/// Writer options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Block codec. Default LZ4.
    pub algorithm: Algorithm,
    /// Uncompressed block size: 4096 (default), 8192, 16384 or 32768.
    pub block_size: u32,
    /// Compression threads; 0 = all available CPUs. The output does not depend on it.
    pub threads: usize,
    /// zstd level (1–22; 0 = upstream's 3). Higher levels make smaller blocks
    /// that decode as fast; ignored for LZ4. Readers do not depend on it.
    pub level: i32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Lz4,
            block_size: 4096,
            threads: 1,
            level: 0,
        }
    }
}

/// Compresses `input` (whole blocks; the last one may be short) into `out` as stored
/// blocks (compressed bytes + CRC) and their stored lengths into `lens`; returns the
/// bytes used in `out`. `out` only grows (no re-zeroing between jobs).
fn compress_job(
    enc: Enc,
    bs: usize,
    input: &[u8],
    out: &mut Vec<u8>,
    lens: &mut Vec<u32>,
) -> Result<usize> {
    lens.clear();
    let bound = input.len().div_ceil(bs) * (max_compressed_len(enc.algo, bs) + 4);
    if out.len() < bound {
        out.resize(bound, 0);
    }
    let mut pos = 0;
    for chunk in input.chunks(bs) {
        let n = compress_into_level(enc.algo, enc.level, chunk, &mut out[pos..])?;
        let crc = crc32c_raw(BLOCK_CRC_SEED, &out[pos..pos + n]);
        out[pos + n..pos + n + 4].copy_from_slice(&crc.to_le_bytes());
        lens.push((n + 4) as u32);
        pos += n + 4;
    }
    Ok(pos)
}

/// Compresses `job` on this thread, from `input` or else from its own input buffer.
fn compress_into_job(enc: Enc, bs: u32, job: &mut Job, input: Option<&[u8]>) -> Result<()> {
    let src = input.unwrap_or(&job.input[..job.input_len]);
    job.used = compress_job(enc, bs as usize, src, &mut job.out, &mut job.lens)?;
    Ok(())
}

/// A codec and its level.
#[derive(Debug, Clone, Copy)]
struct Enc {
    algo: Algorithm,
    level: i32,
}

/// One job: up to 1 MiB of input and its compressed output.
struct Job {
    seq: u64,
    /// Input buffer (`JOB_BYTES` long once used) and how much of it is data.
    input: Vec<u8>,
    input_len: usize,
    out: Vec<u8>,
    used: usize,
    lens: Vec<u32>,
}

impl Job {
    fn new() -> Self {
        Job {
            seq: 0,
            input: Vec::new(),
            input_len: 0,
            out: Vec::new(),
            used: 0,
            lens: Vec::new(),
        }
    }
}

/// Shared state of [`ZFileWriter::compress_bulk`].
struct Bulk {
    /// Next job index to claim.
    next: usize,
    /// Jobs written so far (claims stay within `written + window`).
    written: usize,
    spares: Vec<Job>,
    failed: bool,
}

struct Done {
    job: Job,
    result: Result<()>,
}

/// Jobs waiting for a helper. The calling thread may take ("steal") the oldest one
/// back instead of waiting idle.
struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
}

struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.locked()
    }

    /// Next job for a helper; `None` once the queue is closed.
    fn next(&self) -> Option<Job> {
        let mut g = self.lock();
        loop {
            if let Some(job) = g.jobs.pop_front() {
                return Some(job);
            }
            if g.closed {
                return None;
            }
            g = recover(self.wake.wait(g));
        }
    }
}

/// Helper threads compressing queued jobs; results come back tagged with their
/// sequence number and are written in order.
struct Pool {
    queue: Arc<Queue>,
    done: mpsc::Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(threads: usize, algo: Enc, bs: u32) -> Result<Self> {
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                closed: false,
            }),
            wake: Condvar::new(),
        });
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let mut pool = Self {
            queue,
            done: done_rx,
            workers: Vec::with_capacity(threads),
        };
        for k in 0..threads {
            let q = Arc::clone(&pool.queue);
            let tx = done_tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("zfile-compress-{k}"))
                .spawn(move || {
                    while let Some(mut job) = q.next() {
                        let result = compress_into_job(algo, bs, &mut job, None);
                        if tx.send(Done { job, result }).is_err() {
                            break;
                        }
                    }
                })?;
            pool.workers.push(h);
        }
        Ok(pool)
    }

    fn push(&self, job: Job) {
        self.queue.lock().jobs.push_back(job);
        self.queue.wake.notify_one();
    }

    /// Jobs no helper has taken yet.
    fn queued(&self) -> usize {
        self.queue.lock().jobs.len()
    }

    /// Takes back the oldest job no helper has started.
    fn steal(&self) -> Option<Job> {
        self.queue.lock().jobs.pop_front()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Streaming ZFile writer producing exactly what `overlaybd-commit -z` produces:
/// header (flags 0x1B, final index fields), blocks each followed by its CRC, the jump
/// table and a trailer (flags 0x16). Feed it with [`Write`] or [`ZFileWriter::append`],
/// then call [`ZFileWriter::finish`].
///
/// Blocks are compressed in jobs of 1 MiB. With `threads = T > 1`, `T - 1` helper
/// threads take queued jobs while the calling thread compresses whenever they are
/// busy; writes of two jobs or more are compressed in place by scoped helpers (no
/// copy of the caller's buffer). The output is byte-identical for any thread count
/// and any sequence of write sizes.
pub struct ZFileWriter<W: Write + Seek> {
    out: W,
    base: u64,
    algorithm: Algorithm,
    level: i32,
    block_size: u32,
    /// Input buffer of the next job (always `JOB_BYTES` long) and its fill level.
    pending: Vec<u8>,
    pending_len: usize,
    lens: Vec<u32>,
    data_bytes: u64,
    original: u64,
    pool: Option<Pool>,
    /// Helper threads (`threads - 1`).
    helpers: usize,
    /// Jobs allowed to wait for a helper; beyond that the caller compresses.
    pool_depth: usize,
    /// Jobs queued or being compressed by helpers.
    in_pool: u64,
    /// Most jobs compressed or in flight but not yet written.
    max_unwritten: u64,
    next_seq: u64,
    next_write: u64,
    ready: BTreeMap<u64, Job>,
    free: Vec<Job>,
    poisoned: bool,
}

impl<W: Write + Seek> std::fmt::Debug for ZFileWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZFileWriter")
            .field("base", &self.base)
            .field("algorithm", &self.algorithm)
            .field("block_size", &self.block_size)
            .field("original", &self.original)
            .finish_non_exhaustive()
    }
}

fn worker_gone() -> Error {
    Error::Io(io::Error::other("compression worker exited"))
}

impl<W: Write + Seek> ZFileWriter<W> {
    /// Starts a ZFile at the current position of `out` (remembered as its base) and
    /// writes a placeholder header. Block sizes other than 4, 8, 16 or 32 KiB are
    /// [`Error::BadBlockSize`] (64 KiB blocks are readable but not written, see the
    /// crate docs).
    pub fn new(mut out: W, opts: Options) -> Result<Self> {
        if !matches!(opts.block_size, 4096 | 8192 | 16384 | 32768) {
            return Err(Error::BadBlockSize(opts.block_size));
        }
        let threads = match opts.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let base = out.stream_position()?;
        let placeholder = Header {
            flags: flags::HEADER_PLAIN,
            ..Self::template(opts.algorithm, opts.block_size)
        };
        out.write_all(&placeholder.encode())?;
        let helpers = threads - 1;
        let pool = if helpers > 0 {
            Some(Pool::new(
                helpers,
                Enc {
                    algo: opts.algorithm,
                    level: opts.level,
                },
                opts.block_size,
            )?)
        } else {
            None
        };
        Ok(Self {
            out,
            base,
            algorithm: opts.algorithm,
            level: opts.level,
            block_size: opts.block_size,
            pending: vec![0; JOB_BYTES],
            pending_len: 0,
            lens: Vec::new(),
            data_bytes: 0,
            original: 0,
            pool,
            helpers,
            pool_depth: 2 * helpers,
            in_pool: 0,
            max_unwritten: 4 * threads as u64,
            next_seq: 0,
            next_write: 0,
            ready: BTreeMap::new(),
            free: Vec::new(),
            poisoned: false,
        })
    }

    fn enc(&self) -> Enc {
        Enc {
            algo: self.algorithm,
            level: self.level,
        }
    }

    fn template(algorithm: Algorithm, block_size: u32) -> Header {
        Header {
            struct_size: STRUCT_SIZE,
            block_size,
            algo: algorithm as u8,
            verify: 1,
            ..Header::default()
        }
    }

    /// Offset of the ZFile start in the output stream.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Uncompressed bytes accepted so far.
    pub fn bytes_in(&self) -> u64 {
        self.original
    }

    /// Appends uncompressed data.
    pub fn append(&mut self, data: &[u8]) -> Result<()> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let r = self.append_inner(data);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// Appends everything `input` yields (reading straight into the job buffers);
    /// returns the byte count.
    pub fn append_from(&mut self, mut input: impl Read) -> Result<u64> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let mut total = 0u64;
        loop {
            let n = match input.read(&mut self.pending[self.pending_len..]) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.poisoned = true;
                    return Err(e.into());
                }
            };
            self.pending_len += n;
            self.original += n as u64;
            total += n as u64;
            if self.pending_len == JOB_BYTES {
                if let Err(e) = self.submit(None) {
                    self.poisoned = true;
                    return Err(e);
                }
            }
        }
    }

    fn append_inner(&mut self, mut data: &[u8]) -> Result<()> {
        self.original += data.len() as u64;
        while !data.is_empty() {
            if self.pending_len == 0 {
                if self.helpers > 0 && data.len() >= 2 * JOB_BYTES {
                    // Many whole jobs: helpers read them in place.
                    let (bulk, rest) = data.split_at(data.len() / JOB_BYTES * JOB_BYTES);
                    self.compress_bulk(bulk)?;
                    data = rest;
                    continue;
                }
                if data.len() >= JOB_BYTES {
                    // One whole job straight from the caller's buffer.
                    let (job, rest) = data.split_at(JOB_BYTES);
                    self.submit(Some(job))?;
                    data = rest;
                    continue;
                }
            }
            let take = (JOB_BYTES - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len == JOB_BYTES {
                self.submit(None)?;
            }
        }
        Ok(())
    }

    /// Compresses `data` (whole jobs, at least two) with scoped helper threads that
    /// read it in place (no copy of the caller's buffer), this thread taking jobs
    /// too, and writes the results in order. At most `max_unwritten` jobs are
    /// buffered.
    fn compress_bulk(&mut self, data: &[u8]) -> Result<()> {
        // Everything queued earlier goes out first.
        while self.next_write < self.next_seq {
            self.help_or_wait()?;
        }
        let n = data.len() / JOB_BYTES;
        let window = self.max_unwritten as usize;
        let (algo, bs) = (self.enc(), self.block_size);
        let state = Mutex::new(Bulk {
            next: 0,
            written: 0,
            spares: std::mem::take(&mut self.free),
            failed: false,
        });
        let wake = Condvar::new();
        let chunk = |i: usize| &data[i * JOB_BYTES..(i + 1) * JOB_BYTES];
        let (tx, rx) = mpsc::channel::<(usize, Job, Result<()>)>();
        let result = std::thread::scope(|s| {
            for _ in 0..self.helpers {
                let tx = tx.clone();
                let (state, wake) = (&state, &wake);
                s.spawn(move || loop {
                    let (i, mut job) = {
                        let mut g = state.locked();
                        while !g.failed && g.next < n && g.next >= g.written + window {
                            g = recover(wake.wait(g));
                        }
                        if g.failed || g.next >= n {
                            return;
                        }
                        g.next += 1;
                        (g.next - 1, g.spares.pop().unwrap_or_else(Job::new))
                    };
                    let r = compress_into_job(algo, bs, &mut job, Some(chunk(i)));
                    if tx.send((i, job, r)).is_err() {
                        return;
                    }
                });
            }
            drop(tx);
            let mut ready = BTreeMap::new();
            let mut written = 0usize;
            let run = (|| -> Result<()> {
                while written < n {
                    let claim = {
                        let mut g = state.locked();
                        if g.next < n && g.next < written + window {
                            g.next += 1;
                            Some((g.next - 1, g.spares.pop().unwrap_or_else(Job::new)))
                        } else {
                            None
                        }
                    };
                    match claim {
                        Some((i, mut job)) => {
                            compress_into_job(algo, bs, &mut job, Some(chunk(i)))?;
                            ready.insert(i, job);
                        }
                        None => {
                            let (i, job, r) = rx.recv().map_err(|_| worker_gone())?;
                            r?;
                            ready.insert(i, job);
                        }
                    }
                    while let Ok((i, job, r)) = rx.try_recv() {
                        r?;
                        ready.insert(i, job);
                    }
                    let before = written;
                    while let Some(job) = ready.remove(&written) {
                        self.out.write_all(&job.out[..job.used])?;
                        self.data_bytes += job.used as u64;
                        self.lens.extend_from_slice(&job.lens);
                        written += 1;
                        state.locked().spares.push(job);
                    }
                    if written != before {
                        state.locked().written = written;
                        wake.notify_all();
                    }
                }
                Ok(())
            })();
            if run.is_err() {
                state.locked().failed = true;
                wake.notify_all();
            }
            run
        });
        self.next_seq += n as u64;
        self.next_write += n as u64;
        self.free = recover(state.into_inner()).spares;
        self.free.truncate(self.max_unwritten as usize);
        result
    }

    /// Starts one job (from `direct`, or else from the pending buffer): queues it
    /// for a helper unless enough are waiting, in which case it is compressed on this
    /// thread straight from its buffer. Then writes whatever is complete, in order.
    fn submit(&mut self, direct: Option<&[u8]>) -> Result<()> {
        let mut job = self.free.pop().unwrap_or_else(Job::new);
        job.seq = self.next_seq;
        self.next_seq += 1;
        let queue_it = match &self.pool {
            Some(pool) => pool.queued() < self.pool_depth,
            None => false,
        };
        if let (true, Some(pool)) = (queue_it, &self.pool) {
            match direct {
                Some(d) => {
                    if job.input.len() < JOB_BYTES {
                        job.input.resize(JOB_BYTES, 0);
                    }
                    job.input[..d.len()].copy_from_slice(d);
                    job.input_len = d.len();
                }
                None => {
                    std::mem::swap(&mut job.input, &mut self.pending);
                    job.input_len = self.pending_len;
                    if self.pending.len() < JOB_BYTES {
                        self.pending.resize(JOB_BYTES, 0);
                    }
                }
            }
            pool.push(job);
            self.in_pool += 1;
        } else {
            let input = direct.unwrap_or(&self.pending[..self.pending_len]);
            compress_into_job(self.enc(), self.block_size, &mut job, Some(input))?;
            self.ready.insert(job.seq, job);
        }
        self.pending_len = 0;
        self.collect(false)?;
        while self.next_seq - self.next_write > self.max_unwritten {
            self.help_or_wait()?;
        }
        Ok(())
    }

    /// Compresses the oldest job still waiting for a helper, or, if none, waits for
    /// a helper to finish one. Then writes what is complete.
    fn help_or_wait(&mut self) -> Result<()> {
        let stolen = match &self.pool {
            Some(pool) => pool.steal(),
            None => None,
        };
        match stolen {
            Some(mut job) => {
                self.in_pool -= 1;
                compress_into_job(self.enc(), self.block_size, &mut job, None)?;
                self.ready.insert(job.seq, job);
                self.collect(false)
            }
            None => self.collect(true),
        }
    }

    /// Takes finished jobs from the helpers (waiting for one if `wait`), then writes
    /// every job that is next in order.
    fn collect(&mut self, wait: bool) -> Result<()> {
        if let Some(pool) = &self.pool {
            let mut first = wait;
            loop {
                let done = if first {
                    if self.in_pool == 0 {
                        return Err(worker_gone());
                    }
                    first = false;
                    pool.done.recv().map_err(|_| worker_gone())?
                } else {
                    match pool.done.try_recv() {
                        Ok(d) => d,
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => return Err(worker_gone()),
                    }
                };
                self.in_pool -= 1;
                done.result?;
                self.ready.insert(done.job.seq, done.job);
            }
        }
        while let Some(job) = self.ready.remove(&self.next_write) {
            self.out.write_all(&job.out[..job.used])?;
            self.data_bytes += job.used as u64;
            self.lens.extend_from_slice(&job.lens);
            self.next_write += 1;
            self.free.push(job);
        }
        Ok(())
    }

    /// Compresses the last block, writes the jump table and the trailer (flags 0x16),
    /// then overwrites the header at the base offset (flags 0x1B, final index fields)
    /// and leaves the stream positioned after the trailer. Returns the sink and the
    /// file's [`Info`].
    pub fn finish(mut self) -> Result<(W, Info)> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        if self.pending_len > 0 {
            self.submit(None)?;
        }
        while self.next_write < self.next_seq {
            self.help_or_wait()?;
        }
        self.pool = None;

        let index_offset = HEADER_SIZE as u64 + self.data_bytes;
        let table: Vec<u8> = self.lens.iter().flat_map(|l| l.to_le_bytes()).collect();
        let index_crc = crc32c_raw(0, &table);
        self.out.write_all(&table)?;
        let fields = Header {
            index_offset,
            index_size: self.lens.len() as u64,
            original_size: self.original,
            index_crc,
            ..Self::template(self.algorithm, self.block_size)
        };
        let trailer = Header {
            flags: flags::TRAILER,
            ..fields
        }
        .encode();
        self.out.write_all(&trailer)?;
        let end = self.out.stream_position()?;
        let header = Header {
            flags: flags::HEADER_FINAL,
            ..fields
        }
        .encode();
        self.out.seek(SeekFrom::Start(self.base))?;
        self.out.write_all(&header)?;
        self.out.seek(SeekFrom::Start(end))?;
        self.out.flush()?;

        let digest = |b: &[u8; HEADER_SIZE]| u32::from_le_bytes([b[28], b[29], b[30], b[31]]);
        let info = Info {
            algorithm: self.algorithm,
            block_size: self.block_size,
            blocks: self.lens.len() as u64,
            original_size: self.original,
            header_flags: flags::HEADER_FINAL,
            header_digest: digest(&header),
            trailer_flags: Some(flags::TRAILER),
            trailer_digest: Some(digest(&trailer)),
            index_offset,
            index_crc,
            verify: true,
            header_overwritten: true,
            dict_size: 0,
            level: 0,
            zfile_size: end - self.base,
        };
        Ok((self.out, info))
    }
}

impl<W: Write + Seek> Write for ZFileWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.append(buf)?;
        Ok(buf.len())
    }

    /// Flushes the sink. Buffered input (up to one job) is only compressed by
    /// [`ZFileWriter::finish`] or once a job fills up.
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Compresses everything `input` yields into a ZFile written to `output` (starting at
/// its current position); returns the file's [`Info`].
pub fn compress<W: Write + Seek>(input: impl Read, output: W, opts: Options) -> Result<Info> {
    let mut w = ZFileWriter::new(output, opts)?;
    w.append_from(input)?;
    Ok(w.finish()?.1)
}

/// Decodes the whole ZFile in `src` into `output`; returns the uncompressed size.
/// Every block CRC is checked.
pub fn decompress<R: ReadAt>(src: R, mut output: impl Write) -> Result<u64> {
    let r = ZFileReader::open(src)?;
    let total = r.info().original_size;
    let mut buf = vec![0u8; (JOB_BYTES as u64).min(total) as usize];
    let mut off = 0u64;
    while off < total {
        let n = r.read_at(&mut buf, off)?;
        if n == 0 {
            return Err(Error::Truncated {
                what: "decoded data",
                need: total,
                have: off,
            });
        }
        output.write_all(&buf[..n])?;
        off += n as u64;
    }
    output.flush()?;
    Ok(total)
}
