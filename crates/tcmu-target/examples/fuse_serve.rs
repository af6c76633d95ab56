//! Serves a disk image file through the FUSE + loop frontend, for measurements.
//!
//! ```text
//! fuse_serve IMAGE WORK_DIR [--rw] [--threads N] [--page-cache] [--no-loop-dio] [--max-io BYTES] [--max-read BYTES]
//! ```
//! Prints `READY /dev/loopN` once the device exists, serves it until stdin closes
//! (or a line arrives), then detaches. `--page-cache` opens the FUSE file with
//! `FOPEN_KEEP_CACHE` instead of `FOPEN_DIRECT_IO`.

use std::io::{BufRead, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use tcmu_target::fuse::{FuseFrontend, FuseOptions};
use tcmu_target::{BlockBackend, Frontend};

/// A backend over a plain file (`pread`/`pwrite`).
struct FileBackend {
    file: std::fs::File,
    size: u64,
    read_only: bool,
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        // Zeros, without punching holes (good enough for a measurement tool).
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "fuse_serve IMAGE WORK_DIR [--rw] [--threads N] [--page-cache] [--no-loop-dio] [--max-io BYTES] [--max-read BYTES]";
    let image = PathBuf::from(args.next().ok_or(usage)?);
    let work = PathBuf::from(args.next().ok_or(usage)?);
    let mut opts = FuseOptions::default();
    let mut read_only = true;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rw" => read_only = false,
            "--threads" => opts.threads = args.next().ok_or(usage)?.parse()?,
            "--page-cache" => opts.fuse_direct_io = false,
            "--no-loop-dio" => opts.loop_direct_io = false,
            "--max-io" => opts.max_io = args.next().ok_or(usage)?.parse()?,
            "--max-read" => opts.max_read = args.next().ok_or(usage)?.parse()?,
            _ => return Err(usage.into()),
        }
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(&image)?;
    let size = file.metadata()?.len();
    let backend = Arc::new(FileBackend {
        file,
        size,
        read_only,
    });
    std::fs::create_dir_all(&work)?;
    let fe = FuseFrontend::with_options(opts);
    fe.cleanup("bench", &work)?;
    let att = fe.attach(backend, "bench", &work)?;
    let dio = std::fs::read_to_string(format!(
        "/sys/block/{}/loop/dio",
        att.device_path()
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
    ))
    .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "READY {} loop-dio={}",
        att.device_path().display(),
        dio.trim()
    )?;
    out.flush()?;
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    att.detach()?;
    Ok(())
}
