//! An exact fast path for byte-level BPE tokenizers (GPT-2 style `tokenizer.json`s and the
//! ones `prepare` trains).
//!
//! The Hugging Face encoder spends most of its time outside the BPE merges: the GPT-2
//! pre-tokenizer regex runs on `fancy-regex` (a backtracking engine, because of the `(?!\S)`
//! lookahead), and every word becomes an owned `String` inside offset-tracking structures.
//! Here the regex is a hand-written scanner with the same match semantics, words are looked
//! up by their raw bytes in a per-thread cache, and only a word not seen before goes to the
//! tokenizer's own BPE model (so merges, `ignore_merges`, unknown tokens and byte fallback
//! stay exactly the model's). A document containing the text of an added token (for example
//! a literal `<|endoftext|>`) is handed whole to the HF encoder, which splits those out.
//!
//! Exactness rests on the scanner reproducing
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//! (leftmost-first alternation, greedy runs) and on the character classes coming from
//! `regex-syntax`, the tables the regex engine itself uses. Tests compare token ids with the
//! plain HF encode on tinyshakespeare, on random Unicode text and on edge cases.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use tokenizers::models::ModelWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{Model, Tokenizer};

/// Character classes of the GPT-2 pattern; disjoint (White_Space has no letters or numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

struct Classes {
    ascii: [Class; 128],
    /// Sorted, non-overlapping (first, last, class) ranges above ASCII; others are `Other`.
    ranges: Vec<(u32, u32, Class)>,
}

fn unicode_ranges(pattern: &str) -> Vec<(u32, u32)> {
    use regex_syntax::hir::{Class as HirClass, HirKind};
    let hir = regex_syntax::Parser::new()
        .parse(pattern)
        .expect("a valid Unicode class");
    match hir.kind() {
        HirKind::Class(HirClass::Unicode(c)) => c.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect(),
        other => unreachable!("{pattern} parsed to {other:?}"),
    }
}

impl Classes {
    fn new() -> Classes {
        let mut ranges = Vec::new();
        for (pattern, class) in [
            (r"\p{L}", Class::Letter),
            (r"\p{N}", Class::Number),
            (r"\s", Class::Space),
        ] {
            ranges.extend(unicode_ranges(pattern).into_iter().map(|(a, b)| (a, b, class)));
        }
        ranges.sort_by_key(|r| r.0);
        let mut ascii = [Class::Other; 128];
        for &(a, b, class) in &ranges {
            for c in a..=b.min(127) {
                ascii[c as usize] = class;
            }
        }
        ranges.retain(|r| r.1 >= 128);
        Classes { ascii, ranges }
    }

    #[inline]
    fn of(&self, c: char) -> Class {
        let c = c as u32;
        if c < 128 {
            return self.ascii[c as usize];
        }
        let i = self.ranges.partition_point(|r| r.1 < c);
        match self.ranges.get(i) {
            Some(&(a, _, class)) if a <= c => class,
            _ => Class::Other,
        }
    }
}

/// Call `word` with each match of the GPT-2 pattern in `text`, in order; the matches cover
/// the text exactly.
fn split_words<'t>(classes: &Classes, text: &'t str, mut word: impl FnMut(&'t str)) {
    let bytes = text.as_bytes();
    let char_at = |i: usize| text[i..].chars().next();
    // End of the run of `class` characters starting at byte `i`.
    let run = |mut i: usize, class: Class| {
        while let Some(c) = char_at(i) {
            if classes.of(c) != class {
                break;
            }
            i += c.len_utf8();
        }
        i
    };
    let mut i = 0;
    while i < bytes.len() {
        let c = char_at(i).expect("i is on a char boundary");
        // 's 't 're 've 'm 'll 'd: case-sensitive, only where a match starts.
        if c == '\'' {
            let rest = &bytes[i + 1..];
            let n = match rest {
                [b's' | b't' | b'm' | b'd', ..] => 2,
                [b'r', b'e', ..] | [b'v', b'e', ..] | [b'l', b'l', ..] => 3,
                _ => 0,
            };
            if n > 0 {
                word(&text[i..i + n]);
                i += n;
                continue;
            }
        }
        let class = classes.of(c);
        // ` ?X+` for letters, numbers and the rest: an optional U+0020 joins the run after it.
        if c == ' '
            && let Some(next) = char_at(i + 1)
        {
            let next_class = classes.of(next);
            if next_class != Class::Space {
                let end = run(i + 1, next_class);
                word(&text[i..end]);
                i = end;
                continue;
            }
        }
        if class != Class::Space {
            let end = run(i, class);
            word(&text[i..end]);
            i = end;
            continue;
        }
        // `\s+(?!\S)|\s+`: a whitespace run up to the end of the text, or, when a non-space
        // follows, all of it but its last character (which then starts the next match, e.g.
        // as the space of " word"); a run of one before a non-space is matched by `\s+`.
        let end = run(i, Class::Space);
        if end == bytes.len() {
            word(&text[i..end]);
            i = end;
            continue;
        }
        let last = text[..end].chars().next_back().expect("a non-empty run").len_utf8();
        let cut = if end - last > i { end - last } else { end };
        word(&text[i..cut]);
        i = cut;
    }
}

/// The GPT-2 byte → character table (printable bytes map to themselves, the others to
/// U+0100 onwards), as the HF byte-level pre-tokenizer builds it.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(256 + n - 1).expect("below 512")
        };
    }
    table
}

/// A multiply-xorshift hash: words are short and trusted, so this beats SipHash several
/// times. The final mix matters: the table picks buckets by the low bits, which a bare
/// multiply leaves depending on the low input bits only.
#[derive(Default)]
struct WordHasher(u64);

const K: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for WordHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.write_u64(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let mut tail = [0u8; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.write_u64(u64::from_le_bytes(tail) ^ ((rest.len() as u64) << 59));
    }

    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(23) ^ v).wrapping_mul(K);
    }

    #[inline]
    fn write_u128(&mut self, v: u128) {
        self.write_u64(v as u64);
        self.write_u64((v >> 64) as u64);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        let h = self.0;
        (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (h >> 32)
    }
}

type Hashed = BuildHasherDefault<WordHasher>;

/// Word → token ids, per thread. Words of up to 15 bytes (nearly all) are keyed by their
/// bytes packed into a u128, so a lookup is one integer compare, not a `memcmp` call; ids
/// live in one arena. Cleared when it reaches its entry limit, so its memory is bounded
/// whatever the corpus.
pub struct WordCache {
    /// Direct-mapped front for the most frequent words: small enough to stay in L2, where
    /// the full table's random accesses miss it (Zipf: a few thousand words are most text).
    front: Box<[(u128, u32, u32)]>,
    short: HashMap<u128, (u32, u32), Hashed>,
    long: HashMap<Box<[u8]>, (u32, u32), Hashed>,
    ids: Vec<u32>,
    limit: usize,
    mapped: String,
}

/// The bytes of a word of at most 15 bytes and its length, as one integer.
#[inline]
fn short_key(w: &[u8]) -> Option<u128> {
    if w.len() > 15 {
        return None;
    }
    let mut b = [0u8; 16];
    b[..w.len()].copy_from_slice(w);
    b[15] = w.len() as u8;
    Some(u128::from_le_bytes(b))
}

const FRONT_BITS: u32 = 12;

#[inline]
fn front_slot(key: u128) -> usize {
    let h = ((key as u64) ^ ((key >> 64) as u64).wrapping_mul(K)).wrapping_mul(K);
    (h >> (64 - FRONT_BITS)) as usize
}

impl WordCache {
    pub fn new(limit: usize) -> WordCache {
        WordCache {
            // Key 0 is never a word (a short key holds the length, at least 1, in its top byte).
            front: vec![(0, 0, 0); 1 << FRONT_BITS].into_boxed_slice(),
            short: HashMap::default(),
            long: HashMap::default(),
            ids: Vec::new(),
            limit: limit.max(1),
            mapped: String::new(),
        }
    }

    #[inline]
    fn get(&mut self, w: &[u8]) -> Option<&[u32]> {
        let (start, len) = match short_key(w) {
            Some(k) => {
                let slot = front_slot(k);
                let (key, start, len) = self.front[slot];
                if key == k {
                    (start, len)
                } else {
                    let &(start, len) = self.short.get(&k)?;
                    self.front[slot] = (k, start, len);
                    (start, len)
                }
            }
            None => *self.long.get(w)?,
        };
        Some(&self.ids[start as usize..(start + len) as usize])
    }

    fn insert(&mut self, w: &[u8], ids: &[u32]) {
        if self.short.len() + self.long.len() >= self.limit || self.ids.len() + ids.len() > u32::MAX as usize {
            self.front.fill((0, 0, 0));
            self.short.clear();
            self.long.clear();
            self.ids.clear();
        }
        let at = (self.ids.len() as u32, ids.len() as u32);
        self.ids.extend_from_slice(ids);
        match short_key(w) {
            Some(k) => self.short.insert(k, at),
            None => self.long.insert(w.into(), at),
        };
    }
}

impl Default for WordCache {
    fn default() -> Self {
        // A million words: the frequent words of a language and a good part of its long tail
        // (names, numbers, typos), whose misses cost a BPE merge each; ~40 MB at most.
        WordCache::new(1 << 20)
    }
}

/// Why a tokenizer cannot take the fast path (it is then encoded by HF as a whole).
pub fn unsupported_reason(tokenizer: &Tokenizer) -> Option<String> {
    if tokenizer.get_normalizer().is_some() {
        return Some("it has a normalizer".into());
    }
    match tokenizer.get_pre_tokenizer() {
        Some(PreTokenizerWrapper::ByteLevel(b)) if b.use_regex => {}
        Some(PreTokenizerWrapper::ByteLevel(_)) => {
            return Some("its byte-level pre-tokenizer has use_regex off".into());
        }
        _ => return Some("its pre-tokenizer is not a lone ByteLevel".into()),
    }
    match tokenizer.get_model() {
        ModelWrapper::BPE(bpe) if bpe.dropout.is_none_or(|p| p == 0.0) => {}
        ModelWrapper::BPE(_) => return Some("its BPE uses dropout (not deterministic)".into()),
        _ => return Some("its model is not BPE".into()),
    }
    // Post-processors only add special tokens, which prepare never asks for, and offsets.
    None
}

/// The fast encoder for one tokenizer; shared by all encoding threads.
pub struct FastEncoder<'t> {
    tokenizer: &'t Tokenizer,
    bpe: &'t BPE,
    add_prefix_space: bool,
    /// Texts of added tokens; a document holding one goes to the HF encoder.
    added: Vec<String>,
    /// Whether an added token can reach past a line break (lstrip eats the newline before
    /// it), which would make cutting documents at line starts inexact.
    added_cross_lines: bool,
    classes: Classes,
    byte_chars: [char; 256],
}

impl<'t> FastEncoder<'t> {
    /// `None` when the tokenizer is not a plain byte-level BPE ([`unsupported_reason`]).
    pub fn new(tokenizer: &'t Tokenizer) -> Option<FastEncoder<'t>> {
        if unsupported_reason(tokenizer).is_some() {
            return None;
        }
        let (Some(PreTokenizerWrapper::ByteLevel(level)), ModelWrapper::BPE(bpe)) =
            (tokenizer.get_pre_tokenizer(), tokenizer.get_model())
        else {
            return None;
        };
        let tokens = tokenizer.get_added_tokens_decoder();
        let added: Vec<String> = tokens.values().map(|t| t.content.clone()).collect();
        let added_cross_lines = tokens.values().any(|t| t.lstrip || t.content.contains('\n'));
        Some(FastEncoder {
            tokenizer,
            bpe,
            add_prefix_space: level.add_prefix_space,
            added,
            added_cross_lines,
            classes: Classes::new(),
            byte_chars: byte_chars(),
        })
    }

    /// Whether encoding a document in pieces cut just before a line that starts with a
    /// non-space character gives the same ids as encoding it whole. The pattern always ends
    /// a match at such a point (no alternative runs from a line break into a non-space), so
    /// it holds unless a prefix space is added per piece or an added token spans lines.
    pub fn pieces_are_exact(&self) -> bool {
        !self.add_prefix_space && !self.added_cross_lines
    }

    /// Append the ids of `text` to `out` (no special tokens). Returns false when the HF
    /// encoder was used because the text holds an added token.
    pub fn encode(&self, text: &str, cache: &mut WordCache, out: &mut Vec<u32>) -> Result<bool, String> {
        if text.is_empty() {
            // HF adds no prefix space to an empty text either.
            return Ok(true);
        }
        if self.added.iter().any(|a| text.contains(a.as_str())) {
            let enc = self.tokenizer.encode(text, false).map_err(|e| e.to_string())?;
            out.extend_from_slice(enc.get_ids());
            return Ok(false);
        }
        let mut failure = None;
        let mut emit = |w: &str| {
            if failure.is_none()
                && let Err(e) = self.word(w, cache, out)
            {
                failure = Some(e);
            }
        };
        if self.add_prefix_space && !text.starts_with(' ') {
            let mut prefixed = String::with_capacity(text.len() + 1);
            prefixed.push(' ');
            prefixed.push_str(text);
            split_words(&self.classes, &prefixed, &mut emit);
        } else {
            split_words(&self.classes, text, &mut emit);
        }
        failure.map_or(Ok(true), Err)
    }

    #[inline]
    fn word(&self, w: &str, cache: &mut WordCache, out: &mut Vec<u32>) -> Result<(), String> {
        if let Some(ids) = cache.get(w.as_bytes()) {
            // Most words are one or two ids: a plain loop beats a memcpy call.
            for &id in ids {
                out.push(id);
            }
            return Ok(());
        }
        cache.mapped.clear();
        cache.mapped.extend(w.bytes().map(|b| self.byte_chars[b as usize]));
        let tokens = self.bpe.tokenize(&cache.mapped).map_err(|e| e.to_string())?;
        let start = out.len();
        out.extend(tokens.iter().map(|t| t.id));
        cache.insert(w.as_bytes(), &out[start..]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<&str> {
        let classes = Classes::new();
        let mut out = Vec::new();
        split_words(&classes, text, |w| out.push(w));
        out
    }

    #[test]
    fn scanner_matches_the_gpt2_pattern_on_known_cases() {
        assert_eq!(words("Hello world"), ["Hello", " world"]);
        assert_eq!(
            words("I'm here, they'll see"),
            ["I", "'m", " here", ",", " they", "'ll", " see"]
        );
        assert_eq!(words("a   b"), ["a", "  ", " b"]);
        assert_eq!(words("a\n\nb"), ["a", "\n", "\n", "b"]);
        assert_eq!(words("x  \n"), ["x", "  \n"]);
        assert_eq!(words(" 'S !'s 42x"), [" '", "S", " !'", "s", " 42", "x"]);
        assert_eq!(words("\t hi"), ["\t", " hi"]);
        assert_eq!(words(" "), [" "]);
        assert_eq!(words("日本語 ✓✓ ½"), ["日本語", " ✓✓", " ½"]);
    }

    #[test]
    fn byte_table_is_a_bijection_onto_the_gpt2_alphabet() {
        let t = byte_chars();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        let hf: std::collections::HashSet<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .collect();
        assert_eq!(set, hf);
    }
}
