//! A manifest is data, not trusted to be sane: whatever offsets, lengths, sizes, shapes and
//! object names it holds, `open`, `verify` and `load` return a result (usually a typed error
//! naming the manifest) and never panic. And one garbled step does not hide the others:
//! `latest` falls back to the newest readable step and says what it skipped.

mod common;

use common::backend::Backend;
use common::model;
use gantry_checkpoint::reader::parse_manifest;
use gantry_checkpoint::{Checkpoint, CheckpointError, Which};
use proptest::prelude::*;
use serde_json::{Value, json};

/// A committed local checkpoint of the test model at steps 5 and 7; its manifest of step 7.
fn saved(tag: &str) -> (Backend, Value) {
    let b = Backend::local(tag);
    for r in common::backend::save_ranks(&b, model::world_saves(false, "attempt1", &[5, 7], |s| s)) {
        r.expect("save");
    }
    let text = std::fs::read(b.file_of("step-00000007/manifest.json")).unwrap();
    (b, serde_json::from_slice(&text).unwrap())
}

/// A number from the edges where arithmetic overflows, or a small one.
fn wild() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        Just(u64::MAX - 615),
        Just(1u64 << 63),
        Just(1u64 << 32),
        0u64..4096,
    ]
}

#[derive(Clone, Debug)]
enum Damage {
    Offset(usize, u64),
    Len(usize, u64),
    Size(usize, u64),
    Shape(usize, Vec<u64>),
    Lengths(usize, Vec<u64>),
    Object(usize, String),
    DropObject(usize),
}

fn damage() -> impl Strategy<Value = Damage> {
    let names = prop_oneof![
        Just("../../etc/passwd".to_string()),
        Just("/abs".to_string()),
        Just("".to_string()),
        Just("rank-00000/./x".to_string()),
        "[a-z/.]{0,12}",
    ];
    prop_oneof![
        (0usize..64, wild()).prop_map(|(i, v)| Damage::Offset(i, v)),
        (0usize..64, wild()).prop_map(|(i, v)| Damage::Len(i, v)),
        (0usize..64, wild()).prop_map(|(i, v)| Damage::Size(i, v)),
        (0usize..64, prop::collection::vec(wild(), 0..4)).prop_map(|(i, v)| Damage::Shape(i, v)),
        (0usize..64, prop::collection::vec(wild(), 0..4)).prop_map(|(i, v)| Damage::Lengths(i, v)),
        (0usize..64, names).prop_map(|(i, v)| Damage::Object(i, v)),
        (0usize..64).prop_map(Damage::DropObject),
    ]
}

fn apply(m: &mut Value, d: &Damage) {
    let pick = |arr: &mut Value, i: usize| -> Option<usize> {
        let n = arr.as_array()?.len();
        (n > 0).then_some(i % n)
    };
    match d {
        Damage::Offset(i, v) | Damage::Len(i, v) => {
            let key = if matches!(d, Damage::Offset(..)) {
                "offset"
            } else {
                "len"
            };
            if let Some(i) = pick(&mut m["entries"], *i) {
                m["entries"][i][key] = json!(v);
            }
        }
        Damage::Size(i, v) => {
            if let Some(i) = pick(&mut m["objects"], *i) {
                m["objects"][i]["size"] = json!(v);
            }
        }
        Damage::Shape(i, v) | Damage::Lengths(i, v) => {
            let key = if matches!(d, Damage::Shape(..)) {
                "global_shape"
            } else {
                "lengths"
            };
            if let Some(i) = pick(&mut m["entries"], *i) {
                m["entries"][i][key] = json!(v);
            }
        }
        Damage::Object(i, name) => {
            if let Some(i) = pick(&mut m["objects"], *i) {
                m["objects"][i]["object"] = json!(name);
            }
        }
        Damage::DropObject(i) => {
            if let Some(i) = pick(&mut m["objects"], *i) {
                m["objects"].as_array_mut().unwrap().remove(i);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn damaged_manifests_never_panic(damages in prop::collection::vec(damage(), 1..4)) {
        let (b, original) = saved("fuzz");
        let mut m = original.clone();
        for d in &damages {
            apply(&mut m, d);
        }
        std::fs::write(b.file_of("step-00000007/manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        let _ = parse_manifest(&serde_json::to_vec(&m).unwrap(), "manifest.json");
        let store = b.store();
        if let Ok(ck) = Checkpoint::open(&store, Which::Step(7)) {
            let _ = ck.verify(&mut |_| {});
            let _ = ck.load(&model::tensors(false));
        }
    }
}

#[test]
fn an_offset_near_the_end_of_u64_is_a_named_error() {
    let (b, mut m) = saved("offset");
    m["entries"][0]["offset"] = json!(u64::MAX - 615);
    std::fs::write(
        b.file_of("step-00000007/manifest.json"),
        serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
    let e = Checkpoint::open(&b.store(), Which::Step(7)).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Manifest { object, .. } if object.contains("step-00000007/manifest.json")),
        "{e}"
    );
}

#[test]
fn latest_skips_a_garbled_manifest_and_says_so() {
    let (b, _) = saved("latest");
    std::fs::write(b.file_of("step-00000007/manifest.json"), b"{ garbled").unwrap();
    let store = b.store();
    let (ck, skipped) = Checkpoint::open_latest(&store).unwrap();
    assert_eq!(ck.step(), 5);
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].step, 7);
    assert!(
        skipped[0].reason.contains("not a gantry checkpoint manifest"),
        "{}",
        skipped[0].reason
    );
    assert_eq!(Checkpoint::open(&store, Which::Latest).unwrap().step(), 5);
    // Every step garbled: an error listing them, not "no checkpoint".
    std::fs::write(b.file_of("step-00000005/manifest.json"), b"[]").unwrap();
    let e = Checkpoint::open(&store, Which::Latest).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::NoReadableCheckpoint { skipped, .. } if skipped.len() == 2),
        "{e}"
    );
}
