//! Token ids against a model's vocabulary, and checking a dataset against its manifest once
//! per host: recorded largest ids, the scan of older manifests, the error naming shard,
//! document and id, and the per-host verdict.

use gantry_sharding::frames::ZstdOptions;
use gantry_sharding::gpt::{DatasetError, FrameMode, GptDataset, OpenOptions, Split, TokenDataset};
use gantry_sharding::indexed::{IndexedWriter, TokenDType, Tokens};
use gantry_sharding::manifest::{MANIFEST, Manifest, ManifestError, ShardInfo, TokenizerInfo};
use gantry_sharding::sampler::{Sampler, Span};
use gantry_sharding::verify::{VERDICT, cached_max_token_ids, check_on_host};
use gantry_sharding::vocab::VocabError;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("gantry-vocab-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two shards of 6 documents of 50 tokens (ids below 100), written through the crate's writer,
/// except that document `bad_doc` of shard `bad_shard` holds `bad_id` at position 17.
fn dataset(dir: &Path, bad: Option<(usize, usize, u32)>, zstd: bool) -> Manifest {
    let mut shards = Vec::new();
    for s in 0..2 {
        let prefix = format!("shard-{s:05}");
        let mut w = IndexedWriter::create(&dir.join(&prefix), TokenDType::U16).unwrap();
        for d in 0..6 {
            let mut doc: Vec<u32> = (0..50).map(|i| (i * 7 + d * 3 + s as u32) % 100).collect();
            if let Some((bs, bd, id)) = bad
                && (bs, bd) == (s, d as usize)
            {
                doc[17] = id;
            }
            w.add_document(&doc).unwrap();
        }
        let summary = w.finish().unwrap();
        shards.push(match zstd {
            true => ShardInfo::describe_compressed(dir, &prefix, &summary, &ZstdOptions::default()).unwrap(),
            false => ShardInfo::describe(dir, &prefix, &summary).unwrap(),
        });
    }
    let m = Manifest::new(TokenDType::U16, 100, TokenizerInfo::Bytes, shards);
    m.write(dir).unwrap();
    m
}

/// Rewrite the manifest as an older gantry wrote it: no largest ids.
fn strip_max_ids(dir: &Path) {
    let path = dir.join(MANIFEST);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("max_token_id");
    for s in v["shards"].as_array_mut().unwrap() {
        s.as_object_mut().unwrap().remove("max_token_id");
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn for_vocab(vocab: u64, cache: &Path) -> OpenOptions {
    OpenOptions {
        cache_dir: Some(cache.to_path_buf()),
        vocab_size: Some(vocab),
        ..OpenOptions::default()
    }
}

fn vocab_error(e: DatasetError) -> VocabError {
    match e {
        DatasetError::Vocab(v) => v,
        other => panic!("expected a vocabulary error, got {other}"),
    }
}

/// Every token of the dataset, document by document.
fn read_all(data: &TokenDataset) -> Result<Vec<i64>, DatasetError> {
    let mut out = Vec::new();
    for (doc, len) in data.document_lengths()?.into_iter().enumerate() {
        data.read_span(
            Span {
                doc: doc as u32,
                offset: 0,
                len,
            },
            &mut out,
        )?;
    }
    Ok(out)
}

#[test]
fn the_writer_records_each_shards_largest_id_in_the_manifest() {
    let t = TempDir::new("record");
    let m = dataset(&t.0, Some((1, 2, 4321)), false);
    assert_eq!(
        m.shards.iter().map(|s| s.max_token_id).collect::<Vec<_>>(),
        [Some(99), Some(4321)]
    );
    assert_eq!(m.max_token_id, Some(4321));
    let read = Manifest::read(&t.0).unwrap();
    assert_eq!(read, m, "the largest ids survive a write and a read");
    // Synthetic data records them too.
    let synth = t.0.join("synth");
    let cfg = gantry_sharding::synth::SynthConfig {
        tokens: 5_000,
        seed: 1,
        vocab_size: 300,
        support: 8,
        doc_tokens: 100,
        shard_tokens: 2_000,
    };
    let m = gantry_sharding::synth::synthesize(&synth, &cfg).unwrap();
    assert!(m.shards.iter().all(|s| s.max_token_id.is_some_and(|id| id < 300)));
    assert!(m.max_token_id.is_some_and(|id| id < 300));
}

#[test]
fn an_id_outside_the_vocabulary_is_refused_on_open_naming_shard_document_and_id() {
    let t = TempDir::new("open");
    let data = t.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    dataset(&data, Some((1, 4, 65_535)), false);
    let cache = t.0.join("cache");
    // Without a vocabulary nothing is checked; with a large enough one it opens.
    TokenDataset::open(&data).unwrap();
    TokenDataset::open_with(&data, &for_vocab(65_536, &cache)).unwrap();
    let err = vocab_error(TokenDataset::open_with(&data, &for_vocab(128, &cache)).err().unwrap());
    assert_eq!(
        err,
        VocabError::Id {
            shard: data.join("shard-00001.bin"),
            document: 4,
            position: 17,
            id: 65_535,
            vocab: 128,
        }
    );
    let text = err.to_string();
    for needle in ["shard-00001.bin", "document 4", "token id 65535", "vocabulary is 128"] {
        assert!(text.contains(needle), "{needle:?} in {text}");
    }
    // The GPT dataset the trainer opens refuses it the same way.
    let e = GptDataset::open_with(&data, 16, Split::All, &for_vocab(128, &cache))
        .err()
        .unwrap();
    assert!(e.to_string().contains("document 4 holds token id 65535"), "{e}");
    // A declared vocabulary larger than the model's is refused by the same rule.
    let e = vocab_error(TokenDataset::open_with(&data, &for_vocab(64, &cache)).err().unwrap());
    assert!(
        matches!(
            e,
            VocabError::Declared {
                data: 100,
                model: 64,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_recorded_largest_id_that_is_too_cautious_is_not_an_error() {
    let t = TempDir::new("cautious");
    dataset(&t.0, None, false);
    let path = t.0.join(MANIFEST);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["shards"][0]["max_token_id"] = 5000.into();
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let data = TokenDataset::open_with(&t.0, &for_vocab(128, &t.0.join("cache"))).unwrap();
    assert_eq!(read_all(&data).unwrap().len(), 600);
}

#[test]
fn an_older_manifest_opens_and_each_shard_is_scanned_on_its_first_read() {
    let t = TempDir::new("old");
    let data = t.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    dataset(&data, Some((1, 3, 300)), false);
    strip_max_ids(&data);
    assert_eq!(Manifest::read(&data).unwrap().max_token_id, None);
    let cache = t.0.join("cache");
    let ds = TokenDataset::open_with(&data, &for_vocab(128, &cache)).unwrap();
    // Shard 0 is clean: its documents read.
    let mut out = Vec::new();
    ds.read_span(
        Span {
            doc: 0,
            offset: 0,
            len: 50,
        },
        &mut out,
    )
    .unwrap();
    ds.read_span(
        Span {
            doc: 5,
            offset: 0,
            len: 50,
        },
        &mut out,
    )
    .unwrap();
    // Any read of shard 1, even of a clean document of it, scans the shard and names the
    // offender; and keeps doing so.
    for _ in 0..2 {
        let e = vocab_error(
            ds.read_span(
                Span {
                    doc: 6,
                    offset: 0,
                    len: 5,
                },
                &mut out,
            )
            .unwrap_err(),
        );
        assert_eq!(
            e,
            VocabError::Id {
                shard: data.join("shard-00001.bin"),
                document: 3,
                position: 17,
                id: 300,
                vocab: 128,
            }
        );
    }
    // Through the prefetch path: the micro-batch that touches shard 1 fails.
    let gpt = GptDataset::open_with(&data, 50, Split::All, &for_vocab(128, &cache)).unwrap();
    let sampler = Sampler::new(gpt.num_samples(), 3, gpt.num_samples() as usize).unwrap();
    let cursor = sampler.start(gpt.data().fingerprint());
    let e = gpt.micro_batch(&sampler, &cursor, 0, 1, 1, 0).unwrap_err();
    assert!(
        e.to_string().contains("shard-00001.bin: document 3 holds token id 300"),
        "{e}"
    );
    // A compressed-only copy read through the frame cache is scanned from its frames.
    let only = t.0.join("only");
    std::fs::create_dir_all(&only).unwrap();
    dataset(&only, Some((0, 5, 1000)), true);
    strip_max_ids(&only);
    for s in 0..2 {
        std::fs::remove_file(only.join(format!("shard-{s:05}.bin"))).unwrap();
    }
    let opts = OpenOptions {
        frames: FrameMode::Lru,
        ..for_vocab(128, &cache)
    };
    let ds = TokenDataset::open_with(&only, &opts).unwrap();
    let e = vocab_error(read_all(&ds).unwrap_err());
    assert!(
        matches!(&e, VocabError::Id { shard, document: 5, id: 1000, .. } if shard.ends_with("shard-00000.bin.zst")),
        "{e}"
    );
}

#[test]
fn the_host_check_hashes_once_and_its_verdict_serves_later_opens() {
    let t = TempDir::new("host");
    let data = t.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    dataset(&data, Some((0, 1, 4000)), false);
    strip_max_ids(&data);
    let cache = t.0.join("cache");
    // Before any check, an open cannot know shard 0's largest id: it opens.
    TokenDataset::open_with(&data, &for_vocab(128, &cache)).unwrap();
    let (_, fingerprint) = Manifest::read_with_fingerprint(&data).unwrap();
    let manifest = Manifest::read(&data).unwrap();
    assert_eq!(cached_max_token_ids(&data, &manifest, fingerprint, &cache), None);

    let first = check_on_host(&data, &cache, 2).unwrap();
    assert!(!first.reused && first.not_saved.is_none(), "{first:?}");
    assert_eq!(first.files, 4);
    assert_eq!(first.max_token_ids, [Some(4000), Some(99)]);
    assert_eq!(first.verdict, cache.join(format!("{fingerprint:016x}")).join(VERDICT));
    let verdict = std::fs::read(&first.verdict).unwrap();
    let second = check_on_host(&data, &cache, 2).unwrap();
    assert!(second.reused, "{second:?}");
    assert_eq!(second.max_token_ids, first.max_token_ids);
    assert_eq!(
        std::fs::read(&first.verdict).unwrap(),
        verdict,
        "a reused verdict is not rewritten"
    );
    // Now an open knows shard 0's largest id without reading it, and refuses on open.
    assert_eq!(
        cached_max_token_ids(&data, &manifest, fingerprint, &cache),
        Some(vec![Some(4000), Some(99)])
    );
    let e = vocab_error(TokenDataset::open_with(&data, &for_vocab(128, &cache)).err().unwrap());
    assert!(
        matches!(
            e,
            VocabError::Id {
                document: 1,
                id: 4000,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_flipped_byte_is_an_error_naming_the_shard_even_after_a_good_check() {
    let t = TempDir::new("flip");
    let data = t.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    dataset(&data, None, false);
    let cache = t.0.join("cache");
    check_on_host(&data, &cache, 1).unwrap();
    let bin = data.join("shard-00001.bin");
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[101] ^= 0x01;
    // Replaced (a new inode; written in place, its change time moves, unless within the same
    // clock tick as its creation, which a test cannot rule out).
    let tmp = data.join("flipped");
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::rename(&tmp, &bin).unwrap();
    // The file changed: the verdict no longer holds, and the shard is hashed again.
    let err = check_on_host(&data, &cache, 1).unwrap_err();
    assert!(
        matches!(&err, ManifestError::Checksum { path, .. } if *path == bin),
        "{err}"
    );
    assert!(err.to_string().contains("shard-00001.bin"), "{err}");
    // A failure is not remembered: it stays an error.
    assert!(check_on_host(&data, &cache, 1).is_err());
    // A truncated index is named by its size.
    bytes[101] ^= 0x01;
    std::fs::write(&bin, &bytes).unwrap();
    check_on_host(&data, &cache, 1).unwrap();
    let idx = data.join("shard-00000.idx");
    let len = std::fs::metadata(&idx).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&idx)
        .unwrap()
        .set_len(len - 8)
        .unwrap();
    let err = check_on_host(&data, &cache, 1).unwrap_err();
    assert!(
        matches!(&err, ManifestError::Size { path, .. } if *path == idx),
        "{err}"
    );
}

#[test]
fn the_check_runs_without_a_writable_cache_and_says_it_was_not_kept() {
    let t = TempDir::new("nocache");
    let data = t.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    dataset(&data, None, false);
    // A file where the cache directory should be.
    let cache = t.0.join("cache");
    std::fs::write(&cache, b"not a directory").unwrap();
    let check = check_on_host(&data, &cache, 1).unwrap();
    assert!(!check.reused && check.not_saved.is_some(), "{check:?}");
    assert!(!check_on_host(&data, &cache, 1).unwrap().reused);
}

#[test]
fn a_compressed_only_shard_is_checked_by_its_frames() {
    let t = TempDir::new("zstd");
    let data = t.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    dataset(&data, None, true);
    std::fs::remove_file(data.join("shard-00000.bin")).unwrap();
    let cache = t.0.join("cache");
    let check = check_on_host(&data, &cache, 2).unwrap();
    // .idx, .bin.zst and .zidx for shard 0; .idx and .bin for shard 1.
    assert_eq!(check.files, 5);
    assert_eq!(check.max_token_ids, [None, Some(99)]);
}

fn naive_max(t: Tokens<'_>) -> u64 {
    (0..t.len())
        .map(|i| t.get(i).unwrap())
        .map(|id| if id < 0 { u64::MAX } else { id as u64 })
        .max()
        .unwrap_or(0)
}

proptest! {
    #[test]
    fn the_vectorized_largest_id_is_the_largest(ids in proptest::collection::vec(any::<i64>(), 0..10_000)) {
        let u16s: Vec<u16> = ids.iter().map(|&x| x as u16).collect();
        let u8s: Vec<u8> = ids.iter().map(|&x| x as u8).collect();
        let i32s: Vec<i32> = ids.iter().map(|&x| (x as i32) & i32::MAX).collect();
        let i32_neg: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
        let i16s: Vec<i16> = ids.iter().map(|&x| x as i16).collect();
        for t in [
            Tokens::U16(&u16s),
            Tokens::U8(&u8s),
            Tokens::I32(&i32s),
            Tokens::I32(&i32_neg),
            Tokens::I16(&i16s),
            Tokens::I64(&ids),
        ] {
            prop_assert_eq!(t.max_id(), naive_max(t));
        }
    }
}
