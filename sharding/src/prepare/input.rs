//! Input files (and standard input) → a stream of documents, or of pieces of documents.
//!
//! Files are read line by line. A document longer than the piece size is handed on in
//! pieces, cut just before a line that starts with a non-space character, when the encoder
//! says such cuts do not change the tokens ([`super::fast::FastEncoder::pieces_are_exact`]);
//! so memory stays bounded by the piece size (or by the longest line, or JSON record) however
//! large a document, a file or standard input is.

use super::{PrepareError, SplitBy, io};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// The input name that means standard input.
pub const STDIN: &str = "-";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Text,
    JsonLines,
}

pub(crate) fn is_stdin(path: &Path) -> bool {
    path.as_os_str() == STDIN
}

fn kind_of(path: &Path) -> Option<Kind> {
    match path.extension()?.to_str()? {
        "txt" => Some(Kind::Text),
        "jsonl" | "json" => Some(Kind::JsonLines),
        _ => None,
    }
}

/// The input files: explicit files in the order given (each must be .txt/.jsonl/.json, or
/// `-` for standard input, at most once), directories searched recursively with their
/// supported files in sorted order.
pub fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, PrepareError> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PrepareError> {
        let mut entries = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io(dir))?;
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out)?;
            } else if kind_of(&path).is_some() {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for input in inputs {
        if is_stdin(input) {
            if files.iter().any(|f: &PathBuf| is_stdin(f)) {
                return Err(PrepareError::Config("standard input (-) is given twice".into()));
            }
            files.push(input.clone());
            continue;
        }
        let meta = std::fs::metadata(input).map_err(io(input))?;
        if meta.is_dir() {
            walk(input, &mut files)?;
        } else if kind_of(input).is_some() {
            files.push(input.clone());
        } else {
            return Err(PrepareError::Unsupported { path: input.clone() });
        }
    }
    if files.is_empty() {
        let names: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        return Err(PrepareError::NoInputs {
            inputs: names.join(", "),
        });
    }
    Ok(files)
}

/// Total size of the input files, when known (not for standard input).
pub(crate) fn total_bytes(files: &[PathBuf]) -> Option<u64> {
    files
        .iter()
        .map(|f| {
            if is_stdin(f) {
                None
            } else {
                std::fs::metadata(f).ok().map(|m| m.len())
            }
        })
        .sum()
}

/// A document, or a piece of one, and the file it came from (index into the file list).
pub(crate) struct Doc {
    pub file: usize,
    pub text: String,
    /// Whether this piece ends its document (the end-of-document token follows it).
    pub last: bool,
    /// Whether this piece continues a document begun by an earlier piece.
    pub continued: bool,
}

/// Streams the documents of the input files, line by line.
pub(crate) struct DocReader<'a> {
    files: &'a [PathBuf],
    split_by: SplitBy,
    text_field: &'a str,
    /// Cut documents longer than this into pieces (0: never).
    piece_bytes: usize,
    next_file: usize,
    current: Option<(usize, Kind, Box<dyn BufRead + Send>)>,
    line_no: u64,
    buf: Vec<u8>,
    /// A line read past the end of a piece: it begins the next piece.
    carry: Option<String>,
    /// The current document has had a piece handed out already.
    in_document: bool,
    pub bytes: u64,
    pub skipped_empty: u64,
}

impl<'a> DocReader<'a> {
    pub fn new(files: &'a [PathBuf], split_by: SplitBy, text_field: &'a str, piece_bytes: usize) -> DocReader<'a> {
        DocReader {
            files,
            split_by,
            text_field,
            piece_bytes,
            next_file: 0,
            current: None,
            line_no: 0,
            buf: Vec::new(),
            carry: None,
            in_document: false,
            bytes: 0,
            skipped_empty: 0,
        }
    }

    /// The next line of the current input (with its line ending), or None at its end.
    fn line(&mut self) -> Result<Option<&str>, PrepareError> {
        let (file, _, reader) = self.current.as_mut().expect("a file is open");
        self.buf.clear();
        let n = reader
            .read_until(b'\n', &mut self.buf)
            .map_err(io(&self.files[*file]))?;
        if n == 0 {
            return Ok(None);
        }
        self.bytes += n as u64;
        self.line_no += 1;
        std::str::from_utf8(&self.buf)
            .map(Some)
            .map_err(|_| PrepareError::Utf8 {
                path: self.files[*file].clone(),
                line: self.line_no,
            })
    }

    fn open_next(&mut self) -> Result<bool, PrepareError> {
        let Some(path) = self.files.get(self.next_file) else {
            return Ok(false);
        };
        let (reader, kind): (Box<dyn BufRead + Send>, Kind) = if is_stdin(path) {
            // One stream; JSON lines when documents are records, else text.
            let kind = if self.split_by == SplitBy::Record {
                Kind::JsonLines
            } else {
                Kind::Text
            };
            (Box::new(BufReader::with_capacity(1 << 20, std::io::stdin())), kind)
        } else {
            let file = File::open(path).map_err(io(path))?;
            (
                Box::new(BufReader::with_capacity(1 << 20, file)),
                kind_of(path).unwrap_or(Kind::Text),
            )
        };
        self.current = Some((self.next_file, kind, reader));
        self.next_file += 1;
        self.line_no = 0;
        Ok(true)
    }

    pub fn next_doc(&mut self) -> Result<Option<Doc>, PrepareError> {
        loop {
            if self.current.is_none() && !self.open_next()? {
                return Ok(None);
            }
            let (file, kind) = self.current.as_ref().map(|(f, k, _)| (*f, *k)).expect("a file is open");
            let piece = match (kind, self.split_by) {
                (Kind::JsonLines, _) => self.json_record(file)?.map(|t| (t, true)),
                (Kind::Text, SplitBy::File | SplitBy::Record) => Some(self.lines(false)?),
                (Kind::Text, SplitBy::Line) => self.line()?.map(|line| {
                    let line = line.strip_suffix('\n').unwrap_or(line);
                    (line.strip_suffix('\r').unwrap_or(line).to_string(), true)
                }),
                // Only the end of the input gives an empty block (blank lines are skipped).
                (Kind::Text, SplitBy::BlankLine) => Some(self.lines(true)?).filter(|(t, _)| !t.is_empty()),
            };
            let Some((text, last)) = piece else {
                self.current = None;
                continue;
            };
            let continued = self.in_document;
            self.in_document = !last;
            // Pieces are never empty (a cut needs a line after it), so this is a whole document.
            if text.is_empty() {
                self.skipped_empty += 1;
                continue;
            }
            return Ok(Some(Doc {
                file,
                text,
                last,
                continued,
            }));
        }
    }

    /// Lines up to the end of the input (or, with `blank_ends`, of a blank-line-separated
    /// block, whose last line ending is dropped), cut into a piece once `piece_bytes` is
    /// reached and the next line starts with a non-space. Returns (text, ends the document).
    fn lines(&mut self, blank_ends: bool) -> Result<(String, bool), PrepareError> {
        let mut text = self.carry.take().unwrap_or_default();
        let piece_bytes = self.piece_bytes;
        loop {
            let Some(line) = self.line()? else {
                if !blank_ends {
                    self.current = None;
                }
                break;
            };
            if blank_ends && line.trim().is_empty() {
                if text.is_empty() {
                    continue;
                }
                break;
            }
            if piece_bytes > 0 && text.len() >= piece_bytes && line.starts_with(|c: char| !c.is_whitespace()) {
                let next = line.to_string();
                self.carry = Some(next);
                return Ok((text, false));
            }
            text.push_str(line);
        }
        if blank_ends && text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        Ok((text, true))
    }

    /// The text of the next record (blank lines are skipped), or None at the end of the file.
    fn json_record(&mut self, file: usize) -> Result<Option<String>, PrepareError> {
        loop {
            let field = self.text_field;
            let Some(line) = self.line()? else {
                return Ok(None);
            };
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(line).map_err(|e| PrepareError::Json {
                path: self.files[file].clone(),
                line: self.line_no,
                message: e.to_string(),
            })?;
            return match value.get(field) {
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                _ => Err(PrepareError::MissingField {
                    path: self.files[file].clone(),
                    line: self.line_no,
                    field: field.to_string(),
                }),
            };
        }
    }
}
