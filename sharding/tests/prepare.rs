//! `gantry data prepare`: text → tokenizer → shards → tokens → the same text.

use gantry_sharding::indexed::IndexedDataset;
use gantry_sharding::manifest::{Manifest, TokenizerInfo};
use gantry_sharding::prepare::{PrepareConfig, PrepareError, SplitBy, TokenizerSource, decode_with, prepare};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gantry-prepare-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every document of a dataset directory, decoded with its tokenizer.json, with the EOD
/// token checked and removed.
fn decode_all(dir: &Path) -> Vec<String> {
    let manifest = Manifest::read(dir).unwrap();
    manifest.verify(dir).unwrap();
    let TokenizerInfo::File { path } = &manifest.tokenizer else {
        panic!("expected a tokenizer file, got {:?}", manifest.tokenizer)
    };
    let tokenizer = Tokenizer::from_file(dir.join(path)).unwrap();
    let eod = tokenizer.token_to_id("<|endoftext|>").unwrap() as i64;
    let mut docs = Vec::new();
    for shard in &manifest.shards {
        let ds = IndexedDataset::open(&dir.join(&shard.prefix)).unwrap();
        for d in 0..ds.num_documents() {
            let mut ids = Vec::new();
            for seq in ds.document(d) {
                ds.sequence(seq).extend_i64(&mut ids);
            }
            assert_eq!(ids.pop(), Some(eod), "document {d} of {} ends with EOD", shard.prefix);
            assert!(!ids.contains(&eod), "EOD only at the end");
            let ids: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
            docs.push(tokenizer.decode(&ids, false).unwrap());
        }
    }
    assert_eq!(docs.len() as u64, manifest.documents);
    docs
}

#[test]
fn text_and_jsonl_round_trip_through_a_trained_bpe() {
    let root = temp("roundtrip");
    let input = root.join("corpus");
    std::fs::create_dir_all(input.join("sub")).unwrap();
    // Sorted order: a.txt, b.jsonl, sub/c.txt. Non-ASCII, tabs, CRLF and odd spacing on purpose.
    let a = "The quick brown fox jumps over the lazy dog.\n  Indented line\twith a tab.\r\nÜnïcödé — ✓ 日本語 🦀\n";
    let b_docs = ["first record", "second\nrecord with \"quotes\"", "  spaces  "];
    let c = "Another file without a trailing newline";
    std::fs::write(input.join("a.txt"), a).unwrap();
    let jsonl: String = b_docs
        .iter()
        .map(|t| format!("{}\n", serde_json::json!({"text": t, "id": 1})))
        .collect();
    std::fs::write(input.join("b.jsonl"), format!("{jsonl}\n")).unwrap();
    std::fs::write(input.join("sub/c.txt"), c).unwrap();
    std::fs::write(input.join("README.md"), "ignored").unwrap();

    let out = root.join("out");
    let mut cfg = PrepareConfig::new(vec![input], out.clone(), TokenizerSource::TrainBpe { vocab_size: 300 });
    cfg.shard_tokens = 40; // several shards; documents never split
    let report = prepare(&cfg).unwrap();
    let expected: Vec<&str> = [a].into_iter().chain(b_docs).chain([c]).collect();
    assert_eq!(report.documents, expected.len() as u64);
    assert_eq!(report.files, 3);
    assert!(report.shards > 1, "{report:?}");
    assert_eq!(decode_all(&out), expected);
    let manifest = Manifest::read(&out).unwrap();
    assert_eq!(manifest.tokens, report.tokens);
    let first = IndexedDataset::open(&out.join(&manifest.shards[0].prefix)).unwrap();
    let mut ids = Vec::new();
    first.sequence(0).extend_i64(&mut ids);
    let ids: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
    assert_eq!(
        decode_with(&out.join("tokenizer.json"), &ids).unwrap(),
        format!("{a}<|endoftext|>")
    );
    assert!(manifest.vocab_size <= 300);

    // Loading the saved tokenizer.json gives the same tokens.
    let out2 = root.join("out2");
    let mut cfg2 = cfg.clone();
    cfg2.output = out2.clone();
    cfg2.tokenizer = TokenizerSource::File(out.join("tokenizer.json"));
    let report2 = prepare(&cfg2).unwrap();
    assert!(!report2.trained_tokenizer);
    let m2 = Manifest::read(&out2).unwrap();
    assert_eq!(m2.shards, manifest.shards, "same tokens, same checksums");

    // Line splitting.
    let out3 = root.join("out3");
    let mut cfg3 = cfg2.clone();
    cfg3.output = out3.clone();
    cfg3.inputs = vec![root.join("corpus/a.txt")];
    cfg3.split_by = SplitBy::Line;
    prepare(&cfg3).unwrap();
    assert_eq!(
        decode_all(&out3),
        [
            "The quick brown fox jumps over the lazy dog.",
            "  Indented line\twith a tab.",
            "Ünïcödé — ✓ 日本語 🦀"
        ]
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn tinyshakespeare_blank_line_blocks_round_trip() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/tinyshakespeare.txt");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("skipping: {} is absent", path.display());
        return;
    };
    // Independent reference: blocks of non-blank lines.
    let mut blocks: Vec<String> = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    for line in text.split('\n') {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                blocks.push(cur.join("\n"));
                cur.clear();
            }
        } else {
            cur.push(line);
        }
    }
    if !cur.is_empty() {
        blocks.push(cur.join("\n"));
    }
    let root = temp("shakespeare");
    let out = root.join("out");
    let mut cfg = PrepareConfig::new(vec![path], out.clone(), TokenizerSource::TrainBpe { vocab_size: 1000 });
    cfg.split_by = SplitBy::BlankLine;
    cfg.shard_tokens = 100_000;
    let report = prepare(&cfg).unwrap();
    eprintln!(
        "tinyshakespeare: {} documents, {} tokens, {} bytes, train {:.2}s, total {:.2}s, {:.2} MB/s overall, {:.2} MB/s encoding",
        report.documents,
        report.tokens,
        report.bytes,
        report.train_seconds,
        report.seconds,
        report.mb_per_s,
        report.encode_mb_per_s
    );
    assert_eq!(report.documents, blocks.len() as u64);
    assert_eq!(report.bytes, text.len() as u64);
    assert!(report.shards > 1);
    let decoded = decode_all(&out);
    assert_eq!(decoded.len(), blocks.len());
    for (i, (got, want)) in decoded.iter().zip(&blocks).enumerate() {
        assert_eq!(got, want, "block {i}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_bad_jsonl_line_names_the_file_and_line() {
    let root = temp("badjson");
    let file = root.join("data.jsonl");
    std::fs::write(&file, "{\"text\": \"ok\"}\n{\"body\": \"no text field\"}\n").unwrap();
    let out = root.join("out");
    let cfg = PrepareConfig::new(
        vec![file.clone()],
        out.clone(),
        TokenizerSource::TrainBpe { vocab_size: 300 },
    );
    let err = prepare(&cfg).unwrap_err();
    assert!(matches!(err, PrepareError::MissingField { line: 2, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("data.jsonl") && msg.contains("line 2"), "{msg}");

    std::fs::write(&file, "{\"text\": \"ok\"}\n\n{\"text\": \"fine\"}\nnot json\n").unwrap();
    let err = prepare(&cfg).unwrap_err();
    assert!(matches!(err, PrepareError::Json { line: 4, .. }), "{err:?}");
    assert!(err.to_string().contains("data.jsonl"), "{err}");
    assert!(!out.exists(), "nothing left behind");
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        1,
        "no temporary directory left"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_loaded_tokenizer_without_the_eod_token_is_refused() {
    let root = temp("noeod");
    let text = root.join("a.txt");
    std::fs::write(&text, "hello world, hello tokens\n").unwrap();
    // A tokenizer with a different special token.
    let trained = root.join("trained");
    let mut cfg = PrepareConfig::new(
        vec![text.clone()],
        trained.clone(),
        TokenizerSource::TrainBpe { vocab_size: 280 },
    );
    cfg.eod_token = Some("</s>".into());
    prepare(&cfg).unwrap();
    let tok = trained.join("tokenizer.json");

    let out = root.join("out");
    let cfg = PrepareConfig::new(vec![text.clone()], out.clone(), TokenizerSource::File(tok.clone()));
    let err = prepare(&cfg).unwrap_err();
    assert!(matches!(err, PrepareError::MissingEod { .. }), "{err:?}");
    assert!(err.to_string().contains(&tok.display().to_string()), "{err}");
    assert!(!out.exists());

    // Naming the token it has works.
    let mut cfg = cfg;
    cfg.eod_token = Some("</s>".into());
    let report = prepare(&cfg).unwrap();
    assert_eq!(report.eod_token, "</s>");
    assert_eq!(report.documents, 1);

    // A file that is not a tokenizer is an error naming it.
    let cfg = PrepareConfig::new(
        vec![text],
        root.join("out-bad"),
        TokenizerSource::File(root.join("a.txt")),
    );
    let err = prepare(&cfg).unwrap_err();
    assert!(matches!(err, PrepareError::Tokenizer { .. }), "{err:?}");
    assert!(err.to_string().contains("a.txt"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn an_existing_output_directory_is_left_alone() {
    let root = temp("exists");
    let text = root.join("a.txt");
    std::fs::write(&text, "some text\n").unwrap();
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let cfg = PrepareConfig::new(vec![text], out.clone(), TokenizerSource::TrainBpe { vocab_size: 300 });
    let err = prepare(&cfg).unwrap_err();
    assert!(matches!(err, PrepareError::OutputExists { .. }), "{err:?}");
    assert!(
        err.to_string().contains("already exists") && err.to_string().contains("out"),
        "{err}"
    );
    let entries: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["keep.txt"]);
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "precious");
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        2,
        "no temporary directory left"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn unsupported_and_missing_inputs_are_errors() {
    let root = temp("inputs");
    std::fs::write(root.join("a.csv"), "x").unwrap();
    let cfg = PrepareConfig::new(
        vec![root.join("a.csv")],
        root.join("out"),
        TokenizerSource::TrainBpe { vocab_size: 300 },
    );
    let err = prepare(&cfg).unwrap_err();
    assert!(
        matches!(err, PrepareError::Unsupported { .. }) && err.to_string().contains("a.csv"),
        "{err}"
    );
    let cfg = PrepareConfig::new(
        vec![root.join("nope.txt")],
        root.join("out"),
        TokenizerSource::TrainBpe { vocab_size: 300 },
    );
    let err = prepare(&cfg).unwrap_err();
    assert!(err.to_string().contains("nope.txt"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}
