//! Layer stacking against a naive byte-array model: random writes and discards
//! in up to 5 layers, each shipped in a random nesting (raw, sealed, ZFile lz4 or
//! zstd, tar-wrapped), stacked into an Image and read at random byte ranges.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::Arc;

use overlaybd_core::image::Image;
use overlaybd_core::lsmt::{CommitOptions, CreateOptions, WritableLayer};
use overlaybd_core::source::Blob;
use overlaybd_core::tar::TarWriter;
use proptest::prelude::*;
use zfile::{Algorithm, FileSource};

const VSIZE: u64 = 1 << 20; // 2048 sectors
const SECTORS: u64 = VSIZE / 512;

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        seed: u64,
    },
    Discard {
        sector: u64,
        sectors: u64,
    },
}

#[derive(Debug, Clone, Copy)]
enum Ship {
    Raw,
    Sealed,
    ZFile(Algorithm, u32, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..SECTORS, 1u64..300, any::<u64>()).prop_map(|(s, n, seed)| Op::Write { sector: s, sectors: n.min(SECTORS - s), seed }),
        1 => (0..SECTORS, 1u64..400).prop_map(|(s, n)| Op::Discard { sector: s, sectors: n.min(SECTORS - s) }),
    ]
}

fn ship() -> impl Strategy<Value = Ship> {
    prop_oneof![
        Just(Ship::Raw),
        Just(Ship::Sealed),
        (
            prop_oneof![Just(Algorithm::Lz4), Just(Algorithm::Zstd)],
            prop_oneof![Just(4096u32), Just(8192), Just(16384), Just(32768)],
            any::<bool>()
        )
            .prop_map(|(a, b, t)| Ship::ZFile(a, b, t)),
    ]
}

fn bytes_for(seed: u64, len: usize) -> Vec<u8> {
    let mut r = fixtures::Rng::new(seed);
    // Half compressible, half random, so codecs see both.
    let mut v = fixtures::image_like(seed, len);
    if seed % 2 == 0 {
        r.fill(&mut v);
    }
    v
}

fn build_layer(dir: &std::path::Path, k: usize, ops: &[Op], ship: Ship, model: &mut [u8]) -> Blob {
    let data = dir.join(format!("l{k}.data"));
    let index = dir.join(format!("l{k}.index"));
    let mut w = WritableLayer::create(
        &data,
        &index,
        CreateOptions {
            virtual_size: if k == 0 { VSIZE } else { 0 },
            ..Default::default()
        },
    )
    .unwrap();
    for op in ops {
        match *op {
            Op::Write {
                sector,
                sectors,
                seed,
            } => {
                let buf = bytes_for(seed, (sectors * 512) as usize);
                w.write_at(&buf, sector * 512).unwrap();
                model[(sector * 512) as usize..((sector + sectors) * 512) as usize]
                    .copy_from_slice(&buf);
            }
            Op::Discard { sector, sectors } => {
                w.discard(sector * 512, sectors * 512).unwrap();
                model[(sector * 512) as usize..((sector + sectors) * 512) as usize].fill(0);
            }
        }
    }
    let out = dir.join(format!("l{k}.blob"));
    match ship {
        Ship::Sealed => {
            w.seal().unwrap();
            std::fs::rename(&data, &out).unwrap();
        }
        Ship::Raw => {
            let mut f = BufWriter::new(File::create(&out).unwrap());
            w.commit(&CommitOptions::default(), &mut f).unwrap();
            f.flush().unwrap();
        }
        Ship::ZFile(algorithm, block_size, tar) => {
            let mut f = File::create(&out).unwrap();
            let tw = tar.then(|| TarWriter::begin(&mut f).unwrap());
            let mut z = zfile::ZFileWriter::new(
                &mut f,
                zfile::Options {
                    algorithm,
                    block_size,
                    threads: 2,
                    ..Default::default()
                },
            )
            .unwrap();
            w.commit(&CommitOptions::default(), &mut z).unwrap();
            let (_, info) = z.finish().unwrap();
            if let Some(tw) = tw {
                tw.finish(&mut f, info.zfile_size).unwrap();
            }
        }
    }
    Arc::new(FileSource::open(&out).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    #[test]
    fn stacked_image_reads_equal_the_painted_model(
        layers in proptest::collection::vec((proptest::collection::vec(op(), 0..12), ship()), 1..6),
        reads in proptest::collection::vec((0..VSIZE + 1000, 0usize..70_000), 1..24),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut model = vec![0u8; VSIZE as usize];
        let blobs: Vec<(String, Blob)> = layers
            .iter()
            .enumerate()
            .map(|(k, (ops, ship))| (format!("l{k}"), build_layer(dir.path(), k, ops, *ship, &mut model)))
            .collect();
        let img = Image::from_blobs(blobs).unwrap();
        prop_assert_eq!(img.virtual_size(), VSIZE);
        let mut whole = vec![0xAAu8; VSIZE as usize];
        prop_assert_eq!(img.read_at(&mut whole, 0).unwrap(), VSIZE as usize);
        prop_assert!(whole == model, "whole-disk read differs from the model");
        for (off, len) in reads {
            let mut buf = vec![0x55u8; len];
            let n = img.read_at(&mut buf, off).unwrap();
            let want = (VSIZE.saturating_sub(off) as usize).min(len);
            prop_assert_eq!(n, want);
            if n > 0 {
                prop_assert!(buf[..n] == model[off as usize..off as usize + n], "read {} at {} differs", len, off);
            }
        }
        // The flattened file is the same disk.
        let flat = dir.path().join("flat.img");
        let f = File::options().read(true).write(true).create(true).truncate(true).open(&flat).unwrap();
        img.flatten_to(&f, 2, 64 << 10).unwrap();
        prop_assert!(std::fs::read(&flat).unwrap() == model);
    }
}

#[test]
fn too_many_layers_is_a_typed_error() {
    let cfg = overlaybd_core::config::ImageConfig {
        lowers: vec![
            overlaybd_core::config::Lower {
                file: "x".into(),
                ..Default::default()
            };
            256
        ],
        ..Default::default()
    };
    let err = Image::open(&cfg, None, &[&overlaybd_core::source::LocalFiles])
        .err()
        .unwrap();
    assert!(err.to_string().contains("at most 255"), "{err}");
}

#[test]
fn a_missing_layer_file_names_the_layer_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.v1.json");
    std::fs::write(&cfg, r#"{"lowers":[{"file":"nope.tar"}]}"#).unwrap();
    let err = Image::open_config_file(&cfg).err().unwrap().to_string();
    assert!(err.contains("layer 0") && err.contains("nope.tar"), "{err}");
}

#[test]
fn a_remote_only_layer_without_a_registry_source_is_a_clear_error() {
    let cfg = overlaybd_core::config::ImageConfig::from_slice(
        br#"{"repoBlobUrl":"https://r/v2/x/blobs","lowers":[{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":5}]}"#,
    )
    .unwrap();
    let err = Image::open(&cfg, None, &[&overlaybd_core::source::LocalFiles])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("layer 0") && err.contains("no source"),
        "{err}"
    );
}

#[test]
fn garbage_blob_is_a_typed_error() {
    let blob: Blob = Arc::new(vec![7u8; 10_000]);
    let err = Image::from_blobs(vec![("junk".into(), blob)])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("layer 0 (junk)"), "{err}");
}

/// The innermost error of a chain of `InFile`/`InLayer` wrappers, with the
/// files the wrappers named, outermost first.
fn innermost(e: overlaybd_core::Error) -> (Vec<std::path::PathBuf>, overlaybd_core::Error) {
    use overlaybd_core::Error;
    let mut files = Vec::new();
    let mut e = e;
    loop {
        e = match e {
            Error::InFile { path, inner } => {
                files.push(path);
                *inner
            }
            Error::InLayer { inner, .. } => *inner,
            other => return (files, other),
        }
    }
}

#[test]
fn configs_lowers_and_uppers_that_are_not_regular_files_are_refused() {
    use overlaybd_core::Error;
    // /dev/zero as the config: refused before a byte is read.
    let (files, e) = innermost(Image::open_config_file("/dev/zero").err().unwrap());
    assert_eq!(files, [std::path::PathBuf::from("/dev/zero")]);
    assert!(
        matches!(
            e,
            Error::NotRegularFile {
                kind: "character device"
            }
        ),
        "{e:?}"
    );

    // A FIFO as the config: refused, not waited on.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    fixtures::procs::mkfifo(&fifo);
    let (files, e) = innermost(Image::open_config_file(&fifo).err().unwrap());
    assert_eq!(files, [fifo.as_path()]);
    assert!(matches!(e, Error::NotRegularFile { kind: "FIFO" }), "{e:?}");

    // A FIFO or a device as a lower: the error names the config and the lower.
    let cfg = dir.path().join("config.v1.json");
    for (lower, kind) in [
        (fifo.to_str().unwrap(), "FIFO"),
        ("/dev/zero", "character device"),
    ] {
        std::fs::write(&cfg, format!(r#"{{"lowers":[{{"file":"{lower}"}}]}}"#)).unwrap();
        let err = Image::open_config_file(&cfg).err().unwrap();
        let msg = err.to_string();
        let (files, e) = innermost(err);
        assert_eq!(
            files,
            [cfg.clone(), std::path::PathBuf::from(lower)],
            "{msg}"
        );
        assert!(
            matches!(e, Error::NotRegularFile { kind: k } if k == kind),
            "{e:?}"
        );
        assert!(msg.contains("layer 0"), "{msg}");
    }

    // A FIFO as the writable upper's index.
    let data = dir.path().join("upper.data");
    WritableLayer::create(
        &data,
        dir.path().join("upper.index0"),
        CreateOptions::default(),
    )
    .unwrap();
    let err = WritableLayer::open(&data, &fifo).err().unwrap();
    let (files, e) = innermost(err);
    assert_eq!(files, [fifo.as_path()]);
    assert!(matches!(e, Error::NotRegularFile { kind: "FIFO" }), "{e:?}");

    // A config over the cap is refused by size.
    let big = dir.path().join("big.json");
    File::create(&big)
        .unwrap()
        .set_len(overlaybd_core::regular::MAX_CONFIG_SIZE + 1)
        .unwrap();
    let (files, e) = innermost(Image::open_config_file(&big).err().unwrap());
    assert_eq!(files, [big.as_path()]);
    assert!(
        matches!(e, Error::FileTooLarge { size, max, .. }
            if size == max + 1 && max == 16 << 20),
        "{e:?}"
    );
}
