//! Bringing one shard into the cache for this rank: lease it, and unless a checked copy is
//! there, reserve its room, fetch it, check it, rename it into place (fsynced only where
//! stamps cannot tell an earlier boot's, [`cache::durable`]); then map it.

use super::super::cache::{self, Partial, Space};
use super::super::fetch::{Wanted, download_to, write_error};
use super::super::{RemoteError, io_err};
use super::Inner;
use super::dir::Origin;
use crate::frames::{FrameDecoder, FramedBin};
use crate::indexed::IndexedDataset;
use crate::materialize::{check_existing, lock_cache_entry};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl Inner {
    /// Lease shard `shard` and make sure its checked `.bin` is in the cache (fetching it,
    /// evicting what this rank does not hold when the budget needs room); its lease and map.
    pub(super) fn bring(&self, shard: usize) -> Result<(File, Arc<IndexedDataset>), RemoteError> {
        let info = &self.dir.manifest.shards[shard];
        let bin = self.dir.bin(shard);
        // The lease first: once held, no other rank of the host evicts the shard.
        let lease = cache::lease(&bin)?;
        // A stamped copy needs no build lock (another open and lock per shard on a warm
        // cache): the lease keeps it from eviction, and a stamp matches only the file it was
        // made for (a copy renamed into its place since is another inode with a later change
        // time).
        if self.stamps.matches(shard, &bin, info.bin_bytes, &info.bin_xxh3) {
            self.counters.reused.fetch_add(1, Ordering::Relaxed);
        } else {
            let _lock = lock_cache_entry(&bin)?;
            let present = self.stamps.matches(shard, &bin, info.bin_bytes, &info.bin_xxh3)
                || match check_existing(&bin, info.bin_bytes, &info.bin_xxh3)? {
                    None => {
                        self.space().stamp(shard, &bin, &info.bin_xxh3)?;
                        true
                    }
                    Some(why) if why == "missing" => false,
                    Some(why) => {
                        tracing::warn!(file = %bin.display(), why, "cached shard does not match the manifest; fetching it again");
                        std::fs::remove_file(&bin).map_err(io_err(&bin))?;
                        false
                    }
                };
            if present {
                self.counters.reused.fetch_add(1, Ordering::Relaxed);
            } else {
                // A killed fetch's temporary file is not looked for here (a listing of the
                // whole directory per shard): `prepare_stream` sweeps them before streaming
                // starts, and a reservation short of room sweeps them too.
                self.fetch_shard(shard, &bin)?;
            }
        }
        let map = (self.pack.index(shard, &bin, info.bin_bytes))
            .and_then(|index| IndexedDataset::with_index(index, &bin))
            .map_err(|e| RemoteError::Shard {
                object: self.dir.object(shard),
                message: e.to_string(),
            })?;
        Ok((lease, Arc::new(map)))
    }

    /// The budget of the dataset's cache directory.
    fn space(&self) -> Space<'_> {
        Space {
            dir: &self.dir.dir,
            budget: self.cfg.budget,
            deadline: self.cfg.room_wait,
            stop: &self.stop,
            stamps: &self.stamps,
        }
    }

    /// Fetch shard `shard` into `bin` (its lock held): reserve the room, GET, check, rename.
    fn fetch_shard(&self, shard: usize, bin: &Path) -> Result<(), RemoteError> {
        let info = &self.dir.manifest.shards[shard];
        let space = self.space();
        let name = format!("{}.bin", info.prefix);
        let sizes = self.dir.fetch_sizes(shard);
        let evictable = || self.evictable(&self.lock());
        let (mut partials, reserved) = space.reserve(bin, &sizes, &evictable)?;
        let c = &self.counters;
        c.peak_usage.fetch_max(reserved.usage, Ordering::Relaxed);
        c.evicted.fetch_add(reserved.evicted as u64, Ordering::Relaxed);
        let out = partials.pop().ok_or_else(|| RemoteError::Shard {
            object: self.dir.object(shard),
            message: "no temporary file was reserved".into(),
        })?;
        let mut fetched = info.bin_bytes;
        match &self.dir.origins[shard] {
            Origin::Bin => {
                let object = self.dir.location.child(&name);
                let w = Wanted {
                    object: &object,
                    key: &name,
                    bytes: info.bin_bytes,
                    xxh3: &info.bin_xxh3,
                };
                download_to(&self.store, &self.opts, &w, &out.file, &out.path, Some(&self.stop))?;
                if cache::durable() {
                    out.file
                        .sync_all()
                        .map_err(|e| write_error(&out.path, &object, info.bin_bytes, e))?;
                }
            }
            Origin::Frames {
                zst,
                zst_xxh3,
                zidx,
                zidx_xxh3,
                ..
            } => {
                let [z, zi] = <[Partial; 2]>::try_from(partials).map_err(|_| RemoteError::Shard {
                    object: self.dir.object(shard),
                    message: "the frames' temporary files were not reserved".into(),
                })?;
                for (p, key, xxh3) in [(&z, zst, zst_xxh3), (&zi, zidx, zidx_xxh3)] {
                    let object = self.dir.location.child(key);
                    let bytes = p.file.metadata().map_err(io_err(&p.path))?.len();
                    let w = Wanted {
                        object: &object,
                        key,
                        bytes,
                        xxh3,
                    };
                    download_to(&self.store, &self.opts, &w, &p.file, &p.path, Some(&self.stop))?;
                    fetched += bytes;
                }
                self.decompress(shard, &z, &zi, &out)?;
            }
        }
        space.commit(out, shard, bin, &info.bin_xxh3)?;
        c.fetched.fetch_add(1, Ordering::Relaxed);
        c.bytes_fetched.fetch_add(fetched, Ordering::Relaxed);
        Ok(())
    }

    /// Decompress the fetched frames `z` (index `zi`) of shard `shard` into `out`, which must
    /// then hash to the manifest's xxh3 of the `.bin`.
    fn decompress(&self, shard: usize, z: &Partial, zi: &Partial, out: &Partial) -> Result<(), RemoteError> {
        let info = &self.dir.manifest.shards[shard];
        let object = self.dir.object(shard);
        let frames = FramedBin::open(&z.path, &zi.path, 1).map_err(|e| RemoteError::Shard {
            object: object.clone(),
            message: e.to_string(),
        })?;
        if frames.len() != info.bin_bytes {
            return Err(RemoteError::Size {
                object,
                expected: info.bin_bytes,
                actual: frames.len(),
            });
        }
        let mut decoder = FrameDecoder::new().map_err(|e| RemoteError::Shard {
            object: object.clone(),
            message: e.to_string(),
        })?;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        for i in 0..frames.index().frames.len() {
            if self.stop.load(Ordering::Relaxed) {
                return Err(RemoteError::Stopped { object });
            }
            let at = frames.index().frames[i].uncompressed_offset;
            let bytes = decoder.decode(&frames, i).map_err(|e| RemoteError::Shard {
                object: object.clone(),
                message: e.to_string(),
            })?;
            hasher.update(bytes);
            out.file
                .write_all_at(bytes, at)
                .map_err(|e| write_error(&out.path, &object, info.bin_bytes, e))?;
        }
        if cache::durable() {
            out.file
                .sync_all()
                .map_err(|e| write_error(&out.path, &object, info.bin_bytes, e))?;
        }
        let actual = format!("{:016x}", hasher.digest());
        if actual != info.bin_xxh3 {
            return Err(RemoteError::Checksum {
                object: format!("{object} (decompressed)"),
                expected: info.bin_xxh3.clone(),
                actual,
            });
        }
        Ok(())
    }
}
