//! A dataset's cache directory made ready for streaming: the manifest, every `.idx` (back to
//! back in one file, [`super::index_pack`]) and the tokenizer in place (what opening the
//! dataset and planning its reads need), the shards' `.bin` left to the [`super::Streamer`].

use super::super::block_sums::{BLOCK_SUMS, BlockSums};
use super::super::cache;
use super::super::fetch::{check_listed, get_manifest, get_tokenizer, replace_if_different, write_error};
use super::super::retry::with_retry;
use super::super::upload::INDEX_PACK;
use super::super::{RemoteError, RemoteOptions, open_store};
use super::index_pack;
use crate::manifest::{MANIFEST, Manifest};
use crate::materialize::{dataset_cache_dir, lock_cache_entry};
use bytes::Bytes;
use gantry_checkpoint::Store;
use gantry_checkpoint::location::StorageLocation;
use std::collections::HashMap;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where a shard's `.bin` comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Origin {
    /// The `.bin` object itself.
    Bin,
    /// Its zstd frames and frame index (a compressed-only dataset), decompressed on arrival.
    Frames {
        zst: String,
        zst_bytes: u64,
        zst_xxh3: String,
        zidx: String,
        zidx_bytes: u64,
        zidx_xxh3: String,
    },
}

/// A dataset at an `s3://` location, ready to be streamed into `dir` (see the module
/// documentation): what [`prepare_stream`] returns and [`super::Streamer::start`] takes.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamDir {
    pub location: StorageLocation,
    /// `CACHE/<fingerprint>/`.
    pub dir: PathBuf,
    pub fingerprint: u64,
    pub manifest: Manifest,
    pub(super) origins: Vec<Origin>,
    /// Bytes of the files kept whatever the budget: the manifest, the `.idx` files, the
    /// tokenizer and the shards' stamps.
    pub fixed_bytes: u64,
    /// Files this call fetched (the `.idx` files missing or damaged in the cache).
    pub fetched: Vec<String>,
    pub seconds: f64,
}

impl StreamDir {
    pub fn shards(&self) -> usize {
        self.manifest.shards.len()
    }

    /// Where shard `shard`'s `.bin` goes.
    pub fn bin(&self, shard: usize) -> PathBuf {
        self.dir.join(format!("{}.bin", self.manifest.shards[shard].prefix))
    }

    /// The object shard `shard`'s bytes are fetched from (its `.bin`, or its `.bin.zst`).
    pub fn object(&self, shard: usize) -> String {
        match &self.origins[shard] {
            Origin::Bin => self
                .location
                .child(&format!("{}.bin", self.manifest.shards[shard].prefix)),
            Origin::Frames { zst, .. } => self.location.child(zst),
        }
    }

    /// The files a fetch of shard `shard` writes, their bytes: its `.bin`, and for a
    /// compressed shard first its frames and frame index (there until it is decompressed).
    pub(super) fn fetch_sizes(&self, shard: usize) -> Vec<u64> {
        let bin = self.manifest.shards[shard].bin_bytes;
        match &self.origins[shard] {
            Origin::Bin => vec![bin],
            Origin::Frames {
                zst_bytes, zidx_bytes, ..
            } => vec![*zst_bytes, *zidx_bytes, bin],
        }
    }

    /// Bytes shard `shard` may take in the cache (its [`cache::entry_cost`]): what the plan
    /// holds a rank to and what a reservation makes room for.
    pub fn cost(&self, shard: usize) -> u64 {
        cache::entry_cost(&self.fetch_sizes(shard))
    }

    /// Bytes the whole dataset may take in the cache: the fixed files and every shard at its
    /// [`Self::cost`]. A budget of this much holds every shard at once.
    pub fn footprint(&self) -> u64 {
        self.fixed_bytes + (0..self.shards()).map(|s| self.cost(s)).sum::<u64>()
    }

    /// Bytes of every shard's `.bin` and of the fixed files: the whole dataset in the cache.
    pub fn total_bytes(&self) -> u64 {
        self.fixed_bytes + self.manifest.shards.iter().map(|s| s.bin_bytes).sum::<u64>()
    }
}

/// Make `CACHE/<fingerprint>/` (under `cache_root`) ready to stream the dataset at the S3
/// `location`: one GET of the manifest; a listing of the prefix only when a shard may come
/// from its zstd frames (which objects are there decides; every object the manifest names
/// must then be there with its size), else a HEAD of the index pack when an `.idx` is to be
/// fetched (listing a prefix of many shards took longer than the rest of this; a missing
/// `.bin` fails its own fetch instead, naming it). A warm cache costs the manifest's GET
/// alone: the block checksums are asked for only by range mode ([`fetch_block_sums`]). Then, holding
/// the entry's `fetch` build lock (the one a complete fetch holds, so the ranks of a host do this
/// once), the temporary files of killed fetches removed, each `.idx` that is missing or does
/// not match the manifest fetched and checked as [`super::super::fetch`] does, the tokenizer,
/// and `manifest.json` last.
pub fn prepare_stream(
    location: &StorageLocation,
    cache_root: &Path,
    opts: &RemoteOptions,
) -> Result<StreamDir, RemoteError> {
    let started = Instant::now();
    if location.is_local() {
        return Err(RemoteError::NotRemote {
            location: location.to_string(),
        });
    }
    let store = open_store(location, opts)?;
    let remote = get_manifest(&store, location, opts)?;
    let dir = dataset_cache_dir(cache_root, remote.fingerprint);
    let _lock = lock_cache_entry(&dir.join("fetch"))?;
    // What killed fetches left behind goes now, before the budget counts it.
    super::super::cache::sweep_partials(&dir)?;
    let manifest = remote.manifest;
    let idx_total: u64 = manifest.shards.iter().map(|s| s.idx_bytes).sum();
    // The shards' stamps: one file, at its full size from the start (a fixed file).
    cache::Stamps::open(&dir, manifest.shards.len())?;
    let stamps = manifest.shards.len() as u64 * cache::STAMP_BYTES;
    let mut fixed = remote.raw.len() as u64 + idx_total + stamps;
    let (origins, listed) = match manifest.shards.iter().all(|s| s.zstd.is_none()) {
        // Every shard is read from its `.bin`: nothing a listing says is needed before the
        // first step (a missing or short object fails its own fetch, naming it).
        true => (vec![Origin::Bin; manifest.shards.len()], None),
        false => {
            let listed = list(&store, location, opts)?;
            (origins_listed(location, &manifest, &listed)?, Some(listed))
        }
    };
    // The pack's size: from the listing, else by a HEAD, only when an `.idx` is to be
    // fetched.
    let size_of = |key: &str| -> Result<Option<u64>, RemoteError> {
        match &listed {
            Some(l) => Ok(l.get(key).copied()),
            None => with_retry(&opts.retry, &location.child(key), || store.size(key)),
        }
    };
    let pack = || Ok(size_of(INDEX_PACK)? == Some(idx_total));
    let mut fetched = index_files(opts, location, &dir, &manifest, &pack)?;
    if let Some((path, bytes, written)) = get_tokenizer(&store, opts, location, &dir, &manifest)? {
        if written {
            fetched.push(path);
        }
        fixed += bytes;
    }
    // Last: with the manifest in place the directory opens as a dataset.
    replace_if_different(&dir.join(MANIFEST), &remote.raw)?;
    Ok(StreamDir {
        location: location.clone(),
        dir,
        fingerprint: remote.fingerprint,
        manifest,
        origins,
        fixed_bytes: fixed,
        fetched,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Every object under the dataset's prefix, and its size.
fn list(store: &Store, location: &StorageLocation, opts: &RemoteOptions) -> Result<HashMap<String, u64>, RemoteError> {
    Ok(with_retry(&opts.retry, &location.to_string(), || store.list(""))?
        .into_iter()
        .collect())
}

/// Where each shard's `.bin` comes from, by the listing `listed` of the prefix (a shard with
/// zstd frames may have been uploaded with or without its `.bin`); every object the manifest
/// names for it must be there with its size.
fn origins_listed(
    location: &StorageLocation,
    manifest: &Manifest,
    listed: &HashMap<String, u64>,
) -> Result<Vec<Origin>, RemoteError> {
    let mut origins = Vec::with_capacity(manifest.shards.len());
    for s in &manifest.shards {
        let bin = format!("{}.bin", s.prefix);
        let idx = format!("{}.idx", s.prefix);
        check_listed(location, listed, &idx, s.idx_bytes)?;
        origins.push(match (&s.zstd, listed.contains_key(&bin)) {
            (_, true) => {
                check_listed(location, listed, &bin, s.bin_bytes)?;
                Origin::Bin
            }
            (Some(z), false) => {
                check_listed(location, listed, &z.file, z.bytes)?;
                check_listed(location, listed, &z.index, z.index_bytes)?;
                Origin::Frames {
                    zst: z.file.clone(),
                    zst_bytes: z.bytes,
                    zst_xxh3: z.xxh3.clone(),
                    zidx: z.index.clone(),
                    zidx_bytes: z.index_bytes,
                    zidx_xxh3: z.index_xxh3.clone(),
                }
            }
            (None, false) => {
                return Err(RemoteError::MissingObject {
                    object: location.child(&bin),
                });
            }
        });
    }
    Ok(origins)
}

/// The block checksums of the dataset `dir` streams, when its prefix has them (none: `None`): one GET,
/// taken only when undamaged and written for this very manifest ([`BlockSums::parse`]);
/// otherwise the error names the object and what is wrong with it.
pub fn fetch_block_sums(dir: &StreamDir, opts: &RemoteOptions) -> Result<Option<BlockSums>, RemoteError> {
    let store = open_store(&dir.location, opts)?;
    let object = dir.location.child(BLOCK_SUMS);
    let Some(raw) = with_retry(&opts.retry, &object, || store.get(BLOCK_SUMS))? else {
        return Ok(None);
    };
    BlockSums::parse(&raw, &dir.manifest, dir.fingerprint, &object).map(Some)
}

/// GETs asked for in one batch at most, and their bytes: a transient failure repeats one
/// batch, and a batch is held in memory until it is written.
const BATCH_GETS: usize = 512;
const BATCH_BYTES: u64 = 64 << 20;
/// GETs in flight for the `.idx` files at least: small objects, where the round trip is the
/// cost (a dataset of many small shards has as many `.idx` files, all needed before the
/// dataset opens, since packing its samples needs every document's length).
const IDX_IN_FLIGHT: usize = 32;

/// One GET of `.idx` bytes: `range` of object `key`, holding the `.idx` files of `shards`
/// back to back.
struct Unit {
    key: String,
    range: Range<u64>,
    shards: Vec<usize>,
}

/// Make every shard's `.idx` in the cached index pack of `dir` ([`index_pack`]) match the
/// manifest: each piece checked, and those missing or not matching fetched, each hashed and
/// compared with the manifest before it is written. With the upload's index pack (`pack`
/// says whether the prefix has it, asked only when something is to be fetched) runs of them
/// come as ranged GETs of the pack, a few GETs for the lot; a piece the pack does not hold as
/// the manifest says (a pack that is not this dataset's) and every piece of a prefix without a
/// pack is fetched from its own `.idx` object, many GETs in flight. The names fetched, in
/// shard order. Written without an fsync: see [`index_pack`] for why that is safe.
fn index_files(
    opts: &RemoteOptions,
    location: &StorageLocation,
    dir: &Path,
    manifest: &Manifest,
    pack: &dyn Fn() -> Result<bool, RemoteError>,
) -> Result<Vec<String>, RemoteError> {
    let cached = dir.join(INDEX_PACK);
    let missing = index_pack::damaged(&cached, manifest)?;
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let offsets = index_pack::offsets(manifest);
    let target = index_pack::Target::open(&cached, offsets[manifest.shards.len()])?;
    let wide = RemoteOptions {
        concurrency: opts.concurrency.max(IDX_IN_FLIGHT),
        ..opts.clone()
    };
    let store = open_store(location, &wide)?;
    let to = Dest {
        file: &target.file,
        path: &cached,
        offsets: &offsets,
    };
    let fetch =
        |units: Vec<Unit>, from_pack: bool| fetch_units(&store, opts, location, &to, manifest, units, from_pack);
    let mut fetched = Vec::with_capacity(missing.len());
    let rest = if pack()? {
        let sizes: Vec<u64> = manifest.shards.iter().map(|s| s.idx_bytes).collect();
        let (got, rest) = fetch(pack_units(&sizes, &missing, opts.range_bytes), true)?;
        fetched = got;
        rest
    } else {
        missing
    };
    if !rest.is_empty() {
        let units = rest
            .iter()
            .map(|&i| Unit {
                key: idx_name(manifest, i),
                range: 0..manifest.shards[i].idx_bytes,
                shards: vec![i],
            })
            .collect();
        fetched.extend(fetch(units, false)?.0);
    }
    target.finish()?;
    fetched.sort_unstable();
    Ok(fetched.into_iter().map(|i| idx_name(manifest, i)).collect())
}

/// Where checked `.idx` pieces go: `file` (the cached pack, `path`), shard `s` at
/// `offsets[s]`.
struct Dest<'a> {
    file: &'a std::fs::File,
    path: &'a Path,
    offsets: &'a [u64],
}

fn idx_name(manifest: &Manifest, shard: usize) -> String {
    format!("{}.idx", manifest.shards[shard].prefix)
}

/// Every shard's `.idx` as a file of its own in `dir` (a fetched copy is read as a local
/// dataset), taken from the index pack: the one in the cache when a stream left it there (no
/// GET), else fetched as a stream's start fetches it (`has_pack`: the upload's pack, in a few
/// GETs; otherwise each `.idx`, many in flight). The pieces fetched and the `.idx` files
/// written.
pub(in crate::remote) fn unpacked_index_files(
    opts: &RemoteOptions,
    location: &StorageLocation,
    dir: &Path,
    manifest: &Manifest,
    has_pack: bool,
) -> Result<(Vec<String>, Vec<String>), RemoteError> {
    let fetched = index_files(opts, location, dir, manifest, &|| Ok(has_pack))?;
    let written = index_pack::unpack(&dir.join(INDEX_PACK), dir, manifest)?;
    Ok((fetched, written))
}

/// The GETs of the index pack that cover the `.idx` files of `missing` (shard numbers, in
/// order; `sizes`: every shard's `.idx` bytes): runs of consecutive shards, each GET up to
/// `range_bytes` (a larger `.idx` is a GET of its own).
fn pack_units(sizes: &[u64], missing: &[usize], range_bytes: u64) -> Vec<Unit> {
    let offsets: Vec<u64> = sizes
        .iter()
        .scan(0, |at, &n| {
            *at += n;
            Some(*at - n)
        })
        .collect();
    let mut units: Vec<Unit> = Vec::new();
    for &i in missing {
        let range = offsets[i]..offsets[i] + sizes[i];
        match units.last_mut() {
            Some(u) if u.range.end == range.start && range.end - u.range.start <= range_bytes.max(1) => {
                u.range.end = range.end;
                u.shards.push(i);
            }
            _ => units.push(Unit {
                key: INDEX_PACK.to_string(),
                range,
                shards: vec![i],
            }),
        }
    }
    units
}

/// Fetch `units` in batches (each up to [`BATCH_GETS`] GETs and [`BATCH_BYTES`] bytes, the
/// store's GETs in flight) and write each `.idx` that matches the manifest. The shards
/// written, and (`from_pack`) those whose bytes in the pack do not match, to be fetched from
/// their own objects; a file from its own object that does not match is an error.
fn fetch_units(
    store: &Store,
    opts: &RemoteOptions,
    location: &StorageLocation,
    to: &Dest<'_>,
    manifest: &Manifest,
    units: Vec<Unit>,
    from_pack: bool,
) -> Result<(Vec<usize>, Vec<usize>), RemoteError> {
    let (mut written, mut mismatched) = (Vec::new(), Vec::new());
    let mut units = units.into_iter().peekable();
    while units.peek().is_some() {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(u) = units.next_if(|u| {
            batch.is_empty() || (batch.len() < BATCH_GETS && bytes + (u.range.end - u.range.start) <= BATCH_BYTES)
        }) {
            bytes += u.range.end - u.range.start;
            batch.push(u);
        }
        let request: Vec<(String, Range<u64>)> = batch.iter().map(|u| (u.key.clone(), u.range.clone())).collect();
        let object = match batch.as_slice() {
            [one] => location.child(&one.key),
            [first, .., last] if from_pack => format!(
                "{} (the .idx files of {} to {})",
                location.child(INDEX_PACK),
                manifest.shards[first.shards[0]].prefix,
                manifest.shards[last.shards[last.shards.len() - 1]].prefix
            ),
            [first, .., last] => format!(
                "{} … {} ({} .idx files)",
                location.child(&first.key),
                last.key,
                batch.len()
            ),
            [] => continue,
        };
        let got = with_retry(&opts.retry, &object, || store.get_ranges(&request))?;
        let pieces: Vec<(usize, Bytes)> = batch
            .iter()
            .zip(got)
            .flat_map(|(u, body)| {
                let mut at = 0usize;
                u.shards.iter().map(move |&i| {
                    let end = (at as u64 + manifest.shards[i].idx_bytes).min(body.len() as u64) as usize;
                    let piece = body.slice(at.min(end)..end);
                    at = end;
                    (i, piece)
                })
            })
            .collect();
        for (i, ok) in write_checked(location, to, manifest, &pieces, from_pack)? {
            match ok {
                true => written.push(i),
                false => mismatched.push(i),
            }
        }
    }
    Ok((written, mismatched))
}

/// Threads hashing and writing `.idx` pieces.
const WRITERS: usize = 8;

/// Check each fetched `.idx` piece (shard, bytes) against the manifest and write those that
/// match into the cached pack, on up to [`WRITERS`] threads; per piece, whether it was written. A piece that does not
/// match is an error unless it came from the pack (`from_pack`: then it is fetched again from
/// its own object).
fn write_checked(
    location: &StorageLocation,
    to: &Dest<'_>,
    manifest: &Manifest,
    pieces: &[(usize, Bytes)],
    from_pack: bool,
) -> Result<Vec<(usize, bool)>, RemoteError> {
    let one = |&(i, ref piece): &(usize, Bytes)| -> Result<(usize, bool), RemoteError> {
        let s = &manifest.shards[i];
        let name = idx_name(manifest, i);
        let object = location.child(&name);
        match check_bytes(&object, piece, s.idx_bytes, &s.idx_xxh3) {
            Ok(()) => {}
            Err(e) if from_pack => {
                tracing::warn!(error = %e, pack = %location.child(INDEX_PACK), "the index pack does not hold this .idx as the manifest says; fetching it on its own");
                return Ok((i, false));
            }
            Err(e) => return Err(e),
        }
        to.file
            .write_all_at(piece, to.offsets[i])
            .map_err(|e| write_error(to.path, &object, piece.len() as u64, e))?;
        Ok((i, true))
    };
    let per = pieces.len().div_ceil(WRITERS).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = pieces
            .chunks(per)
            .map(|chunk| scope.spawn(move || chunk.iter().map(one).collect::<Result<Vec<_>, _>>()))
            .collect();
        let mut out = Vec::with_capacity(pieces.len());
        for w in workers {
            out.extend(w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?);
        }
        Ok(out)
    })
}

/// The bytes fetched of `object` are the manifest's: `bytes` long, hashing to `xxh3`.
fn check_bytes(object: &str, got: &[u8], bytes: u64, xxh3: &str) -> Result<(), RemoteError> {
    if got.len() as u64 != bytes {
        return Err(RemoteError::Size {
            object: object.to_string(),
            expected: bytes,
            actual: got.len() as u64,
        });
    }
    let actual = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(got));
    if actual != xxh3 {
        return Err(RemoteError::Checksum {
            object: object.to_string(),
            expected: xxh3.to_string(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(units: &[Unit]) -> Vec<(Range<u64>, Vec<usize>)> {
        units.iter().map(|u| (u.range.clone(), u.shards.clone())).collect()
    }

    #[test]
    fn pack_gets_cover_runs_of_missing_files_within_the_range_size() {
        let sizes = [10, 20, 30, 40, 50];
        // All missing, ranges of 60 bytes: 10+20+30 fit, 40 starts another, 50 would pass 60.
        let all = pack_units(&sizes, &[0, 1, 2, 3, 4], 60);
        assert_eq!(
            shape(&all),
            vec![(0..60, vec![0, 1, 2]), (60..100, vec![3]), (100..150, vec![4])]
        );
        // A gap (shard 2 in place) starts a new GET; a file larger than a range is one GET.
        let gaps = pack_units(&sizes, &[0, 1, 3, 4], 1 << 20);
        assert_eq!(shape(&gaps), vec![(0..30, vec![0, 1]), (60..150, vec![3, 4])]);
        let big = pack_units(&sizes, &[4], 8);
        assert_eq!(shape(&big), vec![(100..150, vec![4])]);
        assert!(big.iter().all(|u| u.key == INDEX_PACK));
        assert!(pack_units(&sizes, &[], 60).is_empty());
    }
}
