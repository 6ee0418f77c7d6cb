//! Dataset directories: synthesize, manifest, verify, atomic creation.

use gantry_sharding::indexed::IndexedDataset;
use gantry_sharding::manifest::{Manifest, ManifestError};
use gantry_sharding::synth::{SynthConfig, synthesize};
use std::path::PathBuf;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gantry-dataset-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn small(seed: u64) -> SynthConfig {
    SynthConfig {
        tokens: 100_000,
        seed,
        vocab_size: 300,
        support: 16,
        doc_tokens: 1000,
        shard_tokens: 30_000,
    }
}

#[test]
fn synthesize_writes_shards_a_manifest_and_the_entropy() {
    let dir = temp("synth");
    let m = synthesize(&dir, &small(5)).unwrap();
    assert_eq!(m.tokens, 100_000);
    assert_eq!(m.shards.len(), 4, "30k-token shards of 1k-token documents");
    assert_eq!(m.documents, 100);
    let h = m.entropy_nats_per_token.unwrap();
    assert!(h > 1.0 && h < 16f64.ln(), "{h}");
    assert_eq!(Manifest::read(&dir).unwrap(), m);
    m.verify(&dir).unwrap();
    let total: u64 = m
        .shards
        .iter()
        .map(|s| IndexedDataset::open(&dir.join(&s.prefix)).unwrap().num_tokens())
        .sum();
    assert_eq!(total, 100_000);
    // No temporary directory is left next to the result.
    let parent = dir.parent().unwrap();
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    let leftovers = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{name}.tmp-")))
        .count();
    assert_eq!(leftovers, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn same_seed_same_bytes() {
    let (a, b, c) = (temp("seed-a"), temp("seed-b"), temp("seed-c"));
    let ma = synthesize(&a, &small(9)).unwrap();
    let mb = synthesize(&b, &small(9)).unwrap();
    let mc = synthesize(&c, &small(10)).unwrap();
    assert_eq!(ma.shards, mb.shards, "checksums equal for the same seed");
    assert_ne!(ma.shards[0].bin_xxh3, mc.shards[0].bin_xxh3);
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn verify_catches_a_flipped_byte_and_names_the_file() {
    let dir = temp("flip");
    let m = synthesize(&dir, &small(1)).unwrap();
    let bin = dir.join(format!("{}.bin", m.shards[1].prefix));
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&bin, bytes).unwrap();
    let err = m.verify(&dir).unwrap_err();
    assert!(matches!(err, ManifestError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains("shard-00001.bin"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn existing_output_is_refused_and_bad_manifests_are_errors() {
    let dir = temp("exists");
    std::fs::create_dir_all(&dir).unwrap();
    let err = synthesize(&dir, &small(1)).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    std::fs::write(dir.join("manifest.json"), b"{ not json").unwrap();
    let err = Manifest::read(&dir).unwrap_err().to_string();
    assert!(err.contains("manifest.json: not a valid manifest"), "{err}");
    let err = Manifest::read(&dir.join("nope")).unwrap_err().to_string();
    assert!(err.contains("nope/manifest.json"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
