//! `manifest.json`: what a dataset directory holds. Written last, after every shard is
//! complete, and the directory itself is built under a temporary name and renamed into place,
//! so a directory with a manifest is always a finished dataset.

use crate::frames::{self, FramedBin, ZstdOptions};
use crate::indexed::{IndexedDataset, IndexedIndex, IndexedSummary, TokenDType, paths};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Bumped whenever the layout of a dataset directory changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub dtype: TokenDType,
    pub vocab_size: u64,
    /// Where the tokens came from: a tokenizer file name next to the shards, or a generator.
    pub tokenizer: TokenizerInfo,
    pub shards: Vec<ShardInfo>,
    pub documents: u64,
    pub sequences: u64,
    pub tokens: u64,
    /// The largest token id in any shard, when every shard records its own (absent in older
    /// manifests: readers then scan the shards, [`crate::vocab`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_token_id: Option<u64>,
    /// Set for synthetic data: the exact entropy rate of the source, so a model's validation
    /// loss can be compared with its floor.
    pub entropy_nats_per_token: Option<f64>,
    pub created_by: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenizerInfo {
    /// A Hugging Face `tokenizer.json` stored next to the shards under this name.
    File { path: String },
    /// Tokens generated directly (no text behind them).
    Synthetic { generator: String, seed: u64 },
    /// Raw bytes as tokens (vocabulary 256).
    Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File prefix relative to the dataset directory (`PREFIX.bin`, `PREFIX.idx`).
    pub prefix: String,
    pub documents: u64,
    pub sequences: u64,
    pub tokens: u64,
    pub bin_bytes: u64,
    pub idx_bytes: u64,
    /// The largest token id in the `.bin` (absent in older manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_token_id: Option<u64>,
    /// xxh3-64 of each file, lowercase hex.
    pub bin_xxh3: String,
    pub idx_xxh3: String,
    /// The zstd variant of the `.bin`, when one was written (absent in older manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zstd: Option<ZstdInfo>,
}

/// The zstd frames of a shard's `.bin` ([`crate::frames`]) and their frame index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZstdInfo {
    /// File names relative to the dataset directory (`PREFIX.bin.zst`, `PREFIX.zidx`).
    pub file: String,
    pub index: String,
    pub level: i32,
    pub frame_bytes: u64,
    pub frames: u64,
    pub bytes: u64,
    pub index_bytes: u64,
    /// xxh3-64 of each file, lowercase hex. The frames decompress to the `.bin` (`bin_xxh3`).
    pub xxh3: String,
    pub index_xxh3: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid manifest: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: format version {found} is newer than this gantry understands ({FORMAT_VERSION})")]
    TooNew { path: PathBuf, found: u32 },
    #[error("{path}: checksum mismatch: manifest says {expected}, file hashes to {actual}")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: manifest says {expected} bytes, file has {actual}")]
    Size { path: PathBuf, expected: u64, actual: u64 },
    #[error("{path}: the frames decompress to content hashing to {actual}, but the .bin's checksum is {expected}")]
    ContentChecksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{dir}: shard {prefix} has neither {bin} nor a zstd variant")]
    MissingShard { dir: PathBuf, prefix: String, bin: String },
    #[error(transparent)]
    Indexed(#[from] crate::indexed::IndexedError),
    #[error(transparent)]
    Frames(#[from] crate::frames::FrameError),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A dataset's fingerprint: xxh3-64 of the bytes of its `manifest.json`.
pub fn fingerprint_of(raw_manifest: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(raw_manifest)
}

/// xxh3-64 of a file, streamed in 4 MiB blocks.
pub fn file_xxh3(path: &Path) -> Result<String, ManifestError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:016x}", hasher.digest()))
}

impl ShardInfo {
    /// Describe a finished shard `dir/prefix.{bin,idx}`, hashing both files.
    pub fn describe(dir: &Path, prefix: &str, summary: &IndexedSummary) -> Result<ShardInfo, ManifestError> {
        let (bin, idx) = paths(&dir.join(prefix));
        Ok(ShardInfo {
            prefix: prefix.to_string(),
            documents: summary.documents,
            sequences: summary.sequences,
            tokens: summary.tokens,
            bin_bytes: summary.bin_bytes,
            idx_bytes: summary.idx_bytes,
            max_token_id: Some(summary.max_token_id),
            bin_xxh3: file_xxh3(&bin)?,
            idx_xxh3: file_xxh3(&idx)?,
            zstd: None,
        })
    }

    /// Describe a finished shard and write its zstd variant next to it.
    pub fn describe_compressed(
        dir: &Path,
        prefix: &str,
        summary: &IndexedSummary,
        opts: &ZstdOptions,
    ) -> Result<ShardInfo, ManifestError> {
        let mut info = Self::describe(dir, prefix, summary)?;
        info.zstd = Some(ZstdInfo::write(dir, prefix, opts)?);
        Ok(info)
    }
}

impl ZstdInfo {
    /// Compress `dir/prefix.bin` into frames and describe the two new files.
    pub fn write(dir: &Path, prefix: &str, opts: &ZstdOptions) -> Result<ZstdInfo, ManifestError> {
        let (bin, _) = paths(&dir.join(prefix));
        let (zst, zidx) = frames::paths(&dir.join(prefix));
        let summary = frames::compress_file(&bin, &zst, &zidx, opts)?;
        let name = |p: &Path| p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        Ok(ZstdInfo {
            file: name(&zst),
            index: name(&zidx),
            level: opts.level,
            frame_bytes: opts.frame_bytes,
            frames: summary.frames,
            bytes: summary.compressed_bytes,
            index_bytes: summary.index_bytes,
            xxh3: file_xxh3(&zst)?,
            index_xxh3: file_xxh3(&zidx)?,
        })
    }
}

impl Manifest {
    pub fn new(dtype: TokenDType, vocab_size: u64, tokenizer: TokenizerInfo, shards: Vec<ShardInfo>) -> Manifest {
        Manifest {
            format: "megatron-mmidx-v1".into(),
            format_version: FORMAT_VERSION,
            dtype,
            vocab_size,
            tokenizer,
            documents: shards.iter().map(|s| s.documents).sum(),
            sequences: shards.iter().map(|s| s.sequences).sum(),
            tokens: shards.iter().map(|s| s.tokens).sum(),
            max_token_id: shards
                .iter()
                .map(|s| s.max_token_id)
                .try_fold(0, |m, s| Some(m.max(s?))),
            shards,
            entropy_nats_per_token: None,
            created_by: format!("gantry {}", env!("CARGO_PKG_VERSION")),
        }
    }

    pub fn read(dir: &Path) -> Result<Manifest, ManifestError> {
        Ok(Self::read_with_fingerprint(dir)?.0)
    }

    /// [`Manifest::read`], and the dataset's fingerprint: xxh3-64 of `manifest.json` (what
    /// sampler cursors and the per-host caches key on; any change to the manifest, hence to
    /// any shard's checksum, changes it).
    pub fn read_with_fingerprint(dir: &Path) -> Result<(Manifest, u64), ManifestError> {
        let path = dir.join(MANIFEST);
        let raw = std::fs::read(&path).map_err(io(&path))?;
        Ok((Manifest::from_json(&raw, &path)?, fingerprint_of(&raw)))
    }

    /// A manifest from the bytes of a `manifest.json` (read from a directory, or fetched from
    /// object storage), checked as [`Manifest::read`] checks it; `path` names it in errors.
    pub fn from_json(raw: &[u8], path: &Path) -> Result<Manifest, ManifestError> {
        let path = path.to_path_buf();
        let m: Manifest = serde_json::from_slice(raw).map_err(|e| ManifestError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if m.format_version > FORMAT_VERSION {
            return Err(ManifestError::TooNew {
                path,
                found: m.format_version,
            });
        }
        let leaves = |name: &str| name.contains('/') || name.contains("..");
        for s in &m.shards {
            let names = [
                Some(&s.prefix),
                s.zstd.as_ref().map(|z| &z.file),
                s.zstd.as_ref().map(|z| &z.index),
            ];
            if let Some(bad) = names.into_iter().flatten().find(|n| leaves(n)) {
                return Err(ManifestError::Invalid {
                    path,
                    message: format!("file name `{bad}` of shard {} leaves the directory", s.prefix),
                });
            }
        }
        if let TokenizerInfo::File { path: name } = &m.tokenizer
            && leaves(name)
        {
            return Err(ManifestError::Invalid {
                path,
                message: format!("tokenizer file name `{name}` leaves the directory"),
            });
        }
        Ok(m)
    }

    pub fn write(&self, dir: &Path) -> Result<(), ManifestError> {
        let path = dir.join(MANIFEST);
        let json = serde_json::to_vec_pretty(self).map_err(|e| ManifestError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&path, json).map_err(io(&path))
    }

    /// Re-hash every shard file and open every shard (which validates its index). A shard
    /// with a zstd variant also has its frame files hashed and its frames decompressed and
    /// compared with the `.bin`'s checksum; its `.bin` may then be absent (compressed-only
    /// copies of a dataset).
    pub fn verify(&self, dir: &Path) -> Result<(), ManifestError> {
        for shard in &self.shards {
            let (bin, idx) = paths(&dir.join(&shard.prefix));
            let mut files = vec![(idx.clone(), shard.idx_bytes, &shard.idx_xxh3)];
            let have_bin = bin.exists();
            if have_bin {
                files.push((bin.clone(), shard.bin_bytes, &shard.bin_xxh3));
            }
            if let Some(z) = &shard.zstd {
                files.push((dir.join(&z.file), z.bytes, &z.xxh3));
                files.push((dir.join(&z.index), z.index_bytes, &z.index_xxh3));
            } else if !have_bin {
                return Err(ManifestError::MissingShard {
                    dir: dir.to_path_buf(),
                    prefix: shard.prefix.clone(),
                    bin: bin.display().to_string(),
                });
            }
            for (path, bytes, sum) in &files {
                check_file(path, *bytes, sum)?;
            }
            if have_bin {
                IndexedDataset::open(&dir.join(&shard.prefix))?;
            }
            if let Some(z) = &shard.zstd {
                let zst = dir.join(&z.file);
                let framed = FramedBin::open(&zst, &dir.join(&z.index), 1)?;
                IndexedIndex::open(&idx, &zst, framed.len())?;
                let actual = framed.content_xxh3()?;
                if actual != shard.bin_xxh3 {
                    return Err(ManifestError::ContentChecksum {
                        path: zst,
                        expected: shard.bin_xxh3.clone(),
                        actual,
                    });
                }
            }
        }
        Ok(())
    }
}

fn check_file(path: &Path, bytes: u64, sum: &str) -> Result<(), ManifestError> {
    let actual = std::fs::metadata(path).map_err(io(path))?.len();
    if actual != bytes {
        return Err(ManifestError::Size {
            path: path.to_path_buf(),
            expected: bytes,
            actual,
        });
    }
    let hash = file_xxh3(path)?;
    if hash != sum {
        return Err(ManifestError::Checksum {
            path: path.to_path_buf(),
            expected: sum.to_string(),
            actual: hash,
        });
    }
    Ok(())
}

/// Build a dataset in `DIR.tmp-PID`, then rename it to `DIR`: an interrupted build never
/// leaves a directory that looks finished. Refuses to replace an existing `DIR`.
pub fn build_atomically<T>(
    dir: &Path,
    build: impl FnOnce(&Path) -> Result<T, ManifestError>,
) -> Result<T, ManifestError> {
    if dir.exists() {
        return Err(ManifestError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "output directory already exists"),
        });
    }
    let mut tmp = dir.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    match build(&tmp) {
        Ok(v) => {
            std::fs::rename(&tmp, dir).map_err(io(dir))?;
            Ok(v)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}
