//! [`IndexedWriter`]: streams sequences into `PREFIX.bin` and writes `PREFIX.idx` at the end.

use super::{HEADER_LEN, IndexedError, MAGIC, Result, TokenDType, VERSION, io_err, paths};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Streams sequences into `PREFIX.bin` and writes `PREFIX.idx` on [`IndexedWriter::finish`].
pub struct IndexedWriter {
    bin: BufWriter<File>,
    bin_path: PathBuf,
    idx_path: PathBuf,
    dtype: TokenDType,
    lengths: Vec<i32>,
    doc_indices: Vec<i64>,
    tokens: u64,
    /// The largest token id written so far.
    max_token: u32,
    /// Tokens of the sequence being written, not yet in `lengths`.
    open_len: usize,
    scratch: Vec<u8>,
}

/// What a finished writer produced.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IndexedSummary {
    pub sequences: u64,
    pub documents: u64,
    pub tokens: u64,
    pub bin_bytes: u64,
    pub idx_bytes: u64,
    /// The largest token id in the `.bin` (0 when it holds no tokens).
    #[serde(default)]
    pub max_token_id: u64,
}

impl IndexedWriter {
    pub fn create(prefix: &Path, dtype: TokenDType) -> Result<IndexedWriter> {
        let (bin_path, idx_path) = paths(prefix);
        let file = File::create(&bin_path).map_err(io_err(&bin_path))?;
        Ok(IndexedWriter {
            bin: BufWriter::with_capacity(1 << 20, file),
            bin_path,
            idx_path,
            dtype,
            lengths: Vec::new(),
            doc_indices: vec![0],
            tokens: 0,
            max_token: 0,
            open_len: 0,
            scratch: Vec::new(),
        })
    }

    /// Append one sequence. Token ids that do not fit the dtype are refused.
    pub fn add_sequence(&mut self, tokens: &[u32]) -> Result<()> {
        self.extend_sequence(tokens)?;
        self.end_sequence()
    }

    /// Append tokens to the sequence being written (begun by the first call after the previous
    /// [`IndexedWriter::end_sequence`]), so a long sequence can be streamed in pieces.
    pub fn extend_sequence(&mut self, tokens: &[u32]) -> Result<()> {
        let max = self.dtype.max_token();
        let largest = tokens.iter().fold(0, |m, &t| m.max(t));
        if u64::from(largest) > max {
            return Err(IndexedError::TokenOutOfRange {
                token: largest.into(),
                dtype: self.dtype,
                max,
            });
        }
        let open = self.open_len + tokens.len();
        if i32::try_from(open).is_err() {
            return Err(IndexedError::SequenceTooLong { len: open });
        }
        self.scratch.clear();
        match self.dtype {
            TokenDType::U8 => self.scratch.extend(tokens.iter().map(|&t| t as u8)),
            TokenDType::I8 => self.scratch.extend(tokens.iter().map(|&t| t as i8 as u8)),
            TokenDType::I16 => tokens
                .iter()
                .for_each(|&t| self.scratch.extend_from_slice(&(t as i16).to_le_bytes())),
            TokenDType::U16 => tokens
                .iter()
                .for_each(|&t| self.scratch.extend_from_slice(&(t as u16).to_le_bytes())),
            TokenDType::I32 => tokens
                .iter()
                .for_each(|&t| self.scratch.extend_from_slice(&(t as i32).to_le_bytes())),
            TokenDType::I64 => tokens
                .iter()
                .for_each(|&t| self.scratch.extend_from_slice(&i64::from(t).to_le_bytes())),
        }
        self.bin.write_all(&self.scratch).map_err(io_err(&self.bin_path))?;
        self.open_len = open;
        self.tokens += tokens.len() as u64;
        self.max_token = self.max_token.max(largest);
        Ok(())
    }

    /// Close the sequence being written (an empty one if nothing was added since the last).
    pub fn end_sequence(&mut self) -> Result<()> {
        self.lengths.push(self.open_len as i32);
        self.open_len = 0;
        Ok(())
    }

    /// Close the current document (the sequences added since the previous one).
    pub fn end_document(&mut self) {
        self.doc_indices.push(self.lengths.len() as i64);
    }

    /// Append a one-sequence document.
    pub fn add_document(&mut self, tokens: &[u32]) -> Result<()> {
        self.add_sequence(tokens)?;
        self.end_document();
        Ok(())
    }

    pub fn finish(mut self) -> Result<IndexedSummary> {
        self.bin.flush().map_err(io_err(&self.bin_path))?;
        let bin = self.bin.into_inner().map_err(|e| IndexedError::Io {
            path: self.bin_path.clone(),
            source: e.into_error(),
        })?;
        bin.sync_all().map_err(io_err(&self.bin_path))?;
        let bin_bytes = self.tokens * self.dtype.size() as u64;

        let file = File::create(&self.idx_path).map_err(io_err(&self.idx_path))?;
        let mut idx = BufWriter::with_capacity(1 << 20, file);
        let (dtype, lengths, doc_indices) = (self.dtype, &self.lengths, &self.doc_indices);
        let write = |out: &mut BufWriter<File>| -> std::io::Result<()> {
            out.write_all(MAGIC)?;
            out.write_all(&VERSION.to_le_bytes())?;
            out.write_all(&[dtype.code()])?;
            out.write_all(&(lengths.len() as u64).to_le_bytes())?;
            out.write_all(&(doc_indices.len() as u64).to_le_bytes())?;
            for len in lengths {
                out.write_all(&len.to_le_bytes())?;
            }
            let mut pointer = 0i64;
            for len in lengths {
                out.write_all(&pointer.to_le_bytes())?;
                pointer += i64::from(*len) * dtype.size() as i64;
            }
            for d in doc_indices {
                out.write_all(&d.to_le_bytes())?;
            }
            Ok(())
        };
        write(&mut idx).map_err(io_err(&self.idx_path))?;
        let file = idx.into_inner().map_err(|e| IndexedError::Io {
            path: self.idx_path.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_err(&self.idx_path))?;
        let idx_bytes = (HEADER_LEN + 12 * self.lengths.len() + 8 * self.doc_indices.len()) as u64;
        Ok(IndexedSummary {
            sequences: self.lengths.len() as u64,
            documents: self.doc_indices.len() as u64 - 1,
            tokens: self.tokens,
            bin_bytes,
            idx_bytes,
            max_token_id: self.max_token.into(),
        })
    }
}
