//! An image's live writable upper against a byte-array model: writes and
//! discards over an upstream-made lower stack are read back at once, flatten
//! and the merged index see them, and they persist when the image is reopened.

use std::path::{Path, PathBuf};

use overlaybd_core::config::{ImageConfig, Upper};
use overlaybd_core::image::{Image, OpenOptions};
use overlaybd_core::index::MergedIndex;
use overlaybd_core::lsmt::{CreateOptions, WritableLayer};
use overlaybd_core::source::LocalFiles;
use overlaybd_core::Error;

const SPAN: u64 = 8 << 20;

/// The interop lz4 stack with a writable upper in `dir` (absolute paths).
fn rw_config(dir: &Path) -> ImageConfig {
    let src = fixtures::interop().join("stack-lz4");
    let mut cfg = ImageConfig::load(src.join("config.v1.json")).unwrap();
    for l in &mut cfg.lowers {
        l.file = src.join(&l.file).to_string_lossy().into_owned();
    }
    let path = |n: &str| dir.join(n).to_string_lossy().into_owned();
    cfg.upper = Upper {
        index: path("upper.index"),
        data: path("upper.data"),
        ..Default::default()
    };
    cfg
}

fn open(cfg: &ImageConfig, create: bool) -> overlaybd_core::Result<Image> {
    let opts = OpenOptions {
        create_upper: create.then_some(1 << 20),
    };
    Image::open_with(cfg, None, &[&LocalFiles], opts)
}

fn read(img: &Image, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    assert_eq!(img.read_at(&mut v, off).unwrap(), len);
    v
}

fn flatten(img: &Image, dir: &Path) -> Vec<u8> {
    let p: PathBuf = dir.join("flat.raw");
    let out = std::fs::File::create(&p).unwrap();
    let stats = img.flatten_to(&out, 3, 256 << 10).unwrap();
    assert_eq!(stats.virtual_size, img.virtual_size());
    std::fs::read(&p).unwrap()
}

#[test]
fn writes_and_discards_merge_over_the_lowers_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = rw_config(dir.path());
    let missing = open(&cfg, false).err().expect("no upper files, no create");
    assert!(missing.to_string().contains("upper"), "{missing}");

    let img = open(&cfg, true).unwrap();
    assert!(img.has_upper());
    assert_eq!(img.upper_entries(), Some(0), "a fresh upper");
    assert_eq!(
        img.virtual_size(),
        1 << 30,
        "the upper inherits the lowers' size"
    );
    let lowers_only = img.merged_index().into_owned();
    let mut model = read(&img, 0, SPAN as usize);
    let mut rng = fixtures::Rng::new(11);
    for step in 0..200 {
        let off = rng.below(SPAN / 512) * 512;
        let len = ((rng.below(64) + 1) * 512).min(SPAN - off);
        if rng.below(3) == 0 {
            img.discard(off, len).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let mut d = vec![0u8; len as usize];
            rng.fill(&mut d);
            img.write_at(&d, off).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&d);
        }
        let a = rng.below(SPAN - 1);
        let n = rng.below((SPAN - a).min(300_000)) as usize + 1;
        assert_eq!(
            read(&img, a, n),
            model[a as usize..a as usize + n],
            "step {step}"
        );
    }
    img.flush().unwrap();
    assert!(img.upper_entries().unwrap() > 0);

    // The merged index now has the upper on top (tag = number of lowers);
    // the lowers' own index is unchanged.
    let merged = img.merged_index();
    let top = img.layers().len() as u8;
    assert!(merged.segments().iter().any(|s| s.tag == top));
    assert_eq!(img.index().segments(), lowers_only.segments());

    // Flatten copies the upper's data (inside the kernel) and the lowers'.
    let flat = flatten(&img, dir.path());
    assert_eq!(flat.len() as u64, img.virtual_size());
    assert_eq!(&flat[..SPAN as usize], &model[..]);
    drop(img);

    let img = open(&cfg, true).unwrap();
    assert!(
        img.upper_entries().unwrap() > 0,
        "reopened, not created again"
    );
    assert_eq!(read(&img, 0, SPAN as usize), model, "after reopening");
    // Opened without the create option, the existing upper is used as is.
    assert_eq!(read(&open(&cfg, false).unwrap(), 0, SPAN as usize), model);
}

#[test]
fn bad_requests_and_read_only_images_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = open(&rw_config(dir.path()), true).unwrap();
    let end = img.virtual_size();
    let bad = |r: overlaybd_core::Result<()>| matches!(r, Err(Error::BadRequest(_)));
    assert!(bad(img.write_at(&[0u8; 512], end)), "past the end");
    assert!(bad(img.write_at(&[0u8; 100], 0)), "unaligned");
    assert!(bad(img.discard(u64::MAX - 511, 512)), "overflow");
    assert!(bad(img.check_range(end - 5, 10)));
    assert!(img.check_range(end - 10, 10).is_ok());
    assert_eq!(
        img.read_at(&mut [0u8; 10], end - 5).unwrap(),
        5,
        "short at the end"
    );

    let ro = Image::open_config_file(fixtures::interop().join("stack-lz4/config.v1.json")).unwrap();
    assert!(!ro.has_upper());
    assert_eq!(ro.upper_entries(), None);
    assert!(matches!(ro.write_at(&[0u8; 512], 0), Err(Error::ReadOnly)));
    assert!(matches!(ro.discard(0, 512), Err(Error::ReadOnly)));
    ro.flush().unwrap();
    assert!(matches!(ro.merged_index(), std::borrow::Cow::Borrowed(_)));
}

#[test]
fn an_upper_alone_sets_the_size_and_cannot_be_added_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mk = |n: &str, vsize: u64| {
        WritableLayer::create(
            dir.path().join(format!("{n}.data")),
            dir.path().join(format!("{n}.index")),
            CreateOptions {
                virtual_size: vsize,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let img = Image::from_blobs(Vec::new())
        .unwrap()
        .with_upper(mk("a", 4 << 20))
        .unwrap();
    assert_eq!(img.virtual_size(), 4 << 20);
    assert_eq!(read(&img, 0, 4096), vec![0u8; 4096]);
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    img.write_at(&data, 8192).unwrap();
    assert_eq!(read(&img, 8192 - 100, 4196)[100..], data[..]);
    let merged: &MergedIndex = &img.merged_index();
    assert_eq!(merged.len(), 1);
    assert_eq!(merged.segments()[0].tag, 0, "no lowers: the upper is tag 0");
    let again = img.with_upper(mk("b", 0));
    assert!(matches!(again, Err(Error::Unsupported(_))));
}
