//! Text ↔ token ids with a dataset's tokenizer (a Hugging Face `tokenizer.json`, as
//! `gantry data prepare` writes or loads it), for evaluation and serving: prompts are encoded
//! the way documents were (no special tokens added, no truncation or padding) and ids are
//! decoded with special tokens left out of the text.

use crate::prepare::DEFAULT_EOD;
use tokenizers::Tokenizer;

pub struct TextCodec {
    tokenizer: Tokenizer,
}

impl TextCodec {
    /// From the bytes of a `tokenizer.json`.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<TextCodec, String> {
        let mut tokenizer = Tokenizer::from_bytes(bytes).map_err(|e| format!("not a tokenizer.json: {e}"))?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| e.to_string())?
            .with_padding(None);
        Ok(TextCodec { tokenizer })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer.decode(ids, true).map_err(|e| e.to_string())
    }

    /// The id of a token, e.g. the end-of-document token [`TextCodec::eod`].
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// A token as the vocabulary writes it (`<|endoftext|>`).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// The end-of-document token `gantry data prepare` appends by default, if this tokenizer
    /// has it.
    pub fn eod(&self) -> Option<u32> {
        self.token_id(DEFAULT_EOD)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}
