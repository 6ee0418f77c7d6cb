//! Aliases with shadows, over real committed checkpoints: what the store accepts and refuses,
//! what a route carries, what survives a reopen, and the same through the HTTP API (a server
//! without generation, so a PUT commits without loading anything). Generation through
//! shadows, sticky keys and moves under load are tested end to end with the `gantry` binary
//! (`launch/tests/alias_moves.rs`).

mod common;

use common::http_client::{get, send_json};
use common::server::{Server, WRITE};
use common::{TempDir, save_steps};
use gantry_registry::model::Shadow;
use gantry_registry::split::WeightError;
use gantry_registry::{ModelRef, Registry, RegistryError};
use serde_json::json;

fn r(s: &str) -> ModelRef {
    ModelRef::parse(s).expect("valid reference")
}

/// A registry holding versions 1 (step 10) and 2 (step 20) of `gpt`.
fn setup(tag: &str) -> (TempDir, Registry) {
    let dir = TempDir::new(tag);
    let ckpt = dir.0.join("ckpt");
    save_steps(&ckpt, &[10, 20]);
    let reg = Registry::open(dir.0.join("registry.redb")).expect("open registry");
    let url = ckpt.display().to_string();
    reg.register_version("gpt", &url, Some(10), 1).unwrap();
    reg.register_version("gpt", &url, Some(20), 2).unwrap();
    (dir, reg)
}

#[test]
fn shadows_are_validated_routed_and_kept() {
    let (dir, reg) = setup("alias-shadow");
    let shadow = |version, percent| Some(Shadow { version, percent });
    let set = reg
        .set_alias_with_shadow("gpt", "prod", &[(1, 1)], shadow(2, 10), 5)
        .unwrap();
    assert_eq!(set.shadow, shadow(2, 10));

    // A route through the alias carries the alias and the shadow's record; by number, neither.
    let route = reg.route(&r("gpt@prod"), 0).unwrap();
    assert_eq!(route.version.version, 1);
    assert_eq!(route.alias.as_ref().map(|a| a.shadow), Some(shadow(2, 10)));
    assert_eq!(route.shadow.as_ref().map(|v| (v.version, v.step)), Some((2, 20)));
    let plain = reg.route(&r("gpt@1"), 0).unwrap();
    assert!(plain.alias.is_none() && plain.shadow.is_none());
    assert_eq!(reg.resolve(&r("gpt@prod"), 7).unwrap().version, 1);

    // Refusals name what is wrong, and leave the alias as it was.
    let refused = [
        (shadow(9, 10), "no version 9"),
        (shadow(2, 0), "1 to 100 percent of the requests, got 0"),
        (shadow(2, 101), "got 101"),
        (shadow(1, 50), "only version"),
    ];
    for (bad, says) in refused {
        let e = reg.set_alias_with_shadow("gpt", "prod", &[(1, 1)], bad, 6).unwrap_err();
        assert!(e.to_string().contains(says), "{bad:?}: {e}");
    }
    assert!(matches!(
        reg.set_alias_with_shadow("gpt", "prod", &[(1, 1)], shadow(1, 50), 6),
        Err(RegistryError::BadWeights(WeightError::ShadowIsPrimary { version: 1 }))
    ));
    assert_eq!(reg.get_alias("gpt", "prod").unwrap(), set);
    // A split may shadow one of its own targets.
    let split = reg
        .set_alias_with_shadow("gpt", "canary", &[(1, 9), (2, 1)], shadow(2, 100), 7)
        .unwrap();

    // Kept across a reopen; a plain move drops the shadow.
    drop(reg);
    let reg = Registry::open(dir.0.join("registry.redb")).unwrap();
    assert_eq!(reg.get_alias("gpt", "prod").unwrap(), set);
    assert_eq!(reg.get_alias("gpt", "canary").unwrap(), split);
    assert_eq!(reg.set_alias("gpt", "prod", &[(2, 1)], 8).unwrap().shadow, None);
    assert!(reg.route(&r("gpt@prod"), 0).unwrap().shadow.is_none());
}

#[test]
fn the_alias_api_sets_shows_and_refuses_shadows() {
    let srv = Server::start("alias-shadow-http", true);
    let a = srv.addr;
    srv.register("gpt", 10);
    srv.register("gpt", 20);
    let path = "/v1/models/gpt/aliases/prod";
    let body = json!({ "version": 1, "shadow": { "version": 2, "percent": 25 } });
    let put = send_json(a, "PUT", path, Some(WRITE), &body);
    assert_eq!(put.status, 200, "{}", put.text());
    assert_eq!(put.json()["shadow"], json!({ "version": 2, "percent": 25 }));
    assert_eq!(get(a, path).json()["shadow"], json!({ "version": 2, "percent": 25 }));
    assert_eq!(
        get(a, "/v1/models/gpt").json()["aliases"][0]["shadow"]["version"],
        2,
        "the model shows its aliases' shadows"
    );

    for (bad, status, code) in [
        (
            json!({ "version": 1, "shadow": { "version": 2, "percent": 0 } }),
            400,
            "bad_weights",
        ),
        (
            json!({ "version": 1, "shadow": { "version": 1, "percent": 5 } }),
            400,
            "bad_weights",
        ),
        (
            json!({ "version": 1, "shadow": { "version": 7, "percent": 5 } }),
            404,
            "unknown_version",
        ),
        (json!({ "version": 1, "shadow": { "version": 2 } }), 400, "bad_json"),
        (
            json!({ "version": 1, "shadow": { "version": 2, "percent": 5, "x": 1 } }),
            400,
            "bad_json",
        ),
    ] {
        let r = send_json(a, "PUT", path, Some(WRITE), &bad);
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (status, code),
            "{bad}: {}",
            r.text()
        );
    }
    assert_eq!(get(a, path).json()["shadow"]["percent"], 25, "refusals left it alone");

    // A PUT replaces the whole alias: without `shadow`, none.
    let plain = send_json(a, "PUT", path, Some(WRITE), &json!({ "version": 2 }));
    assert_eq!(plain.json()["shadow"], serde_json::Value::Null);
}
