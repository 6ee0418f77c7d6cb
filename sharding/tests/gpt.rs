//! The GPT dataset over real shard files: samples, DP micro-batches, prefetch, resume.

mod common;

use common::stream;
use gantry_sharding::gpt::{GptDataset, Prefetcher, TokenDataset};
use gantry_sharding::indexed::{IndexedWriter, TokenDType};
use gantry_sharding::manifest::{Manifest, ShardInfo, TokenizerInfo};
use gantry_sharding::sampler::{Sampler, Span};
use gantry_sharding::synth::{SynthConfig, synthesize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gantry-gpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn synth(name: &str) -> PathBuf {
    let dir = temp(name);
    let cfg = SynthConfig {
        tokens: 60_000,
        seed: 2,
        vocab_size: 1000,
        support: 8,
        doc_tokens: 700,
        shard_tokens: 20_000,
    };
    synthesize(&dir, &cfg).unwrap();
    dir
}

#[test]
fn samples_are_windows_of_the_stream_across_documents_and_shards() {
    let dir = synth("windows");
    let ds = GptDataset::open(&dir, 100).unwrap();
    let all = stream(ds.data());
    assert_eq!(all.len(), 60_000);
    assert_eq!(ds.num_samples(), 599);
    let mut out = Vec::new();
    for sample in [0u64, 1, 6, 7, 199, 200, 598] {
        out.clear();
        ds.sample_into(sample, &mut out).unwrap();
        let start = sample as usize * 100;
        assert_eq!(out, all[start..start + 101], "sample {sample}");
    }
    // A batch read at once (all samples located before any is copied) is the same windows,
    // in the order asked for, repeats included.
    let picks = [598u64, 0, 200, 7, 7, 1, 399, 6];
    out.clear();
    ds.samples_into(&picks, &mut out).unwrap();
    let expected: Vec<i64> = picks
        .iter()
        .flat_map(|&s| all[s as usize * 100..s as usize * 100 + 101].iter().copied())
        .collect();
    assert_eq!(out, expected);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Documents made of several sequences, over two shards.
#[test]
fn multi_sequence_documents_read_in_order() {
    let dir = temp("multiseq");
    std::fs::create_dir_all(&dir).unwrap();
    let mut shards = Vec::new();
    let mut expected = Vec::new();
    let mut next = 0u32;
    for s in 0..2 {
        let prefix = format!("shard-{s:05}");
        let mut w = IndexedWriter::create(&dir.join(&prefix), TokenDType::U16).unwrap();
        for doc in 0..5 {
            for seq in 0..=(doc % 3) {
                let toks: Vec<u32> = (0..(3 + seq))
                    .map(|_| {
                        next += 1;
                        next
                    })
                    .collect();
                expected.extend(toks.iter().map(|&t| i64::from(t)));
                w.add_sequence(&toks).unwrap();
            }
            w.end_document();
        }
        let summary = w.finish().unwrap();
        shards.push(ShardInfo::describe(&dir, &prefix, &summary).unwrap());
    }
    Manifest::new(TokenDType::U16, 65_000, TokenizerInfo::Bytes, shards)
        .write(&dir)
        .unwrap();
    let data = TokenDataset::open(&dir).unwrap();
    assert_eq!(data.num_documents(), 10);
    assert_eq!(stream(&data), expected);
    // A span starting inside the second sequence of document 2.
    let mut out = Vec::new();
    data.read_span(
        Span {
            doc: 2,
            offset: 4,
            len: 5,
        },
        &mut out,
    )
    .unwrap();
    let doc2_start: usize = data.document_lengths().unwrap()[..2].iter().map(|&l| l as usize).sum();
    assert_eq!(out, expected[doc2_start + 4..doc2_start + 9]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dp_ranks_cover_each_global_batch_and_prefetch_matches() {
    let dir = synth("dp");
    let ds = Arc::new(GptDataset::open(&dir, 64).unwrap());
    let sampler = Sampler::new(ds.num_samples(), 7, 16).unwrap();
    let start = sampler.start(ds.data().fingerprint());
    let (dp, micro) = (4, 2);
    // Steps 0..3 read directly: every step's micro-batches over all ranks = its 16 positions.
    let mut direct = Vec::new();
    let mut cursor = start.clone();
    for _ in 0..3 {
        let mut seen = BTreeSet::new();
        for r in 0..dp {
            for m in 0..micro {
                let b = ds.micro_batch(&sampler, &cursor, r, dp, micro, m).unwrap();
                assert_eq!(b.tokens.len(), b.samples.len() * 65);
                seen.extend(b.samples.iter().copied());
                if r == 1 {
                    direct.push(b);
                }
            }
        }
        let want: BTreeSet<_> = (cursor.consumed..cursor.consumed + 16).map(|p| sampler.at(p)).collect();
        assert_eq!(seen, want);
        cursor.advance(1).unwrap();
    }
    // The prefetcher for rank 1 yields exactly the same micro-batches.
    let pf = Prefetcher::spawn(ds.clone(), sampler.clone(), start.clone(), 1, dp, micro, 3);
    for want in &direct {
        assert_eq!(&pf.next_batch().unwrap(), want);
    }
    drop(pf); // stops the thread mid-stream without hanging

    // Resume at step 2 with 2 ranks instead of 4: the same global samples for that step.
    let mut resumed = start;
    resumed.advance(2).unwrap();
    let json = serde_json::to_string(&resumed).unwrap();
    let resumed = serde_json::from_str(&json).unwrap();
    sampler.check_cursor(&resumed, ds.data().fingerprint()).unwrap();
    let mut seen = BTreeSet::new();
    for r in 0..2 {
        let pf = Prefetcher::spawn(ds.clone(), sampler.clone(), resumed.clone(), r, 2, 1, 2);
        seen.extend(pf.next_batch().unwrap().samples);
    }
    let want: BTreeSet<_> = (32..48).map(|p| sampler.at(p)).collect();
    assert_eq!(seen, want);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn opening_a_missing_or_damaged_dataset_names_the_file() {
    let dir = synth("damaged");
    std::fs::remove_file(dir.join("shard-00001.idx")).unwrap();
    let err = TokenDataset::open(&dir).err().unwrap().to_string();
    assert!(err.contains("shard-00001.idx"), "{err}");
    let err = GptDataset::open(Path::new("/nonexistent/gantry"), 8)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/gantry/manifest.json"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn train_and_validation_splits_share_no_document() {
    use gantry_sharding::gpt::Split;
    let dir = synth("split");
    let all = GptDataset::open(&dir, 50).unwrap();
    let train = GptDataset::open_split(
        &dir,
        50,
        Split::Train {
            valid_fraction: 0.25,
            seed: 4,
        },
    )
    .unwrap();
    let valid = GptDataset::open_split(
        &dir,
        50,
        Split::Valid {
            valid_fraction: 0.25,
            seed: 4,
        },
    )
    .unwrap();
    let docs_of = |ds: &GptDataset| {
        let mut docs = BTreeSet::new();
        for s in 0..ds.num_samples() {
            docs.extend(ds.spans(s).unwrap().iter().map(|sp| sp.doc));
        }
        docs
    };
    let (t, v) = (docs_of(&train), docs_of(&valid));
    assert!(t.is_disjoint(&v), "a document is in both splits");
    assert!(!v.is_empty() && t.len() > v.len());
    assert!(train.num_samples() + valid.num_samples() <= all.num_samples());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn blended_datasets_follow_their_weights_and_partition_exactly() {
    use gantry_sharding::gpt::BlendedGptDataset;
    let (a, b) = (synth("blend-a"), temp("blend-b"));
    let cfg = SynthConfig {
        tokens: 30_000,
        seed: 99,
        vocab_size: 500,
        support: 8,
        doc_tokens: 500,
        shard_tokens: 30_000,
    };
    synthesize(&b, &cfg).unwrap();
    let blended = BlendedGptDataset::open(&[(a.clone(), 3.0), (b.clone(), 1.0)], 32, 5, 16).unwrap();
    let sampler = blended.sampler();
    let mut cursor = sampler.start(blended.fingerprint());
    let (mut from_a, mut total) = (0usize, 0usize);
    for _ in 0..10 {
        let mut seen = BTreeSet::new();
        for r in 0..2 {
            for m in 0..2 {
                let batch = blended.micro_batch(&cursor, r, 2, 2, m).unwrap();
                assert_eq!(batch.tokens.len(), batch.samples.len() * 33);
                from_a += batch.datasets.iter().filter(|&&d| d == 0).count();
                total += batch.samples.len();
                seen.extend(batch.samples.iter().zip(&batch.datasets).map(|(s, d)| (*d, *s)));
            }
        }
        // The step's 16 blended positions, each exactly once.
        let want: BTreeSet<_> = (cursor.consumed..cursor.consumed + 16).map(|p| blended.at(p)).collect();
        assert_eq!(seen, want);
        cursor.advance(1).unwrap();
    }
    // 160 positions at weights 3:1: dataset 0 gets 120, within the schedule's bound of 2.
    assert_eq!(total, 160);
    assert!(from_a.abs_diff(120) <= 2, "{from_a} of 160 from the weight-3 dataset");
    for d in [a, b] {
        let _ = std::fs::remove_dir_all(d);
    }
}
