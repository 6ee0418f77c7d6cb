//! Checksums of fixed-size blocks of every shard's `.bin` ([`BLOCK_SUMS`]): what lets a
//! streaming reader fetch and check byte ranges of a shard rather than whole shards.
//!
//! The manifest vouches for each `.bin` as a whole (`bin_xxh3`); a range of it can only be
//! checked against sums of smaller pieces. [`super::upload`] writes them next to the index
//! pack, before the manifest, from the local `.bin` files it has just checked against the
//! manifest. The object is bound to its manifest rather than named by it: its header carries
//! the dataset's fingerprint (xxh3 of `manifest.json`) and its trailer the xxh3 of everything
//! before, so a reader takes it only for the very manifest it streams and only undamaged.
//! Naming it in the manifest would change the manifest, hence the fingerprint that sampler
//! cursors are checked against: a run could no longer resume on the uploaded copy of the
//! dataset it was checkpointed on locally.
//!
//! Layout, little-endian:
//!
//! ```text
//! magic "GANTRYBS" | version u32 | block_bytes u32 | fingerprint u64 | shards u64
//! per shard in manifest order: xxh3-64 of each block of its .bin, ceil(bin_bytes / block_bytes) u64
//! xxh3-64 of all the bytes above, u64
//! ```
//!
//! The block size is a multiple of 8 bytes, so no token straddles two blocks. A dataset with
//! a compressed-only shard (no `.bin` to sum) gets no object: it streams shard by shard.

use super::RemoteError;
use crate::indexed::paths;
use crate::manifest::Manifest;
use std::io::Read;
use std::path::Path;

/// The object (under the dataset's prefix) holding the block checksums.
pub const BLOCK_SUMS: &str = ".gantry-block-sums";
/// Bytes per block of the sums [`super::upload`] writes by default: near the bytes of one
/// sample (a sequence of 1024 to 4096 tokens of 2 or 4 bytes), since a read fetches whole
/// blocks and a global shuffle reads one sample from each place. 8 bytes of checksum per
/// block: 0.2 % of the dataset.
pub const BLOCK_BYTES: u32 = 4 << 10;

const MAGIC: &[u8; 8] = b"GANTRYBS";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8 + 8;

/// The block checksums of a dataset's shards (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSums {
    block_bytes: u64,
    /// `base[s]`: the index of shard `s`'s first block in `sums`; last: every block.
    base: Vec<usize>,
    /// Each shard's `.bin` bytes.
    sizes: Vec<u64>,
    sums: Vec<u64>,
}

/// Blocks of a `.bin` of `bytes` bytes.
fn blocks_of(bytes: u64, block_bytes: u64) -> usize {
    bytes.div_ceil(block_bytes) as usize
}

impl BlockSums {
    /// Sum every `.bin` of the dataset in `dir` (described by `manifest`, whose bytes hash to
    /// `fingerprint`) in blocks of `block_bytes`. `None` when a shard has no `.bin` (a
    /// compressed-only dataset). The files are read, not mapped (a dataset may have more
    /// shards than a process may hold maps); a file of another size than the manifest says is
    /// an error naming it.
    pub fn compute(dir: &Path, manifest: &Manifest, block_bytes: u32) -> Result<Option<BlockSums>, RemoteError> {
        let bs = u64::from(block_bytes.max(8) / 8 * 8);
        let mut sums = Vec::new();
        let mut base = vec![0];
        let mut buf = vec![0u8; bs as usize];
        for s in &manifest.shards {
            let (bin, _) = paths(&dir.join(&s.prefix));
            if !bin.exists() {
                return Ok(None);
            }
            let mut file = std::fs::File::open(&bin).map_err(super::io_err(&bin))?;
            let mut left = s.bin_bytes;
            while left > 0 {
                let n = left.min(bs) as usize;
                file.read_exact(&mut buf[..n]).map_err(super::io_err(&bin))?;
                sums.push(xxhash_rust::xxh3::xxh3_64(&buf[..n]));
                left -= n as u64;
            }
            if file.read(&mut buf[..1]).map_err(super::io_err(&bin))? != 0 {
                return Err(crate::manifest::ManifestError::Size {
                    path: bin.clone(),
                    expected: s.bin_bytes,
                    actual: std::fs::metadata(&bin).map_or(0, |m| m.len()),
                }
                .into());
            }
            base.push(sums.len());
        }
        Ok(Some(BlockSums {
            block_bytes: bs,
            base,
            sizes: manifest.shards.iter().map(|s| s.bin_bytes).collect(),
            sums,
        }))
    }

    /// The object's bytes for the dataset whose manifest hashes to `fingerprint`.
    pub fn encode(&self, fingerprint: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 8 * self.sums.len() + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.block_bytes as u32).to_le_bytes());
        out.extend_from_slice(&fingerprint.to_le_bytes());
        out.extend_from_slice(&(self.sizes.len() as u64).to_le_bytes());
        for s in &self.sums {
            out.extend_from_slice(&s.to_le_bytes());
        }
        let trailer = xxhash_rust::xxh3::xxh3_64(&out);
        out.extend_from_slice(&trailer.to_le_bytes());
        out
    }

    /// The sums in `raw` (the object `object`), taken only when they are undamaged and belong
    /// to `manifest`, whose bytes hash to `fingerprint`; otherwise an error naming the object
    /// and what is wrong.
    pub fn parse(raw: &[u8], manifest: &Manifest, fingerprint: u64, object: &str) -> Result<BlockSums, RemoteError> {
        let refuse = |message: String| RemoteError::BlockSums {
            object: object.to_string(),
            message,
        };
        if raw.len() < HEADER + 8 || &raw[..8] != MAGIC {
            return Err(refuse(format!("not a block-sum object ({} bytes)", raw.len())));
        }
        let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().unwrap_or_default());
        let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().unwrap_or_default());
        let body = raw.len() - 8;
        let actual = xxhash_rust::xxh3::xxh3_64(&raw[..body]);
        if actual != u64_at(body) {
            return Err(refuse(format!(
                "damaged: its bytes hash to {actual:016x}, its trailer says {:016x}",
                u64_at(body)
            )));
        }
        let (version, block_bytes) = (u32_at(8), u64::from(u32_at(12)));
        if version != VERSION {
            return Err(refuse(format!("version {version}, this gantry reads {VERSION}")));
        }
        if block_bytes == 0 || block_bytes % 8 != 0 {
            return Err(refuse(format!(
                "block size {block_bytes} is not a positive multiple of 8"
            )));
        }
        if u64_at(16) != fingerprint {
            return Err(refuse(format!(
                "written for the dataset {:016x}, not this manifest's {fingerprint:016x}",
                u64_at(16)
            )));
        }
        let shards = u64_at(24);
        if shards != manifest.shards.len() as u64 {
            return Err(refuse(format!(
                "{shards} shards, the manifest {}",
                manifest.shards.len()
            )));
        }
        let mut base = vec![0];
        for s in &manifest.shards {
            base.push(base[base.len() - 1] + blocks_of(s.bin_bytes, block_bytes));
        }
        let blocks = base[base.len() - 1];
        if (body - HEADER) as u64 != 8 * blocks as u64 {
            return Err(refuse(format!(
                "{} bytes of sums, but the manifest's shards have {blocks} blocks of {block_bytes} bytes",
                body - HEADER
            )));
        }
        Ok(BlockSums {
            block_bytes,
            base,
            sizes: manifest.shards.iter().map(|s| s.bin_bytes).collect(),
            sums: (0..blocks).map(|i| u64_at(HEADER + 8 * i)).collect(),
        })
    }

    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// Blocks of shard `shard`.
    pub fn blocks(&self, shard: usize) -> usize {
        self.base[shard + 1] - self.base[shard]
    }

    /// Each shard's `.bin` bytes.
    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }

    /// The bytes of shard `shard`'s `.bin` that block `block` covers.
    pub fn range(&self, shard: usize, block: usize) -> std::ops::Range<u64> {
        let start = block as u64 * self.block_bytes;
        start..(start + self.block_bytes).min(self.sizes[shard])
    }

    /// Whether `bytes` are block `block` of shard `shard` (false for a block it has not).
    pub fn matches(&self, shard: usize, block: usize, bytes: &[u8]) -> bool {
        block < self.blocks(shard)
            && self.sums[self.base[shard] + block] == xxhash_rust::xxh3::xxh3_64(bytes)
            && bytes.len() as u64 == self.range(shard, block).end - self.range(shard, block).start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::indexed::TokenDType;
    use crate::manifest::{ShardInfo, TokenizerInfo};

    fn manifest(sizes: &[u64]) -> Manifest {
        let shards = sizes
            .iter()
            .enumerate()
            .map(|(i, &b)| ShardInfo {
                prefix: format!("s{i}"),
                documents: 1,
                sequences: 1,
                tokens: b / 2,
                bin_bytes: b,
                idx_bytes: 0,
                max_token_id: None,
                bin_xxh3: String::new(),
                idx_xxh3: String::new(),
                zstd: None,
            })
            .collect();
        Manifest::new(TokenDType::U16, 10, TokenizerInfo::Bytes, shards)
    }

    #[test]
    fn sums_round_trip_and_refuse_every_damage_naming_the_object() {
        let dir = std::env::temp_dir().join(format!("gantry-block-sums-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Sizes around the block size: empty, partial last block, exact multiple.
        let sizes = [0u64, 10, 64, 100];
        for (i, &n) in sizes.iter().enumerate() {
            let bytes: Vec<u8> = (0..n).map(|b| (b * 7 + i as u64) as u8).collect();
            std::fs::write(dir.join(format!("s{i}.bin")), bytes).unwrap();
        }
        let m = manifest(&sizes);
        let sums = BlockSums::compute(&dir, &m, 32).unwrap().unwrap();
        assert_eq!((0..4).map(|s| sums.blocks(s)).collect::<Vec<_>>(), vec![0, 1, 2, 4]);
        assert_eq!(sums.range(3, 3), 96..100);
        let block = std::fs::read(dir.join("s3.bin")).unwrap()[32..64].to_vec();
        assert!(sums.matches(3, 1, &block));
        assert!(!sums.matches(3, 2, &block) && !sums.matches(3, 9, &block));
        let raw = sums.encode(7);
        assert_eq!(BlockSums::parse(&raw, &m, 7, "OBJ").unwrap(), sums);
        // Any flipped byte, a truncation, another manifest: refused, naming the object.
        for at in [0, 9, 13, 17, 25, HEADER + 3, raw.len() - 1] {
            let mut bad = raw.clone();
            bad[at] ^= 1;
            let e = BlockSums::parse(&bad, &m, 7, "OBJ").unwrap_err().to_string();
            assert!(e.starts_with("OBJ: "), "{e}");
        }
        assert!(BlockSums::parse(&raw[..raw.len() - 8], &m, 7, "OBJ").is_err());
        let e = BlockSums::parse(&raw, &m, 8, "OBJ").unwrap_err().to_string();
        assert!(e.contains("not this manifest's"), "{e}");
        assert!(BlockSums::parse(&raw, &manifest(&[0, 10, 64, 200]), 7, "OBJ").is_err());
        // A shard without its .bin: no sums at all.
        std::fs::remove_file(dir.join("s1.bin")).unwrap();
        assert!(BlockSums::compute(&dir, &m, 32).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
