//! What the API server does to a custom object with a structural schema: every field the
//! schema does not declare is dropped (pruning), and required fields are checked. Applied to
//! the published Kubeflow CRDs (`tests/kubeflow-crds/`), it tells whether the webhook's patch
//! would survive on a real cluster.

use std::path::PathBuf;

use serde_json::Value;

/// A CRD from `tests/kubeflow-crds/` as JSON.
pub fn kubeflow_crd(file: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/kubeflow-crds")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The structural schema of `version` in `crd`.
pub fn schema_of<'a>(crd: &'a Value, version: &str) -> &'a Value {
    crd["spec"]["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == version))
        .map(|v| &v["schema"]["openAPIV3Schema"])
        .unwrap_or_else(|| panic!("the CRD serves no {version}"))
}

/// Drops what `schema` does not declare, in place, as the API server does before storing.
/// At the root (and in embedded resources) `apiVersion`, `kind` and `metadata` are the API
/// server's own.
pub fn prune(value: &mut Value, schema: &Value) {
    prune_at(value, schema, true);
}

fn prune_at(value: &mut Value, schema: &Value, root: bool) {
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
    let embedded = root || schema["x-kubernetes-embedded-resource"] == true;
    match value {
        Value::Object(map) => {
            let properties = schema["properties"].as_object();
            let additional = &schema["additionalProperties"];
            map.retain(|key, _| {
                (embedded
                    && ["apiVersion", "kind", "metadata"].contains(&key.as_str())
                    && properties.is_none_or(|p| !p.contains_key(key)))
                    || properties.is_some_and(|p| p.contains_key(key))
                    || additional.is_object()
                    || *additional == true
                    || preserve
            });
            for (key, child) in map.iter_mut() {
                if embedded && ["apiVersion", "kind", "metadata"].contains(&key.as_str()) {
                    // ObjectMeta, kept by the API server whatever the schema says of it.
                    continue;
                }
                if let Some(sub) = properties.and_then(|p| p.get(key)) {
                    prune_at(child, sub, false);
                } else if additional.is_object() {
                    prune_at(child, additional, false);
                }
            }
        }
        Value::Array(items) if schema["items"].is_object() => {
            for item in items.iter_mut() {
                prune_at(item, &schema["items"], false);
            }
        }
        _ => {}
    }
}

/// Required fields missing anywhere in `value`, as JSON pointers (the API server rejects
/// such an object).
pub fn missing_required(value: &Value, schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    missing_at(value, schema, String::new(), &mut out);
    out
}

fn missing_at(value: &Value, schema: &Value, at: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for required in schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !map.contains_key(required) {
                    out.push(format!("{at}/{required}"));
                }
            }
            for (key, child) in map {
                if let Some(sub) = schema["properties"].get(key) {
                    missing_at(child, sub, format!("{at}/{key}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                missing_at(item, &schema["items"], format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Every JSON value anywhere in `value` (depth first), to find what survived wherever it is.
pub fn all_values(value: &Value) -> Vec<&Value> {
    let mut out = vec![value];
    match value {
        Value::Object(map) => map.values().for_each(|v| out.extend(all_values(v))),
        Value::Array(items) => items.iter().for_each(|v| out.extend(all_values(v))),
        _ => {}
    }
    out
}
