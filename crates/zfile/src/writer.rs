//! Streaming writer: [`ZFileWriter`], plus the [`compress`] / [`decompress`] helpers.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use crate::codec::{compress_into, max_compressed_len};
use crate::crc::{crc32c_raw, BLOCK_CRC_SEED};
use crate::error::{Error, Result};
use crate::header::{flags, Algorithm, Header, HEADER_SIZE, STRUCT_SIZE};
use crate::reader::{Info, ZFileReader};
use crate::source::ReadAt;

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
}

impl Default for Options {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Lz4,
            block_size: 4096,
            threads: 1,
        }
    }
}

/// Compresses `input` (whole blocks; the last one may be short) into `out` as stored
/// blocks (compressed bytes + CRC) and their stored lengths into `lens`; returns the
/// bytes used in `out`. `out` only grows (no re-zeroing between jobs).
fn compress_job(
    algo: Algorithm,
    bs: usize,
    input: &[u8],
    out: &mut Vec<u8>,
    lens: &mut Vec<u32>,
) -> Result<usize> {
    lens.clear();
    let bound = input.len().div_ceil(bs) * (max_compressed_len(algo, bs) + 4);
    if out.len() < bound {
        out.resize(bound, 0);
    }
    let mut pos = 0;
    for chunk in input.chunks(bs) {
        let n = compress_into(algo, chunk, &mut out[pos..])?;
        let crc = crc32c_raw(BLOCK_CRC_SEED, &out[pos..pos + n]);
        out[pos + n..pos + n + 4].copy_from_slice(&crc.to_le_bytes());
        lens.push((n + 4) as u32);
        pos += n + 4;
    }
    Ok(pos)
}

/// One job: up to 1 MiB of input and its compressed output.
struct Job {
    seq: u64,
    input: Vec<u8>,
    out: Vec<u8>,
    used: usize,
    lens: Vec<u32>,
}

struct Done {
    job: Job,
    result: Result<()>,
}

/// Helper threads compressing jobs; results come back tagged with their sequence
/// number and are written in order.
struct Pool {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(threads: usize, algo: Algorithm, bs: usize) -> Result<Self> {
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut workers = Vec::with_capacity(threads);
        for k in 0..threads {
            let rx = Arc::clone(&job_rx);
            let tx = done_tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("zfile-compress-{k}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(g) => g.recv(),
                        Err(_) => break,
                    };
                    let Ok(mut job) = job else { break };
                    let result = compress_job(algo, bs, &job.input, &mut job.out, &mut job.lens)
                        .map(|n| {
                            job.used = n;
                        });
                    if tx.send(Done { job, result }).is_err() {
                        break;
                    }
                })?;
            workers.push(h);
        }
        Ok(Self {
            jobs: Some(job_tx),
            done: done_rx,
            workers,
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs.take();
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
/// threads take jobs while the calling thread compresses whenever they are busy; the
/// output is byte-identical for any thread count.
pub struct ZFileWriter<W: Write + Seek> {
    out: W,
    base: u64,
    algorithm: Algorithm,
    block_size: u32,
    pending: Vec<u8>,
    lens: Vec<u32>,
    data_bytes: u64,
    original: u64,
    pool: Option<Pool>,
    /// Jobs the helpers may hold at once.
    pool_depth: u64,
    /// Jobs sent to / received from the helpers.
    sent: u64,
    received: u64,
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
                opts.algorithm,
                opts.block_size as usize,
            )?)
        } else {
            None
        };
        Ok(Self {
            out,
            base,
            algorithm: opts.algorithm,
            block_size: opts.block_size,
            pending: Vec::with_capacity(JOB_BYTES),
            lens: Vec::new(),
            data_bytes: 0,
            original: 0,
            pool,
            pool_depth: 2 * helpers as u64,
            sent: 0,
            received: 0,
            max_unwritten: 4 * threads as u64,
            next_seq: 0,
            next_write: 0,
            ready: BTreeMap::new(),
            free: Vec::new(),
            poisoned: false,
        })
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

    fn append_inner(&mut self, mut data: &[u8]) -> Result<()> {
        self.original += data.len() as u64;
        while !data.is_empty() {
            if self.pending.is_empty() && data.len() >= JOB_BYTES {
                // Whole job straight from the caller's buffer.
                let (job, rest) = data.split_at(JOB_BYTES);
                self.submit(Some(job))?;
                data = rest;
                continue;
            }
            let take = (JOB_BYTES - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == JOB_BYTES {
                self.submit(None)?;
            }
        }
        Ok(())
    }

    /// Starts one job (from `direct`, or else from the pending buffer): hands it to a
    /// helper if one has room, otherwise compresses it on this thread. Then writes
    /// whatever is complete, in order.
    fn submit(&mut self, direct: Option<&[u8]>) -> Result<()> {
        let mut job = self.free.pop().unwrap_or_else(|| Job {
            seq: 0,
            input: Vec::new(),
            out: Vec::new(),
            used: 0,
            lens: Vec::new(),
        });
        job.seq = self.next_seq;
        self.next_seq += 1;
        let pool = self
            .pool
            .as_ref()
            .filter(|_| self.sent - self.received < self.pool_depth);
        if let Some(pool) = pool {
            match direct {
                Some(d) => {
                    job.input.clear();
                    job.input.extend_from_slice(d);
                }
                None => std::mem::swap(&mut job.input, &mut self.pending),
            }
            self.pending.clear();
            let tx = pool.jobs.as_ref().ok_or(Error::Poisoned)?;
            tx.send(job).map_err(|_| worker_gone())?;
            self.sent += 1;
        } else {
            let input = direct.unwrap_or(&self.pending);
            let bs = self.block_size as usize;
            job.used = compress_job(self.algorithm, bs, input, &mut job.out, &mut job.lens)?;
            self.pending.clear();
            self.ready.insert(job.seq, job);
        }
        self.collect(false)?;
        while self.next_seq - self.next_write > self.max_unwritten {
            self.collect(true)?;
        }
        Ok(())
    }

    /// Takes finished jobs from the helpers (waiting for one if `wait`), then writes
    /// every job that is next in order.
    fn collect(&mut self, wait: bool) -> Result<()> {
        if let Some(pool) = &self.pool {
            let mut first = wait;
            loop {
                let done = if first {
                    if self.sent == self.received {
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
                self.received += 1;
                done.result?;
                self.ready.insert(done.job.seq, done.job);
            }
        }
        while let Some(mut job) = self.ready.remove(&self.next_write) {
            self.out.write_all(&job.out[..job.used])?;
            self.data_bytes += job.used as u64;
            self.lens.extend_from_slice(&job.lens);
            self.next_write += 1;
            job.input.clear();
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
        if !self.pending.is_empty() {
            self.submit(None)?;
        }
        while self.next_write < self.next_seq {
            self.collect(true)?;
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
pub fn compress<W: Write + Seek>(mut input: impl Read, output: W, opts: Options) -> Result<Info> {
    let mut w = ZFileWriter::new(output, opts)?;
    let mut buf = vec![0u8; JOB_BYTES];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        w.append(&buf[..n])?;
    }
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
