//! Damage to a committed checkpoint, done behind the store's back on the stored files (a
//! local directory, or the plain files s3s-fs keeps its objects in), is reported as a typed
//! error naming the object, tensor or step at fault: never a silent wrong load.

mod common;

use common::backend::Backend;
use common::model;
use common::pattern::{slice_bytes, splitmix64};
use gantry_checkpoint::format::ChunkEntry;
use gantry_checkpoint::planner::PlanError;
use gantry_checkpoint::{Checkpoint, CheckpointError, DType, SliceSpec, Store, Which, committed_steps};
use std::path::Path;

const STEP: u64 = 7;
const DIR: &str = "step-00000007";

fn seed() -> u64 {
    splitmix64(STEP)
}

/// A committed step [`STEP`] of the test model; its store and checkpoint.
fn committed(b: &Backend, big: bool) -> (Store, Checkpoint) {
    for (rank, r) in common::backend::save_ranks(b, model::world_saves(big, "attempt1", &[STEP], |_| seed()))
        .into_iter()
        .enumerate()
    {
        r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
    }
    let store = b.store();
    let ck = Checkpoint::open(&store, Which::Latest).unwrap();
    assert_eq!(ck.step(), STEP);
    ck.verify(&mut |_| {}).expect("an untouched checkpoint verifies");
    (store, ck)
}

fn whole(big: bool, name: &str) -> SliceSpec {
    model::tensors(big).into_iter().find(|t| t.name == name).unwrap()
}

/// The entry of tensor `name` that rank 1 saved.
fn rank1_entry<'a>(ck: &'a Checkpoint, name: &str) -> &'a ChunkEntry {
    ck.manifest
        .entries
        .iter()
        .find(|e| e.slice.name == name && e.object.starts_with("rank-00001/"))
        .unwrap_or_else(|| panic!("no rank 1 entry of {name}"))
}

fn flip_byte(file: &Path, at: u64) {
    let mut bytes = std::fs::read(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    bytes[at as usize] ^= 0x20;
    std::fs::write(file, bytes).unwrap();
}

/// `err` is shown with the object's key in it (the step prefix and the key under it).
fn assert_names(err: &CheckpointError, key: &str) {
    let shown = err.to_string();
    assert!(
        shown.contains(&format!("{DIR}/{key}")),
        "error does not name {DIR}/{key}: {shown}"
    );
}

/// A flipped byte in a chunk: a checksum error naming the object and tensor on load and on
/// verify; tensors stored in other objects still load.
fn flipped_byte(b: &Backend) {
    let big = true;
    let (_store, ck) = committed(b, big);
    for name in ["big", "w"] {
        let e = rank1_entry(&ck, name).clone();
        flip_byte(&b.file_of(&format!("{DIR}/{}", e.object)), e.offset + e.len / 2 + 1);
        match ck.load(&[whole(big, name)]) {
            Err(err @ CheckpointError::Checksum { .. }) => {
                assert_names(&err, &e.object);
                let CheckpointError::Checksum {
                    tensor, offset, end, ..
                } = &err
                else {
                    unreachable!()
                };
                assert_eq!(
                    (tensor.as_str(), *offset, *end),
                    (name, e.offset, e.offset + e.len),
                    "{err}"
                );
            }
            other => panic!("loading {name} after a flipped byte in {}: {other:?}", e.object),
        }
        match ck.verify(&mut |_| {}) {
            Err(err @ CheckpointError::Checksum { .. }) => {
                assert!(err.to_string().contains(&format!("{DIR}/rank-")), "{err}")
            }
            other => panic!("verify after a flipped byte: {other:?}"),
        }
    }
    // A request that needs none of the damaged entries loads, and loads right.
    let emb = whole(big, "emb");
    let damaged: Vec<&str> = ["big", "w"]
        .iter()
        .map(|n| rank1_entry(&ck, n).object.as_str())
        .collect();
    assert!(
        ck.manifest
            .entries
            .iter()
            .filter(|e| e.slice.name == "emb")
            .all(|e| !damaged.contains(&e.object.as_str()))
    );
    let got = ck.load(std::slice::from_ref(&emb)).unwrap();
    assert!(got[0] == slice_bytes(seed(), &emb));
    // Reopening sees the same damage: nothing was cached or repaired.
    let again = Checkpoint::open(&b.store(), Which::Step(STEP)).unwrap();
    assert!(matches!(
        again.load(&[whole(big, "w")]),
        Err(CheckpointError::Checksum { .. })
    ));
}

/// A chunk cut short: `Truncated` with both sizes, on load and on verify.
fn truncated_chunk(b: &Backend) {
    let (_store, ck) = committed(b, false);
    let e = rank1_entry(&ck, "w").clone();
    let size = ck.manifest.objects.iter().find(|o| o.object == e.object).unwrap().size;
    let file = b.file_of(&format!("{DIR}/{}", e.object));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(size - 1)
        .unwrap();
    for (what, result) in [
        ("load", ck.load(&[whole(false, "w")]).map(|_| ())),
        ("verify", ck.verify(&mut |_| {}).map(|_| ())),
    ] {
        match result {
            Err(err @ CheckpointError::Truncated { expected, found, .. }) => {
                assert_names(&err, &e.object);
                assert_eq!((expected, found), (size, size - 1), "{what}: {err}");
            }
            other => panic!("{what} of a truncated chunk: {other:?}"),
        }
    }
}

/// A chunk deleted: `MissingObject` naming it, on load and on verify.
fn deleted_chunk(b: &Backend) {
    let (_store, ck) = committed(b, false);
    let e = rank1_entry(&ck, "b3").clone();
    std::fs::remove_file(b.file_of(&format!("{DIR}/{}", e.object))).unwrap();
    for (what, result) in [
        ("load", ck.load(&[whole(false, "b3")]).map(|_| ())),
        ("verify", ck.verify(&mut |_| {}).map(|_| ())),
    ] {
        match result {
            Err(err @ CheckpointError::MissingObject { .. }) => assert_names(&err, &e.object),
            other => panic!("{what} of a deleted chunk: {other:?}"),
        }
    }
}

/// Rewrite the stored manifest of [`STEP`] through `edit`.
fn edit_manifest(b: &Backend, edit: impl FnOnce(&mut serde_json::Value)) {
    let file = b.file_of(&format!("{DIR}/manifest.json"));
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&file, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

fn entries_of<'a>(m: &'a mut serde_json::Value, name: &'a str) -> impl Iterator<Item = &'a mut serde_json::Value> {
    m["entries"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .filter(move |e| e["name"] == name)
}

/// The planner's error for loading `requests` from [`STEP`], checking it names the step.
fn plan_error(b: &Backend, requests: &[SliceSpec]) -> (String, PlanError) {
    let ck = Checkpoint::open(&b.store(), Which::Step(STEP)).expect("a consistent manifest of another model opens");
    match ck.load(requests) {
        Err(err @ CheckpointError::Plan { .. }) => {
            let shown = err.to_string();
            assert!(shown.contains(DIR), "{shown}");
            let CheckpointError::Plan { source, .. } = err else {
                unreachable!()
            };
            (shown, source)
        }
        other => panic!("loading the original model's tensors from another model's checkpoint: {other:?}"),
    }
}

/// A manifest rewritten to a consistent but different model: `w` is [48, 80] instead of
/// [96, 40] (same bytes, other shape). Loading the original `w` is a shape mismatch.
fn reshaped_model(b: &Backend) {
    committed(b, false);
    edit_manifest(b, |m| {
        for e in entries_of(m, "w") {
            let row = e["offsets"][0].as_u64().unwrap();
            e["global_shape"] = serde_json::json!([48, 80]);
            e["offsets"] = serde_json::json!([row / 2, 0]);
            e["lengths"] = serde_json::json!([16, 80]);
        }
    });
    let (err, source) = plan_error(b, &model::other_cuts(false));
    assert_eq!(
        source,
        PlanError::ShapeMismatch {
            name: "w".into(),
            saved: vec![48, 80],
            requested: vec![96, 40]
        },
        "{err}"
    );
    assert!(err.contains("tensor w"), "{err}");
}

/// A tensor renamed (another model's names): loading the original name is a missing tensor;
/// a dtype changed at the same size is a dtype mismatch.
fn renamed_tensor(b: &Backend) {
    committed(b, false);
    edit_manifest(b, |m| {
        for e in entries_of(m, "w") {
            e["name"] = serde_json::json!("blocks.0.w");
        }
        for e in entries_of(m, "big") {
            e["dtype"] = serde_json::json!("i32");
        }
    });
    let (err, source) = plan_error(b, &[whole(false, "emb"), whole(false, "w")]);
    assert_eq!(source, PlanError::MissingTensor { name: "w".into() }, "{err}");
    assert!(err.contains("tensor w is not in the checkpoint"), "{err}");
    let (err, source) = plan_error(b, &[whole(false, "big")]);
    assert_eq!(
        source,
        PlanError::DTypeMismatch {
            name: "big".into(),
            saved: DType::I32,
            requested: DType::F32
        },
        "{err}"
    );
    // The renamed tensor loads under its new name with the saved bytes.
    let ck = Checkpoint::open(&b.store(), Which::Step(STEP)).unwrap();
    let mut renamed = whole(false, "w");
    renamed.name = "blocks.0.w".into();
    assert!(ck.load(&[renamed]).unwrap()[0] == slice_bytes(seed(), &whole(false, "w")));
}

/// A change to a manifest's JSON.
type Edit = Box<dyn Fn(&mut serde_json::Value)>;

/// Garbage, a cut-short manifest, one claiming another step, one pointing outside its
/// objects and one whose slices no longer tile a tensor: a `Manifest` error naming
/// `manifest.json`, from opening the step and from opening latest.
fn bad_manifest(b: &Backend) {
    let (store, _) = committed(b, false);
    let file = b.file_of(&format!("{DIR}/manifest.json"));
    let good = std::fs::read(&file).unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\x01 this is not json".to_vec()),
        ("cut short", good[..good.len() / 2].to_vec()),
        ("empty object", b"{}".to_vec()),
    ];
    let json: serde_json::Value = serde_json::from_slice(&good).unwrap();
    let edits: Vec<(&str, Edit)> = vec![
        ("another step", Box::new(|m| m["step"] = serde_json::json!(STEP + 1))),
        (
            "entry past its object",
            Box::new(|m| {
                let e = &mut m["entries"][0];
                e["offset"] = serde_json::json!(e["offset"].as_u64().unwrap() + 1_000_000);
            }),
        ),
        (
            "a slice missing",
            Box::new(|m| {
                let entries = m["entries"].as_array_mut().unwrap();
                let i = entries.iter().position(|e| e["name"] == "w").unwrap();
                entries.remove(i);
            }),
        ),
        (
            "newer format",
            Box::new(|m| m["format_version"] = serde_json::json!(999)),
        ),
    ];
    for (what, edit) in edits {
        let mut m = json.clone();
        edit(&mut m);
        cases.push((what, serde_json::to_vec(&m).unwrap()));
    }
    for (what, bytes) in cases {
        std::fs::write(&file, &bytes).unwrap();
        assert_eq!(
            committed_steps(&store).unwrap(),
            vec![STEP],
            "{what}: the step is listed"
        );
        for which in [Which::Step(STEP), Which::Latest] {
            match Checkpoint::open(&store, which) {
                Err(err @ CheckpointError::Manifest { .. }) => assert_names(&err, "manifest.json"),
                other => panic!("{what}: opening {which:?}: {other:?}"),
            }
        }
    }
    std::fs::write(&file, &good).unwrap();
    Checkpoint::open(&store, Which::Latest)
        .unwrap()
        .verify(&mut |_| {})
        .unwrap();
}

both!(flipped_byte_is_a_checksum_error, super::flipped_byte);
both!(truncated_chunk_is_truncated, super::truncated_chunk);
both!(deleted_chunk_is_missing, super::deleted_chunk);
both!(reshaped_manifest_is_a_shape_mismatch, super::reshaped_model);
both!(renamed_tensor_is_missing, super::renamed_tensor);
both!(bad_manifest_is_a_manifest_error, super::bad_manifest);
