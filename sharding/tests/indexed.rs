//! The indexed dataset format against the spec in ../shared/ARCHITECTURE.md, round trips, and
//! corrupt inputs (each a named error, never a panic).

use gantry_sharding::indexed::{IndexedDataset, IndexedError, IndexedIndex, IndexedWriter, TokenDType, paths};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "gantry-sharding-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Three documents: [1 2 3], [4 5] + [6] (two sequences), [70000-ish or small].
fn write_sample(prefix: &Path, dtype: TokenDType, big: u32) {
    let mut w = IndexedWriter::create(prefix, dtype).unwrap();
    w.add_document(&[1, 2, 3]).unwrap();
    w.add_sequence(&[4, 5]).unwrap();
    w.add_sequence(&[6]).unwrap();
    w.end_document();
    w.add_document(&[big, 0]).unwrap();
    let summary = w.finish().unwrap();
    assert_eq!((summary.sequences, summary.documents, summary.tokens), (4, 3, 8));
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn idx_header_and_arrays_field_by_field() {
    let dir = TempDir::new("header");
    let prefix = dir.0.join("data");
    write_sample(&prefix, TokenDType::U16, 65_000);
    let (bin_path, idx_path) = paths(&prefix);
    let idx = std::fs::read(&idx_path).unwrap();
    assert_eq!(&idx[0..9], b"MMIDIDX\0\0", "magic");
    assert_eq!(u64_at(&idx, 9), 1, "version");
    assert_eq!(idx[17], 8, "dtype code 8 = u16");
    assert_eq!(u64_at(&idx, 18), 4, "sequence count");
    assert_eq!(u64_at(&idx, 26), 4, "document index count = documents + 1");
    let lengths: Vec<i32> = (0..4)
        .map(|i| i32::from_le_bytes(idx[34 + 4 * i..38 + 4 * i].try_into().unwrap()))
        .collect();
    assert_eq!(lengths, [3, 2, 1, 2], "i32 lengths");
    let pointers: Vec<u64> = (0..4).map(|i| u64_at(&idx, 50 + 8 * i)).collect();
    assert_eq!(pointers, [0, 6, 10, 12], "i64 byte pointers (2 bytes per u16 token)");
    let docs: Vec<u64> = (0..4).map(|i| u64_at(&idx, 82 + 8 * i)).collect();
    assert_eq!(docs, [0, 1, 3, 4], "i64 document indices");
    assert_eq!(idx.len(), 82 + 32);
    let bin = std::fs::read(&bin_path).unwrap();
    let tokens: Vec<u16> = bin.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    assert_eq!(tokens, [1, 2, 3, 4, 5, 6, 65_000, 0]);
}

#[test]
fn round_trip_every_token_type() {
    for (dtype, big) in [
        (TokenDType::U8, 255),
        (TokenDType::I8, 127),
        (TokenDType::I16, 32_767),
        (TokenDType::U16, 65_535),
        (TokenDType::I32, 2_000_000_000),
        (TokenDType::I64, u32::MAX),
    ] {
        let dir = TempDir::new("round-trip");
        let prefix = dir.0.join("d");
        write_sample(&prefix, dtype, big);
        let ds = IndexedDataset::open(&prefix).unwrap();
        assert_eq!(ds.dtype(), dtype);
        assert_eq!((ds.num_sequences(), ds.num_documents(), ds.num_tokens()), (4, 3, 8));
        assert_eq!(ds.document(1), 1..3);
        assert_eq!(ds.document_lengths(), [3, 3, 2]);
        let mut all = Vec::new();
        for s in 0..4 {
            ds.sequence(s).extend_i64(&mut all);
        }
        assert_eq!(all, [1, 2, 3, 4, 5, 6, i64::from(big), 0], "{dtype:?}");
        assert_eq!(ds.tokens(0, 1, 2).get(1), Some(3));
    }
}

#[test]
fn token_that_does_not_fit_is_refused() {
    let dir = TempDir::new("range");
    let mut w = IndexedWriter::create(&dir.0.join("d"), TokenDType::U16).unwrap();
    let err = w.add_sequence(&[5, 70_000]).unwrap_err();
    assert!(
        matches!(err, IndexedError::TokenOutOfRange { token: 70_000, .. }),
        "{err}"
    );
}

/// A real text as byte tokens: text → shards → tokens → the same text.
#[test]
fn tinyshakespeare_round_trips_as_bytes() {
    let text_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/tinyshakespeare.txt");
    let Ok(text) = std::fs::read(&text_path) else {
        eprintln!("skipping: {} is not there", text_path.display());
        return;
    };
    let dir = TempDir::new("shakespeare");
    let prefix = dir.0.join("shakespeare");
    let mut w = IndexedWriter::create(&prefix, TokenDType::U8).unwrap();
    // A document per 40 lines.
    let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    let docs: Vec<Vec<u8>> = lines.chunks(40).map(|c| c.join(&b'\n')).collect();
    for doc in &docs {
        w.add_document(&doc.iter().map(|&b| u32::from(b)).collect::<Vec<_>>())
            .unwrap();
    }
    w.finish().unwrap();
    let ds = IndexedDataset::open(&prefix).unwrap();
    assert_eq!(ds.num_documents(), docs.len());
    for (d, doc) in docs.iter().enumerate() {
        let seq = ds.document(d).start;
        match ds.sequence(seq) {
            gantry_sharding::indexed::Tokens::U8(bytes) => assert_eq!(bytes, doc.as_slice()),
            other => panic!("unexpected token type {other:?}"),
        }
    }
}

/// Edits the `.idx` and `.bin` bytes of a valid dataset.
type Edit = Box<dyn FnOnce(&mut Vec<u8>, &mut Vec<u8>)>;

fn corrupt(name: &str, edit: impl FnOnce(&mut Vec<u8>, &mut Vec<u8>)) -> (IndexedError, TempDir) {
    let dir = TempDir::new(name);
    let prefix = dir.0.join("d");
    write_sample(&prefix, TokenDType::U16, 9);
    let (bin_path, idx_path) = paths(&prefix);
    let mut idx = std::fs::read(&idx_path).unwrap();
    let mut bin = std::fs::read(&bin_path).unwrap();
    edit(&mut idx, &mut bin);
    std::fs::write(&idx_path, &idx).unwrap();
    std::fs::write(&bin_path, &bin).unwrap();
    let err = IndexedDataset::open(&prefix)
        .err()
        .expect("corrupt dataset must not open");
    (err, dir)
}

#[test]
fn corrupt_inputs_are_named_errors() {
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("magic", Box::new(|i, _| i[0] = b'X'), "not an indexed dataset index"),
        ("version", Box::new(|i, _| i[9] = 2), "format version 2 at offset 9"),
        ("dtype", Box::new(|i, _| i[17] = 7), "token dtype code 7 at offset 17"),
        (
            "truncated-header",
            Box::new(|i, _| i.truncate(20)),
            "too short for the header",
        ),
        (
            "truncated-arrays",
            Box::new(|i, _| i.truncate(i.len() - 3)),
            "should be 114 bytes, but it is 111",
        ),
        (
            "huge-count",
            Box::new(|i, _| i[25] = 0x7f),
            "sequences and 4 document entries",
        ),
        (
            "negative-length",
            Box::new(|i, _| i[37] = 0x80),
            "sequence 0 at offset 34: negative length",
        ),
        (
            "pointer",
            Box::new(|i, _| i[58] = 9),
            "sequence 1 at offset 58: starts at byte 9",
        ),
        (
            "bin-short",
            Box::new(|_, b| b.truncate(b.len() - 2)),
            "holds 14 bytes but the index describes 16",
        ),
        (
            "doc-first",
            Box::new(|i, _| i[82] = 1),
            "document index 0 at offset 82: the first entry must be 0",
        ),
        ("doc-order", Box::new(|i, _| i[90] = 9), "document index 1 at offset 90"),
        (
            "doc-last",
            Box::new(|i, _| i[106] = 3),
            "the last entry must be the sequence count 4",
        ),
    ];
    for (name, edit, expect) in cases {
        let (err, dir) = corrupt(name, edit);
        let msg = err.to_string();
        assert!(msg.contains(expect), "{name}: `{msg}` should contain `{expect}`");
        assert!(
            msg.contains(&dir.0.display().to_string()),
            "{name}: `{msg}` should name the file"
        );
    }
}

#[test]
fn empty_dataset_is_an_error() {
    let dir = TempDir::new("empty");
    let prefix = dir.0.join("d");
    IndexedWriter::create(&prefix, TokenDType::U16)
        .unwrap()
        .finish()
        .unwrap();
    let err = IndexedDataset::open(&prefix).err().unwrap().to_string();
    assert!(err.contains("the dataset is empty"), "{err}");
    let err = IndexedDataset::open(&dir.0.join("missing")).err().unwrap().to_string();
    assert!(err.contains("missing.idx"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Fuzz: random byte edits and truncations of a valid index and data file. Opening either
    /// fails with an error or yields a dataset all of whose sequences can be read in bounds.
    #[test]
    fn mutated_files_never_panic(
        edits in prop::collection::vec((0usize..200, any::<u8>()), 1..6),
        idx_cut in prop::option::of(0usize..200),
        bin_cut in prop::option::of(0usize..40),
        target_bin in any::<bool>(),
    ) {
        let dir = TempDir::new("fuzz");
        let prefix = dir.0.join("d");
        write_sample(&prefix, TokenDType::U16, 7);
        let (bin_path, idx_path) = paths(&prefix);
        let mut idx = std::fs::read(&idx_path).unwrap();
        let mut bin = std::fs::read(&bin_path).unwrap();
        let target = if target_bin { &mut bin } else { &mut idx };
        for (at, value) in edits {
            if !target.is_empty() {
                let i = at % target.len();
                target[i] = value;
            }
        }
        if let Some(c) = idx_cut { idx.truncate(c.min(idx.len())); }
        if let Some(c) = bin_cut { bin.truncate(c.min(bin.len())); }
        std::fs::write(&idx_path, &idx).unwrap();
        std::fs::write(&bin_path, &bin).unwrap();
        if let Ok(ds) = IndexedDataset::open(&prefix) {
            let mut sink = Vec::new();
            for s in 0..ds.num_sequences() {
                ds.sequence(s).extend_i64(&mut sink);
            }
            for d in 0..ds.num_documents() {
                let _ = ds.document(d);
            }
            prop_assert_eq!(sink.len() as u64, ds.num_tokens());
        }
    }
}

/// A streamed dataset keeps its `.idx` files back to back in one file: an index read from
/// its place in one shared mapping is the file's, and a place that is not an `.idx` (past the
/// end, or off by a byte) is a named error, never a panic.
#[test]
fn an_index_from_a_piece_of_a_shared_mapping_is_the_files() {
    let dir = TempDir::new("shared");
    let (a, b) = (dir.0.join("a"), dir.0.join("b"));
    write_sample(&a, TokenDType::U16, 60_000);
    write_sample(&b, TokenDType::U16, 7);
    let (bin_a, idx_a) = paths(&a);
    let (bin_b, idx_b) = paths(&b);
    let (ia, ib) = (std::fs::read(&idx_a).unwrap(), std::fs::read(&idx_b).unwrap());
    let packed = dir.0.join("pack");
    std::fs::write(&packed, [vec![0xee; 5], ia.clone(), ib.clone()].concat()).unwrap();
    // SAFETY: read-only, and nothing else writes the file.
    let map = std::sync::Arc::new(unsafe { memmap2::Mmap::map(&std::fs::File::open(&packed).unwrap()) }.unwrap());
    let bin_len = std::fs::metadata(&bin_b).unwrap().len();
    let at_b = 5 + ia.len()..5 + ia.len() + ib.len();
    let index = IndexedIndex::from_shared(map.clone(), at_b.clone(), &idx_b, &bin_b, bin_len).unwrap();
    let ds = IndexedDataset::with_index(index, &bin_b).unwrap();
    let mut all = Vec::new();
    for s in 0..ds.num_sequences() {
        ds.sequence(s).extend_i64(&mut all);
    }
    assert_eq!(all, [1, 2, 3, 4, 5, 6, 7, 0]);
    assert_eq!(ds.document_lengths(), [3, 3, 2]);
    // Shard a's piece is a's.
    let a_len = std::fs::metadata(&bin_a).unwrap().len();
    let index = IndexedIndex::from_shared(map.clone(), 5..5 + ia.len(), &idx_a, &bin_a, a_len).unwrap();
    let ds = IndexedDataset::with_index(index, &bin_a).unwrap();
    assert_eq!(ds.sequence(3).get(0), Some(60_000));
    // Past the end of the mapping, and a byte early.
    let end = map.len();
    let past = IndexedIndex::from_shared(map.clone(), end - 10..end + 1, &idx_b, &bin_b, bin_len);
    assert!(matches!(past, Err(IndexedError::Truncated { .. })));
    let early = at_b.start - 1..at_b.end - 1;
    let early = IndexedIndex::from_shared(map, early, &idx_b, &bin_b, bin_len);
    assert!(matches!(early, Err(IndexedError::BadMagic { .. })));
}
