//! The committed OpenAPI document (`docs/openapi.json`) is the one the code generates.
//!
//! Regenerate it with `cargo xtask openapi` (or `RBEE_UPDATE_OPENAPI=1 cargo test -p queen
//! --test openapi`).

use std::path::PathBuf;

const UPDATE_ENV: &str = "RBEE_UPDATE_OPENAPI";

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
}

#[test]
fn committed_openapi_document_is_current() {
    let generated = queen::openapi_json();
    let path = committed_path();
    if std::env::var_os(UPDATE_ENV).is_some() {
        std::fs::write(&path, &generated).expect("write docs/openapi.json");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is stale (or missing): regenerate it with `cargo xtask openapi` \
         (or `{UPDATE_ENV}=1 cargo test -p queen --test openapi`) and commit the result"
    );
}

#[test]
fn the_document_describes_the_public_routes() {
    let doc: serde_json::Value =
        serde_json::from_str(&queen::openapi_json()).expect("the document is JSON");
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    for (path, method) in [
        ("/health", "get"),
        ("/v1/jobs", "post"),
        ("/v1/jobs/{job_id}/stream", "get"),
        ("/v1/jobs/{job_id}", "delete"),
        ("/v1/workers", "get"),
        ("/v1/hives", "get"),
        ("/v1/shutdown", "post"),
        ("/metrics", "get"),
        ("/v1/models", "get"),
        ("/v1/models/{id}", "get"),
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is not in the document"
        );
    }
    let schemas = &doc["components"]["schemas"];
    for name in [
        "Operation",
        "JobEvent",
        "ChatCompletionRequest",
        "ChatCompletionChunk",
        "ErrorResponse",
    ] {
        assert!(schemas[name].is_object(), "no schema {name}");
    }
    // Served parameters are advertised; refused ones are not.
    let chat = &schemas["ChatCompletionRequest"]["properties"];
    for served in ["messages", "tools", "response_format"] {
        assert!(chat[served].is_object(), "{served} is not documented");
    }
    assert!(chat["logit_bias"].is_null() && chat["modalities"].is_null());
    assert!(schemas["ResponseFormatIn"].is_object() && schemas["JsonSchemaIn"].is_object());
}
