//! Compressed-only shards materialized into a local `.bin` (the default way to read zstd
//! frames): same batches as the `.bin`, reuse of a complete copy, rebuilding a damaged one,
//! named errors for damaged frames and unusable cache directories, interrupted runs.

use gantry_sharding::frames::{FrameError, ZstdOptions};
use gantry_sharding::gpt::{DatasetError, FrameMode, GptDataset, OpenOptions, Split, TokenDataset, TokenSource};
use gantry_sharding::manifest::Manifest;
use gantry_sharding::materialize::{MaterializeError, dataset_cache_dir, default_cache_root};
use gantry_sharding::sampler::Sampler;
use gantry_sharding::synth::{SynthConfig, synthesize_with};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("gantry-mat-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A dataset of 2 shards with 4 KiB frames (many per shard), `.bin` files kept; the seed
/// makes each test's dataset (and so its fingerprint) its own.
fn synth(dir: &Path, seed: u64, vocab_size: u32) -> Manifest {
    let cfg = SynthConfig {
        tokens: 60_001,
        seed,
        vocab_size,
        support: 16,
        doc_tokens: 777,
        shard_tokens: 40_000,
    };
    let opts = ZstdOptions {
        level: 3,
        frame_bytes: 4096,
    };
    synthesize_with(dir, &cfg, Some(&opts)).unwrap()
}

/// A compressed-only copy of `src` (manifest, `.idx`, `.bin.zst`, `.zidx`; no `.bin`).
fn compressed_copy(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".bin") {
            std::fs::copy(&path, dst.join(&name)).unwrap();
        }
    }
}

fn materializing(cache: &Path) -> OpenOptions {
    OpenOptions {
        cache_dir: Some(cache.to_path_buf()),
        ..OpenOptions::default()
    }
}

/// Every micro-batch of a few steps of a shuffled 2-rank run.
fn batches(ds: &GptDataset) -> Vec<Vec<i64>> {
    let sampler = Sampler::new(ds.num_samples(), 11, 8).unwrap();
    let mut cursor = sampler.start(0);
    let mut out = Vec::new();
    for _ in 0..12 {
        for rank in 0..2 {
            for micro in 0..2 {
                out.push(ds.micro_batch(&sampler, &cursor, rank, 2, 2, micro).unwrap().tokens);
            }
        }
        cursor.advance(1).unwrap();
    }
    out
}

#[test]
fn compressed_only_data_reads_bit_identical_batches_through_the_default_cache() {
    for (seed, vocab) in [(101, 300), (102, 70_000)] {
        let t = TempDir::new(&format!("same{vocab}"));
        let (full, only) = (t.0.join("full"), t.0.join("only"));
        let m = synth(&full, seed, vocab);
        compressed_copy(&full, &only);
        let plain = GptDataset::open_with(&full, 100, Split::All, &OpenOptions::default()).unwrap();
        assert!(plain.data().materialized().is_empty() && !plain.data().reads_zstd());
        let expected = batches(&plain);

        // The default options: materialized under the default cache root.
        let ds = GptDataset::open(&only, 100).unwrap();
        let cache = dataset_cache_dir(&default_cache_root(), ds.data().fingerprint());
        let done = ds.data().materialized();
        assert_eq!(done.len(), 2);
        assert!(!ds.data().reads_zstd());
        for (d, s) in done.iter().zip(&m.shards) {
            assert_eq!(d.path, cache.join(format!("{}.bin", s.prefix)));
            assert_eq!(d.bytes, s.bin_bytes);
            assert_eq!(
                std::fs::read(&d.path).unwrap(),
                std::fs::read(full.join(format!("{}.bin", s.prefix))).unwrap()
            );
        }
        assert_eq!(batches(&ds), expected, "vocab {vocab}");
        drop(ds);
        let _ = std::fs::remove_dir_all(&cache);

        // An explicit cache directory, one thread and many threads, Zstd asked for even with
        // the .bin present.
        for threads in [1, 3, 64] {
            let cache = t.0.join(format!("cache{threads}"));
            let opts = OpenOptions {
                source: TokenSource::Zstd,
                threads,
                ..materializing(&cache)
            };
            let ds = GptDataset::open_with(&full, 100, Split::All, &opts).unwrap();
            assert_eq!(ds.data().materialized().len(), 2);
            assert!(ds.data().materialized()[0].path.starts_with(&cache));
            assert_eq!(batches(&ds), expected, "vocab {vocab}, {threads} threads");
        }
    }
}

#[test]
fn a_second_open_reuses_the_complete_copy() {
    let t = TempDir::new("reuse");
    let (full, only, cache) = (t.0.join("full"), t.0.join("only"), t.0.join("cache"));
    synth(&full, 103, 300);
    compressed_copy(&full, &only);
    let first = TokenDataset::open_with(&only, &materializing(&cache)).unwrap();
    let built = first.materialized().to_vec();
    assert!(
        built
            .iter()
            .all(|d| !d.reused && d.rebuilt_because.is_none() && d.threads >= 1)
    );
    let meta: Vec<_> = built.iter().map(|d| std::fs::metadata(&d.path).unwrap()).collect();
    drop(first);
    let second = TokenDataset::open_with(&only, &materializing(&cache)).unwrap();
    for (d, m) in second.materialized().iter().zip(&meta) {
        assert!(d.reused, "{d:?}");
        let now = std::fs::metadata(&d.path).unwrap();
        assert_eq!(
            (now.ino(), now.mtime(), now.mtime_nsec()),
            (m.ino(), m.mtime(), m.mtime_nsec())
        );
    }
    // Only the copies and the directory's lock files are left in the cache.
    let dir = dataset_cache_dir(&cache, second.fingerprint());
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.retain(|n| !n.starts_with(gantry_sharding::entry_lock::LOCKS_FILE));
    names.sort();
    assert_eq!(names, ["shard-00000.bin", "shard-00001.bin"]);
}

#[test]
fn a_truncated_or_corrupted_copy_is_detected_and_rebuilt() {
    let t = TempDir::new("rebuild");
    let (full, only, cache) = (t.0.join("full"), t.0.join("only"), t.0.join("cache"));
    synth(&full, 104, 300);
    compressed_copy(&full, &only);
    let expected = std::fs::read(full.join("shard-00000.bin")).unwrap();
    let copy = TokenDataset::open_with(&only, &materializing(&cache))
        .unwrap()
        .materialized()[0]
        .path
        .clone();
    type Damage = fn(&mut Vec<u8>);
    let cases: [(&str, Damage, &str); 3] = [
        ("truncated", |b| b.truncate(b.len() - 2), "bytes, expected"),
        ("extended", |b| b.push(0), "bytes, expected"),
        ("flipped", |b| b[1000] ^= 0x10, "xxh3"),
    ];
    for (name, damage, reason) in cases {
        let mut b = std::fs::read(&copy).unwrap();
        damage(&mut b);
        std::fs::write(&copy, &b).unwrap();
        let ds = TokenDataset::open_with(&only, &materializing(&cache)).unwrap();
        let d = &ds.materialized()[0];
        assert!(!d.reused, "{name}");
        assert!(d.rebuilt_because.as_deref().unwrap().contains(reason), "{name}: {d:?}");
        assert!(ds.materialized()[1].reused, "{name}: the other shard is untouched");
        assert_eq!(std::fs::read(&copy).unwrap(), expected, "{name}");
    }
}

#[test]
fn damaged_frames_are_an_error_naming_the_file_and_leave_nothing_behind() {
    let t = TempDir::new("damaged");
    let (full, only, cache) = (t.0.join("full"), t.0.join("only"), t.0.join("cache"));
    synth(&full, 105, 300);
    compressed_copy(&full, &only);
    let zst = only.join("shard-00001.bin.zst");
    let mut z = std::fs::read(&zst).unwrap();
    let at = z.len() / 2;
    z[at] ^= 0x5a;
    std::fs::write(&zst, &z).unwrap();
    let err = TokenDataset::open_with(&only, &materializing(&cache)).err().unwrap();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            DatasetError::Materialize(MaterializeError::Frames(FrameError::Frame { ref path, .. })) if *path == zst
        ),
        "{text}"
    );
    assert!(
        text.contains("shard-00001.bin.zst: frame ") && text.contains(" at offset "),
        "{text}"
    );
    // Shard 0 was fine and is kept; shard 1 left neither a copy nor a partial file.
    let fingerprint = TokenDataset::open_with(&only, &OpenOptions::lru(TokenSource::Auto, 4))
        .unwrap()
        .fingerprint();
    let dir = dataset_cache_dir(&cache, fingerprint);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"shard-00000.bin".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("shard-00001.bin")), "{names:?}");
}

#[test]
fn frames_that_do_not_hash_to_the_manifest_are_refused() {
    let t = TempDir::new("hash");
    let (full, only, cache) = (t.0.join("full"), t.0.join("only"), t.0.join("cache"));
    let m = synth(&full, 106, 300);
    compressed_copy(&full, &only);
    // Valid frames, but the manifest expects other bytes.
    let raw = std::fs::read_to_string(only.join("manifest.json")).unwrap();
    let wrong = "0123456789abcdef";
    std::fs::write(only.join("manifest.json"), raw.replace(&m.shards[0].bin_xxh3, wrong)).unwrap();
    let err = TokenDataset::open_with(&only, &materializing(&cache)).err().unwrap();
    let text = err.to_string();
    assert!(
        matches!(err, DatasetError::Materialize(MaterializeError::Checksum { .. })),
        "{text}"
    );
    assert!(
        text.contains("shard-00000.bin: the frames of ")
            && text.contains("shard-00000.bin.zst")
            && text.contains(wrong),
        "{text}"
    );
}

#[test]
fn an_interrupted_materialization_is_not_taken_for_a_complete_one() {
    let t = TempDir::new("interrupted");
    let (full, only, cache) = (t.0.join("full"), t.0.join("only"), t.0.join("cache"));
    synth(&full, 107, 300);
    compressed_copy(&full, &only);
    let fingerprint = TokenDataset::open_with(&only, &OpenOptions::lru(TokenSource::Auto, 4))
        .unwrap()
        .fingerprint();
    let dir = dataset_cache_dir(&cache, fingerprint);
    std::fs::create_dir_all(&dir).unwrap();
    let bin = std::fs::read(full.join("shard-00000.bin")).unwrap();
    // What a run killed mid-way leaves: a partial file (here even with all the bytes), and
    // one cut short.
    let left = [
        dir.join("shard-00000.bin.partial-999999-0"),
        dir.join("shard-00000.bin.partial-999998-3"),
    ];
    std::fs::write(&left[0], &bin).unwrap();
    std::fs::write(&left[1], &bin[..bin.len() / 3]).unwrap();
    let ds = TokenDataset::open_with(&only, &materializing(&cache)).unwrap();
    let d = &ds.materialized()[0];
    assert!(!d.reused && d.rebuilt_because.is_none(), "{d:?}");
    assert_eq!(d.path, dir.join("shard-00000.bin"));
    assert_eq!(std::fs::read(&d.path).unwrap(), bin);
    for p in &left {
        assert!(!p.exists(), "{} was cleaned up", p.display());
    }
}

#[test]
fn an_unusable_cache_directory_is_an_error_naming_it() {
    let t = TempDir::new("unusable");
    let (full, only) = (t.0.join("full"), t.0.join("only"));
    synth(&full, 108, 300);
    compressed_copy(&full, &only);
    // A regular file where the cache root should be (fails even for root).
    let blocker = t.0.join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let err = TokenDataset::open_with(&only, &materializing(&blocker)).err().unwrap();
    let text = err.to_string();
    assert!(
        matches!(err, DatasetError::Materialize(MaterializeError::CacheDir { .. })),
        "{text}"
    );
    assert!(text.starts_with(&blocker.display().to_string()), "{text}");
    assert!(text.contains("cannot create the data cache directory"), "{text}");
}

#[test]
fn the_frame_cache_stays_available() {
    let t = TempDir::new("lru");
    let (full, only, cache) = (t.0.join("full"), t.0.join("only"), t.0.join("cache"));
    synth(&full, 109, 300);
    compressed_copy(&full, &only);
    let opts = OpenOptions {
        frames: FrameMode::Lru,
        cache_frames: 2,
        ..materializing(&cache)
    };
    let lru = GptDataset::open_with(&only, 100, Split::All, &opts).unwrap();
    assert!(lru.data().reads_zstd() && lru.data().materialized().is_empty());
    assert!(!cache.exists(), "the frame cache writes nothing to disk");
    let plain = GptDataset::open_with(&full, 100, Split::All, &OpenOptions::default()).unwrap();
    assert_eq!(batches(&lru), batches(&plain));
}
