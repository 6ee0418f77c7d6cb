//! The zstd variant of a shard's `.bin`: the same bytes cut into independent zstd frames of
//! a fixed uncompressed size (4 MiB by default; the last frame is shorter), concatenated into
//! `PREFIX.bin.zst`, with a frame index `PREFIX.zidx` saying where each frame lies. Meant for
//! moving shards through object storage at a fraction of the bandwidth; any token span can be
//! read back by decompressing only the frames it touches. Frame boundaries ignore token,
//! sequence and document boundaries, except that the frame size is a multiple of 8 bytes, so a
//! token never straddles two frames. Every frame carries zstd's content checksum.
//!
//! `PREFIX.zidx`, all integers little-endian (also in `docs/token-format.md`):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `GZFRIDX\0` |
//! | 8 | 4 | version, u32 = 1 |
//! | 12 | 4 | zstd level used, i32 (informational) |
//! | 16 | 8 | frame size: uncompressed bytes of every frame but the last, u64 (multiple of 8) |
//! | 24 | 8 | uncompressed total: the `.bin`'s size, u64 |
//! | 32 | 8 | compressed total: the `.bin.zst`'s size, u64 |
//! | 40 | 8 | frame count F, u64 |
//! | 48 | 24·F | per frame: uncompressed offset u64, compressed offset u64, compressed length u32, uncompressed length u32 |
//! | 48+24F | 8 | xxh3-64 of bytes 0..48+24F |
//!
//! The reader checks every field against the others and against the file sizes before the
//! first frame is touched (the checksum last, so a damaged field is reported by name), and a
//! frame that fails to decompress or decompresses to the wrong length is an error naming the
//! file, the frame and its byte offset; never a panic, and never an allocation sized by an
//! unchecked field.

use crate::index_header::{self, HeaderFault, i32_at, u32_at, u64_at};
use crate::indexed::with_suffix;
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const MAGIC: &[u8; 8] = b"GZFRIDX\0";
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 48;
const ENTRY_LEN: usize = 24;
/// Largest frame size accepted, so a reader's buffers stay bounded whatever an index says.
pub const MAX_FRAME_BYTES: u64 = 256 << 20;

/// How to write the zstd variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZstdOptions {
    /// zstd compression level (1..=22; 3 is zstd's default and decompresses at ~1.2 GB/s).
    pub level: i32,
    /// Uncompressed bytes per frame (a multiple of 8, at most [`MAX_FRAME_BYTES`]).
    pub frame_bytes: u64,
}

impl Default for ZstdOptions {
    fn default() -> Self {
        ZstdOptions {
            level: 3,
            frame_bytes: 4 << 20,
        }
    }
}

impl ZstdOptions {
    pub fn validate(&self) -> Result<(), String> {
        if !zstd::compression_level_range().contains(&self.level) {
            return Err(format!(
                "zstd level {} is outside {:?}",
                self.level,
                zstd::compression_level_range()
            ));
        }
        if self.frame_bytes == 0 || !self.frame_bytes.is_multiple_of(8) || self.frame_bytes > MAX_FRAME_BYTES {
            return Err(format!(
                "zstd frame size {} must be a positive multiple of 8 bytes, at most {MAX_FRAME_BYTES}",
                self.frame_bytes
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: file is {got} bytes, too short for {what} (needs {needed})")]
    Truncated {
        path: PathBuf,
        what: &'static str,
        needed: u64,
        got: u64,
    },
    #[error("{path}: not a zstd frame index (magic {found:?} at offset 0, expected \"GZFRIDX\\0\")")]
    BadMagic { path: PathBuf, found: String },
    #[error("{path}: frame index version {version} at offset 8 is not supported (only version 1)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: header field at offset {offset}: {message}")]
    BadHeader {
        path: PathBuf,
        offset: u64,
        message: String,
    },
    #[error("{path}: frame {frame} (index entry at offset {offset}): {message}")]
    BadEntry {
        path: PathBuf,
        frame: u64,
        offset: u64,
        message: String,
    },
    #[error("{path}: checksum at offset {offset} is {stored:016x}, the index hashes to {actual:016x}")]
    Checksum {
        path: PathBuf,
        offset: u64,
        stored: u64,
        actual: u64,
    },
    #[error("{path}: holds {actual} bytes but its frame index ({index}) describes {expected}")]
    SizeMismatch {
        path: PathBuf,
        index: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: frame {frame} at offset {offset}: {message}")]
    Frame {
        path: PathBuf,
        frame: u64,
        offset: u64,
        message: String,
    },
    #[error("{path}: byte range {start}..{end} is past the {len} uncompressed bytes")]
    OutOfRange {
        path: PathBuf,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error("{path}: zstd: {message}")]
    Zstd { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> FrameError + '_ {
    move |source| FrameError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `PREFIX.bin.zst` and `PREFIX.zidx`.
pub fn paths(prefix: &Path) -> (PathBuf, PathBuf) {
    (with_suffix(prefix, ".bin.zst"), with_suffix(prefix, ".zidx"))
}

/// One frame: where its bytes come from and go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameEntry {
    pub uncompressed_offset: u64,
    pub compressed_offset: u64,
    pub compressed_len: u32,
    pub uncompressed_len: u32,
}

/// A parsed and fully checked frame index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameIndex {
    pub level: i32,
    pub frame_bytes: u64,
    pub uncompressed_bytes: u64,
    pub compressed_bytes: u64,
    pub frames: Vec<FrameEntry>,
}

/// The fixed header of a `.zidx`, checked against itself and the file's length.
struct Header {
    level: i32,
    frame_bytes: u64,
    uncompressed_bytes: u64,
    compressed_bytes: u64,
    count: u64,
}

fn bad_header(path: &Path, offset: u64, message: String) -> FrameError {
    FrameError::BadHeader {
        path: path.into(),
        offset,
        message,
    }
}

impl FrameIndex {
    /// The bytes of the index file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + ENTRY_LEN * self.frames.len() + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.level.to_le_bytes());
        for v in [
            self.frame_bytes,
            self.uncompressed_bytes,
            self.compressed_bytes,
            self.frames.len() as u64,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for f in &self.frames {
            out.extend_from_slice(&f.uncompressed_offset.to_le_bytes());
            out.extend_from_slice(&f.compressed_offset.to_le_bytes());
            out.extend_from_slice(&f.compressed_len.to_le_bytes());
            out.extend_from_slice(&f.uncompressed_len.to_le_bytes());
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Parse and check index bytes read from `path` (named in errors): the header, every
    /// entry against the ones before it, then the checksum (last, so that a damaged field is
    /// reported by name rather than as a checksum mismatch).
    pub fn parse(b: &[u8], path: &Path) -> Result<FrameIndex, FrameError> {
        let header = parse_header(b, path)?;
        let frames = parse_entries(b, path, &header)?;
        let compressed_at = frames
            .last()
            .map_or(0, |f| f.compressed_offset + u64::from(f.compressed_len));
        if compressed_at != header.compressed_bytes {
            return Err(bad_header(
                path,
                32,
                format!(
                    "compressed total {}, but the frames add up to {compressed_at}",
                    header.compressed_bytes
                ),
            ));
        }
        check_checksum(b, path)?;
        Ok(FrameIndex {
            level: header.level,
            frame_bytes: header.frame_bytes,
            uncompressed_bytes: header.uncompressed_bytes,
            compressed_bytes: header.compressed_bytes,
            frames,
        })
    }

    /// The frames holding uncompressed bytes `range` (which must lie inside).
    fn frames_of(&self, range: &Range<u64>) -> Range<usize> {
        let first = (range.start / self.frame_bytes) as usize;
        let last = range.end.div_ceil(self.frame_bytes) as usize;
        first..last.max(first)
    }
}

/// The fixed header: magic, version, a frame size a reader can hold, a frame count that
/// matches the totals, and a file length that matches the count.
fn parse_header(b: &[u8], path: &Path) -> Result<Header, FrameError> {
    index_header::check_start(b, HEADER_LEN, MAGIC).map_err(|fault| match fault {
        HeaderFault::Truncated { needed, got } => FrameError::Truncated {
            path: path.into(),
            what: "the header",
            needed,
            got,
        },
        HeaderFault::BadMagic { found } => FrameError::BadMagic {
            path: path.into(),
            found,
        },
    })?;
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion {
            path: path.into(),
            version,
        });
    }
    let level = i32_at(b, 12);
    let frame_bytes = u64_at(b, 16);
    if frame_bytes == 0 || !frame_bytes.is_multiple_of(8) || frame_bytes > MAX_FRAME_BYTES {
        return Err(bad_header(
            path,
            16,
            format!("frame size {frame_bytes} is not a positive multiple of 8 up to {MAX_FRAME_BYTES}"),
        ));
    }
    let uncompressed_bytes = u64_at(b, 24);
    let compressed_bytes = u64_at(b, 32);
    let count = u64_at(b, 40);
    let expected_count = uncompressed_bytes.div_ceil(frame_bytes);
    if count != expected_count {
        return Err(bad_header(
            path,
            40,
            format!("{count} frames, but {uncompressed_bytes} bytes in frames of {frame_bytes} make {expected_count}"),
        ));
    }
    let got = b.len() as u64;
    let expected_len = count
        .checked_mul(ENTRY_LEN as u64)
        .and_then(|n| n.checked_add(HEADER_LEN as u64 + 8));
    if expected_len != Some(got) {
        return Err(bad_header(
            path,
            40,
            format!(
                "{count} frames make a {} byte index, but the file is {got} bytes",
                expected_len.map_or("too large a".to_string(), |n| n.to_string())
            ),
        ));
    }
    Ok(Header {
        level,
        frame_bytes,
        uncompressed_bytes,
        compressed_bytes,
        count,
    })
}

/// The entries after `header`: frame `i` covers its share of the uncompressed bytes and
/// starts, never empty, where frame `i - 1` ends in the compressed file.
fn parse_entries(b: &[u8], path: &Path, header: &Header) -> Result<Vec<FrameEntry>, FrameError> {
    let mut frames = Vec::with_capacity(header.count as usize);
    let mut compressed_at = 0u64;
    for i in 0..header.count {
        let at = HEADER_LEN + ENTRY_LEN * i as usize;
        let entry = FrameEntry {
            uncompressed_offset: u64_at(b, at),
            compressed_offset: u64_at(b, at + 8),
            compressed_len: u32_at(b, at + 16),
            uncompressed_len: u32_at(b, at + 20),
        };
        let bad = |message: String| FrameError::BadEntry {
            path: path.into(),
            frame: i,
            offset: at as u64,
            message,
        };
        let start = i * header.frame_bytes;
        let len = header.frame_bytes.min(header.uncompressed_bytes - start);
        if entry.uncompressed_offset != start || u64::from(entry.uncompressed_len) != len {
            return Err(bad(format!(
                "covers {}+{} uncompressed bytes, expected {start}+{len}",
                entry.uncompressed_offset, entry.uncompressed_len
            )));
        }
        if entry.compressed_offset != compressed_at || entry.compressed_len == 0 {
            return Err(bad(format!(
                "starts at compressed byte {} with {} bytes; the frames before it end at {compressed_at} and a frame is never empty",
                entry.compressed_offset, entry.compressed_len
            )));
        }
        compressed_at += u64::from(entry.compressed_len);
        frames.push(entry);
    }
    Ok(frames)
}

/// The xxh3-64 in the last 8 bytes against the bytes before it.
fn check_checksum(b: &[u8], path: &Path) -> Result<(), FrameError> {
    let sum_at = b.len() - 8;
    let stored = u64_at(b, sum_at);
    let actual = xxhash_rust::xxh3::xxh3_64(&b[..sum_at]);
    if stored != actual {
        return Err(FrameError::Checksum {
            path: path.into(),
            offset: sum_at as u64,
            stored,
            actual,
        });
    }
    Ok(())
}

/// What compressing one `.bin` produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompressSummary {
    pub frames: u64,
    pub uncompressed_bytes: u64,
    pub compressed_bytes: u64,
    pub index_bytes: u64,
}

/// One compression worker's state: its compressor, a raw frame, the bytes of it filled, and
/// the frame compressed.
type CompressSlot = (zstd::bulk::Compressor<'static>, Vec<u8>, usize, Vec<u8>);

/// Read up to one whole frame into each slot in turn from `input` (the `.bin` at `bin`);
/// returns how many slots got bytes and whether the input ended (a frame came up short).
fn read_frames(input: &mut File, bin: &Path, slots: &mut [CompressSlot]) -> Result<(usize, bool), FrameError> {
    let mut used = 0;
    for (_, raw, filled, _) in slots.iter_mut() {
        let frame_bytes = raw.len();
        *filled = 0;
        while *filled < frame_bytes {
            let n = input.read(&mut raw[*filled..]).map_err(io_err(bin))?;
            if n == 0 {
                break;
            }
            *filled += n;
        }
        if *filled > 0 {
            used += 1;
        }
        if *filled < frame_bytes {
            return Ok((used, true));
        }
    }
    Ok((used, false))
}

/// Compress `bin` into independent frames in `zst`, writing the frame index to `zidx`.
/// Frames are compressed in parallel, one per core (the frames are independent, and at
/// level 3 one core compresses token ids at only ~40 MB/s); memory is two frames per core
/// whatever the file size.
pub fn compress_file(bin: &Path, zst: &Path, zidx: &Path, opts: &ZstdOptions) -> Result<CompressSummary, FrameError> {
    opts.validate().map_err(|message| FrameError::Zstd {
        path: zst.to_path_buf(),
        message,
    })?;
    let zstd_err = |e: std::io::Error| FrameError::Zstd {
        path: zst.to_path_buf(),
        message: e.to_string(),
    };
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
    let frame_bytes = opts.frame_bytes as usize;
    // Per worker: a compressor, the raw frame and its compressed bytes.
    let mut slots = Vec::with_capacity(workers);
    for _ in 0..workers {
        let mut compressor = zstd::bulk::Compressor::new(opts.level).map_err(zstd_err)?;
        // The content checksum lets a reader tell a damaged frame from a valid one.
        compressor
            .set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
            .map_err(zstd_err)?;
        slots.push((compressor, vec![0u8; frame_bytes], 0usize, Vec::new()));
    }
    let mut input = File::open(bin).map_err(io_err(bin))?;
    let mut out = BufWriter::with_capacity(1 << 20, File::create(zst).map_err(io_err(zst))?);
    let mut index = FrameIndex {
        level: opts.level,
        frame_bytes: opts.frame_bytes,
        uncompressed_bytes: 0,
        compressed_bytes: 0,
        frames: Vec::new(),
    };
    let mut at_end = false;
    while !at_end {
        let used;
        (used, at_end) = read_frames(&mut input, bin, &mut slots)?;
        let compress = |(c, raw, filled, packed): &mut CompressSlot| {
            packed.clear();
            packed.reserve(zstd::zstd_safe::compress_bound(*filled));
            c.compress_to_buffer(&raw[..*filled], packed).map(|_| ())
        };
        let results: Vec<std::io::Result<()>> = if used <= 1 {
            slots[..used].iter_mut().map(compress).collect()
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = slots[..used]
                    .iter_mut()
                    .map(|slot| scope.spawn(move || compress(slot)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                    .collect()
            })
        };
        for ((_, _, filled, packed), result) in slots[..used].iter().zip(results) {
            result.map_err(zstd_err)?;
            out.write_all(packed).map_err(io_err(zst))?;
            index.frames.push(FrameEntry {
                uncompressed_offset: index.uncompressed_bytes,
                compressed_offset: index.compressed_bytes,
                compressed_len: u32::try_from(packed.len()).expect("a frame of at most 256 MiB compresses below 4 GiB"),
                uncompressed_len: *filled as u32,
            });
            index.uncompressed_bytes += *filled as u64;
            index.compressed_bytes += packed.len() as u64;
        }
    }
    let file = out.into_inner().map_err(|e| FrameError::Io {
        path: zst.to_path_buf(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io_err(zst))?;
    let bytes = index.to_bytes();
    std::fs::write(zidx, &bytes).map_err(io_err(zidx))?;
    Ok(CompressSummary {
        frames: index.frames.len() as u64,
        uncompressed_bytes: index.uncompressed_bytes,
        compressed_bytes: index.compressed_bytes,
        index_bytes: bytes.len() as u64,
    })
}

/// A memory-mapped `.bin.zst` with its checked frame index.
pub struct FramedBin {
    zst: Mmap,
    zst_path: PathBuf,
    index: FrameIndex,
    cache: Mutex<FrameCache>,
}

/// Decompresses frames of a [`FramedBin`] into its own buffer (one per thread).
pub struct FrameDecoder {
    dctx: zstd::bulk::Decompressor<'static>,
    /// u64 storage so the bytes are aligned for every token type.
    buf: Vec<u64>,
    len: usize,
}

impl FrameDecoder {
    pub fn new() -> Result<FrameDecoder, FrameError> {
        let dctx = zstd::bulk::Decompressor::new().map_err(|e| FrameError::Zstd {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        Ok(FrameDecoder {
            dctx,
            buf: Vec::new(),
            len: 0,
        })
    }

    /// Decompress frame `i` of `bin` and return its bytes.
    pub fn decode<'a>(&'a mut self, bin: &FramedBin, i: usize) -> Result<&'a [u8], FrameError> {
        let f = bin.index.frames[i];
        let want = f.uncompressed_len as usize;
        let start = f.compressed_offset as usize;
        let src = &bin.zst[start..start + f.compressed_len as usize];
        self.buf.resize(want.div_ceil(8) + 1, 0);
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut self.buf[..]);
        // One byte more than expected: a frame that holds more than its entry says is caught
        // as a length mismatch, not as "buffer too small".
        let got = self
            .dctx
            .decompress_to_buffer(src, &mut dst[..want + 1])
            .map_err(|e| FrameError::Frame {
                path: bin.zst_path.clone(),
                frame: i as u64,
                offset: f.compressed_offset,
                message: format!("cannot decompress {} bytes: {e}", f.compressed_len),
            })?;
        if got != want {
            return Err(FrameError::Frame {
                path: bin.zst_path.clone(),
                frame: i as u64,
                offset: f.compressed_offset,
                message: format!("decompressed to {got} bytes, the index says {want}"),
            });
        }
        self.len = want;
        Ok(&bytemuck::cast_slice(&self.buf[..])[..want])
    }
}

/// Recently used decompressed frames, least recently used evicted first.
const NOT_CACHED: u32 = u32::MAX;

struct FrameCache {
    decoder: Option<FrameDecoder>,
    /// (frame, bytes in u64 storage, last use)
    frames: Vec<(usize, Vec<u64>, u64)>,
    /// Slot of each frame of the file in `frames`, or `NOT_CACHED` (O(1) hits with a large cache).
    slot_of: Vec<u32>,
    capacity: usize,
    clock: u64,
}

impl FramedBin {
    /// Open `zst` and its index `zidx`, keeping up to `cache_frames` decompressed frames.
    pub fn open(zst: &Path, zidx: &Path, cache_frames: usize) -> Result<FramedBin, FrameError> {
        let raw = std::fs::read(zidx).map_err(io_err(zidx))?;
        let index = FrameIndex::parse(&raw, zidx)?;
        let file = File::open(zst).map_err(io_err(zst))?;
        // SAFETY: read-only map of a file written once under a temporary name (see indexed/reader.rs).
        let map = unsafe { Mmap::map(&file) }.map_err(io_err(zst))?;
        if map.len() as u64 != index.compressed_bytes {
            return Err(FrameError::SizeMismatch {
                path: zst.to_path_buf(),
                index: zidx.to_path_buf(),
                expected: index.compressed_bytes,
                actual: map.len() as u64,
            });
        }
        let frame_count = index.frames.len();
        Ok(FramedBin {
            zst: map,
            zst_path: zst.to_path_buf(),
            index,
            cache: Mutex::new(FrameCache {
                decoder: None,
                frames: Vec::new(),
                slot_of: vec![NOT_CACHED; frame_count],
                capacity: cache_frames.clamp(1, u32::MAX as usize - 1),
                clock: 0,
            }),
        })
    }

    pub fn index(&self) -> &FrameIndex {
        &self.index
    }

    pub fn path(&self) -> &Path {
        &self.zst_path
    }

    /// Size of the uncompressed `.bin`.
    pub fn len(&self) -> u64 {
        self.index.uncompressed_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hand the uncompressed bytes `range` to `sink`, piece by piece (one piece per frame
    /// touched, in order), decompressing frames not in the cache. Pieces start at
    /// 8-byte-aligned addresses plus `range.start`'s offset within its frame.
    pub fn read(&self, range: Range<u64>, mut sink: impl FnMut(&[u8])) -> Result<(), FrameError> {
        if range.start > range.end || range.end > self.len() {
            return Err(FrameError::OutOfRange {
                path: self.zst_path.clone(),
                start: range.start,
                end: range.end,
                len: self.len(),
            });
        }
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let cache = &mut *cache;
        for i in self.index.frames_of(&range) {
            let f = self.index.frames[i];
            let lo = range.start.max(f.uncompressed_offset) - f.uncompressed_offset;
            let hi = range.end.min(f.uncompressed_offset + u64::from(f.uncompressed_len)) - f.uncompressed_offset;
            cache.clock += 1;
            let clock = cache.clock;
            let slot = match cache.slot_of[i] {
                NOT_CACHED => self.load(cache, i)?,
                slot => slot as usize,
            };
            let (_, words, used) = &mut cache.frames[slot];
            *used = clock;
            let bytes: &[u8] = bytemuck::cast_slice(&words[..]);
            sink(&bytes[lo as usize..hi as usize]);
        }
        Ok(())
    }

    /// Decompress frame `i` into the cache; returns its slot.
    fn load(&self, cache: &mut FrameCache, i: usize) -> Result<usize, FrameError> {
        if cache.decoder.is_none() {
            cache.decoder = Some(FrameDecoder::new()?);
        }
        let decoder = cache.decoder.as_mut().expect("just made");
        decoder.decode(self, i)?;
        // The decoder's buffer becomes the cache entry (no copy); the evicted one, if any,
        // becomes the decoder's buffer.
        let slot = if cache.frames.len() < cache.capacity {
            cache.frames.push((i, std::mem::take(&mut decoder.buf), 0));
            cache.frames.len() - 1
        } else {
            let slot = (0..cache.frames.len())
                .min_by_key(|&s| cache.frames[s].2)
                .expect("capacity is at least 1");
            let entry = &mut cache.frames[slot];
            cache.slot_of[entry.0] = NOT_CACHED;
            entry.0 = i;
            std::mem::swap(&mut entry.1, &mut decoder.buf);
            slot
        };
        cache.slot_of[i] = slot as u32;
        Ok(slot)
    }

    /// Decompress every frame in order, handing each frame's bytes to `sink` (verification,
    /// benchmarks). Uses its own decoder; the cache is left alone.
    pub fn for_each_frame(&self, mut sink: impl FnMut(&[u8])) -> Result<(), FrameError> {
        let mut decoder = FrameDecoder::new()?;
        for i in 0..self.index.frames.len() {
            sink(decoder.decode(self, i)?);
        }
        Ok(())
    }

    /// xxh3-64 of the decompressed bytes, lowercase hex (compare with the `.bin`'s checksum).
    pub fn content_xxh3(&self) -> Result<String, FrameError> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        self.for_each_frame(|bytes| hasher.update(bytes))?;
        Ok(format!("{:016x}", hasher.digest()))
    }
}
