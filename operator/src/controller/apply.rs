//! Writing owned objects: server-side apply, so a reconcile states the whole desired object
//! and the API server merges; applying the same object twice changes nothing.

use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::resources::FIELD_MANAGER;

pub async fn apply_namespaced<K>(client: &Client, obj: &K) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), obj.meta().namespace.as_deref().unwrap_or_default());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&obj.name_any(), &params, &Patch::Apply(obj)).await
}

/// Creates `obj` unless it exists, and returns what is there: for objects whose spec the
/// API server does not let change (PV sources, PVC bindings).
pub async fn create_if_absent<K>(api: &Api<K>, obj: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    if let Some(existing) = api.get_opt(&obj.name_any()).await? {
        return Ok(existing);
    }
    match api.create(&PostParams::default(), obj).await {
        Ok(created) => Ok(created),
        // Created meanwhile (another reconcile, a previous leader): take what is there.
        Err(kube::Error::Api(s)) if s.code == 409 => api.get(&obj.name_any()).await,
        Err(e) => Err(e),
    }
}

/// Deletes `name`; one already gone is not an error.
pub async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `status` over `current` when they differ; returns whether it wrote. A merge patch
/// keeps the fields it does not mention, so those `current` has and `status` lacks are
/// sent as null.
pub async fn patch_status<K, S>(api: &Api<K>, name: &str, current: Option<&S>, status: &S) -> Result<bool, super::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(false);
    }
    let encode = |s: &S| serde_json::to_value(s).map_err(|e| super::Error::Build(e.to_string()));
    let mut value = encode(status)?;
    if let (Some(old), Some(new)) = (current.map(encode).transpose()?, value.as_object_mut()) {
        for field in old.as_object().into_iter().flat_map(|o| o.keys()) {
            new.entry(field.clone()).or_insert(serde_json::Value::Null);
        }
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({ "status": value })),
    )
    .await?;
    Ok(true)
}
