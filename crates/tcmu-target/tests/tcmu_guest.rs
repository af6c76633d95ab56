//! End to end against a real kernel: TCMU + tcm_loop as `/dev/sdX`, ext4 on it.
//!
//! These tests are `#[ignore]`d: they need root, configfs and the
//! `target_core_user` and `tcm_loop` modules, which the CI host's kernel lacks. Run
//! them in the qemu guest with `scripts/tcmu-guest-test.sh`. Without what they
//! need they print `SKIPPED: ...` and pass.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fixtures::procs::run;
use fixtures::random_bytes;
use tcmu_target::tcmu::configfs::{self, DevicePaths};
use tcmu_target::tcmu::{TcmuFrontend, TcmuOptions};
use tcmu_target::{Attachment, BlockBackend, Frontend, MemBackend};

const MIB: usize = 1 << 20;

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root".into());
    }
    if !configfs::target_available() {
        return Some(format!(
            "{}/core is missing (modprobe target_core_user tcm_loop)",
            configfs::TARGET_ROOT
        ));
    }
    for m in ["target_core_user", "tcm_loop"] {
        if !Path::new("/sys/module").join(m).exists() {
            return Some(format!("kernel module {m} is not loaded"));
        }
    }
    for tool in ["mkfs.ext4", "mount", "umount", "e2fsck"] {
        if !tool_exists(tool) {
            return Some(format!("{tool} is missing"));
        }
    }
    None
}

fn tool_exists(tool: &str) -> bool {
    fixtures::procs::have(tool)
}

macro_rules! require_kernel {
    ($name:expr) => {
        if let Some(why) = skip_reason() {
            eprintln!("SKIPPED: {}: {why}", $name);
            return;
        }
    };
}

/// A temporary directory with `len` random bytes (seed `seed`) in the file
/// `image` and an empty `state` directory: (dir, bytes, image, state).
fn image_and_state(seed: u64, len: usize) -> (tempfile::TempDir, Arc<Vec<u8>>, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let image = Arc::new(random_bytes(seed, len));
    let img = tmp.path().join("image");
    fs::write(&img, &*image).unwrap();
    let state = tmp.path().join("state");
    fs::create_dir_all(&state).unwrap();
    (tmp, image, img, state)
}

/// A tree of files: (relative path, contents).
fn sample_tree() -> Vec<(String, Vec<u8>)> {
    let sizes = [0, 1, 511, 4095, 4096, 65537, MIB + 3, 5 * MIB];
    let mut out = Vec::new();
    for (i, n) in sizes.iter().enumerate() {
        out.push((format!("f{i}"), random_bytes(i as u64, *n)));
        out.push((
            format!("d{}/sub/g{i}", i % 3),
            random_bytes(100 + i as u64, *n / 3),
        ));
    }
    out
}

fn write_tree(root: &Path, tree: &[(String, Vec<u8>)]) {
    for (rel, data) in tree {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut f = File::create(&p).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }
}

fn check_tree(root: &Path, tree: &[(String, Vec<u8>)]) {
    for (rel, data) in tree {
        let got = fs::read(root.join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"));
        assert!(
            got == *data,
            "{rel}: contents differ ({} vs {} bytes)",
            got.len(),
            data.len()
        );
    }
}

fn mkfs_image(dir: &Path, tree: &[(String, Vec<u8>)], size_mib: usize) -> Vec<u8> {
    let src = dir.join("src");
    write_tree(&src, tree);
    let img = dir.join("fs.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-L", "obd-test", "-d"])
        .arg(&src)
        .arg(&img)
        .arg(format!("{size_mib}M")));
    fs::read(&img).unwrap()
}

fn mount(dev: &Path, at: &Path, opts: &str) {
    fs::create_dir_all(at).unwrap();
    run(Command::new("mount")
        .args(["-t", "ext4", "-o", opts])
        .arg(dev)
        .arg(at));
}

fn umount(at: &Path) {
    run(Command::new("umount").arg(at));
}

fn drop_caches() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

fn sd_name(dev: &Path) -> String {
    dev.file_name().unwrap().to_string_lossy().into_owned()
}

fn sys_block(dev: &Path, attr: &str) -> String {
    fs::read_to_string(Path::new("/sys/block").join(sd_name(dev)).join(attr))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Reads the whole device with O_DIRECT in `chunk`-byte requests.
fn read_direct(dev: &Path, len: usize, chunk: usize) -> io::Result<Vec<u8>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?;
    let mut out = Vec::with_capacity(len);
    let mut buf = AlignedBuf::new(chunk);
    let mut off = 0usize;
    while off < len {
        let n = chunk.min(len - off);
        f.read_exact_at(&mut buf.as_mut()[..n], off as u64)?;
        out.extend_from_slice(&buf.as_mut()[..n]);
        off += n;
    }
    Ok(out)
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct AlignedBuf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}
impl AlignedBuf {
    fn new(len: usize) -> Self {
        let v = vec![0u8; len + 4096];
        let start = v.as_ptr().align_offset(4096);
        AlignedBuf { v, start, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

fn assert_no_leftovers(id: &str) {
    let p = DevicePaths::new(id).unwrap();
    let left = configfs::leftovers(&p);
    assert!(left.is_empty(), "left behind for {id}: {left:?}");
}

fn frontend() -> TcmuFrontend {
    TcmuFrontend::new(TcmuOptions {
        attach_timeout: Duration::from_secs(120),
        ..TcmuOptions::default()
    })
}

#[test]
#[ignore = "needs root and the TCMU/tcm_loop kernel modules: scripts/tcmu-guest-test.sh"]
fn tcmu_guest_e2e_read_only() {
    require_kernel!("tcmu_guest_e2e_read_only");
    let tmp = tempfile::tempdir().unwrap();
    let tree = sample_tree();
    let image = mkfs_image(tmp.path(), &tree, 64);
    let backend = Arc::new(MemBackend::new(image.clone(), true));
    let fe = frontend();
    assert_eq!(fe.name(), "tcmu");
    let id = "e2e-ro";
    fe.cleanup(id, tmp.path()).unwrap();

    let t = Instant::now();
    let att = fe.attach(backend, id, tmp.path()).unwrap();
    let dev = att.device_path().to_path_buf();
    eprintln!("attach: {} in {:?}", dev.display(), t.elapsed());
    assert!(dev.starts_with("/dev") && dev.exists());
    assert_eq!(sys_block(&dev, "size"), (64 * MIB / 512).to_string());
    assert_eq!(sys_block(&dev, "ro"), "1", "write protect seen by sd");
    assert_eq!(sys_block(&dev, "device/vendor"), "OBD");

    // Raw O_DIRECT read of the whole device.
    let t = Instant::now();
    let raw = read_direct(&dev, image.len(), MIB).unwrap();
    let el = t.elapsed();
    assert!(raw == image, "raw device contents differ");
    eprintln!(
        "O_DIRECT read of 64 MiB: {:?} ({:.1} MiB/s)",
        el,
        64.0 / el.as_secs_f64()
    );
    // A write is refused.
    let w = OpenOptions::new().write(true).open(&dev);
    assert!(w.is_err() || w.unwrap().write_all_at(&[0u8; 512], 0).is_err());

    let mnt = tmp.path().join("mnt");
    mount(&dev, &mnt, "ro,noload");
    check_tree(&mnt, &tree);
    umount(&mnt);

    let t = Instant::now();
    att.detach().unwrap();
    eprintln!("detach in {:?}", t.elapsed());
    assert!(
        !Path::new("/sys/block").join(sd_name(&dev)).exists(),
        "the SCSI disk is gone"
    );
    assert_no_leftovers(id);
    // Idempotent cleanup of nothing.
    fe.cleanup(id, tmp.path()).unwrap();
}

#[test]
#[ignore = "needs root and the TCMU/tcm_loop kernel modules: scripts/tcmu-guest-test.sh"]
fn tcmu_guest_e2e_read_write() {
    require_kernel!("tcmu_guest_e2e_read_write");
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(MemBackend::new(vec![0xa5; 64 * MIB], false));
    let fe = frontend();
    let id = "e2e-rw";
    fe.cleanup(id, tmp.path()).unwrap();
    let att = fe.attach(backend.clone(), id, tmp.path()).unwrap();
    let dev = att.device_path().to_path_buf();
    assert_eq!(sys_block(&dev, "ro"), "0");
    let dmax: u64 = sys_block(&dev, "queue/discard_max_bytes")
        .parse()
        .unwrap_or(0);
    assert!(dmax > 0, "discard enabled (LBPME, VPD 0xB2)");
    eprintln!(
        "{}: discard_max_bytes {dmax}, write_cache {:?}, max_sectors_kb {}",
        dev.display(),
        sys_block(&dev, "queue/write_cache"),
        sys_block(&dev, "queue/max_sectors_kb")
    );

    // mkfs discards the whole device first (UNMAP or WRITE SAME).
    let t = Instant::now();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096"])
        .arg(&dev));
    eprintln!("mkfs.ext4: {:?}", t.elapsed());
    let mnt = tmp.path().join("mnt");
    mount(&dev, &mnt, "rw");
    let tree = sample_tree();
    let t = Instant::now();
    write_tree(&mnt, &tree);
    let mut big = File::create(mnt.join("big")).unwrap();
    let big_data = random_bytes(7, 16 * MIB);
    big.write_all(&big_data).unwrap();
    big.sync_all().unwrap();
    drop(big);
    eprintln!("write ~30 MiB + fsync: {:?}", t.elapsed());
    umount(&mnt);
    drop_caches();

    mount(&dev, &mnt, "rw");
    check_tree(&mnt, &tree);
    let mut got = Vec::new();
    File::open(mnt.join("big"))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got == big_data, "big file differs");
    // Deleting and trimming discards through UNMAP.
    fs::remove_file(mnt.join("big")).unwrap();
    if tool_exists("fstrim") {
        run(Command::new("fstrim").arg("-v").arg(&mnt));
    }
    umount(&mnt);

    att.detach().unwrap();
    assert_no_leftovers(id);

    // What the backend holds is a consistent ext4 file system.
    let img = tmp.path().join("after.img");
    fs::write(&img, backend.snapshot()).unwrap();
    run(Command::new("e2fsck").arg("-fn").arg(&img));
}

#[test]
#[ignore = "needs root and the TCMU/tcm_loop kernel modules: scripts/tcmu-guest-test.sh"]
fn tcmu_guest_two_devices() {
    require_kernel!("tcmu_guest_two_devices");
    let tmp = tempfile::tempdir().unwrap();
    let fe = frontend();
    let [a, b] = [("two-a", 1, 4 * MIB, true), ("two-b", 2, 8 * MIB, false)].map(
        |(id, seed, size, read_only)| {
            let backend = MemBackend::new(random_bytes(seed, size), read_only);
            fe.attach(Arc::new(backend), id, tmp.path()).unwrap()
        },
    );
    assert_ne!(a.device_path(), b.device_path());
    for (att, seed, size) in [(&a, 1, 4 * MIB), (&b, 2, 8 * MIB)] {
        assert_eq!(
            read_direct(att.device_path(), size, 256 * 1024).unwrap(),
            random_bytes(seed, size)
        );
    }
    a.detach().unwrap();
    assert_no_leftovers("two-a");
    // The shared HBA directory stays while b lives.
    assert!(DevicePaths::new("two-b").unwrap().hba_dir.exists());
    b.detach().unwrap();
    assert_no_leftovers("two-b");
    assert!(!DevicePaths::new("two-b").unwrap().hba_dir.exists());
}

// ---- recovery: the serving process dies and another takes over

/// A read-only file backend that is slow on purpose, so a reader is mid-way when
/// the serving process is killed.
struct SlowFile {
    f: File,
    size: u64,
    delay: Duration,
}

impl BlockBackend for SlowFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        std::thread::sleep(self.delay);
        self.f.read_exact_at(buf, off)
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Not a test on its own: the serving process of the recovery tests. Attaches (or
/// takes over) device `$OBD_TCMU_ID` over `$OBD_TCMU_IMAGE`, writes the device
/// path to `$OBD_TCMU_STATE/dev`, serves until `$OBD_TCMU_STATE/stop` exists, then
/// detaches and writes `$OBD_TCMU_STATE/detached`.
#[test]
#[ignore = "helper process of tcmu_guest_recovery"]
fn tcmu_guest_child() {
    let (Some(id), Some(image), Some(state)) = (
        std::env::var_os("OBD_TCMU_ID"),
        std::env::var_os("OBD_TCMU_IMAGE"),
        std::env::var_os("OBD_TCMU_STATE"),
    ) else {
        return;
    };
    let (id, state) = (id.into_string().unwrap(), PathBuf::from(state));
    let f = File::open(&image).unwrap();
    let size = f.metadata().unwrap().len();
    let backend = Arc::new(SlowFile {
        f,
        size,
        delay: Duration::from_millis(3),
    });
    let fe = frontend();
    let t = Instant::now();
    let att = fe.attach_device(backend, &id, &state).unwrap();
    eprintln!(
        "child {}: serving {} ({:?}, ring reset: {})",
        std::process::id(),
        att.device_path().display(),
        t.elapsed(),
        att.ring_was_reset()
    );
    if att.ring_was_reset() {
        fs::write(state.join("ring-reset"), b"").unwrap();
    }
    fs::write(
        state.join("dev.tmp"),
        att.device_path().to_string_lossy().as_bytes(),
    )
    .unwrap();
    fs::rename(state.join("dev.tmp"), state.join("dev")).unwrap();
    while !state.join("stop").exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(att.broken(), None);
    eprintln!(
        "child {}: {} commands completed",
        std::process::id(),
        att.completed()
    );
    Box::new(att).detach().unwrap();
    fs::write(state.join("detached"), b"ok").unwrap();
}

fn spawn_child(id: &str, image: &Path, state: &Path) -> Child {
    let _ = fs::remove_file(state.join("dev"));
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tcmu_guest_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("OBD_TCMU_ID", id)
        .env("OBD_TCMU_IMAGE", image)
        .env("OBD_TCMU_STATE", state)
        .spawn()
        .unwrap()
}

fn wait_dev(state: &Path, child: &mut Child) -> PathBuf {
    let start = Instant::now();
    loop {
        if let Ok(s) = fs::read_to_string(state.join("dev")) {
            return PathBuf::from(s);
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("serving process exited early: {st}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "no device from the child"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads `dev` in 64 KiB O_DIRECT requests against `image`, counting progress.
fn reader(
    dev: PathBuf,
    image: Arc<Vec<u8>>,
    progress: Arc<AtomicU64>,
    loops: usize,
) -> std::thread::JoinHandle<io::Result<usize>> {
    std::thread::spawn(move || {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev)?;
        let chunk = 64 * 1024;
        let mut buf = AlignedBuf::new(chunk);
        let mut mismatches = 0;
        for _ in 0..loops {
            for off in (0..image.len()).step_by(chunk) {
                let n = chunk.min(image.len() - off);
                f.read_exact_at(&mut buf.as_mut()[..n], off as u64)?;
                if buf.as_mut()[..n] != image[off..off + n] {
                    mismatches += 1;
                }
                progress.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
        Ok(mismatches)
    })
}

fn wait_progress(progress: &AtomicU64, at_least: u64) {
    let start = Instant::now();
    while progress.load(Ordering::SeqCst) < at_least {
        assert!(start.elapsed() < Duration::from_secs(300), "reader stalled");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
#[ignore = "needs root and the TCMU/tcm_loop kernel modules: scripts/tcmu-guest-test.sh"]
fn tcmu_guest_recovery() {
    require_kernel!("tcmu_guest_recovery");
    let (_tmp, image, img, state) = image_and_state(42, 16 * MIB);
    let id = "recovery";
    frontend().cleanup(id, &state).unwrap();

    let mut first = spawn_child(id, &img, &state);
    let dev = wait_dev(&state, &mut first);
    let progress = Arc::new(AtomicU64::new(0));
    let rd = reader(dev.clone(), image.clone(), progress.clone(), 2);
    // Kill the serving process a quarter of the way in, with reads in flight.
    wait_progress(&progress, image.len() as u64 / 4);
    first.kill().unwrap();
    first.wait().unwrap();
    let killed_at = progress.load(Ordering::SeqCst);
    eprintln!("killed the serving process at {killed_at} bytes");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        progress.load(Ordering::SeqCst) <= killed_at + 64 * 1024,
        "reads went on without a handler"
    );

    let t = Instant::now();
    let mut second = spawn_child(id, &img, &state);
    let dev2 = wait_dev(&state, &mut second);
    eprintln!("took over {} in {:?}", dev2.display(), t.elapsed());
    assert_eq!(dev2, dev, "the same disk is served again");
    assert!(
        state.join("ring-reset").exists(),
        "the reader's pending command made the takeover reset the ring"
    );

    // While a live process serves it, nobody else can take the device.
    let other = frontend().attach(
        Arc::new(MemBackend::new(vec![0; image.len()], true)),
        id,
        &state,
    );
    match other {
        Err(e) => assert!(e.to_string().contains("another process"), "{e}"),
        Ok(_) => panic!("a second handler attached a served device"),
    }

    let mismatches = rd.join().unwrap().expect("the reader sees no I/O error");
    assert_eq!(mismatches, 0);
    assert_eq!(progress.load(Ordering::SeqCst), 2 * image.len() as u64);

    fs::write(state.join("stop"), b"").unwrap();
    let st = second.wait().unwrap();
    assert!(st.success(), "second serving process: {st}");
    assert!(state.join("detached").exists());
    assert_no_leftovers(id);
}

/// A MemBackend that is slow to read.
struct SlowMem(MemBackend, Duration);

impl BlockBackend for SlowMem {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        self.0.read_only()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        std::thread::sleep(self.1);
        self.0.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.write_at(buf, off)
    }
    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.0.discard(off, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
}

#[test]
#[ignore = "needs root and the TCMU/tcm_loop kernel modules: scripts/tcmu-guest-test.sh"]
fn tcmu_guest_reattach_in_process() {
    require_kernel!("tcmu_guest_reattach_in_process");
    let tmp = tempfile::tempdir().unwrap();
    let image = Arc::new(random_bytes(5, 8 * MIB));
    let backend = Arc::new(SlowMem(
        MemBackend::new((*image).clone(), true),
        Duration::from_millis(3),
    ));
    let fe = frontend();
    let id = "inproc";
    fe.cleanup(id, tmp.path()).unwrap();
    let att = fe.attach_device(backend.clone(), id, tmp.path()).unwrap();
    let dev = att.device_path().to_path_buf();
    let progress = Arc::new(AtomicU64::new(0));
    let rd = reader(dev.clone(), image.clone(), progress.clone(), 2);
    wait_progress(&progress, image.len() as u64 / 3);
    // Stop serving without tearing anything down, then take over again.
    att.abandon();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let att = fe.reattach(backend, id, tmp.path()).unwrap();
    eprintln!(
        "reattached {} in {:?} (ring reset: {})",
        att.device_path().display(),
        t.elapsed(),
        att.ring_was_reset()
    );
    assert_eq!(att.device_path(), dev);
    assert_eq!(rd.join().unwrap().expect("no I/O error"), 0);
    assert_eq!(progress.load(Ordering::SeqCst), 2 * image.len() as u64);
    Box::new(att).detach().unwrap();
    assert_no_leftovers(id);
}

#[test]
#[ignore = "needs root and the TCMU/tcm_loop kernel modules: scripts/tcmu-guest-test.sh"]
fn tcmu_guest_cleanup_after_kill() {
    require_kernel!("tcmu_guest_cleanup_after_kill");
    let (_tmp, image, img, state) = image_and_state(9, 8 * MIB);
    let id = "cleanup";
    let fe = frontend();
    fe.cleanup(id, &state).unwrap();

    let mut child = spawn_child(id, &img, &state);
    let dev = wait_dev(&state, &mut child);
    let progress = Arc::new(AtomicU64::new(0));
    let rd = reader(dev, image.clone(), progress.clone(), 1000);
    wait_progress(&progress, 1024 * 1024);
    child.kill().unwrap();
    child.wait().unwrap();

    // Nobody serves the ring and a reader waits on it: cleanup answers the
    // pending commands (with errors) while it removes everything.
    let t = Instant::now();
    fe.cleanup(id, &state).unwrap();
    eprintln!("cleanup after kill: {:?}", t.elapsed());
    assert_no_leftovers(id);
    let r = rd.join().unwrap();
    assert!(r.is_err(), "the reader's device went away: {r:?}");
    // Idempotent.
    fe.cleanup(id, &state).unwrap();
}

/// Runs everywhere: without the LIO configfs tree, attach says what is missing
/// and cleanup has nothing to do.
#[test]
fn tcmu_unsupported_kernel_is_reported() {
    if configfs::target_available() {
        eprintln!("SKIPPED: tcmu_unsupported_kernel_is_reported: this kernel has TCMU");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fe = TcmuFrontend::default();
    let r = fe.attach(
        Arc::new(MemBackend::new(vec![0; MIB], true)),
        "nope",
        tmp.path(),
    );
    match r {
        Err(tcmu_target::Error::Unsupported(m)) => assert!(m.contains("target_core_user"), "{m}"),
        Err(e) => panic!("expected Unsupported, got {e}"),
        Ok(_) => panic!("attach succeeded without TCMU"),
    }
    fe.cleanup("nope", tmp.path()).unwrap();
    // Bad ids are refused before anything else.
    assert!(DevicePaths::new("Bad_Id").is_err());
    assert!(DevicePaths::new(&"x".repeat(33)).is_err());
    let p = DevicePaths::new("abc-1").unwrap();
    assert_eq!(
        p.uio_name,
        format!("tcm-user/{}/abc-1/obd/abc-1", configfs::HBA)
    );
    assert!(p.wwn.starts_with("naa.5001405"));
    assert_eq!(p.wwn.len(), 4 + 16);
}
