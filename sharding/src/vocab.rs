//! Whether a model can read a dataset's token ids: the one place for the rule that the
//! dataset's vocabulary fits the model's and that every id is below the model's vocabulary
//! (an id past it indexes outside the embedding: a panic at TP 1, silently masked at TP > 1).
//!
//! A manifest declares the tokenizer's vocabulary (`vocab_size`) and records each shard's
//! largest id (`max_token_id`, from [`crate::indexed::IndexedWriter`]). Older manifests lack
//! the largest ids; their shards are scanned once (a vectorized max over the `.bin`,
//! [`Tokens::max_id`]): by `gantry launch`'s per-host check ([`crate::verify`], whose result
//! later opens on the host reuse), else on the shard's first read. Only when a largest id is
//! at or above the vocabulary is the shard read document by document for the first offender,
//! so the error names the file, the document, the position and the id.

use crate::indexed::{IndexedIndex, Tokens};
use crate::manifest::Manifest;
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VocabError {
    #[error(
        "{dir}: the dataset's vocabulary is {data} tokens, more than the model's {model} (model.vocab_size): another tokenizer?"
    )]
    Declared { dir: PathBuf, data: u64, model: u64 },
    #[error(
        "{shard}: document {document} holds token id {id} (token {position} of the document), but the model's vocabulary is {vocab} tokens (ids below {vocab}): written with another tokenizer, or damaged"
    )]
    Id {
        /// The file the tokens were read from (`.bin`, or `.bin.zst` for a compressed-only shard).
        shard: PathBuf,
        /// The document's index in its shard (its `.idx`).
        document: u64,
        position: u64,
        id: i64,
        vocab: u64,
    },
}

/// The dataset's declared vocabulary fits a model of `model_vocab` tokens.
pub fn check_declared(manifest: &Manifest, dir: &Path, model_vocab: u64) -> Result<(), VocabError> {
    if manifest.vocab_size > model_vocab {
        return Err(VocabError::Declared {
            dir: dir.to_path_buf(),
            data: manifest.vocab_size,
            model: model_vocab,
        });
    }
    Ok(())
}

/// Whether ids up to `max` (a shard's largest) are all below `vocab`.
pub fn fits(max: u64, vocab: u64) -> bool {
    max < vocab
}

/// The first id at or above `vocab` in a shard, in document order, as the error naming it
/// (`shard` is the file named); `None` when there is none. `read` hands the tokens of a byte
/// range of the `.bin` to its sink, in order, in one or more pieces. Each document is first
/// reduced with [`Tokens::max_id`]; only the offending one is searched token by token.
pub(crate) fn first_outside<E>(
    index: &IndexedIndex,
    shard: &Path,
    vocab: u64,
    mut read: impl FnMut(Range<usize>, &mut dyn FnMut(Tokens<'_>)) -> Result<(), E>,
) -> Result<Option<VocabError>, E> {
    for document in 0..index.num_documents() {
        let seqs = index.document(document);
        if seqs.is_empty() {
            continue;
        }
        let last = seqs.end - 1;
        let bytes = index.byte_range(seqs.start, 0, 0).start..index.byte_range(last, 0, index.sequence_len(last)).end;
        let (mut seen, mut found) = (0u64, None);
        read(bytes, &mut |tokens| {
            if found.is_none() && !fits(tokens.max_id(), vocab) {
                found = (0..tokens.len()).find_map(|i| {
                    let id = tokens.get(i)?;
                    (id < 0 || !fits(id as u64, vocab)).then_some((seen + i as u64, id))
                });
            }
            seen += tokens.len() as u64;
        })?;
        if let Some((position, id)) = found {
            return Ok(Some(VocabError::Id {
                shard: shard.to_path_buf(),
                document: document as u64,
                position,
                id,
                vocab,
            }));
        }
    }
    Ok(None)
}
