//! The hand-written OpenAPI 3.0 document served at `/openapi.json`.

use serde_json::{Value, json};

/// Every route the router serves, as `(METHOD, OpenAPI path)`; the document describes exactly
/// these (checked by a test).
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/openapi.json"),
    ("get", "/metrics"),
    ("get", "/v1/models"),
    ("post", "/v1/completions"),
    ("post", "/v1/chat/completions"),
    ("get", "/v1/registry/models"),
    ("get", "/v1/models/{model}"),
    ("post", "/v1/models/{model}/generate"),
    ("get", "/v1/models/{model}/versions"),
    ("post", "/v1/models/{model}/versions"),
    ("get", "/v1/models/{model}/versions/{version}"),
    ("post", "/v1/models/{model}/versions/{version}/evals"),
    ("get", "/v1/models/{model}/versions/{version}/files/{path}"),
    ("get", "/v1/models/{model}/versions/{version}/tensors"),
    ("get", "/v1/models/{model}/aliases"),
    ("get", "/v1/models/{model}/aliases/{alias}"),
    ("put", "/v1/models/{model}/aliases/{alias}"),
    ("delete", "/v1/models/{model}/aliases/{alias}"),
];

fn path_param(name: &str, description: &str) -> Value {
    json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" }, "description": description })
}

fn query_param(name: &str, ty: &str, description: &str) -> Value {
    json!({ "name": name, "in": "query", "required": false, "schema": { "type": ty }, "description": description })
}

fn model_p() -> Value {
    path_param("model", "model name")
}
fn version_p() -> Value {
    path_param("version", "version number, `latest`, or an alias name")
}
fn alias_p() -> Value {
    path_param("alias", "alias name")
}

fn ok(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// Error responses by status code.
fn errors(codes: &[u16]) -> serde_json::Map<String, Value> {
    codes
        .iter()
        .map(|c| {
            let what = match c {
                400 => "bad input or malformed JSON",
                401 => "missing or invalid token",
                403 => "a read token on a write",
                404 => "unknown model, version, alias or file",
                409 => "that checkpoint step is already registered",
                415 => "the body is not declared as JSON",
                416 => "the range is outside the file",
                501 => "this server does not generate (started with --no-generate)",
                503 => "too many generation requests in flight for this version (--max-pending); retry later",
                507 => "the model needs more memory than the model cache's limit",
                422 => "checkpoint refused (uncommitted, corrupt or incomplete) or no longer readable, or a version that cannot be loaded for serving",
                _ => "error",
            };
            (c.to_string(), ok(what, schema("Error")))
        })
        .collect()
}

fn responses(success: (&str, Value), codes: &[u16]) -> Value {
    let mut m = errors(codes);
    m.insert(success.0.to_string(), success.1);
    Value::Object(m)
}

fn json_body(name: &str) -> Value {
    json!({ "required": true, "content": { "application/json": { "schema": schema(name) } } })
}

const READ: &[u16] = &[400, 401, 404];
const WRITE: &[u16] = &[400, 401, 403, 404, 415];

/// The `X-Gantry-Route-Key` header of the generation routes.
fn route_key_p() -> Value {
    json!({ "name": "X-Gantry-Route-Key", "in": "header", "required": false, "schema": { "type": "string" },
        "description": "sticky routing: a weighted alias sends every request with the same key to the same version (xxh3 of the key drawn into the weights) for as long as its targets and weights stay as they are; without a key, consecutive requests interleave by the weights. On the OpenAI routes the `user` field does the same; the header wins" })
}

fn read_security() -> Value {
    json!([{}, { "bearer": [] }])
}

fn write_security() -> Value {
    json!([{ "bearer": [] }])
}

/// `extra` followed by the cursor and page-size parameters of a listing.
fn paging(extra: Vec<Value>) -> Vec<Value> {
    let mut p = extra;
    p.push(query_param("after", "string", "cursor from the previous page's `next`"));
    p.push(query_param("limit", "integer", "page size, 1..=1000 (default 100)"));
    p
}

/// The document.
pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "gantry model registry",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Immutable model versions registered from committed gantry checkpoints, movable aliases with weighted splits, and the checkpoint files. Reads may be open (server setting) or need a read/write token; writes need a write token."
        },
        "paths": paths(),
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "description": "a read or write token" } },
            "schemas": schemas()
        }
    })
}

/// Every path, group by group, in the order the document has always listed them.
fn paths() -> Value {
    let mut all = serde_json::Map::new();
    for group in [
        service_paths(),
        generation_paths(),
        model_paths(),
        file_paths(),
        alias_paths(),
    ] {
        if let Value::Object(paths) = group {
            all.extend(paths);
        }
    }
    Value::Object(all)
}

/// Liveness, this document and the metrics: open to all.
fn service_paths() -> Value {
    json!({
        "/healthz": { "get": { "summary": "liveness", "security": [], "responses": { "200": ok("serving", json!({ "type": "object" })) } } },
        "/openapi.json": { "get": { "summary": "this document", "security": [], "responses": { "200": ok("the OpenAPI document", json!({ "type": "object" })) } } },
        "/metrics": { "get": { "summary": "Prometheus metrics: generation requests, latency, time to first token and tokens per served version; shadow comparisons per (model, version, shadow_version): gantry_registry_shadow_requests_total by outcome (agree, differ, error, dropped, no_primary), gantry_registry_shadow_seconds and gantry_registry_shadow_primary_seconds (both sides' latency on the mirrored requests), gantry_registry_shadow_first_difference (token position where greedy answers part); downloads; the model cache; batching", "security": [], "responses": { "200": { "description": "text exposition format", "content": { "text/plain": { "schema": { "type": "string" } } } } } } },
    })
}

/// Text generation: gantry's own route and the OpenAI-compatible ones.
fn generation_paths() -> Value {
    json!({
        "/v1/models/{model}/generate": { "post": {
            "summary": "generate text with a version (`name`, `name@3`, `name@alias`; a weighted alias picks a version per request, named in `version` and `X-Gantry-Version`). With `stream: true` the answer is server-sent events: `token` events `{token, text}`, then `done` with the whole answer (or `error`)",
            "security": read_security(),
            "parameters": [path_param("model", "model name or reference `name@selector`"), route_key_p()],
            "requestBody": json_body("GenerateRequest"),
            "responses": responses(("200", json!({
                "description": "the generation (JSON), or an event stream when `stream` is true",
                "headers": { "X-Gantry-Version": { "schema": { "type": "integer" }, "description": "the version that served the request" } },
                "content": {
                    "application/json": { "schema": schema("Generation") },
                    "text/event-stream": { "schema": { "type": "string" } }
                }
            })), &[400, 401, 404, 415, 422, 501, 503, 507]),
        }},
        "/v1/models": { "get": {
            "summary": "OpenAI-compatible: every servable reference (`name`, `name@alias`, `name@N`) as `{object: \"list\", data: [{id, object: \"model\", created, owned_by}]}`",
            "security": read_security(),
            "responses": responses(("200", ok("the servable references", json!({ "type": "object" }))), &[401]),
        }},
        "/v1/completions": { "post": {
            "summary": "OpenAI-compatible text completion: `model` (a registry reference), `prompt` (string, strings, token ids, lists of token ids), `max_tokens`, `temperature`, `top_p`, `n`, `stop`, `seed`, `logprobs`, `echo`, `stream` (server-sent `text_completion` chunks, then `data: [DONE]`), `user` (the route key of a weighted alias: one user, one version); OpenAI's response shape with `usage`",
            "security": read_security(),
            "parameters": [route_key_p()],
            "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object" } } } },
            "responses": responses(("200", json!({
                "description": "the completion (JSON), or an event stream when `stream` is true",
                "content": { "application/json": { "schema": { "type": "object" } }, "text/event-stream": { "schema": { "type": "string" } } }
            })), &[400, 401, 404, 415, 422, 501, 503, 507]),
        }},
        "/v1/chat/completions": { "post": {
            "summary": "OpenAI-compatible chat: `messages` rendered with the model's chat template (or the documented plain default), the sampling fields of /v1/completions, `logprobs` + `top_logprobs`, `stream`, `user` (the route key of a weighted alias)",
            "security": read_security(),
            "parameters": [route_key_p()],
            "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object" } } } },
            "responses": responses(("200", json!({
                "description": "the chat completion (JSON), or an event stream when `stream` is true",
                "content": { "application/json": { "schema": { "type": "object" } }, "text/event-stream": { "schema": { "type": "string" } } }
            })), &[400, 401, 404, 415, 422, 501, 503, 507]),
        }},
    })
}

/// Models, their versions and evals.
fn model_paths() -> Value {
    json!({
        "/v1/registry/models": { "get": {
            "summary": "gantry's listing: models (name contains `filter`), by name, paged",
            "security": read_security(),
            "parameters": paging(vec![query_param("filter", "string", "substring of the model name")]),
            "responses": responses(("200", ok("a page of models", schema("ModelPage"))), &[400, 401]),
        }},
        "/v1/models/{model}": { "get": {
            "summary": "a model (plain name), or the version a reference resolves to (`name@3`, `name@latest`, `name@alias`, with `resolved_from`)",
            "security": read_security(),
            "parameters": [path_param("model", "model name or reference `name@selector`")],
            "responses": responses(("200", ok("the model, or the resolved version", json!({ "oneOf": [schema("Model"), schema("Version")] }))), READ),
        }},
        "/v1/models/{model}/versions": {
            "get": {
                "summary": "list versions, by number",
                "security": read_security(),
                "parameters": paging(vec![model_p()]),
                "responses": responses(("200", ok("a page of versions", schema("VersionPage"))), READ),
            },
            "post": {
                "summary": "register the checkpoint (newest committed step, or `step`) as the next version; verified in full first",
                "security": write_security(),
                "parameters": [model_p()],
                "requestBody": json_body("RegisterRequest"),
                "responses": responses(("201", ok("the new version", schema("Version"))), &[400, 401, 403, 409, 415, 422]),
            }
        },
        "/v1/models/{model}/versions/{version}": { "get": {
            "summary": "one version",
            "security": read_security(),
            "parameters": [model_p(), version_p()],
            "responses": responses(("200", ok("the version", schema("Version"))), READ),
        }},
        "/v1/models/{model}/versions/{version}/evals": { "post": {
            "summary": "append an evaluation to a version",
            "security": write_security(),
            "parameters": [model_p(), version_p()],
            "requestBody": json_body("EvalRequest"),
            "responses": responses(("201", ok("the version with the eval appended", schema("Version"))), WRITE),
        }},
    })
}

/// A version's checkpoint files and its tensor-parallel slices.
fn file_paths() -> Value {
    json!({
        "/v1/models/{model}/versions/{version}/files/{path}": { "get": {
            "summary": "a file of the version's checkpoint step: `manifest.json` or a chunk object it lists; supports Range and If-None-Match",
            "security": read_security(),
            "parameters": [
                model_p(), version_p(),
                path_param("path", "`manifest.json` or an object such as `rank-00000/<attempt>-0000.bin` (may contain `/`)"),
                { "name": "Range", "in": "header", "required": false, "schema": { "type": "string" }, "description": "`bytes=a-b`, `bytes=a-` or `bytes=-n`; with several ranges only the first is served" },
                { "name": "If-None-Match", "in": "header", "required": false, "schema": { "type": "string" } }
            ],
            "responses": responses(("200", json!({
                "description": "the file",
                "headers": {
                    "ETag": { "schema": { "type": "string" } },
                    "Content-Length": { "schema": { "type": "integer" } },
                    "X-Gantry-Version": { "schema": { "type": "integer" }, "description": "the version served" }
                },
                "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } }
            })), &[400, 401, 404, 416, 422])
            .as_object().cloned().map(|mut m| {
                m.insert("206".into(), json!({ "description": "the requested range, with Content-Range", "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } } }));
                m.insert("304".into(), json!({ "description": "not modified (If-None-Match matched the ETag)" }));
                Value::Object(m)
            }),
        }},
        "/v1/models/{model}/versions/{version}/tensors": { "get": {
            "summary": "the parameter slices tensor-parallel rank `rank` of `tp` holds, as one safetensors file (cut from any saved layout by the checkpoint's reshard planner); `__metadata__` has `gantry.slices`: each tensor's `global_shape` and `offsets`",
            "security": read_security(),
            "parameters": [
                model_p(), version_p(),
                query_param("tp", "integer", "tensor-parallel degree (default 1)"),
                query_param("rank", "integer", "tensor-parallel rank, 0..tp (default 0)"),
                { "name": "If-None-Match", "in": "header", "required": false, "schema": { "type": "string" } }
            ],
            "responses": responses(("200", json!({
                "description": "a safetensors file",
                "headers": {
                    "ETag": { "schema": { "type": "string" } },
                    "X-Gantry-Version": { "schema": { "type": "integer" }, "description": "the version served" }
                },
                "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } }
            })), &[400, 401, 404, 422]),
        }},
    })
}

/// Aliases.
fn alias_paths() -> Value {
    json!({
        "/v1/models/{model}/aliases": { "get": {
            "summary": "every alias of a model",
            "security": read_security(),
            "parameters": [model_p()],
            "responses": responses(("200", ok("the aliases", json!({ "type": "object", "properties": { "aliases": { "type": "array", "items": schema("Alias") } } }))), READ),
        }},
        "/v1/models/{model}/aliases/{alias}": {
            "get": {
                "summary": "one alias",
                "security": read_security(),
                "parameters": [model_p(), alias_p()],
                "responses": responses(("200", ok("the alias", schema("Alias"))), READ),
            },
            "put": {
                "summary": "set or move an alias atomically (one version, or weighted targets, optionally with a shadow); the whole alias is replaced. On a server that generates, every version it will name (targets and shadow) is loaded before the move is committed, so the PUT waits for those loads and no request waits for one; a version that cannot be loaded fails the PUT (422, 507) and leaves the alias as it was. Requests already running finish on the version they started on",
                "security": write_security(),
                "parameters": [model_p(), alias_p()],
                "requestBody": json_body("AliasRequest"),
                "responses": responses(("200", ok("the alias as set", schema("Alias"))), &[400, 401, 403, 404, 415, 422, 507]),
            },
            "delete": {
                "summary": "remove an alias",
                "security": write_security(),
                "parameters": [model_p(), alias_p()],
                "responses": responses(("200", ok("what the alias pointed at", schema("Alias"))), &[400, 401, 403, 404]),
            }
        }
    })
}

/// The bodies the routes take and return.
fn schemas() -> Value {
    json!({
        "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object", "required": ["code", "message"], "properties": { "code": { "type": "string" }, "message": { "type": "string" } } } } },
        "Model": { "type": "object", "properties": {
            "name": { "type": "string" }, "created_ms": { "type": "integer" }, "description": { "type": "string" },
            "latest_version": { "type": "integer", "nullable": true },
            "aliases": { "type": "array", "items": schema("Alias") } } },
        "Version": { "type": "object", "properties": {
            "model": { "type": "string" }, "version": { "type": "integer" }, "created_ms": { "type": "integer" },
            "checkpoint_url": { "type": "string" }, "step": { "type": "integer" }, "tokens_seen": { "type": "integer" },
            "model_config": { "type": "object" }, "layout": { "type": "object" }, "data_cursor": { "type": "object" },
            "lineage": { "type": "object" }, "spec_hash": { "type": "string" }, "bytes": { "type": "integer" },
            "tensors": { "type": "integer" }, "evals": { "type": "array", "items": schema("Eval") },
            "resolved_from": { "type": "string", "description": "only when fetched by reference" } } },
        "Eval": { "type": "object", "properties": {
            "at_ms": { "type": "integer" }, "dataset": { "type": "string" }, "loss": { "type": "number" },
            "perplexity": { "type": "number" }, "tokens": { "type": "integer" }, "tp": { "type": "integer" }, "note": { "type": "string" } } },
        "Alias": { "type": "object", "properties": {
            "model": { "type": "string" }, "name": { "type": "string" },
            "targets": { "type": "array", "description": "[version, weight] pairs", "items": { "type": "array", "items": { "type": "integer" }, "minItems": 2, "maxItems": 2 } },
            "updated_ms": { "type": "integer" },
            "shadow": { "allOf": [schema("Shadow")], "nullable": true, "description": "where a share of the alias's generation requests is mirrored; null: none" } } },
        "Shadow": { "type": "object", "required": ["version", "percent"], "additionalProperties": false, "description": "mirror `percent` (1..=100, exact over every 100 eligible requests) of the alias's generation requests to `version`: same prompt tokens, sampling and seed, in the background (the client gets only the primary's answer and never waits for the shadow; a mirror is dropped while the shadow version has half of --max-pending in flight or is not loaded yet). Answers are compared (same tokens or not; for greedy requests the first differing position) and counted on /metrics as gantry_registry_shadow_*. Requests drawn to the shadow's own version are not mirrored; it may not be the alias's only version", "properties": {
            "version": { "type": "integer" }, "percent": { "type": "integer", "minimum": 1, "maximum": 100 } } },
        "ModelPage": { "type": "object", "properties": { "models": { "type": "array", "items": schema("Model") }, "next": { "type": "string", "nullable": true } } },
        "VersionPage": { "type": "object", "properties": { "versions": { "type": "array", "items": schema("Version") }, "next": { "type": "string", "nullable": true } } },
        "RegisterRequest": { "type": "object", "required": ["checkpoint"], "additionalProperties": false, "properties": {
            "checkpoint": { "type": "string", "description": "checkpoint root: local path, file:// or s3://" },
            "step": { "type": "integer", "description": "a committed step (default: the newest)" } } },
        "EvalRequest": { "type": "object", "required": ["dataset", "loss", "perplexity", "tokens", "tp"], "additionalProperties": false, "properties": {
            "at_ms": { "type": "integer", "description": "default: now" }, "dataset": { "type": "string" }, "loss": { "type": "number" },
            "perplexity": { "type": "number" }, "tokens": { "type": "integer" }, "tp": { "type": "integer" }, "note": { "type": "string" } } },
        "GenerateRequest": { "type": "object", "additionalProperties": false, "description": "exactly one of `prompt` or `tokens`", "properties": {
            "prompt": { "type": "string", "description": "text, encoded with the tokenizer the model was trained with" },
            "tokens": { "type": "array", "items": { "type": "integer" } },
            "max_tokens": { "type": "integer", "description": "default 16, at most the model's context" },
            "temperature": { "type": "number", "description": "default 1; 0 is greedy" },
            "top_p": { "type": "number", "description": "(0, 1], default 1" },
            "seed": { "type": "integer", "description": "default: drawn, and returned in the answer" },
            "stop": { "oneOf": [{ "type": "string" }, { "type": "array", "items": { "type": "string" } }], "description": "the text ends before the first of these" },
            "stop_at_eod": { "type": "boolean", "description": "end at the end-of-document token (default true)" },
            "stream": { "type": "boolean", "description": "server-sent events (default false)" } } },
        "Generation": { "type": "object", "properties": {
            "model": { "type": "string" }, "version": { "type": "integer" }, "resolved_from": { "type": "string" },
            "text": { "type": "string", "nullable": true, "description": "null for models without a tokenizer" },
            "tokens": { "type": "array", "items": { "type": "integer" } },
            "prompt_tokens": { "type": "integer" }, "completion_tokens": { "type": "integer" },
            "finish_reason": { "type": "string", "enum": ["length", "eod", "context", "stop"] },
            "seed": { "type": "integer" },
            "timing": { "type": "object", "properties": { "total_ms": { "type": "number" }, "first_token_ms": { "type": "number" } } } } },
        "AliasRequest": { "type": "object", "additionalProperties": false, "description": "exactly one of `version` or `targets`, and optionally `shadow`", "properties": {
            "version": { "type": "integer" },
            "shadow": schema("Shadow"),
            "targets": { "type": "array", "items": { "type": "object", "required": ["version", "weight"], "properties": { "version": { "type": "integer" }, "weight": { "type": "integer" } } } } } }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_describes_exactly_the_routes() {
        let doc = document();
        let mut described: Vec<(String, String)> = Vec::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                assert!(op["responses"].is_object(), "{method} {path} has responses");
                described.push((method.clone(), path.clone()));
            }
        }
        let mut routes: Vec<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        described.sort();
        routes.sort();
        assert_eq!(described, routes);
    }
}
