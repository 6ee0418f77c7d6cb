//! The fast byte-level BPE path gives exactly the HF encoder's ids; documents cut into pieces
//! give exactly the shards of whole documents; standard input and zstd output from prepare.

use gantry_sharding::frames::ZstdOptions;
use gantry_sharding::manifest::Manifest;
use gantry_sharding::prepare::fast::{FastEncoder, WordCache, unsupported_reason};
use gantry_sharding::prepare::{PrepareConfig, SplitBy, TokenizerSource, prepare};
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tokenizers::Tokenizer;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gantry-fastbpe-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn shakespeare() -> Option<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/tinyshakespeare.txt");
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(_) => {
            eprintln!("skipping: {} is absent", path.display());
            None
        }
    }
}

/// Mixed scripts, digits, odd whitespace, contractions and a literal special token, so the
/// trained merges cover non-ASCII words too.
const CORPUS: &str = "It's the 2nd time they'll say 'I'd rather not' — we've 12,345 reasons.\n\
  Ünïcödé straße, naïve café; 日本語のテキスト 123 ٣٤٥ ½ ⅔\n\
  \t\ttabs\u{a0}nbsp\u{2028}line-sep  double  spaces   \r\n\
  emoji 🦀🦀 <|endoftext|> mid-text, and the END.\n\n\n";

/// A byte-level BPE (vocabulary 600) trained by prepare on CORPUS.
fn trained() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let root = temp("trained");
        std::fs::write(root.join("c.txt"), CORPUS.repeat(20)).unwrap();
        let out = root.join("out");
        let cfg = PrepareConfig::new(
            vec![root.join("c.txt")],
            out.clone(),
            TokenizerSource::TrainBpe { vocab_size: 600 },
        );
        prepare(&cfg).unwrap();
        out.join("tokenizer.json")
    })
}

fn hf_ids(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
    tokenizer.encode(text, false).unwrap().get_ids().to_vec()
}

fn fast_ids(fast: &FastEncoder, cache: &mut WordCache, text: &str) -> Vec<u32> {
    let mut out = Vec::new();
    fast.encode(text, cache, &mut out).unwrap();
    out
}

/// The same tokenizer with `add_prefix_space` on (as some GPT-2 style tokenizer.json files have).
fn with_prefix_space(tokenizer: &Tokenizer) -> Tokenizer {
    let mut t = tokenizer.clone();
    t.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(true, true, true))));
    t
}

#[test]
fn fast_path_matches_hf_on_tinyshakespeare() {
    let Some(text) = shakespeare() else { return };
    // A tokenizer trained on tinyshakespeare itself, so most words are whole tokens.
    let root = temp("shakespeare");
    let input = root.join("s.txt");
    std::fs::write(&input, &text).unwrap();
    let mut cfg = PrepareConfig::new(
        vec![input],
        root.join("out"),
        TokenizerSource::TrainBpe { vocab_size: 2000 },
    );
    cfg.split_by = SplitBy::BlankLine;
    prepare(&cfg).unwrap();
    let tokenizer = Tokenizer::from_file(root.join("out/tokenizer.json")).unwrap();
    for tokenizer in [tokenizer.clone(), with_prefix_space(&tokenizer)] {
        let fast = FastEncoder::new(&tokenizer).expect("a byte-level BPE");
        let mut cache = WordCache::new(1000); // small: evictions happen
        assert_eq!(
            fast_ids(&fast, &mut cache, &text),
            hf_ids(&tokenizer, &text),
            "whole file"
        );
        for (i, block) in text.split("\n\n").enumerate() {
            assert_eq!(
                fast_ids(&fast, &mut cache, block),
                hf_ids(&tokenizer, block),
                "block {i}"
            );
        }
        for (i, line) in text.lines().enumerate().step_by(5) {
            assert_eq!(fast_ids(&fast, &mut cache, line), hf_ids(&tokenizer, line), "line {i}");
        }
    }
    // And through prepare: fast and plain HF write identical shards.
    let out_fast = root.join("fast");
    let mut cfg2 = cfg.clone();
    cfg2.tokenizer = TokenizerSource::File(root.join("out/tokenizer.json"));
    cfg2.output = out_fast.clone();
    let r_fast = prepare(&cfg2).unwrap();
    assert!(r_fast.fast_path, "{r_fast:?}");
    let mut cfg3 = cfg2.clone();
    cfg3.output = root.join("hf");
    cfg3.fast = false;
    let r_hf = prepare(&cfg3).unwrap();
    assert!(!r_hf.fast_path);
    assert_eq!(
        Manifest::read(&out_fast).unwrap().shards,
        Manifest::read(&root.join("hf")).unwrap().shards
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn fast_path_matches_hf_on_edge_cases() {
    let tokenizer = Tokenizer::from_file(trained()).unwrap();
    assert_eq!(unsupported_reason(&tokenizer), None);
    let cases = [
        "",
        " ",
        "   ",
        "\n",
        "a",
        " a",
        "a ",
        "a  b",
        "a   b",
        "a \n b",
        "a\n\n\nb",
        "\t\t x",
        "x\u{a0}\u{a0}y",
        "x \u{a0}y",
        "'s's 's'S''ll'LL 've're'd'm't",
        " 'x",
        "!!!'s",
        "12345abc٣٤٥½",
        "<|endoftext|>",
        "a<|endoftext|>b",
        " <|endoftext|> ",
        "<|endoftext|",
        "🦀 🦀🦀  🦀",
        "trailing spaces   ",
        "\r\n\r\n",
        "\u{2028}\u{2029}\u{85}\u{3000}x",
        "\u{200b}zero\u{200b}width",
        "combining e\u{301} and \u{301}",
    ];
    for tokenizer in [tokenizer.clone(), with_prefix_space(&tokenizer)] {
        let fast = FastEncoder::new(&tokenizer).unwrap();
        let mut cache = WordCache::default();
        for case in cases {
            assert_eq!(fast_ids(&fast, &mut cache, case), hf_ids(&tokenizer, case), "{case:?}");
        }
        // Long runs (the HF regex engine backtracks over them).
        for case in [" ".repeat(5000) + "x", "a".repeat(5000), "\n".repeat(3000) + " y"] {
            assert_eq!(fast_ids(&fast, &mut cache, &case), hf_ids(&tokenizer, &case));
        }
    }
}

#[test]
fn other_tokenizers_are_left_to_hf() {
    let mut t = Tokenizer::from_file(trained()).unwrap();
    t.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false))));
    assert!(unsupported_reason(&t).unwrap().contains("use_regex"));
    assert!(FastEncoder::new(&t).is_none());
    t.with_pre_tokenizer(None::<PreTokenizerWrapper>);
    assert!(unsupported_reason(&t).unwrap().contains("pre-tokenizer"));
}

/// Characters from every class the pattern distinguishes.
fn text_strategy() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "a",
        "Z",
        "é",
        "ß",
        "日",
        "本",
        "ж",
        "7",
        "0",
        "٣",
        "½",
        "Ⅻ",
        " ",
        " ",
        "  ",
        "\n",
        "\r\n",
        "\t",
        "\u{a0}",
        "\u{2028}",
        "\u{3000}",
        "'",
        "'s",
        "'t",
        "'re",
        "'ve",
        "'m",
        "'ll",
        "'d",
        "'S",
        ".",
        ",",
        "!",
        "—",
        "🦀",
        "$",
        "\u{301}",
        "\u{200b}",
        "<|endoftext|>",
        "<|",
        "the",
        " the",
        "It",
        "they",
        "12",
    ]);
    prop::collection::vec(pieces, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn fast_path_matches_hf_on_random_text(text in text_strategy(), prefix in any::<bool>()) {
        let mut tokenizer = Tokenizer::from_file(trained()).unwrap();
        if prefix {
            tokenizer = with_prefix_space(&tokenizer);
        }
        let fast = FastEncoder::new(&tokenizer).unwrap();
        let mut cache = WordCache::new(8);
        prop_assert_eq!(fast_ids(&fast, &mut cache, &text), hf_ids(&tokenizer, &text), "{:?}", text);
    }
}

/// A text whose documents are much longer than a tiny piece size.
fn long_documents() -> String {
    let mut text = String::new();
    for block in 0..6 {
        for line in 0..40 {
            // Some lines start with spaces or tabs: no cut may fall before them.
            let lead = ["", "  ", "\t", ""][line % 4];
            text.push_str(&format!(
                "{lead}Block {block} line {line}: it's naïve — 日本 {}.\n",
                line * 37
            ));
        }
        text.push('\n');
    }
    text
}

#[test]
fn documents_in_pieces_give_the_same_shards() {
    let root = temp("pieces");
    let input = root.join("long.txt");
    std::fs::write(&input, long_documents()).unwrap();
    for split_by in [SplitBy::File, SplitBy::BlankLine] {
        let run = |name: &str, piece_bytes: usize, tokenizer: TokenizerSource| {
            let out = root.join(format!("{name}-{split_by:?}"));
            let mut cfg = PrepareConfig::new(vec![input.clone()], out.clone(), tokenizer);
            cfg.split_by = split_by;
            cfg.piece_bytes = piece_bytes;
            cfg.shard_tokens = 500;
            cfg.batch_docs = 3; // pieces of one document span batches
            let report = prepare(&cfg).unwrap();
            (Manifest::read(&out).unwrap(), report)
        };
        // Training sees the same words either way, so the trained tokenizers agree too.
        let (whole, rw) = run("whole", 0, TokenizerSource::TrainBpe { vocab_size: 400 });
        let (cut, rc) = run("cut", 100, TokenizerSource::TrainBpe { vocab_size: 400 });
        assert_eq!(whole.shards, cut.shards, "{split_by:?}");
        assert_eq!(rw.documents, rc.documents);
        let tok = TokenizerSource::File(root.join(format!("whole-{split_by:?}/tokenizer.json")));
        let (loaded, _) = run("loaded", 64, tok);
        assert_eq!(whole.shards, loaded.shards, "{split_by:?}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn prepare_writes_zstd_frames_that_verify() {
    let root = temp("zstd");
    let input = root.join("t.txt");
    std::fs::write(&input, long_documents()).unwrap();
    let out = root.join("out");
    let mut cfg = PrepareConfig::new(vec![input], out.clone(), TokenizerSource::TrainBpe { vocab_size: 400 });
    cfg.split_by = SplitBy::BlankLine;
    cfg.compress = Some(ZstdOptions {
        level: 5,
        frame_bytes: 1024,
    });
    let report = prepare(&cfg).unwrap();
    let m = Manifest::read(&out).unwrap();
    let z = m.shards[0].zstd.as_ref().unwrap();
    assert_eq!((z.level, z.frame_bytes), (5, 1024));
    assert_eq!(report.zstd_bytes, Some(z.bytes));
    assert!(z.frames > 1);
    m.verify(&out).unwrap();
    cfg.output = root.join("bad");
    cfg.compress = Some(ZstdOptions {
        level: 3,
        frame_bytes: 1001,
    });
    assert!(prepare(&cfg).unwrap_err().to_string().contains("multiple of 8"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn training_from_stdin_is_refused() {
    let root = temp("stdin");
    let cfg = PrepareConfig::new(
        vec![PathBuf::from("-")],
        root.join("out"),
        TokenizerSource::TrainBpe { vocab_size: 300 },
    );
    let err = prepare(&cfg).unwrap_err().to_string();
    assert!(err.contains("standard input"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}
