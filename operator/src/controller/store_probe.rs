//! Is a store reachable with the credentials given? Listing its root once answers it; the
//! answer (or the error, which names the cause) goes into the resource's status.

use std::collections::BTreeMap;
use std::time::Duration;

use granary_store::source::{SourceStore, SourceTuning};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::api::common::StoreRef;

/// The store's options with the Secret's keys added; the error says which Secret is missing.
pub async fn options_with_secret(
    client: &Client,
    namespace: &str,
    store: &StoreRef,
) -> Result<BTreeMap<String, String>, String> {
    let mut options = store.options.clone();
    let Some(secret_ref) = &store.secret_ref else {
        return Ok(options);
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = match api.get_opt(&secret_ref.name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(format!(
                "the Secret {:?} named in secretRef does not exist in namespace {namespace}; create it, e.g. kubectl create secret generic {} --from-literal=access_key_id=… --from-literal=secret_access_key=…",
                secret_ref.name, secret_ref.name
            ))
        }
        Err(e) => return Err(format!("reading the Secret {:?}: {e}", secret_ref.name)),
    };
    for (key, value) in secret.data.unwrap_or_default() {
        let value = String::from_utf8(value.0)
            .map_err(|_| format!("the Secret {:?} key {key} is not UTF-8 text", secret_ref.name))?;
        options.insert(key, value.trim_end_matches(['\n', '\r']).to_string());
    }
    for (key, value) in secret.string_data.unwrap_or_default() {
        options.insert(key, value);
    }
    Ok(options)
}

/// Lists the store's root once, within `timeout`.
pub async fn probe(uri: &str, options: &BTreeMap<String, String>, timeout: Duration) -> Result<(), String> {
    let tuning = SourceTuning { retries: 0, timeout };
    let store = SourceStore::open(uri, options, &tuning).map_err(|e| e.to_string())?;
    let listing = async {
        let mut lister = store.operator().lister("/").await?;
        use futures::TryStreamExt;
        lister.try_next().await.map(|_| ())
    };
    match tokio::time::timeout(timeout, listing).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("listing {uri}: {e}")),
        Err(_) => Err(format!(
            "{uri} did not answer within {timeout:?}; check the endpoint and the network"
        )),
    }
}
