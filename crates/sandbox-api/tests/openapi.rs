//! The committed OpenAPI document matches the code, and every operation is documented.

use std::path::PathBuf;

use serde_json::Value;

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../openapi/openapi.yaml")
}

#[test]
fn committed_openapi_yaml_matches_the_code() {
    let generated = sandbox_api::spec_yaml();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(committed_path(), &generated).expect("write openapi.yaml");
        return;
    }
    let committed = std::fs::read_to_string(committed_path()).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi/openapi.yaml is stale: regenerate it with \
         `UPDATE_OPENAPI=1 cargo test -p sandbox-api --test openapi` \
         (or `colima-e2b openapi > openapi/openapi.yaml`)"
    );
}

#[test]
fn every_operation_has_summary_description_and_error_responses() {
    let spec: Value = serde_json::from_str(&sandbox_api::spec_json()).expect("spec is JSON");
    let paths = spec["paths"].as_object().expect("paths");
    assert!(paths.len() >= 3, "too few paths: {:?}", paths.keys());
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            let what = format!("{method} {path}");
            for field in ["summary", "description", "operationId"] {
                let text = op[field].as_str().unwrap_or_default();
                assert!(!text.trim().is_empty(), "{what} has no {field}");
            }
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|k| k.starts_with('2')),
                "{what}: no success response"
            );
            if path != "/health" {
                for status in ["404", "422", "500", "503"] {
                    assert!(
                        responses.contains_key(status),
                        "{what}: no {status} response"
                    );
                }
            }
        }
    }
}
