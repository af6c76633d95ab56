//! FUSE + loop frontend against the real kernel: loop devices over plain files, ext4
//! images served from memory (read-only and writable), and crash cleanup.
//!
//! Needs root, /dev/fuse, /dev/loop-control, fusermount3, mkfs.ext4 and blkdiscard;
//! otherwise each test prints `SKIPPED: <why>` to stderr and passes.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fixtures::procs::{poll, run, Needs};
use fixtures::random_bytes;

use tcmu_target::fuse::{FuseFrontend, FuseOptions, DEFAULT_READ_AHEAD_KB};
use tcmu_target::loopdev::{LoopDevice, LoopOptions};
use tcmu_target::{Attachment, Frontend, MemBackend};

const CHILD_ENV: &str = "OBD_FUSE_LOOP_CHILD_WORK";
const CHILD_IMG_ENV: &str = "OBD_FUSE_LOOP_CHILD_IMG";

fn missing_requirement() -> Option<String> {
    Needs::root(&["fusermount3", "mkfs.ext4", "mount", "umount", "blkdiscard"])
        .paths(&["/dev/fuse", "/dev/loop-control"])
        .unmet()
}

macro_rules! require {
    () => {
        if let Some(why) = missing_requirement() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

fn is_mounted(path: &Path) -> bool {
    tcmu_target::mountinfo::read()
        .unwrap()
        .iter()
        .any(|m| m.mount_point == path)
}

/// The backing file of /dev/loopN as the kernel shows it, if bound.
fn loop_backing(dev: &Path) -> Option<Vec<u8>> {
    let name = dev.file_name()?.to_str()?;
    std::fs::read(format!("/sys/block/{name}/loop/backing_file")).ok()
}

/// Test files: (relative path, contents).
fn sample_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "hello.txt",
            b"hello from a FUSE-backed loop device\n".to_vec(),
        ),
        ("empty", Vec::new()),
        ("big.bin", random_bytes(1, 3 << 20)),
        ("dir/sub/odd.bin", random_bytes(2, 123_457)),
    ]
}

fn write_files(root: &Path, files: &[(&str, Vec<u8>)]) {
    for (rel, data) in files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
    }
}

fn check_files(root: &Path, files: &[(&str, Vec<u8>)]) {
    for (rel, data) in files {
        let got = std::fs::read(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert!(
            got == *data,
            "{rel} differs ({} vs {} bytes)",
            got.len(),
            data.len()
        );
    }
}

/// An ext4 image of 64 MiB holding `files`.
fn ext4_image(tmp: &Path, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let src = tmp.join("src");
    write_files(&src, files);
    let img = tmp.join("ext4.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("64M"));
    img
}

/// A read-only in-memory backend holding [`ext4_image`] of `files`.
fn ext4_backend(tmp: &Path, files: &[(&str, Vec<u8>)]) -> Arc<MemBackend> {
    let img = ext4_image(tmp, files);
    Arc::new(MemBackend::new(std::fs::read(img).unwrap(), true))
}

/// A temporary directory, [`sample_files`], a backend holding them in an
/// ext4 and an empty work directory in it.
#[allow(clippy::type_complexity)]
fn ext4_setup() -> (
    tempfile::TempDir,
    Vec<(&'static str, Vec<u8>)>,
    Arc<MemBackend>,
    PathBuf,
) {
    let tmp = tempfile::tempdir().unwrap();
    let files = sample_files();
    let backend = ext4_backend(tmp.path(), &files);
    let work = work_dir(tmp.path(), "work");
    (tmp, files, backend, work)
}

/// A new, empty work directory `<tmp>/<name>`.
fn work_dir(tmp: &Path, name: &str) -> PathBuf {
    let work = tmp.join(name);
    std::fs::create_dir(&work).unwrap();
    work
}

/// A FUSE + loop attachment under test.
struct Fused {
    att: Box<dyn Attachment>,
    dev: PathBuf,
    /// The loop device's backing file as the kernel shows it.
    backing: Vec<u8>,
    work: PathBuf,
}

impl Fused {
    /// Attaches `backend` as `id` with the work directory `work`.
    fn attach(fe: &FuseFrontend, backend: Arc<MemBackend>, id: &str, work: &Path) -> Fused {
        let att = fe.attach(backend, id, work).unwrap();
        let dev = att.device_path().to_path_buf();
        let backing = loop_backing(&dev).unwrap();
        Fused {
            att,
            dev,
            backing,
            work: work.to_owned(),
        }
    }

    /// The one file of the FUSE mount that backs the loop device.
    fn disk(&self) -> PathBuf {
        self.work.canonicalize().unwrap().join("fuse/disk")
    }

    /// The permission bits of [`Fused::disk`].
    fn disk_mode(&self) -> u32 {
        let meta = std::fs::metadata(self.disk()).unwrap();
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777
    }

    /// Detaches and checks that nothing is left.
    fn detach(self) {
        self.att.detach().unwrap();
        assert_gone(&self.work, &self.dev, &self.backing);
    }
}

fn mount_ext4(dev: &Path, at: &Path, ro: bool) {
    std::fs::create_dir_all(at).unwrap();
    run(Command::new("mount")
        .args(["-t", "ext4", "-o", if ro { "ro" } else { "rw" }])
        .arg(dev)
        .arg(at));
}

fn umount(at: &Path) {
    run(Command::new("umount").arg(at));
}

fn assert_gone(work: &Path, dev: &Path, backing_was: &[u8]) {
    let disk = work.canonicalize().unwrap().join("fuse/disk");
    assert!(
        poll(Duration::from_secs(10), || {
            LoopDevice::find_by_backing(&disk).is_empty()
                && loop_backing(dev).is_none_or(|b| b != backing_was)
        }),
        "a loop device still serves {}",
        disk.display()
    );
    assert!(!is_mounted(&work.canonicalize().unwrap().join("fuse")));
}

#[test]
fn loop_over_plain_file() {
    require!();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("plain.img");
    let data = random_bytes(3, 4 << 20);
    std::fs::write(&path, &data).unwrap();
    for direct_io in [false, true] {
        let lo = LoopDevice::attach(
            &path,
            LoopOptions {
                read_only: true,
                direct_io,
                block_size: 4096,
                autoclear: true,
            },
        )
        .unwrap();
        let dev = lo.path().to_path_buf();
        assert!(dev.to_str().unwrap().starts_with("/dev/loop"));
        let canon = path.canonicalize().unwrap();
        assert!(LoopDevice::find_by_backing(&canon).contains(&dev));
        if direct_io {
            // A file on a local filesystem takes direct I/O.
            assert!(
                lo.direct_io().unwrap(),
                "direct I/O refused on {}",
                canon.display()
            );
        }
        let mut got = Vec::new();
        std::fs::File::open(&dev)
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert!(got == data, "{} reads differ from the file", dev.display());
        // Writes are refused on a read-only device.
        assert!(std::fs::OpenOptions::new()
            .write(true)
            .open(&dev)
            .and_then(|mut f| f.write_all(&[1; 4096]).and_then(|_| f.sync_all()))
            .is_err());
        lo.detach().unwrap();
        assert!(
            poll(Duration::from_secs(5), || LoopDevice::find_by_backing(
                &canon
            )
            .is_empty()),
            "{} still bound",
            dev.display()
        );
    }
    // Detaching an idle device is fine.
    LoopDevice::detach_path(Path::new("/dev/loop-nonexistent")).unwrap();
}

#[test]
fn loop_attach_races() {
    require!();
    let tmp = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..4)
        .map(|i| {
            let p = tmp.path().join(format!("f{i}"));
            std::fs::write(&p, vec![i as u8; 1 << 20]).unwrap();
            p
        })
        .collect();
    let devs: Vec<LoopDevice> = std::thread::scope(|s| {
        let hs: Vec<_> = paths
            .iter()
            .map(|p| s.spawn(move || LoopDevice::attach(p, LoopOptions::default()).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut names: Vec<&Path> = devs.iter().map(|d| d.path()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 4);
    for (i, d) in devs.iter().enumerate() {
        let mut b = [0u8; 512];
        std::fs::File::open(d.path())
            .unwrap()
            .read_exact(&mut b)
            .unwrap();
        assert_eq!(b, [i as u8; 512]);
    }
    for d in devs {
        d.detach().unwrap();
    }
}

#[test]
fn fuse_reads_match_backend() {
    require!();
    let tmp = tempfile::tempdir().unwrap();
    let data = Arc::new(random_bytes(4, 16 << 20));
    let backend = Arc::new(MemBackend::new(data.to_vec(), true));
    let work = work_dir(tmp.path(), "work");
    let f = Fused::attach(&FuseFrontend::new(), backend, "read-test", &work);
    let dev = &f.dev;
    // O_DIRECT preads from several threads at scattered offsets and sizes.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let data = &data;
            s.spawn(move || {
                use std::os::unix::fs::{FileExt, OpenOptionsExt};
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(dev)
                    .unwrap();
                // An O_DIRECT buffer must be aligned: take an aligned window.
                let mut buf = vec![0u8; (1 << 20) + 4096];
                let off = buf.as_ptr().align_offset(4096);
                let buf = &mut buf[off..off + (1 << 20)];
                let mut x = t + 1;
                for _ in 0..200 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let len = 4096 * (1 + (x >> 33) as usize % 256);
                    let pos = 4096 * ((x >> 17) as usize % ((data.len() - len) / 4096));
                    f.read_exact_at(&mut buf[..len], pos as u64).unwrap();
                    assert!(
                        buf[..len] == data[pos..pos + len],
                        "{len} bytes at {pos} differ"
                    );
                }
            });
        }
    });
    f.detach();
}

/// The loop device's `queue/read_ahead_kb`.
fn read_ahead_kb(dev: &Path) -> u32 {
    let name = dev.file_name().unwrap().to_str().unwrap();
    let s = std::fs::read_to_string(format!("/sys/block/{name}/queue/read_ahead_kb")).unwrap();
    s.trim().parse().unwrap()
}

#[test]
fn fuse_read_ahead_set_on_every_attach() {
    require!();
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(MemBackend::new(vec![0u8; 4 << 20], true));
    let odd = FuseFrontend::with_options(FuseOptions {
        read_ahead_kb: Some(1536),
        ..FuseOptions::default()
    });
    let f = Fused::attach(&odd, backend.clone(), "ra-odd", &work_dir(tmp.path(), "w1"));
    assert_eq!(read_ahead_kb(&f.dev), 1536);
    f.detach();
    // The next attach (maybe on the same loop device) sets its own value
    // instead of inheriting the last user's.
    let f = Fused::attach(
        &FuseFrontend::new(),
        backend.clone(),
        "ra-def",
        &work_dir(tmp.path(), "w2"),
    );
    assert_eq!(read_ahead_kb(&f.dev), DEFAULT_READ_AHEAD_KB);
    f.detach();
    // A backend's own value wins over the frontend's.
    let att = FuseFrontend::new()
        .attach(
            Arc::new(ReadAhead(backend)),
            "ra-own",
            &work_dir(tmp.path(), "w3"),
        )
        .unwrap();
    assert_eq!(read_ahead_kb(att.device_path()), 3072);
    att.detach().unwrap();
}

/// A backend asking for 3 MiB of readahead.
struct ReadAhead(Arc<MemBackend>);

impl tcmu_target::BlockBackend for ReadAhead {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        self.0.read_only()
    }
    fn read_ahead_kb(&self) -> Option<u32> {
        Some(3072)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.discard(offset, len)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[test]
fn fuse_read_only_ext4() {
    require!();
    let (tmp, files, backend, work) = ext4_setup();
    let fe = FuseFrontend::new();
    assert_eq!(fe.name(), "fuse");

    let f = Fused::attach(&fe, backend, "ro-test", &work);
    let disk = f.disk();
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 64 << 20);
    assert_eq!(f.disk_mode(), 0o444);
    assert_eq!(LoopDevice::find_by_backing(&disk), vec![f.dev.clone()]);

    // Reads beyond the end of the file are short.
    let mut file = std::fs::File::open(&disk).unwrap();
    let mut tail = Vec::new();
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start((64 << 20) - 100)).unwrap();
    file.read_to_end(&mut tail).unwrap();
    assert_eq!(tail.len(), 100);
    drop(file);

    let m = tmp.path().join("m");
    mount_ext4(&f.dev, &m, true);
    check_files(&m, &files);
    umount(&m);
    f.detach();
}

#[test]
fn fuse_writable_ext4_survives_reattach() {
    require!();
    let tmp = tempfile::tempdir().unwrap();
    let mut data = vec![0; 64 << 20];
    data[..2 << 20].fill(0x5a);
    let backend = Arc::new(MemBackend::new(data, false));
    let work = work_dir(tmp.path(), "work");
    let fe = FuseFrontend::new();
    let files = sample_files();
    let m = tmp.path().join("m");

    let f = Fused::attach(&fe, backend.clone(), "rw-test", &work);
    assert_eq!(f.disk_mode(), 0o644);
    // A discard reaches the backend as FALLOCATE(PUNCH_HOLE).
    run(Command::new("blkdiscard")
        .args(["-o", "0", "-l", "1048576"])
        .arg(&f.dev));
    let snap = backend.snapshot();
    assert!(snap[..1 << 20].iter().all(|&b| b == 0));
    assert!(snap[1 << 20..2 << 20].iter().all(|&b| b == 0x5a));
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&f.dev));
    mount_ext4(&f.dev, &m, false);
    write_files(&m, &files);
    for (rel, _) in &files {
        std::fs::File::open(m.join(rel))
            .unwrap()
            .sync_all()
            .unwrap();
    }
    run(Command::new("sync").arg("-f").arg(&m));
    umount(&m);
    f.detach();
    // The superblock magic 0xEF53 at 1024 + 56 landed in the backend.
    assert_eq!(&backend.snapshot()[1080..1082], &[0x53, 0xEF]);

    let f = Fused::attach(&fe, backend.clone(), "rw-test", &work);
    mount_ext4(&f.dev, &m, false);
    check_files(&m, &files);
    std::fs::remove_file(m.join("big.bin")).unwrap();
    umount(&m);
    f.detach();
}

#[test]
fn detach_while_still_mounted_stops_serving() {
    require!();
    let (tmp, files, backend, work) = ext4_setup();
    let f = Fused::attach(&FuseFrontend::new(), backend, "busy-test", &work);
    let m = tmp.path().join("m");
    mount_ext4(&f.dev, &m, true);
    check_files(&m, &files[..1]);
    // The caller forgot to unmount: detach reports it but stops serving anyway.
    let err = f.att.detach().unwrap_err();
    assert!(err.to_string().contains("still open"), "{err}");
    assert!(!is_mounted(&work.canonicalize().unwrap().join("fuse")));
    assert!(std::fs::read(m.join("big.bin")).is_err());
    umount(&m);
    assert_gone(&work, &f.dev, &f.backing);
}

/// The child half of `cleanup_after_crash`: attaches and waits to be killed.
#[test]
fn crash_child() {
    let (Some(work), Some(img)) = (std::env::var_os(CHILD_ENV), std::env::var_os(CHILD_IMG_ENV))
    else {
        return; // not run as the child
    };
    let backend = Arc::new(MemBackend::new(std::fs::read(img).unwrap(), true));
    let att = FuseFrontend::new()
        .attach(backend, "crash-test", Path::new(&work))
        .unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY {}", att.device_path().display()).unwrap();
    out.flush().unwrap();
    // Wait for the parent: it kills this process; EOF means the parent went away.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    att.detach().unwrap();
}

/// `crash_child` running in a process of its own, attached.
struct Crashing {
    child: std::process::Child,
    work: PathBuf,
    /// The FUSE mount point under `work`.
    mnt: PathBuf,
    dev: PathBuf,
    /// The loop device's backing file as the kernel shows it.
    backing: Vec<u8>,
}

impl Crashing {
    /// Starts `crash_child` serving `img` with the work directory
    /// `<tmp>/<name>`; returns once it has attached.
    fn spawn(tmp: &Path, name: &str, img: &Path) -> Crashing {
        let work = work_dir(tmp, name);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &work)
            .env(CHILD_IMG_ENV, img)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        // libtest may have printed "test crash_child ... " on the READY line.
        let dev = stdout
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.split_once("READY ").map(|(_, d)| PathBuf::from(d.trim())));
        let Some(dev) = dev else {
            let _ = child.kill();
            panic!("the child exited before attaching: {:?}", child.wait());
        };
        let backing = loop_backing(&dev).unwrap();
        let mnt = work.canonicalize().unwrap().join("fuse");
        Crashing {
            child,
            work,
            mnt,
            dev,
            backing,
        }
    }

    /// SIGKILLs the child and reaps it.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Crashing {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn cleanup_after_crash() {
    require!();
    let tmp = tempfile::tempdir().unwrap();
    let files = sample_files();
    let img = ext4_image(tmp.path(), &files);
    let fe = FuseFrontend::new();

    // 1. Killed while nothing else used the device: autoclear drops the loop device,
    //    a dead FUSE mount stays behind until cleanup.
    let mut c = Crashing::spawn(tmp.path(), "work1", &img);
    assert!(is_mounted(&c.mnt));
    c.kill();
    assert!(
        is_mounted(&c.mnt),
        "the dead FUSE mount should remain until cleanup"
    );
    fe.cleanup("crash-test", &c.work).unwrap();
    assert_gone(&c.work, &c.dev, &c.backing);
    fe.cleanup("crash-test", &c.work).unwrap(); // idempotent

    // 2. Killed while a filesystem on the device was mounted: the loop device
    //    outlives the process; cleanup aborts the connection, marks the device for
    //    removal and unmounts FUSE; the device goes when its filesystem is unmounted.
    let mut c = Crashing::spawn(tmp.path(), "work2", &img);
    let m = tmp.path().join("m");
    mount_ext4(&c.dev, &m, true);
    check_files(&m, &files[..1]);
    c.kill();
    fe.cleanup("crash-test", &c.work).unwrap();
    assert!(!is_mounted(&c.mnt));
    // Reading data not read before fails now instead of hanging.
    assert!(std::fs::read(m.join("big.bin")).is_err());
    umount(&m);
    assert!(
        poll(Duration::from_secs(10), || loop_backing(&c.dev)
            .is_none_or(|b| b != c.backing)),
        "{} is still bound",
        c.dev.display()
    );
    fe.cleanup("crash-test", &c.work).unwrap();
    assert_gone(&c.work, &c.dev, &c.backing);

    // 3. Nothing to clean up: fine too.
    fe.cleanup("never-attached", &tmp.path().join("none"))
        .unwrap();
}
