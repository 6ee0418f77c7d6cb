//! The registry against real committed checkpoints on a local disk: registration and its
//! refusals, aliases and resolution, pagination, durability and the database lock.

mod common;

use common::{TempDir, chunk_files, job, save_steps};
use gantry_registry::{EvalRecord, ModelRef, Page, Registry, RegistryError, Selector};
use std::collections::HashSet;
use std::path::Path;

fn url(p: &Path) -> String {
    p.display().to_string()
}

/// A registry and a checkpoint root with committed steps 10 and 20.
fn setup(tag: &str) -> (TempDir, Registry, String) {
    let dir = TempDir::new(tag);
    let ckpt = dir.0.join("ckpt");
    save_steps(&ckpt, &[10, 20]);
    let registry = Registry::open(dir.0.join("db").join("registry.redb")).expect("open registry");
    (dir, registry, url(&ckpt))
}

fn r(s: &str) -> ModelRef {
    ModelRef::parse(s).expect("valid reference")
}

#[test]
fn versions_carry_the_manifest_lineage_and_are_immutable() {
    let (_dir, reg, ckpt) = setup("lineage");
    let v1 = reg.register_version("gpt", &ckpt, Some(10), 1_000).unwrap();
    assert_eq!((v1.model.as_str(), v1.version, v1.step), ("gpt", 1, 10));
    let expected = job(10);
    assert_eq!(v1.tokens_seen, expected.tokens_seen);
    assert_eq!(v1.layout, expected.layout);
    assert_eq!(v1.model_config, expected.model);
    assert_eq!(v1.data_cursor, expected.data_cursor);
    assert_eq!(v1.lineage["job_id"], "job-17");
    assert_eq!(v1.lineage["spec_hash"], "00112233aabbccdd");
    assert_eq!(v1.lineage["world_size"], 2);
    assert_eq!(v1.spec_hash.len(), 16);
    assert_eq!(v1.tensors, 3);
    assert!(v1.bytes > 0);
    assert_eq!(v1.checkpoint_url, ckpt);
    assert_eq!(reg.get_model("gpt").unwrap().created_ms, 1_000);

    // None = the newest committed step.
    let v2 = reg.register_version("gpt", &ckpt, None, 2_000).unwrap();
    assert_eq!((v2.version, v2.step, v2.tokens_seen), (2, 20, job(20).tokens_seen));
    assert_eq!(v2.spec_hash, v1.spec_hash, "same model, layout and optimizer");

    // The same checkpoint step again (also spelled with a trailing slash) is refused.
    for again in [ckpt.clone(), format!("{ckpt}/")] {
        match reg.register_version("gpt", &again, Some(20), 3_000) {
            Err(RegistryError::AlreadyRegistered { model, version }) => {
                assert_eq!((model.as_str(), version), ("gpt", 2))
            }
            other => panic!("expected AlreadyRegistered, got {other:?}"),
        }
    }
    // Another model may hold the same checkpoint.
    assert_eq!(
        reg.register_version("gpt-copy", &ckpt, Some(20), 3_000)
            .unwrap()
            .version,
        1
    );
    assert_eq!(reg.latest_version("gpt").unwrap(), v2);
    assert_eq!(reg.get_version("gpt", 1).unwrap(), v1);
    assert!(matches!(
        reg.get_version("gpt", 3),
        Err(RegistryError::UnknownVersion { version: 3, .. })
    ));
    assert!(matches!(reg.get_version("nope", 1), Err(RegistryError::UnknownModel(m)) if m == "nope"));
    assert!(matches!(
        reg.register_version("bad name", &ckpt, None, 0),
        Err(RegistryError::BadName(_))
    ));
}

#[test]
fn uncommitted_and_missing_checkpoints_are_refused() {
    let (dir, reg, ckpt) = setup("uncommitted");
    std::fs::remove_file(dir.0.join("ckpt/step-00000020/manifest.json")).unwrap();
    let e = reg.register_version("gpt", &ckpt, Some(20), 0).unwrap_err();
    match &e {
        RegistryError::Checkpoint { url, message } => {
            assert_eq!(url, &ckpt);
            assert!(
                message.contains("step 20") && message.contains("not committed"),
                "{message}"
            );
        }
        other => panic!("expected a checkpoint refusal, got {other:?}"),
    }
    // A step that was never written at all.
    assert!(matches!(
        reg.register_version("gpt", &ckpt, Some(30), 0),
        Err(RegistryError::Checkpoint { .. })
    ));
    // Latest is the newest *committed* step: 10.
    assert_eq!(reg.register_version("gpt", &ckpt, None, 0).unwrap().step, 10);

    let missing = dir.0.join("does-not-exist");
    let e = reg.register_version("gpt", &url(&missing), None, 0).unwrap_err();
    assert!(matches!(e, RegistryError::Checkpoint { .. }), "{e}");
    assert!(!missing.exists(), "registering must not create the directory");

    let empty = dir.0.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e2 = reg.register_version("gpt", &url(&empty), None, 0).unwrap_err();
    assert!(e2.to_string().contains("no committed gantry checkpoint"), "{e2}");
    // Missing and empty answer alike: registration does not tell what exists.
    assert_eq!(
        e.to_string().replace(&url(&missing), "URL"),
        e2.to_string().replace(&url(&empty), "URL")
    );
    // Nothing half-registered.
    assert_eq!(reg.list_versions("gpt", &Page::first(10)).unwrap().0.len(), 1);
}

#[test]
fn corrupt_and_incomplete_checkpoints_are_refused_naming_the_object() {
    let (dir, reg, ckpt) = setup("corrupt");
    let chunks = chunk_files(&dir.0.join("ckpt"), 20);
    assert!(chunks.len() > 1, "several chunk objects: {chunks:?}");
    let victim = &chunks[1];
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[5] ^= 0x40;
    std::fs::write(victim, &bytes).unwrap();
    let object = victim.file_name().unwrap().to_str().unwrap();
    let e = reg.register_version("gpt", &ckpt, Some(20), 0).unwrap_err();
    match &e {
        RegistryError::Checkpoint { message, .. } => {
            assert!(
                message.contains("checksum mismatch") && message.contains(object),
                "{message}"
            )
        }
        other => panic!("expected a checkpoint refusal, got {other:?}"),
    }

    // Incomplete: a chunk of step 10 gone.
    let gone = &chunk_files(&dir.0.join("ckpt"), 10)[0];
    std::fs::remove_file(gone).unwrap();
    let e = reg.register_version("gpt", &ckpt, Some(10), 0).unwrap_err();
    let object = gone.file_name().unwrap().to_str().unwrap();
    assert!(
        e.to_string().contains(object) && e.to_string().contains("missing"),
        "{e}"
    );
    assert!(matches!(reg.get_model("gpt"), Err(RegistryError::UnknownModel(_))));
}

#[test]
fn aliases_move_atomically_and_resolve_with_weights() {
    let (_dir, reg, ckpt) = setup("aliases");
    reg.register_version("gpt", &ckpt, Some(10), 0).unwrap();
    reg.register_version("gpt", &ckpt, Some(20), 0).unwrap();

    assert_eq!(reg.resolve(&r("gpt"), 0).unwrap().version, 2);
    assert_eq!(reg.resolve(&r("gpt@latest"), 0).unwrap().version, 2);
    assert_eq!(reg.resolve(&r("gpt@1"), 0).unwrap().version, 1);
    assert_eq!(reg.resolve(&r("gpt@2"), 0).unwrap().step, 20);

    reg.set_alias("gpt", "production", &[(1, 1)], 5).unwrap();
    assert_eq!(reg.resolve(&r("gpt@production"), 12345).unwrap().version, 1);
    let moved = reg.set_alias("gpt", "production", &[(2, 1)], 6).unwrap();
    assert_eq!(moved.updated_ms, 6);
    assert_eq!(reg.resolve(&r("gpt@production"), 0).unwrap().version, 2);

    reg.set_alias("gpt", "canary", &[(1, 90), (2, 10)], 7).unwrap();
    let canary = r("gpt@canary");
    assert_eq!(canary.selector, Selector::Alias("canary".into()));
    let mut counts = [0u32; 3];
    for draw in 0..100 {
        counts[reg.resolve(&canary, draw).unwrap().version as usize] += 1;
    }
    assert_eq!(counts, [0, 90, 10]);

    let names: Vec<String> = reg.list_aliases("gpt").unwrap().into_iter().map(|a| a.name).collect();
    assert_eq!(names, ["canary", "production"]);

    // Refusals leave the alias as it was.
    assert!(matches!(
        reg.set_alias("gpt", "production", &[(2, 1), (3, 1)], 8),
        Err(RegistryError::UnknownVersion { version: 3, .. })
    ));
    assert!(matches!(
        reg.set_alias("gpt", "production", &[(1, 0)], 8),
        Err(RegistryError::BadWeights(_))
    ));
    assert!(matches!(
        reg.set_alias("gpt", "production", &[], 8),
        Err(RegistryError::BadWeights(_))
    ));
    assert!(matches!(
        reg.set_alias("gpt", "latest", &[(1, 1)], 8),
        Err(RegistryError::BadName(_))
    ));
    assert!(matches!(
        reg.set_alias("gpt", "42", &[(1, 1)], 8),
        Err(RegistryError::BadName(_))
    ));
    assert!(matches!(
        reg.set_alias("nope", "prod", &[(1, 1)], 8),
        Err(RegistryError::UnknownModel(_))
    ));
    assert_eq!(reg.get_alias("gpt", "production").unwrap().targets, vec![(2, 1)]);

    assert_eq!(
        reg.delete_alias("gpt", "canary").unwrap().targets,
        vec![(1, 90), (2, 10)]
    );
    assert!(matches!(
        reg.resolve(&canary, 0),
        Err(RegistryError::UnknownAlias { alias, .. }) if alias == "canary"
    ));
    assert!(matches!(
        reg.delete_alias("gpt", "canary"),
        Err(RegistryError::UnknownAlias { .. })
    ));
    assert!(matches!(
        reg.resolve(&r("gpt@3"), 0),
        Err(RegistryError::UnknownVersion { version: 3, .. })
    ));
    assert!(matches!(
        reg.resolve(&r("nope@prod"), 0),
        Err(RegistryError::UnknownModel(_))
    ));
    assert!(matches!(
        reg.resolve(&r("nope"), 0),
        Err(RegistryError::UnknownModel(_))
    ));
}

#[test]
fn listings_page_without_duplicates() {
    let (_dir, reg, ckpt) = setup("pages");
    for i in 0..25 {
        reg.register_version(&format!("model-{i:02}"), &ckpt, Some(10), i)
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut page = Page::first(10);
    let mut sizes = Vec::new();
    loop {
        let (models, next) = reg.list_models("", &page).unwrap();
        sizes.push(models.len());
        seen.extend(models.into_iter().map(|m| m.name));
        match next {
            Some(cursor) => page.after = Some(cursor),
            None => break,
        }
    }
    assert_eq!(sizes, [10, 10, 5]);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 25);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted);

    let (models, next) = reg.list_models("model-1", &Page::first(10)).unwrap();
    assert_eq!(models.len(), 10);
    assert_eq!(next, None, "exactly one full page matches");
    let (models, next) = reg.list_models("-2", &Page::first(3)).unwrap();
    assert_eq!(
        models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["model-20", "model-21", "model-22"]
    );
    let (models, _) = reg.list_models("-2", &Page { after: next, limit: 3 }).unwrap();
    assert_eq!(
        models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["model-23", "model-24"]
    );

    // Versions page by number.
    reg.register_version("model-00", &ckpt, Some(20), 0).unwrap();
    let (v, next) = reg.list_versions("model-00", &Page::first(1)).unwrap();
    assert_eq!((v[0].version, next.as_deref()), (1, Some("1")));
    let (v, next) = reg.list_versions("model-00", &Page { after: next, limit: 1 }).unwrap();
    assert_eq!((v[0].version, next), (2, None));
    assert!(matches!(
        reg.list_versions(
            "model-00",
            &Page {
                after: Some("x".into()),
                limit: 1
            }
        ),
        Err(RegistryError::BadCursor { .. })
    ));
    assert!(matches!(
        reg.list_versions("nope", &Page::first(1)),
        Err(RegistryError::UnknownModel(_))
    ));
}

#[test]
fn everything_survives_reopen_and_a_second_opener_is_refused() {
    let (dir, reg, ckpt) = setup("reopen");
    let db = reg.path().to_path_buf();
    reg.register_version("gpt", &ckpt, Some(10), 0).unwrap();
    reg.register_version("gpt", &ckpt, Some(20), 0).unwrap();
    reg.set_alias("gpt", "staging", &[(1, 3), (2, 1)], 0).unwrap();
    let eval = EvalRecord {
        at_ms: 9,
        dataset: "val".into(),
        loss: 2.5,
        perplexity: 2.5f64.exp(),
        tokens: 4096,
        tp: 2,
        note: "held-out".into(),
    };
    let with_eval = reg.add_eval("gpt", 2, eval.clone()).unwrap();
    assert_eq!(with_eval.evals, vec![eval.clone()]);
    assert!(matches!(
        reg.add_eval("gpt", 7, eval.clone()),
        Err(RegistryError::UnknownVersion { .. })
    ));

    match Registry::open(&db) {
        Err(RegistryError::Database { path, message }) => {
            assert_eq!(path, db);
            assert!(!message.is_empty());
        }
        Err(other) => panic!("expected a database error, got {other}"),
        Ok(_) => panic!("a second opener must be refused while the first is open"),
    }
    drop(reg);

    let reg = Registry::open(&db).unwrap();
    assert_eq!(reg.latest_version("gpt").unwrap(), with_eval);
    assert_eq!(reg.get_alias("gpt", "staging").unwrap().targets, vec![(1, 3), (2, 1)]);
    assert_eq!(reg.resolve(&r("gpt@staging"), 3).unwrap().version, 2);
    // Version numbering and immutability continue after the reopen.
    assert!(matches!(
        reg.register_version("gpt", &ckpt, Some(10), 0),
        Err(RegistryError::AlreadyRegistered { version: 1, .. })
    ));
    save_steps(&dir.0.join("ckpt"), &[30]);
    assert_eq!(reg.register_version("gpt", &ckpt, None, 0).unwrap().version, 3);
}
