//! FUSE + loop frontend against the real kernel: loop devices over plain files, ext4
//! images served from memory (read-only and writable), and crash cleanup.
//!
//! Needs root, /dev/fuse, /dev/loop-control, fusermount3, mkfs.ext4 and blkdiscard;
//! otherwise each test prints `SKIPPED: <why>` to stderr and passes.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tcmu_target::fuse::FuseFrontend;
use tcmu_target::loopdev::{LoopDevice, LoopOptions};
use tcmu_target::{Frontend, MemBackend};

const CHILD_ENV: &str = "OBD_FUSE_LOOP_CHILD_WORK";
const CHILD_IMG_ENV: &str = "OBD_FUSE_LOOP_CHILD_IMG";

fn missing_requirement() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            return Some(format!("{dev} is missing"));
        }
    }
    for tool in ["fusermount3", "mkfs.ext4", "mount", "umount", "blkdiscard"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

macro_rules! require {
    () => {
        if let Some(why) = missing_requirement() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// Polls `cond` until it holds or `timeout` passes.
fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
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

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Test files: (relative path, contents).
fn sample_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "hello.txt",
            b"hello from a FUSE-backed loop device\n".to_vec(),
        ),
        ("empty", Vec::new()),
        ("big.bin", pseudo_random(3 << 20, 1)),
        ("dir/sub/odd.bin", pseudo_random(123_457, 2)),
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
    let data = pseudo_random(4 << 20, 3);
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
    let data = Arc::new(pseudo_random(16 << 20, 4));
    let backend = Arc::new(MemBackend::new(data.to_vec(), true));
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let att = FuseFrontend::new()
        .attach(backend, "read-test", &work)
        .unwrap();
    let dev = att.device_path().to_path_buf();
    let backing = loop_backing(&dev).unwrap();
    // O_DIRECT preads from several threads at scattered offsets and sizes.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (dev, data) = (&dev, &data);
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
    att.detach().unwrap();
    assert_gone(&work, &dev, &backing);
}

#[test]
fn fuse_read_only_ext4() {
    require!();
    let tmp = tempfile::tempdir().unwrap();
    let files = sample_files();
    let img = ext4_image(tmp.path(), &files);
    let backend = Arc::new(MemBackend::new(std::fs::read(&img).unwrap(), true));
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let fe = FuseFrontend::new();
    assert_eq!(fe.name(), "fuse");

    let att = fe.attach(backend, "ro-test", &work).unwrap();
    let dev = att.device_path().to_path_buf();
    let disk = work.canonicalize().unwrap().join("fuse/disk");
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o444
    );
    assert_eq!(LoopDevice::find_by_backing(&disk), vec![dev.clone()]);
    let backing = loop_backing(&dev).unwrap();

    // Reads beyond the end of the file are short.
    let mut f = std::fs::File::open(&disk).unwrap();
    let mut tail = Vec::new();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start((64 << 20) - 100)).unwrap();
    f.read_to_end(&mut tail).unwrap();
    assert_eq!(tail.len(), 100);
    drop(f);

    let m = tmp.path().join("m");
    mount_ext4(&dev, &m, true);
    check_files(&m, &files);
    umount(&m);
    att.detach().unwrap();
    assert_gone(&work, &dev, &backing);
}

#[test]
fn fuse_writable_ext4_survives_reattach() {
    require!();
    let tmp = tempfile::tempdir().unwrap();
    let mut data = vec![0; 64 << 20];
    data[..2 << 20].fill(0x5a);
    let backend = Arc::new(MemBackend::new(data, false));
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let fe = FuseFrontend::new();
    let files = sample_files();
    let m = tmp.path().join("m");

    let att = fe.attach(backend.clone(), "rw-test", &work).unwrap();
    let dev = att.device_path().to_path_buf();
    let disk = work.canonicalize().unwrap().join("fuse/disk");
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o644
    );
    let backing = loop_backing(&dev).unwrap();
    // A discard reaches the backend as FALLOCATE(PUNCH_HOLE).
    run(Command::new("blkdiscard")
        .args(["-o", "0", "-l", "1048576"])
        .arg(&dev));
    let snap = backend.snapshot();
    assert!(snap[..1 << 20].iter().all(|&b| b == 0));
    assert!(snap[1 << 20..2 << 20].iter().all(|&b| b == 0x5a));
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev));
    mount_ext4(&dev, &m, false);
    write_files(&m, &files);
    for (rel, _) in &files {
        std::fs::File::open(m.join(rel))
            .unwrap()
            .sync_all()
            .unwrap();
    }
    run(Command::new("sync").arg("-f").arg(&m));
    umount(&m);
    att.detach().unwrap();
    assert_gone(&work, &dev, &backing);
    // The superblock magic 0xEF53 at 1024 + 56 landed in the backend.
    assert_eq!(&backend.snapshot()[1080..1082], &[0x53, 0xEF]);

    let att = fe.attach(backend.clone(), "rw-test", &work).unwrap();
    let dev = att.device_path().to_path_buf();
    let backing = loop_backing(&dev).unwrap();
    mount_ext4(&dev, &m, false);
    check_files(&m, &files);
    std::fs::remove_file(m.join("big.bin")).unwrap();
    umount(&m);
    att.detach().unwrap();
    assert_gone(&work, &dev, &backing);
}

#[test]
fn detach_while_still_mounted_stops_serving() {
    require!();
    let tmp = tempfile::tempdir().unwrap();
    let files = sample_files();
    let img = ext4_image(tmp.path(), &files);
    let backend = Arc::new(MemBackend::new(std::fs::read(&img).unwrap(), true));
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let att = FuseFrontend::new()
        .attach(backend, "busy-test", &work)
        .unwrap();
    let dev = att.device_path().to_path_buf();
    let backing = loop_backing(&dev).unwrap();
    let m = tmp.path().join("m");
    mount_ext4(&dev, &m, true);
    check_files(&m, &files[..1]);
    // The caller forgot to unmount: detach reports it but stops serving anyway.
    let err = att.detach().unwrap_err();
    assert!(err.to_string().contains("still open"), "{err}");
    assert!(!is_mounted(&work.canonicalize().unwrap().join("fuse")));
    assert!(std::fs::read(m.join("big.bin")).is_err());
    umount(&m);
    assert_gone(&work, &dev, &backing);
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

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `crash_child` in a new process; returns it and its device.
fn spawn_child(work: &Path, img: &Path) -> (Child, PathBuf) {
    let mut child = Child(
        Command::new(std::env::current_exe().unwrap())
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, work)
            .env(CHILD_IMG_ENV, img)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = BufReader::new(child.0.stdout.take().unwrap());
    for line in stdout.lines() {
        let line = line.unwrap();
        // libtest may have printed "test crash_child ... " on the same line.
        if let Some((_, dev)) = line.split_once("READY ") {
            return (child, PathBuf::from(dev.trim()));
        }
    }
    panic!("the child exited before attaching: {:?}", child.0.wait());
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
    let work = tmp.path().join("work1");
    std::fs::create_dir(&work).unwrap();
    let mnt = work.canonicalize().unwrap().join("fuse");
    let (mut child, dev) = spawn_child(&work, &img);
    let backing = loop_backing(&dev).unwrap();
    assert!(is_mounted(&mnt));
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert!(
        is_mounted(&mnt),
        "the dead FUSE mount should remain until cleanup"
    );
    fe.cleanup("crash-test", &work).unwrap();
    assert_gone(&work, &dev, &backing);
    fe.cleanup("crash-test", &work).unwrap(); // idempotent

    // 2. Killed while a filesystem on the device was mounted: the loop device
    //    outlives the process; cleanup aborts the connection, marks the device for
    //    removal and unmounts FUSE; the device goes when its filesystem is unmounted.
    let work = tmp.path().join("work2");
    std::fs::create_dir(&work).unwrap();
    let mnt = work.canonicalize().unwrap().join("fuse");
    let (mut child, dev) = spawn_child(&work, &img);
    let backing = loop_backing(&dev).unwrap();
    let m = tmp.path().join("m");
    mount_ext4(&dev, &m, true);
    check_files(&m, &files[..1]);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    fe.cleanup("crash-test", &work).unwrap();
    assert!(!is_mounted(&mnt));
    // Reading data not read before fails now instead of hanging.
    assert!(std::fs::read(m.join("big.bin")).is_err());
    umount(&m);
    assert!(
        poll(Duration::from_secs(10), || loop_backing(&dev)
            .is_none_or(|b| b != backing)),
        "{} is still bound",
        dev.display()
    );
    fe.cleanup("crash-test", &work).unwrap();
    assert_gone(&work, &dev, &backing);

    // 3. Nothing to clean up: fine too.
    fe.cleanup("never-attached", &tmp.path().join("none"))
        .unwrap();
}
