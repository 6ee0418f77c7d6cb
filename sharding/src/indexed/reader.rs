//! The validating, memory-mapped reader: [`IndexedIndex`] (the `.idx`, checked against the
//! `.bin`'s size before use) and [`IndexedDataset`] (the `.idx` with its mapped `.bin`).

use super::{HEADER_LEN, IndexedError, MAGIC, Result, TokenDType, Tokens, VERSION, io_err, paths, tokens_of};
use crate::index_header::{self, HeaderFault, i32_at, u64_at};
use memmap2::Mmap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A validated, memory-mapped `.idx`: where every sequence lies in its `.bin` and which
/// sequences make up each document. Checked against the `.bin`'s size, so it can describe a
/// `.bin` that is not on disk (the zstd frames of [`crate::frames`] serve the bytes instead).
pub struct IndexedIndex {
    idx: IdxBytes,
    idx_path: PathBuf,
    dtype: TokenDType,
    sequences: usize,
    doc_entries: usize,
}

/// An `.idx`'s bytes: a mapping of its own file, or a piece of one mapping shared by many
/// (a streamed dataset's `.idx` files, kept back to back in one file of the data cache rather
/// than hundreds of small files, [`IndexedIndex::from_shared`]).
struct IdxBytes {
    map: Arc<Mmap>,
    at: Range<usize>,
}

impl std::ops::Deref for IdxBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map[self.at.clone()]
    }
}

/// A validated, memory-mapped `.idx` + `.bin` pair.
pub struct IndexedDataset {
    index: IndexedIndex,
    bin: Mmap,
}

fn map(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(io_err(path))?;
    // SAFETY: the map is read-only; a concurrent writer truncating the file could fault us
    // (the usual mmap caveat). Datasets are written once, to a temporary name, and renamed.
    let mapped = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
    // Shuffled reads touch a new page per sample; when the kernel reads the file in, let it
    // fill the page cache in 2 MiB folios, which it maps with one TLB entry each (measured:
    // 15% more tokens/s on a 400M-token dataset). Only a hint: kernels without it refuse it.
    #[cfg(target_os = "linux")]
    let _ = mapped.advise(memmap2::Advice::HugePage);
    Ok(mapped)
}

impl IndexedIndex {
    /// Open `idx_path` and check it against a `.bin` of `bin_len` bytes (named `bin_path` in
    /// errors), O(sequences).
    pub fn open(idx_path: &Path, bin_path: &Path, bin_len: u64) -> Result<IndexedIndex> {
        Self::from_map(map(idx_path)?, idx_path, bin_path, bin_len)
    }

    /// The `.idx` held at bytes `at` of the shared mapping `map` (named `idx_path` in
    /// errors), checked against a `.bin` of `bin_len` bytes (`bin_path`) as [`Self::open`]
    /// checks a file; an error when `at` is not within the mapping.
    pub fn from_shared(
        map: Arc<Mmap>,
        at: Range<usize>,
        idx_path: &Path,
        bin_path: &Path,
        bin_len: u64,
    ) -> Result<IndexedIndex> {
        if at.start > at.end || at.end > map.len() {
            return Err(IndexedError::Truncated {
                path: idx_path.into(),
                what: "the .idx's bytes in the shared file",
                needed: at.end as u64,
                got: map.len() as u64,
            });
        }
        Self::checked(IdxBytes { map, at }, idx_path, bin_path, bin_len)
    }

    fn from_map(idx: Mmap, idx_path: &Path, bin_path: &Path, bin_len: u64) -> Result<IndexedIndex> {
        let at = 0..idx.len();
        let idx = IdxBytes { map: Arc::new(idx), at };
        Self::checked(idx, idx_path, bin_path, bin_len)
    }

    fn checked(idx: IdxBytes, idx_path: &Path, bin_path: &Path, bin_len: u64) -> Result<IndexedIndex> {
        let (dtype, sequences, doc_entries) = check_header(&idx, idx_path)?;
        let index = IndexedIndex {
            idx,
            idx_path: idx_path.to_path_buf(),
            dtype,
            sequences,
            doc_entries,
        };
        index.check_arrays(bin_path, bin_len)?;
        Ok(index)
    }

    pub fn dtype(&self) -> TokenDType {
        self.dtype
    }

    pub fn num_sequences(&self) -> usize {
        self.sequences
    }

    pub fn num_documents(&self) -> usize {
        self.doc_entries - 1
    }

    pub fn idx_path(&self) -> &Path {
        &self.idx_path
    }

    /// Byte offset in the `.idx` of sequence `i`'s length (i32), after the header.
    fn length_offset(&self, i: usize) -> usize {
        HEADER_LEN + 4 * i
    }

    /// Byte offset of sequence `i`'s pointer (i64), after all the lengths.
    fn pointer_offset(&self, i: usize) -> usize {
        HEADER_LEN + 4 * self.sequences + 8 * i
    }

    /// Byte offset of document index entry `d` (i64), after all the pointers.
    fn doc_index_offset(&self, d: usize) -> usize {
        HEADER_LEN + 12 * self.sequences + 8 * d
    }

    fn length_at(&self, i: usize) -> usize {
        let at = self.length_offset(i);
        i32_at(&self.idx, at) as usize
    }

    fn pointer_at(&self, i: usize) -> usize {
        u64_at(&self.idx, self.pointer_offset(i)) as usize
    }

    fn doc_index_at(&self, d: usize) -> usize {
        u64_at(&self.idx, self.doc_index_offset(d)) as usize
    }

    /// Hint the CPU to load the entries [`Self::document`] reads for document `d`.
    pub(crate) fn prefetch_document(&self, d: usize) {
        let at = self.doc_index_offset(d);
        if let Some(entries) = self.idx.get(at..at + 16) {
            crate::cache_hint::prefetch(entries);
        }
    }

    /// Hint the CPU to load the entries [`Self::byte_range`] reads for sequence `i`.
    pub(crate) fn prefetch_sequence(&self, i: usize) {
        let (length, pointer) = (self.length_offset(i), self.pointer_offset(i));
        if let (Some(length), Some(pointer)) = (self.idx.get(length..length + 4), self.idx.get(pointer..pointer + 8)) {
            crate::cache_hint::prefetch(length);
            crate::cache_hint::prefetch(pointer);
        }
    }

    /// Tokens of sequence `i`. Panics if `i` is out of range (a caller bug).
    pub fn sequence_len(&self, i: usize) -> usize {
        assert!(
            i < self.sequences,
            "sequence {i} out of range ({} sequences)",
            self.sequences
        );
        self.length_at(i)
    }

    /// Byte offset of token `offset` of sequence `i` in the `.bin`, checked against the
    /// sequence (`len` tokens from there must lie inside it). Panics if out of range.
    pub fn byte_range(&self, i: usize, offset: usize, len: usize) -> Range<usize> {
        let seq_len = self.sequence_len(i);
        assert!(
            offset + len <= seq_len,
            "tokens {offset}..{} of a {seq_len}-token sequence",
            offset + len
        );
        let size = self.dtype.size();
        let start = self.pointer_at(i) + offset * size;
        start..start + len * size
    }

    /// The sequences of document `d`.
    pub fn document(&self, d: usize) -> Range<usize> {
        assert!(
            d < self.num_documents(),
            "document {d} out of range ({} documents)",
            self.num_documents()
        );
        self.doc_index_at(d)..self.doc_index_at(d + 1)
    }

    /// Tokens per document, in order (what the sampler packs).
    pub fn document_lengths(&self) -> Vec<u64> {
        (0..self.num_documents())
            .map(|d| self.document(d).map(|s| self.length_at(s) as u64).sum())
            .collect()
    }

    fn check_arrays(&self, bin_path: &Path, bin_len: u64) -> Result<()> {
        self.check_sequences(bin_path, bin_len)?;
        self.check_documents()
    }

    /// Every length is non-negative and every pointer follows from the lengths before it, up
    /// to exactly the `.bin`'s size.
    fn check_sequences(&self, bin_path: &Path, bin_len: u64) -> Result<()> {
        let path = || self.idx_path.clone();
        let size = self.dtype.size() as u64;
        let mut expected_pointer = 0u64;
        for i in 0..self.sequences {
            let len_offset = self.length_offset(i) as u64;
            let len = i32_at(&self.idx, len_offset as usize);
            if len < 0 {
                return Err(IndexedError::BadSequence {
                    path: path(),
                    index: i as u64,
                    offset: len_offset,
                    message: format!("negative length {len}"),
                });
            }
            let ptr_offset = self.pointer_offset(i) as u64;
            let pointer = u64_at(&self.idx, ptr_offset as usize);
            if pointer != expected_pointer {
                return Err(IndexedError::BadSequence {
                    path: path(),
                    index: i as u64,
                    offset: ptr_offset,
                    message: format!(
                        "starts at byte {pointer} of the .bin, but the lengths before it put it at {expected_pointer}"
                    ),
                });
            }
            expected_pointer = pointer + len as u64 * size;
        }
        if expected_pointer != bin_len {
            return Err(IndexedError::BinSizeMismatch {
                path: bin_path.to_path_buf(),
                expected: expected_pointer,
                actual: bin_len,
            });
        }
        Ok(())
    }

    /// The document index starts at 0, never decreases and ends at the sequence count.
    fn check_documents(&self) -> Result<()> {
        let path = || self.idx_path.clone();
        let mut previous = 0u64;
        for d in 0..self.doc_entries {
            let offset = self.doc_index_offset(d) as u64;
            let value = u64_at(&self.idx, offset as usize);
            let bad = |message: String| IndexedError::BadDocument {
                path: path(),
                index: d as u64,
                offset,
                message,
            };
            if d == 0 && value != 0 {
                return Err(bad(format!("the first entry must be 0, found {value}")));
            }
            if value < previous || value > self.sequences as u64 {
                return Err(bad(format!(
                    "{value} is out of order or past the {} sequences (previous entry {previous})",
                    self.sequences
                )));
            }
            previous = value;
        }
        if previous != self.sequences as u64 {
            let offset = self.doc_index_offset(self.doc_entries - 1) as u64;
            return Err(IndexedError::BadDocument {
                path: path(),
                index: self.doc_entries as u64 - 1,
                offset,
                message: format!(
                    "the last entry must be the sequence count {}, found {previous}",
                    self.sequences
                ),
            });
        }
        Ok(())
    }
}

impl IndexedDataset {
    /// Open `PREFIX.idx` and `PREFIX.bin`, checking everything (O(sequences)).
    pub fn open(prefix: &Path) -> Result<IndexedDataset> {
        let (bin_path, idx_path) = paths(prefix);
        let idx = map(&idx_path)?;
        let bin = map(&bin_path)?;
        let index = IndexedIndex::from_map(idx, &idx_path, &bin_path, bin.len() as u64)?;
        Ok(IndexedDataset { index, bin })
    }

    /// Open an `.idx` and a `.bin` that live apart (a `.bin` materialized from zstd frames
    /// into a cache directory), checking everything as [`IndexedDataset::open`] does.
    pub fn open_files(idx_path: &Path, bin_path: &Path) -> Result<IndexedDataset> {
        let idx = map(idx_path)?;
        let bin = map(bin_path)?;
        let index = IndexedIndex::from_map(idx, idx_path, bin_path, bin.len() as u64)?;
        Ok(IndexedDataset { index, bin })
    }

    /// The checked `index` (of a `.idx` that lives elsewhere, [`IndexedIndex::from_shared`])
    /// with the `.bin` at `bin_path`, mapped and checked against it.
    pub fn with_index(index: IndexedIndex, bin_path: &Path) -> Result<IndexedDataset> {
        let bin = map(bin_path)?;
        index.check_sequences(bin_path, bin.len() as u64)?;
        Ok(IndexedDataset { index, bin })
    }

    /// The validated `.idx`.
    pub fn index(&self) -> &IndexedIndex {
        &self.index
    }

    pub fn dtype(&self) -> TokenDType {
        self.index.dtype
    }

    pub fn num_sequences(&self) -> usize {
        self.index.sequences
    }

    pub fn num_documents(&self) -> usize {
        self.index.num_documents()
    }

    pub fn num_tokens(&self) -> u64 {
        self.bin.len() as u64 / self.index.dtype.size() as u64
    }

    pub fn idx_path(&self) -> &Path {
        &self.index.idx_path
    }

    /// Tokens of sequence `i`. Panics if `i` is out of range (a caller bug).
    pub fn sequence_len(&self, i: usize) -> usize {
        self.index.sequence_len(i)
    }

    /// `len` tokens of sequence `i` starting at `offset`, zero-copy. Panics if out of range.
    pub fn tokens(&self, i: usize, offset: usize, len: usize) -> Tokens<'_> {
        self.tokens_at(self.index.byte_range(i, offset, len))
    }

    /// The tokens in `bytes` of the `.bin` (a range from [`IndexedIndex::byte_range`]),
    /// zero-copy. Panics if out of range.
    pub fn tokens_at(&self, bytes: Range<usize>) -> Tokens<'_> {
        tokens_of(self.index.dtype, &self.bin[bytes])
    }

    /// The mapped `.bin`.
    pub(crate) fn bin(&self) -> &[u8] {
        &self.bin
    }

    pub fn sequence(&self, i: usize) -> Tokens<'_> {
        self.tokens(i, 0, self.sequence_len(i))
    }

    /// The sequences of document `d`.
    pub fn document(&self, d: usize) -> Range<usize> {
        self.index.document(d)
    }

    /// Tokens per document, in order (what the sampler packs).
    pub fn document_lengths(&self) -> Vec<u64> {
        self.index.document_lengths()
    }
}

/// Check the fixed header and the file size it implies; returns (dtype, sequences, doc entries).
fn check_header(idx: &[u8], path: &Path) -> Result<(TokenDType, usize, usize)> {
    index_header::check_start(idx, HEADER_LEN, MAGIC).map_err(|fault| match fault {
        HeaderFault::Truncated { needed, got } => IndexedError::Truncated {
            path: path.into(),
            what: "the header",
            needed,
            got,
        },
        HeaderFault::BadMagic { found } => IndexedError::BadMagic {
            path: path.into(),
            found,
        },
    })?;
    let got = idx.len() as u64;
    let version = u64_at(idx, 9);
    if version != VERSION {
        return Err(IndexedError::UnsupportedVersion {
            path: path.into(),
            version,
        });
    }
    let dtype = TokenDType::from_code(idx[17]).ok_or(IndexedError::BadDType {
        path: path.into(),
        code: idx[17],
    })?;
    let sequences = u64_at(idx, 18);
    let doc_entries = u64_at(idx, 26);
    let expected = sequences
        .checked_mul(12)
        .and_then(|a| doc_entries.checked_mul(8).and_then(|b| a.checked_add(b)))
        .and_then(|n| n.checked_add(HEADER_LEN as u64));
    if expected != Some(got) {
        return Err(IndexedError::SizeMismatch {
            path: path.into(),
            sequences,
            doc_entries,
            expected: expected.unwrap_or(u64::MAX),
            actual: got,
        });
    }
    if sequences == 0 {
        return Err(IndexedError::Empty {
            path: path.into(),
            what: "sequences",
        });
    }
    if doc_entries < 2 {
        return Err(IndexedError::Empty {
            path: path.into(),
            what: "documents",
        });
    }
    Ok((dtype, sequences as usize, doc_entries as usize))
}
