//! Log-probabilities in the two JSON shapes of the OpenAI API: the completions API's columns
//! (`tokens`, `token_logprobs`, `top_logprobs` as `{token: logprob}` maps, `text_offset`) and
//! the chat API's list of `{token, logprob, bytes, top_logprobs}` objects.
//!
//! A token is shown as its decoded text; a model without a tokenizer shows `token_id:N`
//! (vLLM's convention), and a token that is only part of a UTF-8 character decodes to U+FFFD,
//! its `bytes` (chat) being the replacement character's, as the decoded text is all there is.

use crate::serving::{TextCodec, TokenLogprobs};
use serde_json::{Map, Value, json};

/// How one token reads.
pub(crate) fn token_text(codec: Option<&dyn TextCodec>, id: u32) -> String {
    match codec.and_then(|c| c.decode(&[id]).ok()) {
        Some(text) => text,
        None => format!("token_id:{id}"),
    }
}

/// JSON numbers cannot be infinite: a token the model gives no probability at all (possible
/// only for prompt tokens, which are not sampled) is shown with f32's lowest value.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() { lp } else { f32::MIN }
}

/// The completions API's columns.
#[derive(Default)]
pub(crate) struct Columns {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Option<Map<String, Value>>>,
    text_offset: Vec<usize>,
    /// Characters of text before the next token.
    offset: usize,
}

impl Columns {
    /// Starting `offset` characters into the text the answer returns.
    pub fn at(offset: usize) -> Columns {
        Columns {
            offset,
            ..Columns::default()
        }
    }

    /// One token; `None` for a position with no score (a prompt's first token).
    pub fn push(&mut self, codec: Option<&dyn TextCodec>, id: u32, scored: Option<&TokenLogprobs>) {
        let text = token_text(codec, id);
        self.text_offset.push(self.offset);
        self.offset += text.chars().count();
        self.token_logprobs.push(scored.map(|s| finite(s.logprob)));
        self.top_logprobs.push(scored.map(|s| {
            let mut top: Map<String, Value> = s
                .top
                .iter()
                .map(|&(t, lp)| (token_text(codec, t), json!(finite(lp))))
                .collect();
            // The chosen token is always listed, so there may be one more than asked for.
            top.entry(text.clone()).or_insert(json!(finite(s.logprob)));
            top
        }));
        self.tokens.push(text);
    }

    pub fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }

    /// The columns of the tokens pushed since `from` (a streamed chunk's share).
    pub fn since(&self, from: usize) -> Value {
        json!({
            "tokens": self.tokens[from..],
            "token_logprobs": self.token_logprobs[from..],
            "top_logprobs": self.top_logprobs[from..],
            "text_offset": self.text_offset[from..],
        })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }
}

/// One entry of the chat API's `logprobs.content`.
pub(crate) fn chat_entry(codec: Option<&dyn TextCodec>, id: u32, scored: &TokenLogprobs) -> Value {
    let one = |t: u32, lp: f32| {
        let text = token_text(codec, t);
        json!({ "token": text, "logprob": finite(lp), "bytes": text.as_bytes() })
    };
    let mut entry = one(id, scored.logprob);
    entry["top_logprobs"] = scored.top.iter().map(|&(t, lp)| one(t, lp)).collect();
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Letters;
    impl TextCodec for Letters {
        fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
            Ok(text.bytes().map(|b| u32::from(b - b'a')).collect())
        }
        fn decode(&self, ids: &[u32]) -> Result<String, String> {
            Ok(ids.iter().map(|&i| char::from(b'a' + i as u8)).collect())
        }
    }

    #[test]
    fn columns_list_the_chosen_token_among_the_top_and_count_offsets_in_characters() {
        let codec: &dyn TextCodec = &Letters;
        let mut c = Columns::at(0);
        c.push(Some(codec), 0, None);
        let s = TokenLogprobs {
            logprob: -2.0,
            top: vec![(2, -0.5)],
        };
        c.push(Some(codec), 1, Some(&s));
        let j = c.to_json();
        assert_eq!(j["tokens"], json!(["a", "b"]));
        assert_eq!(j["token_logprobs"], json!([null, -2.0]));
        assert_eq!(j["top_logprobs"], json!([null, {"c": -0.5, "b": -2.0}]));
        assert_eq!(j["text_offset"], json!([0, 1]));
        assert_eq!(c.since(1)["tokens"], json!(["b"]));
        // No tokenizer: ids shown as vLLM does; -inf is not JSON.
        let mut c = Columns::at(5);
        let zero = TokenLogprobs {
            logprob: f32::NEG_INFINITY,
            top: vec![],
        };
        c.push(None, 7, Some(&zero));
        assert_eq!(c.to_json()["tokens"], json!(["token_id:7"]));
        assert_eq!(c.to_json()["token_logprobs"], json!([f32::MIN]));
        assert_eq!(c.to_json()["text_offset"], json!([5]));
        let e = chat_entry(Some(codec), 2, &s);
        assert_eq!(e["token"], "c");
        assert_eq!(e["bytes"], json!([99]));
        assert_eq!(e["top_logprobs"][0]["token"], "c");
    }
}
