//! The zstd variant of shards: layout, reading through the frames, compressed-only datasets,
//! damaged frame files and indexes.

mod common;

use common::stream;
use gantry_sharding::frames::{self, FrameError, FrameIndex, FramedBin, ZstdOptions};
use gantry_sharding::gpt::{DatasetError, GptDataset, OpenOptions, Split, TokenDataset, TokenSource};
use gantry_sharding::manifest::{Manifest, ManifestError};
use gantry_sharding::sampler::Span;
use gantry_sharding::synth::{SynthConfig, synthesize_with};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("gantry-frames-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Small frames (4 KiB) so that spans cross many frame boundaries.
const SMALL: ZstdOptions = ZstdOptions {
    level: 3,
    frame_bytes: 4096,
};

fn synth(dir: &Path, vocab_size: u32, zstd: &ZstdOptions) -> Manifest {
    let cfg = SynthConfig {
        tokens: 60_001,
        seed: 4,
        vocab_size,
        support: 16,
        doc_tokens: 777,
        shard_tokens: 25_000,
    };
    synthesize_with(dir, &cfg, Some(zstd)).unwrap()
}

fn open(dir: &Path, source: TokenSource, cache_frames: usize) -> Result<TokenDataset, DatasetError> {
    TokenDataset::open_with(dir, &OpenOptions::lru(source, cache_frames))
}

#[test]
fn frames_serve_the_same_tokens_and_samples_as_the_bin() {
    // u16 and i32 tokens (a vocabulary above 65,500 is stored as i32).
    for vocab in [300, 70_000] {
        let dir = TempDir::new("same");
        let m = synth(&dir.0, vocab, &SMALL);
        assert!(m.shards.iter().all(|s| s.zstd.is_some()));
        m.verify(&dir.0).unwrap();
        let plain = open(&dir.0, TokenSource::Bin, 16).unwrap();
        assert!(!plain.reads_zstd());
        let expected = stream(&plain);
        assert_eq!(expected.len(), 60_001);
        // A one-frame cache evicts on nearly every span; results must not depend on it.
        for cache in [1, 3, 64] {
            let framed = open(&dir.0, TokenSource::Zstd, cache).unwrap();
            assert!(framed.reads_zstd());
            assert_eq!(stream(&framed), expected, "vocab {vocab}, cache {cache}");
        }
        // Sample by sample, shuffled order, through the GPT dataset.
        let a = GptDataset::open_with(&dir.0, 100, Split::All, &OpenOptions::default()).unwrap();
        let opts = OpenOptions::lru(TokenSource::Zstd, 2);
        let b = GptDataset::open_with(&dir.0, 100, Split::All, &opts).unwrap();
        let (mut sa, mut sb) = (Vec::new(), Vec::new());
        for s in (0..a.num_samples()).rev().step_by(7) {
            sa.clear();
            sb.clear();
            a.sample_into(s, &mut sa).unwrap();
            b.sample_into(s, &mut sb).unwrap();
            assert_eq!(sa, sb, "sample {s}");
        }
        // Many samples at once (located together, then copied) read the same.
        let picks: Vec<u64> = (0..a.num_samples()).rev().step_by(3).collect();
        let (mut many_a, mut many_b) = (Vec::new(), Vec::new());
        a.samples_into(&picks, &mut many_a).unwrap();
        b.samples_into(&picks, &mut many_b).unwrap();
        assert_eq!(many_a, many_b);
        assert_eq!(many_a.len(), picks.len() * 101);
    }
}

#[test]
fn a_compressed_only_directory_is_read_and_verified_from_its_frames() {
    let dir = TempDir::new("only");
    let m = synth(&dir.0, 300, &ZstdOptions::default());
    let expected = stream(&open(&dir.0, TokenSource::Auto, 16).unwrap());
    for s in &m.shards {
        std::fs::remove_file(dir.0.join(format!("{}.bin", s.prefix))).unwrap();
    }
    // Through the frame cache (the default, materializing, is tested in materialize.rs).
    let auto = open(&dir.0, TokenSource::Auto, 16).unwrap();
    assert!(auto.reads_zstd());
    assert_eq!(stream(&auto), expected);
    m.verify(&dir.0).unwrap();
    let err = open(&dir.0, TokenSource::Bin, 16).err().unwrap().to_string();
    assert!(err.contains("shard-00000.bin"), "{err}");
}

#[test]
fn frame_index_layout_field_by_field() {
    let dir = TempDir::new("layout");
    std::fs::create_dir_all(&dir.0).unwrap();
    let bin = dir.0.join("x.bin");
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&bin, &data).unwrap();
    let (zst, zidx) = frames::paths(&dir.0.join("x"));
    assert!(zst.ends_with("x.bin.zst") && zidx.ends_with("x.zidx"));
    let summary = frames::compress_file(&bin, &zst, &zidx, &SMALL).unwrap();
    assert_eq!(summary.frames, 3, "10,000 bytes in 4 KiB frames");
    let b = std::fs::read(&zidx).unwrap();
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    assert_eq!(&b[..8], b"GZFRIDX\0");
    assert_eq!(u32_at(8), 1, "version");
    assert_eq!(u32_at(12), 3, "level");
    assert_eq!(u64_at(16), 4096, "frame size");
    assert_eq!(u64_at(24), 10_000, "uncompressed total");
    assert_eq!(u64_at(32), std::fs::metadata(&zst).unwrap().len(), "compressed total");
    assert_eq!(u64_at(40), 3, "frames");
    assert_eq!(b.len(), 48 + 3 * 24 + 8);
    let mut compressed_at = 0;
    for (i, ulen) in [4096u32, 4096, 1808].into_iter().enumerate() {
        let at = 48 + 24 * i;
        assert_eq!(u64_at(at), 4096 * i as u64, "uncompressed offset of frame {i}");
        assert_eq!(u64_at(at + 8), compressed_at, "compressed offset of frame {i}");
        assert_eq!(u32_at(at + 20), ulen, "uncompressed length of frame {i}");
        compressed_at += u64::from(u32_at(at + 16));
    }
    assert_eq!(
        u64_at(120),
        xxhash_rust::xxh3::xxh3_64(&b[..120]),
        "checksum of the rest"
    );
    // Each frame is an independent zstd frame.
    let z = std::fs::read(&zst).unwrap();
    let second = &z[u64_at(48 + 24 + 8) as usize..][..u32_at(48 + 24 + 16) as usize];
    assert_eq!(zstd::bulk::decompress(second, 4096).unwrap(), &data[4096..8192]);
    // Byte ranges across frame boundaries.
    let framed = FramedBin::open(&zst, &zidx, 1).unwrap();
    for range in [0..1, 4095..4097, 100..9_999, 8192..10_000, 0..10_000, 5..5] {
        let mut got = Vec::new();
        framed
            .read(range.start as u64..range.end as u64, |b| got.extend_from_slice(b))
            .unwrap();
        assert_eq!(got, &data[range]);
    }
    let err = framed.read(9_000..10_001, |_| {}).unwrap_err().to_string();
    assert!(err.contains("past the 10000 uncompressed bytes"), "{err}");
}

/// Files of shard 0 of a fresh dataset, for damaging.
fn damaged(name: &str, edit: impl FnOnce(&mut Vec<u8>, &mut Vec<u8>)) -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new(name);
    synth(&dir.0, 300, &SMALL);
    let (zst, zidx) = frames::paths(&dir.0.join("shard-00000"));
    let mut z = std::fs::read(&zst).unwrap();
    let mut i = std::fs::read(&zidx).unwrap();
    edit(&mut z, &mut i);
    std::fs::write(&zst, &z).unwrap();
    std::fs::write(&zidx, &i).unwrap();
    (dir, zst, zidx)
}

#[test]
fn damaged_frames_and_indexes_are_named_errors() {
    // A flipped byte inside a frame: hashing catches it, and so does reading (zstd's checksum
    // or its decoder), naming the file, the frame and its offset.
    let (dir, zst, _) = damaged("flip", |z, _| {
        let at = z.len() / 2;
        z[at] ^= 0x5a;
    });
    let err = Manifest::read(&dir.0).unwrap().verify(&dir.0).unwrap_err();
    assert!(
        matches!(&err, ManifestError::Checksum { path, .. } if *path == zst),
        "{err}"
    );
    let data = open(&dir.0, TokenSource::Zstd, 4).unwrap();
    let err = data
        .read_span(
            Span {
                doc: 0,
                offset: 0,
                len: 1,
            },
            &mut Vec::new(),
        )
        .and_then(|_| {
            let mut sink = Vec::new();
            for (doc, len) in data.document_lengths()?.into_iter().enumerate() {
                data.read_span(
                    Span {
                        doc: doc as u32,
                        offset: 0,
                        len,
                    },
                    &mut sink,
                )?;
            }
            Ok(())
        })
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DatasetError::Frames(FrameError::Frame { .. })), "{text}");
    assert!(
        text.contains("shard-00000.bin.zst: frame ") && text.contains(" at offset "),
        "{text}"
    );

    // Truncated frame file.
    let (dir, _, _) = damaged("cut", |z, _| z.truncate(z.len() - 10));
    let err = open(&dir.0, TokenSource::Zstd, 4).err().unwrap().to_string();
    assert!(
        err.contains("shard-00000.bin.zst: holds") && err.contains("shard-00000.zidx"),
        "{err}"
    );

    // Truncated, mislabelled, future and inconsistent indexes.
    type Edit = Box<dyn FnOnce(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "short",
            Box::new(|i: &mut Vec<u8>| i.truncate(20)),
            "too short for the header",
        ),
        (
            "magic",
            Box::new(|i: &mut Vec<u8>| i[0] = b'X'),
            "not a zstd frame index",
        ),
        ("version", Box::new(|i: &mut Vec<u8>| i[8] = 2), "version 2 at offset 8"),
        ("framesize", Box::new(|i: &mut Vec<u8>| i[16] = 3), "offset 16"),
        ("count", Box::new(|i: &mut Vec<u8>| i[40] ^= 1), "offset 40"),
        (
            "entry",
            Box::new(|i: &mut Vec<u8>| i[48 + 24 + 8] ^= 1),
            "frame 1 (index entry at offset 72)",
        ),
        (
            "sum",
            Box::new(|i: &mut Vec<u8>| *i.last_mut().unwrap() ^= 1),
            "checksum at offset",
        ),
        ("tail", Box::new(|i: &mut Vec<u8>| i.truncate(i.len() - 1)), "offset 40"),
    ];
    for (name, edit, expected) in cases {
        let (dir, _, zidx) = damaged(name, |_, i| edit(i));
        let err = open(&dir.0, TokenSource::Zstd, 4).err().unwrap().to_string();
        assert!(err.contains(&zidx.display().to_string()), "{name}: {err}");
        assert!(err.contains(expected), "{name}: {err}");
    }
}

#[test]
fn older_manifests_without_zstd_still_read() {
    let dir = TempDir::new("old");
    let cfg = SynthConfig {
        tokens: 5000,
        ..SynthConfig::default()
    };
    synthesize_with(&dir.0, &cfg, None).unwrap();
    let raw = std::fs::read_to_string(dir.0.join("manifest.json")).unwrap();
    assert!(!raw.contains("zstd"), "no zstd key unless frames were written");
    let m = Manifest::read(&dir.0).unwrap();
    assert!(m.shards[0].zstd.is_none());
    m.verify(&dir.0).unwrap();
    let err = open(&dir.0, TokenSource::Zstd, 4).err().unwrap().to_string();
    assert!(err.contains("has no zstd variant"), "{err}");
}

#[test]
fn bad_options_are_refused() {
    for (level, frame_bytes) in [(3, 0), (3, 12), (3, 1 << 30), (99, 4096)] {
        assert!(
            ZstdOptions { level, frame_bytes }.validate().is_err(),
            "{level} {frame_bytes}"
        );
    }
}

fn sample_index() -> (Vec<u8>, TempDir) {
    let dir = TempDir::new("prop");
    std::fs::create_dir_all(&dir.0).unwrap();
    let bin = dir.0.join("x.bin");
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 97) as u8).collect();
    std::fs::write(&bin, data).unwrap();
    let (zst, zidx) = frames::paths(&dir.0.join("x"));
    frames::compress_file(&bin, &zst, &zidx, &SMALL).unwrap();
    (std::fs::read(&zidx).unwrap(), dir)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// Fuzz the frame index: random byte edits and truncations are errors naming the file,
    /// never panics, and an unchanged index parses.
    #[test]
    fn mutated_frame_indexes_are_errors_not_panics(
        edits in prop::collection::vec((0usize..200, any::<u8>()), 0..6),
        cut in prop::option::of(0usize..200),
    ) {
        let (original, _dir) = sample_index();
        let mut b = original.clone();
        for (at, value) in edits {
            let i = at % b.len();
            b[i] = value;
        }
        if let Some(c) = cut {
            b.truncate(c.min(b.len()));
        }
        let path = Path::new("/data/x.zidx");
        match FrameIndex::parse(&b, path) {
            Ok(index) => {
                prop_assert_eq!(&b, &original);
                prop_assert_eq!(index.to_bytes(), original);
            }
            Err(e) => {
                prop_assert!(b != original);
                prop_assert!(e.to_string().starts_with("/data/x.zidx: "), "{}", e);
            }
        }
    }

    /// Damaged frame data: every read either succeeds or is an error naming the file.
    #[test]
    fn mutated_frames_are_errors_not_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let (_, dir) = sample_index();
        let (zst, zidx) = frames::paths(&dir.0.join("x"));
        let mut z = std::fs::read(&zst).unwrap();
        for (at, value) in edits {
            let i = at.index(z.len());
            z[i] = value;
        }
        std::fs::write(&zst, &z).unwrap();
        let framed = FramedBin::open(&zst, &zidx, 2).unwrap();
        let mut got = Vec::new();
        match framed.read(0..20_000, |b| got.extend_from_slice(b)) {
            Ok(()) => prop_assert_eq!(got.len(), 20_000),
            Err(e) => prop_assert!(e.to_string().contains("x.bin.zst: frame "), "{}", e),
        }
    }
}
