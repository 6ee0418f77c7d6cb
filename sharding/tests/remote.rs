//! Datasets on a real S3 server (s3s-fs): upload with the manifest last and a rerun that
//! completes an interrupted upload; fetch into the data cache, reused while it checks out,
//! a damaged cached file fetched again; compressed-only datasets; and the errors that name
//! a missing manifest, a missing bucket, wrong credentials, a missing or damaged object.

#[path = "../../checkpoint/tests/common/s3_server.rs"]
mod s3_server;

use gantry_checkpoint::S3Options;
use gantry_checkpoint::location::{Role, StorageLocation};
use gantry_sharding::frames::ZstdOptions;
use gantry_sharding::gpt::{GptDataset, OpenOptions, Split};
use gantry_sharding::manifest::{MANIFEST, Manifest};
use gantry_sharding::remote::{RemoteError, RemoteOptions, Retry, fetch, read_manifest, upload};
use gantry_sharding::synth::{SynthConfig, synthesize_with};
use s3_server::S3Server;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gantry-remote-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn options(server: &S3Server) -> RemoteOptions {
    RemoteOptions {
        // Small ranges and parts, so even these small files take several ranged GETs.
        range_bytes: 64 << 10,
        retry: Retry {
            deadline: Duration::from_secs(5),
            ..Retry::default()
        },
        ..RemoteOptions::with_s3(S3Options {
            endpoint: Some(server.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key: Some(server.access_key.clone()),
            secret_key: Some(server.secret_key.clone()),
            ..S3Options::default()
        })
    }
}

fn at(text: &str) -> StorageLocation {
    StorageLocation::parse_as(text, Role::Dataset).unwrap()
}

/// A synthetic dataset of 3 shards in `dir/name` (with zstd frames when asked).
fn synth(dir: &Path, name: &str, zstd: bool, seed: u64) -> PathBuf {
    let out = dir.join(name);
    let cfg = SynthConfig {
        tokens: 300_000,
        seed,
        shard_tokens: 100_000,
        doc_tokens: 1000,
        ..SynthConfig::default()
    };
    let z = ZstdOptions {
        level: 1,
        frame_bytes: 64 << 10,
    };
    synthesize_with(&out, &cfg, zstd.then_some(&z)).unwrap();
    out
}

fn tokens(dir: &Path, cache: &Path) -> Vec<i64> {
    let opts = OpenOptions {
        cache_dir: Some(cache.to_path_buf()),
        ..OpenOptions::default()
    };
    let ds = GptDataset::open_with(dir, 63, Split::All, &opts).unwrap();
    let mut out = Vec::new();
    for i in 0..ds.num_samples() {
        ds.sample_into(i, &mut out).unwrap();
    }
    out
}

#[test]
fn upload_then_fetch_gives_the_same_dataset_and_a_damaged_cached_file_is_fetched_again() {
    let server = S3Server::start();
    let dir = tempdir("roundtrip");
    let local = synth(&dir, "ds", false, 1);
    let opts = options(&server);
    let loc = at(&format!("s3://{}/corpora/ds", server.bucket));

    let up = upload(&local, &loc, &opts).unwrap();
    assert!(!up.already_complete && up.skipped.is_empty(), "{up:?}");
    assert_eq!(up.uploaded.last().map(String::as_str), Some(MANIFEST), "{up:?}");
    assert_eq!(up.files, 7, "{up:?}"); // 3 × (.idx, .bin) + manifest
    assert!(
        !server.object_path("corpora/ds/.gantry-upload").exists()
            || std::fs::read_dir(server.object_path("corpora/ds/.gantry-upload"))
                .unwrap()
                .next()
                .is_none(),
        "the upload records are removed once the manifest is up"
    );
    // The same dataset again: nothing to do.
    assert!(upload(&local, &loc, &opts).unwrap().already_complete);

    let remote = read_manifest(&loc, &opts).unwrap();
    assert_eq!(remote.manifest, Manifest::read(&local).unwrap());
    let cache = dir.join("cache");
    let got = fetch(&loc, &cache, &opts).unwrap();
    assert!(!got.reused && got.refetched.is_empty(), "{got:?}");
    assert_eq!(got.fetched.len(), 6, "{got:?}");
    assert_eq!(got.dir, cache.join(format!("{:016x}", remote.fingerprint)));
    for name in got.fetched.iter().chain([&MANIFEST.to_string()]) {
        assert_eq!(
            std::fs::read(got.dir.join(name)).unwrap(),
            std::fs::read(local.join(name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(tokens(&got.dir, &cache), tokens(&local, &cache));

    // Checked before and unchanged: only the manifest is read.
    let again = fetch(&loc, &cache, &opts).unwrap();
    assert!(again.reused && again.fetched.is_empty(), "{again:?}");

    // A flipped byte in a cached shard: fetched again, and the copy is whole.
    let bin = got.dir.join("shard-00001.bin");
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[1000] ^= 0x40;
    std::fs::write(&bin, &bytes).unwrap();
    let healed = fetch(&loc, &cache, &opts).unwrap();
    assert_eq!(healed.fetched, vec!["shard-00001.bin".to_string()], "{healed:?}");
    assert!(
        healed.refetched.len() == 1 && healed.refetched[0].starts_with("shard-00001.bin (xxh3 "),
        "{healed:?}"
    );
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(local.join("shard-00001.bin")).unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_interrupted_upload_shows_no_manifest_and_a_rerun_completes_it() {
    let server = S3Server::start();
    let dir = tempdir("interrupted");
    let local = synth(&dir, "ds", false, 2);
    let opts = options(&server);
    let loc = at(&format!("s3://{}/ds", server.bucket));
    upload(&local, &loc, &opts).unwrap();
    // As if killed before its last files and the manifest: the records of the files that
    // were complete are there (an upload writes one after each object).
    std::fs::remove_file(server.object_path("ds/manifest.json")).unwrap();
    std::fs::remove_file(server.object_path("ds/shard-00002.bin")).unwrap();
    let records = server.object_path("ds/.gantry-upload");
    std::fs::create_dir_all(&records).unwrap();
    for name in ["shard-00000.idx", "shard-00000.bin", "shard-00001.bin"] {
        let m = Manifest::read(&local).unwrap();
        let s = m.shards.iter().find(|s| name.starts_with(&s.prefix)).unwrap();
        let (bytes, xxh3) = if name.ends_with(".idx") {
            (s.idx_bytes, s.idx_xxh3.clone())
        } else {
            (s.bin_bytes, s.bin_xxh3.clone())
        };
        std::fs::write(
            records.join(format!("{name}.json")),
            serde_json::json!({ "bytes": bytes, "xxh3": xxh3 }).to_string(),
        )
        .unwrap();
    }
    // shard-00001.idx, shard-00002.idx and the rest have no record: they are sent again.
    let e = fetch(&loc, &dir.join("cache"), &opts).unwrap_err();
    assert!(matches!(e, RemoteError::NoManifest { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("s3://{}/ds/manifest.json does not exist", server.bucket)),
        "{e}"
    );

    let up = upload(&local, &loc, &opts).unwrap();
    let mut skipped = up.skipped.clone();
    skipped.sort();
    assert_eq!(
        skipped,
        ["shard-00000.bin", "shard-00000.idx", "shard-00001.bin"],
        "{up:?}"
    );
    assert_eq!(up.uploaded.last().map(String::as_str), Some(MANIFEST), "{up:?}");
    assert!(up.uploaded.contains(&"shard-00002.bin".to_string()), "{up:?}");
    let got = fetch(&loc, &dir.join("cache"), &opts).unwrap();
    assert_eq!(tokens(&got.dir, &dir.join("cache")), tokens(&local, &dir.join("cache")));

    // Another dataset to the same prefix is refused; a damaged local file is never sent.
    let other = synth(&dir, "other", false, 3);
    let e = upload(&other, &loc, &opts).unwrap_err();
    assert!(matches!(e, RemoteError::Exists { .. }), "{e}");
    let bin = other.join("shard-00000.bin");
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&bin, &bytes).unwrap();
    let e = upload(&other, &at(&format!("s3://{}/other", server.bucket)), &opts).unwrap_err();
    assert!(e.to_string().contains("shard-00000.bin: checksum mismatch"), "{e}");
    assert!(!server.object_path("other/manifest.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compressed_only_datasets_fetch_their_frames_and_materialize_in_the_cache() {
    let server = S3Server::start();
    let dir = tempdir("zstd");
    let full = synth(&dir, "ds", true, 4);
    let expected = tokens(&full, &dir.join("cache-local"));
    // The compressed-only copy: no .bin files.
    for e in std::fs::read_dir(&full).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "bin") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let opts = options(&server);
    let loc = at(&format!("s3://{}/z", server.bucket));
    let up = upload(&full, &loc, &opts).unwrap();
    assert_eq!(up.files, 10, "{up:?}"); // 3 × (.idx, .bin.zst, .zidx) + manifest
    let cache = dir.join("cache");
    let got = fetch(&loc, &cache, &opts).unwrap();
    let mut names = got.fetched.clone();
    names.sort();
    assert_eq!(
        names,
        [
            "shard-00000.bin.zst",
            "shard-00000.idx",
            "shard-00000.zidx",
            "shard-00001.bin.zst",
            "shard-00001.idx",
            "shard-00001.zidx",
            "shard-00002.bin.zst",
            "shard-00002.idx",
            "shard-00002.zidx"
        ]
    );
    // Opening materializes each .bin in the same cache directory, checked.
    assert_eq!(tokens(&got.dir, &cache), expected);
    assert!(got.dir.join("shard-00000.bin").exists());
    // The next fetch keeps the materialized copies: no frames again.
    let again = fetch(&loc, &cache, &opts).unwrap();
    assert!(again.fetched.is_empty(), "{again:?}");
    // A damaged materialized copy is removed (the frames are still there and check out),
    // and the next open materializes it again.
    let bin = got.dir.join("shard-00002.bin");
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[7] ^= 2;
    std::fs::write(&bin, &bytes).unwrap();
    let healed = fetch(&loc, &cache, &opts).unwrap();
    assert!(
        healed.fetched.is_empty()
            && healed.refetched.len() == 1
            && healed.refetched[0].starts_with("shard-00002.bin (xxh3"),
        "{healed:?}"
    );
    assert!(!bin.exists());
    assert_eq!(tokens(&got.dir, &cache), expected);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_manifest_bucket_objects_and_wrong_credentials_are_named() {
    let server = S3Server::start();
    let dir = tempdir("errors");
    let opts = options(&server);
    let cache = dir.join("cache");

    let e = fetch(&at(&format!("s3://{}/nothing-here", server.bucket)), &cache, &opts).unwrap_err();
    assert!(
        matches!(e, RemoteError::NoManifest { .. })
            && e.to_string()
                .contains(&format!("s3://{}/nothing-here/manifest.json", server.bucket)),
        "{e}"
    );
    let e = fetch(&at("s3://no-such-bucket-gantry/ds"), &cache, &opts).unwrap_err();
    assert!(
        matches!(e, RemoteError::NoBucket { .. }) && e.to_string().contains("\"no-such-bucket-gantry\""),
        "{e}"
    );
    let local = synth(&dir, "ds", false, 5);
    let e = upload(&local, &at("s3://no-such-bucket-gantry/ds"), &opts).unwrap_err();
    assert!(matches!(e, RemoteError::NoBucket { .. }), "{e}");

    let loc = at(&format!("s3://{}/ds", server.bucket));
    upload(&local, &loc, &opts).unwrap();
    let mut wrong = opts.clone();
    wrong.s3.secret_key = Some("not-the-secret".into());
    let e = fetch(&loc, &cache, &wrong).unwrap_err();
    assert!(
        matches!(e, RemoteError::Denied { .. })
            && e.to_string().contains("manifest.json")
            && e.to_string().contains("credentials"),
        "{e}"
    );

    // An object the manifest lists is gone, or damaged on the server.
    std::fs::remove_file(server.object_path("ds/shard-00001.idx")).unwrap();
    let e = fetch(&loc, &cache, &opts).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "s3://{}/ds/shard-00001.idx is missing, but the manifest lists it",
            server.bucket
        )
    );
    std::fs::copy(local.join("shard-00001.idx"), server.object_path("ds/shard-00001.idx")).unwrap();
    let object = server.object_path("ds/shard-00002.bin");
    let mut bytes = std::fs::read(&object).unwrap();
    bytes[5] ^= 1;
    std::fs::write(&object, &bytes).unwrap();
    let e = fetch(&loc, &cache, &opts).unwrap_err();
    assert!(
        matches!(e, RemoteError::Checksum { .. })
            && e.to_string().starts_with(&format!(
                "s3://{}/ds/shard-00002.bin: the bytes fetched hash to",
                server.bucket
            )),
        "{e}"
    );
    // Nothing damaged or partial is left under a final name.
    let fp = read_manifest(&loc, &opts).unwrap().fingerprint;
    let cached = cache.join(format!("{fp:016x}"));
    assert!(!cached.join("shard-00002.bin").exists() && !cached.join(MANIFEST).exists());
    assert!(
        std::fs::read_dir(&cached)
            .unwrap()
            .all(|e| !e.unwrap().file_name().to_string_lossy().contains(".partial-")),
    );

    let _ = std::fs::remove_dir_all(&dir);
}
