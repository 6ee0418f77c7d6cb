//! What range mode's blocks are, where a GET of some finds their bytes, and how each is
//! checked before a read can see it:
//!
//! - [`Layout::Sums`]: blocks of a shard's `.bin` object, each hashed against the upload's
//!   block checksums ([`BlockSums`]).
//! - [`Layout::Frames`]: the zstd frames of a compressed-only shard (`.bin.zst`, no `.bin` in
//!   the bucket): a block is one frame's uncompressed bytes, a GET reads neighbouring frames'
//!   compressed bytes, and each frame is checked as it is decompressed (zstd's content
//!   checksum, which every frame gantry writes carries, and the length its index gives). The
//!   frame indexes (`.zidx`, checked against the manifest) are fetched when the stream starts.
//!   Range mode needs one block size, so this layout applies only when every shard's frames
//!   have the same uncompressed size (the last of each shorter), as `data prepare` writes them.
//!
//! A frame is the unit of reading compressed bytes: a 2 KB sample in 4 MiB frames costs a
//! frame per sample the window does not already hold, so a budget far below the dataset
//! fetches compressed-only data many times over (smaller frames, or the `.bin` uploaded too,
//! make it cheap); it still runs within the budget, where whole shards could not even hold
//! one step of a dataset of large shards.

use super::super::block_sums::BlockSums;
use super::super::retry::with_retry;
use super::super::{BLOCK_SUMS, RemoteError, RemoteOptions, open_store};
use super::dir::{Origin, StreamDir};
use crate::frames::FrameIndex;
use std::ops::Range;
use std::path::Path;

/// The frames of every shard of a compressed-only dataset, of one uncompressed size.
pub(super) struct Frames {
    frame_bytes: u64,
    sizes: Vec<u64>,
    /// Per shard: the `.bin.zst` object's key (relative to the prefix) and its frame index.
    zst: Vec<String>,
    indexes: Vec<FrameIndex>,
}

/// The blocks of range mode (see the module documentation).
pub(super) enum Layout {
    Sums(BlockSums),
    Frames(Frames),
}

/// A block that could not be made from its bytes: which, and why (for the error that names it).
pub(super) struct BadBlock {
    pub block: usize,
    pub why: String,
}

impl Layout {
    /// Bytes of every block but a shard's last.
    pub fn block_bytes(&self) -> u64 {
        match self {
            Layout::Sums(s) => s.block_bytes(),
            Layout::Frames(f) => f.frame_bytes,
        }
    }

    /// Each shard's `.bin` bytes.
    pub fn sizes(&self) -> &[u64] {
        match self {
            Layout::Sums(s) => s.sizes(),
            Layout::Frames(f) => &f.sizes,
        }
    }

    /// Bytes of shard `shard`'s `.bin` that block `block` holds.
    pub fn range(&self, shard: usize, block: usize) -> Range<u64> {
        let start = block as u64 * self.block_bytes();
        start..(start + self.block_bytes()).min(self.sizes()[shard])
    }

    /// The object (key under the prefix) and its byte range that one GET of blocks `blocks`
    /// of shard `shard` reads.
    pub fn request(&self, dir: &StreamDir, shard: usize, blocks: &Range<usize>) -> (String, Range<u64>) {
        match self {
            Layout::Sums(_) => {
                let key = format!("{}.bin", dir.manifest.shards[shard].prefix);
                (
                    key,
                    self.range(shard, blocks.start).start..self.range(shard, blocks.end - 1).end,
                )
            }
            Layout::Frames(f) => {
                let frames = &f.indexes[shard].frames;
                let (first, last) = (frames[blocks.start], frames[blocks.end - 1]);
                let end = last.compressed_offset + u64::from(last.compressed_len);
                (f.zst[shard].clone(), first.compressed_offset..end)
            }
        }
    }

    /// The blocks `blocks` of shard `shard` made from `body` (the bytes `range` of the GET's
    /// object), each checked; else the first that is not right.
    pub fn blocks(
        &self,
        shard: usize,
        blocks: &Range<usize>,
        range: &Range<u64>,
        body: &[u8],
        mut keep: impl FnMut(&[u8]),
    ) -> Result<(), BadBlock> {
        let cut = |r: Range<u64>| body.get((r.start - range.start) as usize..(r.end - range.start) as usize);
        match self {
            Layout::Sums(sums) => {
                for block in blocks.clone() {
                    match cut(self.range(shard, block)) {
                        Some(bytes) if sums.matches(shard, block, bytes) => keep(bytes),
                        Some(_) => return Err(bad(block, "does not match its checksum")),
                        None => return Err(bad(block, "cut short")),
                    }
                }
            }
            Layout::Frames(f) => {
                let mut dctx = zstd::bulk::Decompressor::new().map_err(|e| bad(blocks.start, &e.to_string()))?;
                let mut out = vec![0u8; f.frame_bytes as usize + 1];
                for block in blocks.clone() {
                    let e = f.indexes[shard].frames[block];
                    let at = e.compressed_offset;
                    let Some(src) = cut(at..at + u64::from(e.compressed_len)) else {
                        return Err(bad(block, "cut short"));
                    };
                    // One byte more than the frame should hold: a longer frame is a length
                    // mismatch, not "buffer too small".
                    let want = e.uncompressed_len as usize;
                    match dctx.decompress_to_buffer(src, &mut out[..want + 1]) {
                        Ok(n) if n == want => keep(&out[..want]),
                        Ok(n) => return Err(bad(block, &format!("decompressed to {n} bytes, its index says {want}"))),
                        Err(e) => return Err(bad(block, &format!("cannot decompress: {e}"))),
                    }
                }
            }
        }
        Ok(())
    }

    /// The error for block `bad` of shard `shard`, still wrong when fetched a second time.
    pub fn error(&self, dir: &StreamDir, shard: usize, bad: BadBlock) -> RemoteError {
        let r = self.range(shard, bad.block);
        match self {
            Layout::Sums(_) => RemoteError::BlockChecksum {
                object: dir.object(shard),
                shard,
                block: bad.block,
                start: r.start,
                end: r.end,
                sums: dir.location.child(BLOCK_SUMS),
            },
            Layout::Frames(_) => RemoteError::Shard {
                object: dir.object(shard),
                message: format!(
                    "frame {} of shard {shard} (bytes {}..{} of its .bin), fetched twice: {}",
                    bad.block, r.start, r.end, bad.why
                ),
            },
        }
    }
}

fn bad(block: usize, why: &str) -> BadBlock {
    BadBlock {
        block,
        why: why.to_string(),
    }
}

/// The frame layout of `dir`'s dataset when every shard is compressed-only and their frames
/// have one uncompressed size: each `.zidx` fetched (many in flight), checked against the
/// manifest and parsed. `None` otherwise (then shards stream whole).
pub(super) fn fetch_frames(dir: &StreamDir, opts: &RemoteOptions) -> Result<Option<Frames>, RemoteError> {
    let mut keys = Vec::with_capacity(dir.shards());
    for origin in &dir.origins {
        match origin {
            Origin::Frames {
                zst,
                zidx,
                zidx_bytes,
                zidx_xxh3,
                ..
            } => keys.push((zst.clone(), zidx.clone(), *zidx_bytes, zidx_xxh3.clone())),
            Origin::Bin => return Ok(None),
        }
    }
    let store = open_store(&dir.location, opts)?;
    let requests: Vec<(String, Range<u64>)> = keys.iter().map(|k| (k.1.clone(), 0..k.2)).collect();
    let bodies = with_retry(&opts.retry, &dir.location.to_string(), || store.get_ranges(&requests))?;
    let mut frames = Frames {
        frame_bytes: 0,
        sizes: dir.manifest.shards.iter().map(|s| s.bin_bytes).collect(),
        zst: Vec::with_capacity(keys.len()),
        indexes: Vec::with_capacity(keys.len()),
    };
    for (shard, ((zst, zidx, _, xxh3), body)) in keys.into_iter().zip(bodies).enumerate() {
        let object = dir.location.child(&zidx);
        let actual = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&body));
        if actual != xxh3 {
            return Err(RemoteError::Checksum {
                object,
                expected: xxh3,
                actual,
            });
        }
        let index = FrameIndex::parse(&body, Path::new(&object)).map_err(|e| RemoteError::Shard {
            object: object.clone(),
            message: e.to_string(),
        })?;
        if shard == 0 {
            frames.frame_bytes = index.frame_bytes;
        }
        if !uniform(&index, frames.frame_bytes, frames.sizes[shard]) {
            tracing::info!(object, "frames of another size: compressed shards stream whole");
            return Ok(None);
        }
        frames.zst.push(zst);
        frames.indexes.push(index);
    }
    Ok(Some(frames))
}

/// Whether frame `i` of `index` holds bytes `i·F..min((i+1)·F, size)` of a `.bin` of `size`
/// bytes, for every frame: what blocks of size `F` are.
fn uniform(index: &FrameIndex, frame_bytes: u64, size: u64) -> bool {
    frame_bytes > 0
        && index.frame_bytes == frame_bytes
        && index.uncompressed_bytes == size
        && index.frames.len() as u64 == size.div_ceil(frame_bytes)
        && index.frames.iter().enumerate().all(|(i, f)| {
            let start = i as u64 * frame_bytes;
            f.uncompressed_offset == start && u64::from(f.uncompressed_len) == (size - start).min(frame_bytes)
        })
}
