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

/// The schema a `$ref` names, or `schema` itself.
fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> (Option<String>, &'a Value) {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            (Some(name.to_string()), &spec["components"]["schemas"][name])
        }
        None => match schema["allOf"].as_array().and_then(|a| a.first()) {
            Some(inner) => resolve(spec, inner),
            None => (None, schema),
        },
    }
}

/// Object schemas reachable from `schema` (through `$ref`, `allOf`, array items and
/// properties), by name.
fn objects_in(spec: &Value, schema: &Value, out: &mut std::collections::BTreeSet<String>) {
    let (name, s) = resolve(spec, schema);
    if s["type"] == "array" {
        return objects_in(spec, &s["items"], out);
    }
    if s["type"] != "object" || s["properties"].as_object().is_none() {
        return;
    }
    if let Some(name) = name {
        if !out.insert(name) {
            return;
        }
    }
    for prop in s["properties"]
        .as_object()
        .into_iter()
        .flat_map(|p| p.values())
    {
        objects_in(spec, prop, out);
    }
}

/// Checks that `value` fits `schema` (types, required and known properties, nullability,
/// enums); returns what does not.
fn check_value(spec: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let (_, s) = resolve(spec, schema);
    let nullable = schema["nullable"] == true || s["nullable"] == true;
    if value.is_null() {
        if !nullable {
            errors.push(format!("{at}: null but not nullable"));
        }
        return;
    }
    if let Some(allowed) = s["enum"].as_array() {
        if !allowed.contains(value) {
            errors.push(format!("{at}: {value} not in {allowed:?}"));
        }
    }
    let fits = match s["type"].as_str() {
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some("array") => match value.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    check_value(spec, &s["items"], item, &format!("{at}[{i}]"), errors);
                }
                true
            }
            None => false,
        },
        Some("object") => match value.as_object() {
            Some(map) => {
                let props = s["properties"].as_object();
                for req in s["required"].as_array().into_iter().flatten() {
                    let req = req.as_str().unwrap_or_default();
                    if !map.contains_key(req) {
                        errors.push(format!("{at}: required {req} missing"));
                    }
                }
                for (k, v) in map {
                    match props.and_then(|p| p.get(k)) {
                        Some(p) => check_value(spec, p, v, &format!("{at}.{k}"), errors),
                        None if props.is_some() => {
                            errors.push(format!("{at}: unknown property {k}"))
                        }
                        None => check_value(
                            spec,
                            &s["additionalProperties"],
                            v,
                            &format!("{at}.{k}"),
                            errors,
                        ),
                    }
                }
                true
            }
            None => false,
        },
        _ => true,
    };
    if !fits {
        errors.push(format!("{at}: {value} is not a {}", s["type"]));
    }
}

#[test]
fn every_request_and_success_body_object_has_a_valid_example() {
    let spec: Value = serde_json::from_str(&sandbox_api::spec_json()).expect("spec is JSON");
    let mut objects = std::collections::BTreeSet::new();
    for item in spec["paths"].as_object().expect("paths").values() {
        for op in item.as_object().expect("path item").values() {
            let mut bodies: Vec<&Value> = op["requestBody"]["content"]
                .as_object()
                .into_iter()
                .flat_map(|c| c.values())
                .collect();
            for (status, resp) in op["responses"].as_object().expect("responses") {
                if status.starts_with('2') {
                    bodies.extend(
                        resp["content"]
                            .as_object()
                            .into_iter()
                            .flat_map(|c| c.values()),
                    );
                }
            }
            for body in bodies {
                objects_in(&spec, &body["schema"], &mut objects);
            }
        }
    }
    // The seed API's bodies, at least.
    for name in [
        "CreateSandboxRequest",
        "Sandbox",
        "TimeoutRequest",
        "Killed",
        "WriteFileRequest",
        "WrittenFile",
        "FileContent",
        "FileEntry",
        "Exists",
        "Removed",
        "RunCommandRequest",
        "RunCommandResponse",
        "BackgroundCommand",
        "ProcessEntry",
        "KilledProcess",
        "Health",
        "EngineHealth",
    ] {
        assert!(
            objects.contains(name),
            "{name} is not a request or 2xx body"
        );
    }
    // ...and the error body every operation shares.
    objects.insert("ErrorBody".to_string());
    let mut errors = Vec::new();
    for name in &objects {
        let schema = &spec["components"]["schemas"][name.as_str()];
        match schema.get("example") {
            Some(example) => check_value(&spec, schema, example, name, &mut errors),
            None => errors.push(format!("{name} has no example")),
        }
    }
    assert!(errors.is_empty(), "bad examples:\n{}", errors.join("\n"));
}
