//! An in-memory Kubernetes API behind kube's mocked service (tower-test): enough of the API
//! server's behaviour (create, get, list, server-side apply, merge and JSON patches, replace
//! with resourceVersion checks, delete with finalizers, status subresources) for the
//! controllers to run against it unchanged, with every request recorded. `https::serve`
//! puts the same API on a real TLS socket, with watches, for the operator binary.

#![allow(dead_code)]

pub mod admission;
pub mod https;
pub mod schema;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

#[derive(Default)]
pub struct Store {
    /// Objects by collection path (`/api/v1/namespaces/ns/pods`), then name.
    pub objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// (method, path) of every request.
    pub log: Vec<(String, String)>,
    /// (method, path, query) of every request, for asserting what a reconcile asks.
    pub requests: Vec<(String, String, String)>,
    /// Every change, for watches: (resourceVersion, collection, ADDED/MODIFIED/DELETED, object).
    pub changes: Vec<(u64, String, &'static str, Value)>,
    next_version: u64,
}

impl Store {
    fn changed(&mut self, collection: &str, type_: &'static str, obj: &Value) {
        let version = obj["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(self.next_version);
        self.changes.push((version, collection.to_string(), type_, obj.clone()));
    }
}

/// Whether the collection `actual` (`/apis/g/v/namespaces/ns/plural`) is in the requested
/// one, which may be the all-namespaces form (`/apis/g/v/plural`).
pub fn in_collection(requested: &str, actual: &str) -> bool {
    if requested == actual {
        return true;
    }
    let parts: Vec<&str> = actual.split('/').collect();
    match parts.iter().position(|p| *p == "namespaces") {
        Some(i) if parts.len() == i + 3 => {
            let mut without: Vec<&str> = parts[..i].to_vec();
            without.push(parts[i + 2]);
            without.join("/") == requested
        }
        _ => false,
    }
}

#[derive(Clone, Default)]
pub struct FakeApi {
    pub store: Arc<Mutex<Store>>,
    /// Requests whose path contains one of these get 503 over HTTPS (an API server that
    /// cannot be reached for them).
    pub refused: Arc<Mutex<Vec<String>>>,
}

fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}),
    )
}

/// Splits `/apis/g/v/namespaces/ns/plural/name/status` into (collection, name, subresource).
fn split_path(path: &str) -> (String, Option<String>, Option<String>) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // The collection ends at the plural: after `namespaces/<ns>` or right after the version.
    let base = if parts.first() == Some(&"api") { 2 } else { 3 };
    let plural_at = if parts.get(base) == Some(&"namespaces") && parts.len() > base + 2 {
        base + 2
    } else {
        base
    };
    let collection = format!("/{}", parts[..=plural_at.min(parts.len() - 1)].join("/"));
    let name = parts.get(plural_at + 1).map(|s| s.to_string());
    let sub = parts.get(plural_at + 2).map(|s| s.to_string());
    (collection, name, sub)
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.replace("%3D", "=").replace("%2C", ",").replace("%2F", "/"))
    })
}

fn labels_match(obj: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => obj["metadata"]["labels"][k] == v,
            None => !obj["metadata"]["labels"][term].is_null(),
        })
}

impl FakeApi {
    pub fn new() -> (Self, Client) {
        let fake = FakeApi::default();
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = fake.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let (code, value) = server.handle_request(&parts, &bytes);
                let response = Response::builder()
                    .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&value).unwrap_or_default()))
                    .expect("a response");
                respond.send_response(response);
            }
        });
        (fake, Client::new(service, "default"))
    }

    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.store.lock().ok()?.objects.get(collection)?.get(name).cloned()
    }

    pub fn list(&self, collection: &str) -> Vec<Value> {
        let store = self.store.lock().expect("store");
        store
            .objects
            .get(collection)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Puts an object in place as if another client (a kubelet, a user) had written it.
    pub fn put(&self, collection: &str, mut obj: Value) {
        let mut store = self.store.lock().expect("store");
        store.next_version += 1;
        let version = store.next_version.to_string();
        let name = obj["metadata"]["name"].as_str().expect("a name").to_string();
        obj["metadata"]["resourceVersion"] = json!(version);
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{name}-{version}"));
        }
        if obj["metadata"]["generation"].is_null() {
            obj["metadata"]["generation"] = json!(1);
        }
        let existed = store
            .objects
            .entry(collection.to_string())
            .or_default()
            .insert(name, obj.clone())
            .is_some();
        store.changed(collection, if existed { "MODIFIED" } else { "ADDED" }, &obj);
    }

    /// Changes in `collection` (or the all-namespaces form of it) after `since`, matching
    /// `selector`.
    pub fn changes_since(&self, collection: &str, since: u64, selector: &str) -> Vec<(u64, &'static str, Value)> {
        let store = self.store.lock().expect("store");
        store
            .changes
            .iter()
            .filter(|(v, c, _, o)| *v > since && in_collection(collection, c) && labels_match(o, selector))
            .map(|(v, _, t, o)| (*v, *t, o.clone()))
            .collect()
    }

    /// (method, path, query) of every request so far.
    pub fn requests(&self) -> Vec<(String, String, String)> {
        self.store.lock().expect("store").requests.clone()
    }

    /// Requests logged so far.
    pub fn log(&self) -> Vec<(String, String)> {
        self.store.lock().expect("store").log.clone()
    }

    /// Every object, to compare before and after a reconcile.
    pub fn snapshot(&self) -> BTreeMap<String, BTreeMap<String, Value>> {
        self.store.lock().expect("store").objects.clone()
    }

    /// One request as the API server gets it, over either transport.
    fn handle_request(&self, parts: &http::request::Parts, body: &[u8]) -> (u16, Value) {
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        self.handle(
            parts.method.as_str(),
            parts.uri.path(),
            parts.uri.query(),
            content_type,
            body,
        )
    }

    fn handle(&self, method: &str, path: &str, query: Option<&str>, content_type: &str, body: &[u8]) -> (u16, Value) {
        let mut store = self.store.lock().expect("store");
        store.log.push((method.to_string(), path.to_string()));
        store
            .requests
            .push((method.to_string(), path.to_string(), query.unwrap_or("").to_string()));
        let (collection, name, sub) = split_path(path);
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return status(400, "BadRequest", format!("body: {e}")),
            }
        };
        store.next_version += 1;
        let version = store.next_version.to_string();
        if method == "GET" && name.is_none() {
            let selector = query_param(query, "labelSelector").unwrap_or_default();
            let items: Vec<Value> = store
                .objects
                .iter()
                .filter(|(c, _)| in_collection(&collection, c))
                .flat_map(|(_, objects)| objects.values())
                .filter(|o| labels_match(o, &selector))
                .cloned()
                .collect();
            return (
                200,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": version}, "items": items}),
            );
        }
        let (code, value) = Self::write(
            &mut store,
            method,
            path,
            &collection,
            name.clone(),
            sub,
            content_type,
            body,
            &version,
        );
        if code < 300 && method != "GET" {
            let name = name
                .or_else(|| value["metadata"]["name"].as_str().map(str::to_string))
                .unwrap_or_default();
            match store.objects.get(&collection).and_then(|o| o.get(&name)).cloned() {
                None => store.changed(&collection, "DELETED", &value),
                Some(now) if now["metadata"]["resourceVersion"] == version.as_str() => {
                    store.changed(&collection, if method == "POST" { "ADDED" } else { "MODIFIED" }, &now)
                }
                Some(_) => {}
            }
        }
        (code, value)
    }

    /// A request other than a list; the change it made, if any, for watches.
    #[allow(clippy::too_many_arguments)]
    fn write(
        store: &mut Store,
        method: &str,
        path: &str,
        collection: &str,
        name: Option<String>,
        sub: Option<String>,
        content_type: &str,
        body: Value,
        version: &str,
    ) -> (u16, Value) {
        let objects = store.objects.entry(collection.to_string()).or_default();
        match (method, name) {
            ("GET", None) => {
                let items: Vec<Value> = objects.values().cloned().collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": version}, "items": items}),
                )
            }
            ("GET", Some(name)) => match objects.get(&name) {
                Some(o) => (200, o.clone()),
                None => status(404, "NotFound", format!("{name} not found")),
            },
            ("POST", _) => {
                let mut obj = body;
                let name = match obj["metadata"]["name"].as_str() {
                    Some(n) => n.to_string(),
                    None => match obj["metadata"]["generateName"].as_str() {
                        Some(prefix) => format!("{prefix}{version}"),
                        None => return status(422, "Invalid", "metadata.name is required".into()),
                    },
                };
                if objects.contains_key(&name) {
                    return status(409, "AlreadyExists", format!("{name} already exists"));
                }
                obj["metadata"]["name"] = json!(name);
                obj["metadata"]["resourceVersion"] = json!(version);
                obj["metadata"]["uid"] = json!(format!("uid-{name}-{version}"));
                obj["metadata"]["generation"] = json!(1);
                obj["metadata"]["creationTimestamp"] = json!("2026-11-23T00:00:00Z");
                objects.insert(name, obj.clone());
                (201, obj)
            }
            ("PATCH", Some(name)) => {
                let existing = objects.get(&name).cloned();
                let is_status = sub.as_deref() == Some("status");
                let mut obj = match (&existing, content_type) {
                    (Some(o), _) => o.clone(),
                    (None, ct) if ct.contains("apply-patch") => {
                        json!({"metadata": {"name": name, "uid": format!("uid-{name}-{version}"), "generation": 1, "creationTimestamp": "2026-11-23T00:00:00Z"}})
                    }
                    (None, _) => return status(404, "NotFound", format!("{name} not found")),
                };
                let before = obj.clone();
                if content_type.contains("json-patch") {
                    let mut patch: json_patch::Patch = match serde_json::from_value(body) {
                        Ok(p) => p,
                        Err(e) => return status(400, "BadRequest", format!("patch: {e}")),
                    };
                    // As the API server does, a test for null passes on a field that is absent.
                    patch.0.retain(|op| match op {
                        json_patch::PatchOperation::Test(t) => {
                            !(t.value.is_null() && obj.pointer(t.path.as_str()).is_none())
                        }
                        _ => true,
                    });
                    if let Err(e) = json_patch::patch(&mut obj, &patch) {
                        return status(422, "Invalid", format!("the JSON patch failed: {e}"));
                    }
                } else {
                    let mut body = body;
                    if is_status {
                        body = json!({"status": body["status"].clone()});
                    } else if let Some(m) = body.as_object_mut() {
                        m.remove("status");
                    }
                    json_patch::merge(&mut obj, &body);
                }
                if before["spec"] != obj["spec"] && existing.is_some() {
                    let generation = obj["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                    obj["metadata"]["generation"] = json!(generation);
                }
                if obj == before {
                    // A no-op write (an apply of the same object) leaves the version alone.
                    return (200, obj);
                }
                obj["metadata"]["resourceVersion"] = json!(version);
                let finished_deleting = !obj["metadata"]["deletionTimestamp"].is_null()
                    && obj["metadata"]["finalizers"].as_array().is_none_or(|f| f.is_empty());
                if finished_deleting {
                    objects.remove(&name);
                } else {
                    objects.insert(name, obj.clone());
                }
                (200, obj)
            }
            ("PUT", Some(name)) => {
                let Some(existing) = objects.get(&name) else {
                    return status(404, "NotFound", format!("{name} not found"));
                };
                let sent = body["metadata"]["resourceVersion"].clone();
                if !sent.is_null() && sent != existing["metadata"]["resourceVersion"] {
                    return status(409, "Conflict", format!("{name} was modified"));
                }
                let mut obj = body;
                obj["metadata"]["resourceVersion"] = json!(version);
                objects.insert(name, obj.clone());
                (200, obj)
            }
            ("DELETE", Some(name)) => match objects.get_mut(&name) {
                None => status(404, "NotFound", format!("{name} not found")),
                Some(obj) if obj["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty()) => {
                    obj["metadata"]["deletionTimestamp"] = json!("2026-11-23T00:00:01Z");
                    obj["metadata"]["resourceVersion"] = json!(version);
                    (200, obj.clone())
                }
                Some(_) => {
                    let obj = objects.remove(&name).unwrap_or_default();
                    (200, obj)
                }
            },
            (m, n) => status(405, "MethodNotAllowed", format!("{m} {path} ({n:?})")),
        }
    }
}

pub const DATASETS: &str = "/apis/granary.dev/v1alpha1/namespaces/ml/datasets";
pub const POLICIES: &str = "/apis/granary.dev/v1alpha1/namespaces/ml/checkpointpolicies";
pub const STATEFULSETS: &str = "/apis/apps/v1/namespaces/ml/statefulsets";
pub const CONFIGMAPS: &str = "/api/v1/namespaces/ml/configmaps";
pub const SERVICES: &str = "/api/v1/namespaces/ml/services";
pub const PVCS: &str = "/api/v1/namespaces/ml/persistentvolumeclaims";
pub const PVS: &str = "/api/v1/persistentvolumes";
pub const PODS: &str = "/api/v1/namespaces/ml/pods";
pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ml/events";
pub const SECRETS: &str = "/api/v1/namespaces/ml/secrets";

/// The volume key the tests' operator marks PVs with, and their granary-csi checks (the
/// chart makes a random one per release).
pub const TEST_VOLUME_KEY: &[u8; 32] = b"granary-test-volume-key-32-bytes";

pub fn test_volume_key() -> Arc<granary_node_api::volume_mark::VolumeKey> {
    Arc::new(granary_node_api::volume_mark::VolumeKey::new(TEST_VOLUME_KEY).expect("32 bytes"))
}

/// Writes the test key where `--volume-key-file` reads it, as the chart's Secret mount does.
pub fn write_test_volume_key(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("volume.key");
    std::fs::write(&path, TEST_VOLUME_KEY).expect("write the volume key");
    path
}

/// A PV's attributes as granary-csi hands them to the node daemon: the operator's mark
/// checked against the handle, then dropped.
pub fn checked_attributes(pv: &Value) -> BTreeMap<String, String> {
    use granary_node_api::volume_mark::MARK_ATTRIBUTE;
    let csi = &pv["spec"]["csi"];
    let mut attributes: BTreeMap<String, String> =
        serde_json::from_value(csi["volumeAttributes"].clone()).expect("volumeAttributes");
    let handle = csi["volumeHandle"].as_str().expect("volumeHandle");
    test_volume_key()
        .verify(handle, &attributes)
        .expect("the operator marks its PVs");
    attributes.remove(MARK_ATTRIBUTE);
    attributes
}
