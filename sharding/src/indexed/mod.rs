//! The Megatron indexed dataset format, version 1 ("MMIDIDX"), byte for byte.
//!
//! A dataset is a pair of files sharing a prefix: `PREFIX.bin` holds the raw tokens of every
//! sequence back to back; `PREFIX.idx` says where each sequence starts and which sequences
//! make up each document. All integers are little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 9 | magic `MMIDIDX\0\0` |
//! | 9 | 8 | version, u64 = 1 |
//! | 17 | 1 | token dtype code: 1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16 |
//! | 18 | 8 | sequence count S, u64 |
//! | 26 | 8 | document index count D, u64 (documents + 1) |
//! | 34 | 4·S | sequence lengths in tokens, i32 |
//! | 34+4S | 8·S | sequence byte offsets into `.bin`, i64 |
//! | 34+12S | 8·D | document indices, i64: 0, then the sequence index where each document ends |
//!
//! The reader maps both files and checks every count, length, offset and document index
//! against the file sizes before anything is used, so a corrupt or truncated file is an error
//! that names the file and the offset, never a panic or an out-of-bounds read. The `.idx`
//! arrays start at offset 34 (not aligned), so they are decoded on access; token slices in
//! `.bin` are aligned (offsets are multiples of the token size) and handed out zero-copy.
//!
//! # Layout
//! - this file: the format's constants, [`TokenDType`], [`IndexedError`] and [`paths`].
//! - `writer.rs`: [`IndexedWriter`], tokens streamed to the `.bin`, the `.idx` written at the end.
//! - `reader.rs`: [`IndexedIndex`] and [`IndexedDataset`], mapped and checked before use.
//! - `tokens.rs`: [`Tokens`], the zero-copy views the reader hands out ([`tokens_of`]).

mod reader;
mod tokens;
mod writer;

pub use reader::{IndexedDataset, IndexedIndex};
pub use tokens::{Tokens, tokens_of};
pub use writer::{IndexedSummary, IndexedWriter};

use std::path::{Path, PathBuf};

#[cfg(target_endian = "big")]
compile_error!("the indexed dataset format is little-endian; big-endian hosts are not supported");

pub const MAGIC: &[u8; 9] = b"MMIDIDX\0\0";
pub const VERSION: u64 = 1;
const HEADER_LEN: usize = 34;

/// Token element types. Megatron's codes 6 (f64) and 7 (f32) exist in the format but are not
/// token types; they are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDType {
    U8,
    I8,
    I16,
    I32,
    I64,
    U16,
}

impl TokenDType {
    pub const fn code(self) -> u8 {
        match self {
            TokenDType::U8 => 1,
            TokenDType::I8 => 2,
            TokenDType::I16 => 3,
            TokenDType::I32 => 4,
            TokenDType::I64 => 5,
            TokenDType::U16 => 8,
        }
    }

    pub fn from_code(code: u8) -> Option<TokenDType> {
        [
            TokenDType::U8,
            TokenDType::I8,
            TokenDType::I16,
            TokenDType::I32,
            TokenDType::I64,
            TokenDType::U16,
        ]
        .into_iter()
        .find(|d| d.code() == code)
    }

    pub const fn size(self) -> usize {
        match self {
            TokenDType::U8 | TokenDType::I8 => 1,
            TokenDType::I16 | TokenDType::U16 => 2,
            TokenDType::I32 => 4,
            TokenDType::I64 => 8,
        }
    }

    /// The type gantry writes for a vocabulary: u16 below 65,500 tokens (Megatron's cut-off),
    /// else i32.
    pub fn for_vocab(vocab_size: usize) -> TokenDType {
        if vocab_size < 65_500 {
            TokenDType::U16
        } else {
            TokenDType::I32
        }
    }

    /// Largest token id this type can hold.
    pub const fn max_token(self) -> u64 {
        match self {
            TokenDType::U8 => u8::MAX as u64,
            TokenDType::I8 => i8::MAX as u64,
            TokenDType::I16 => i16::MAX as u64,
            TokenDType::U16 => u16::MAX as u64,
            TokenDType::I32 => i32::MAX as u64,
            TokenDType::I64 => i64::MAX as u64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IndexedError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: file is {got} bytes, too short for {what} (needs {needed})")]
    Truncated {
        path: PathBuf,
        what: &'static str,
        needed: u64,
        got: u64,
    },
    #[error("{path}: not an indexed dataset index (magic {found:?} at offset 0, expected \"MMIDIDX\\0\\0\")")]
    BadMagic { path: PathBuf, found: String },
    #[error("{path}: format version {version} at offset 9 is not supported (only version 1)")]
    UnsupportedVersion { path: PathBuf, version: u64 },
    #[error(
        "{path}: token dtype code {code} at offset 17 is not a token type (1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 8 u16)"
    )]
    BadDType { path: PathBuf, code: u8 },
    #[error(
        "{path}: header says {sequences} sequences and {doc_entries} document entries, so the file should be {expected} bytes, but it is {actual}"
    )]
    SizeMismatch {
        path: PathBuf,
        sequences: u64,
        doc_entries: u64,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: the dataset is empty (no {what})")]
    Empty { path: PathBuf, what: &'static str },
    #[error("{path}: sequence {index} at offset {offset}: {message}")]
    BadSequence {
        path: PathBuf,
        index: u64,
        offset: u64,
        message: String,
    },
    #[error("{path}: document index {index} at offset {offset}: {message}")]
    BadDocument {
        path: PathBuf,
        index: u64,
        offset: u64,
        message: String,
    },
    #[error("{path}: holds {actual} bytes but the index describes {expected}")]
    BinSizeMismatch { path: PathBuf, expected: u64, actual: u64 },
    #[error("token {token} does not fit the dataset's {dtype:?} tokens (largest {max})")]
    TokenOutOfRange { token: u64, dtype: TokenDType, max: u64 },
    #[error("sequence of {len} tokens is longer than the format allows (i32 lengths)")]
    SequenceTooLong { len: usize },
}

pub type Result<T, E = IndexedError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> IndexedError + '_ {
    move |source| IndexedError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `PREFIX.bin` and `PREFIX.idx`.
pub fn paths(prefix: &Path) -> (PathBuf, PathBuf) {
    (with_suffix(prefix, ".bin"), with_suffix(prefix, ".idx"))
}

/// `path` with `suffix` appended to its file name: how every file of a shard (and the lock
/// and partial files beside a materialized one) is named from its prefix.
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}
