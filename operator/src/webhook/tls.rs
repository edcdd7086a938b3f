//! The webhook's serving certificate: from files (cert-manager, reloaded when renewed), or
//! generated once per installation and kept in a Secret, so every operator replica serves
//! the same one, with its CA written into both webhook configurations.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use kube::{Api, Client};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} holds no {what} in PEM form")]
    NoPem { path: String, what: &'static str },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("patching the caBundle of {kind} {name}: {source} (the chart creates it; out of the chart, create it or give --tls-cert/--tls-key and set the caBundle yourself)")]
    CaBundle {
        kind: &'static str,
        name: String,
        source: kube::Error,
    },
    #[error("keeping the generated certificate in the Secret {namespace}/{name}: {source}")]
    Secret {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

/// A certificate and key in PEM.
#[derive(Clone)]
pub struct Certificate {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Certificate {
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| TlsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        Ok(Certificate {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        })
    }

    /// Whether `host` can be a subject alternative name: an IP address or a DNS name.
    pub fn valid_host(host: &str) -> Result<(), String> {
        if host.parse::<std::net::IpAddr>().is_ok() {
            return Ok(());
        }
        let labels_ok = host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
        if host.len() <= 253 && labels_ok {
            Ok(())
        } else {
            Err(format!(
                "{host:?} is neither an IP address nor a DNS name (e.g. 10.0.0.5 or webhook.example.com)"
            ))
        }
    }

    /// A self-signed certificate for `names`: DNS names (the webhook Service's) and IP
    /// addresses (an API server that calls the webhook by URL, out of the cluster). It is its
    /// own CA, so it is also the caBundle.
    pub fn self_signed(names: Vec<String>) -> Result<Self, TlsError> {
        let generated = rcgen::generate_simple_self_signed(names)?;
        Ok(Certificate {
            cert_pem: generated.cert.pem(),
            key_pem: generated.signing_key.serialize_pem(),
        })
    }

    /// The certificate and key as rustls serves them.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let certs = rustls_pemfile::certs(&mut self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Read {
                path: "certificate".into(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoPem {
                path: "the certificate".into(),
                what: "certificate",
            });
        }
        let key = rustls_pemfile::private_key(&mut self.key_pem.as_bytes())
            .map_err(|source| TlsError::Read {
                path: "key".into(),
                source,
            })?
            .ok_or(TlsError::NoPem {
                path: "the key".into(),
                what: "private key",
            })?;
        let key = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key)?;
        let certified = CertifiedKey::new(certs, key);
        certified.keys_match()?;
        Ok(Arc::new(certified))
    }

    /// A server configuration serving only this certificate.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        ServingCertificate::new(self)?.server_config()
    }
}

/// The certificate the webhook serves now; [`ServingCertificate::reload_from`] swaps in a
/// renewed one, and the next handshake gets it.
#[derive(Debug)]
pub struct ServingCertificate {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| Arc::clone(&c))
    }
}

impl ServingCertificate {
    pub fn new(certificate: &Certificate) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(ServingCertificate {
            current: RwLock::new(certificate.certified_key()?),
        }))
    }

    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        Ok(Arc::new(config))
    }

    fn replace(&self, key: Arc<CertifiedKey>) {
        if let Ok(mut current) = self.current.write() {
            *current = key;
        }
    }

    /// Re-reads `cert` and `key` every `period` and serves them when they differ from
    /// `loaded` (what is served now) and make a valid pair (cert-manager renews the Secret,
    /// the kubelet updates the mounted files). A half-written or broken pair is logged and the
    /// current certificate kept.
    pub async fn reload_from(self: Arc<Self>, loaded: Certificate, cert: PathBuf, key: PathBuf, period: Duration) {
        let mut last = Some((loaded.cert_pem, loaded.key_pem));
        loop {
            tokio::time::sleep(period).await;
            let read = match Certificate::from_files(&cert, &key) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "re-reading the webhook certificate failed; serving the current one");
                    continue;
                }
            };
            let pair = (read.cert_pem.clone(), read.key_pem.clone());
            if last.as_ref() == Some(&pair) {
                continue;
            }
            match read.certified_key() {
                Ok(key) => {
                    self.replace(key);
                    last = Some(pair);
                    tracing::info!(cert = %cert.display(), "serving the renewed webhook certificate");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the renewed webhook certificate is not usable yet; serving the current one")
                }
            }
        }
    }
}

/// The Service names a webhook Service `service` in `namespace` is reached by.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// On the Secret: the names the certificate in it was made for; other names make a new one.
const NAMES_ANNOTATION: &str = "granary.dev/certificate-names";

/// The installation's generated certificate: read from the Secret `name`, or generated and
/// stored there by the first replica to start (a create that loses the race reads the
/// winner's). Replicas so serve one certificate, and the caBundle matches every one of them.
pub async fn shared_self_signed(
    client: &Client,
    namespace: &str,
    name: &str,
    names: Vec<String>,
) -> Result<Certificate, TlsError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let err = |source| TlsError::Secret {
        namespace: namespace.to_string(),
        name: name.to_string(),
        source,
    };
    let wanted = names.join(",");
    let from_secret = |secret: &Secret| -> Option<Certificate> {
        if secret.metadata.annotations.as_ref()?.get(NAMES_ANNOTATION)? != &wanted {
            return None;
        }
        let data = secret.data.as_ref()?;
        let text = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
        let certificate = Certificate {
            cert_pem: text("tls.crt")?,
            key_pem: text("tls.key")?,
        };
        certificate.certified_key().ok().map(|_| certificate)
    };
    for _ in 0..3 {
        let existing = api.get_opt(name).await.map_err(err)?;
        if let Some(certificate) = existing.as_ref().and_then(from_secret) {
            return Ok(certificate);
        }
        let generated = Certificate::self_signed(names.clone())?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(namespace.to_string()),
                annotations: Some(BTreeMap::from([(NAMES_ANNOTATION.to_string(), wanted.clone())])),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "granary-operator".to_string(),
                )])),
                resource_version: existing.as_ref().and_then(|s| s.metadata.resource_version.clone()),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                (
                    "tls.crt".to_string(),
                    ByteString(generated.cert_pem.clone().into_bytes()),
                ),
                (
                    "tls.key".to_string(),
                    ByteString(generated.key_pem.clone().into_bytes()),
                ),
            ])),
            ..Secret::default()
        };
        let written = match existing {
            None => api.create(&PostParams::default(), &secret).await,
            // Made for other names (a changed --webhook-host): replaced, guarded by its version.
            Some(_) => api.replace(name, &PostParams::default(), &secret).await,
        };
        match written {
            Ok(_) => return Ok(generated),
            // Another replica wrote first: use what it wrote.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(err(e)),
        }
    }
    let existing = api.get(name).await.map_err(err)?;
    from_secret(&existing).ok_or_else(|| {
        err(kube::Error::Service(
            "the Secret keeps changing under the operator; do two installations share it?".into(),
        ))
    })
}

/// Writes `ca_pem` as the caBundle of every webhook of the Mutating- and the
/// ValidatingWebhookConfiguration called `name`. A JSON patch per webhook entry, not a
/// replace: two replicas starting together both succeed instead of one getting a conflict.
pub async fn patch_ca_bundle(client: &Client, name: &str, ca_pem: &str) -> Result<(), TlsError> {
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let count = |c: &MutatingWebhookConfiguration| c.webhooks.as_ref().map_or(0, Vec::len);
    set_ca_bundle(&mutating, "MutatingWebhookConfiguration", name, ca_pem, count).await?;
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let count = |c: &ValidatingWebhookConfiguration| c.webhooks.as_ref().map_or(0, Vec::len);
    set_ca_bundle(&validating, "ValidatingWebhookConfiguration", name, ca_pem, count).await
}

async fn set_ca_bundle<K>(
    api: &Api<K>,
    kind: &'static str,
    name: &str,
    ca_pem: &str,
    webhooks: impl Fn(&K) -> usize,
) -> Result<(), TlsError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let err = |source| TlsError::CaBundle {
        kind,
        name: name.to_string(),
        source,
    };
    let config = api.get(name).await.map_err(err)?;
    let bundle = serde_json::to_value(ByteString(ca_pem.as_bytes().to_vec())).unwrap_or_default();
    let ops: Vec<serde_json::Value> = (0..webhooks(&config))
        .map(|i| serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": bundle}))
        .collect();
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::Value::Array(ops)).map_err(|e| err(kube::Error::SerdeError(e)))?;
    api.patch(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Json::<()>(patch),
    )
    .await
    .map_err(err)?;
    Ok(())
}
