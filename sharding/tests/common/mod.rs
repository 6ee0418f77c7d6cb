//! Helpers shared by the sharding integration tests.

use gantry_sharding::gpt::TokenDataset;
use gantry_sharding::sampler::Span;

/// Every token of the dataset in stream order, document after document.
pub fn stream(data: &TokenDataset) -> Vec<i64> {
    let mut out = Vec::new();
    for (doc, len) in data.document_lengths().unwrap().into_iter().enumerate() {
        data.read_span(
            Span {
                doc: doc as u32,
                offset: 0,
                len,
            },
            &mut out,
        )
        .unwrap();
    }
    out
}
