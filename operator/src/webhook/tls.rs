//! The webhook's serving certificate: from files (cert-manager), or generated at start with
//! the CA bundle written into the MutatingWebhookConfiguration.

use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use kube::{Api, Client};

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
    #[error("patching the caBundle of MutatingWebhookConfiguration {name}: {source}")]
    CaBundle { name: String, source: kube::Error },
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

    /// A self-signed certificate for `dns_names` (the webhook Service's names); it is its
    /// own CA, so it is also the caBundle.
    pub fn self_signed(dns_names: Vec<String>) -> Result<Self, TlsError> {
        let generated = rcgen::generate_simple_self_signed(dns_names)?;
        Ok(Certificate {
            cert_pem: generated.cert.pem(),
            key_pem: generated.signing_key.serialize_pem(),
        })
    }

    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
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
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(Arc::new(config))
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

/// Writes `ca_pem` as the caBundle of every webhook in the configuration `name`.
pub async fn patch_ca_bundle(client: &Client, name: &str, ca_pem: &str) -> Result<(), TlsError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let err = |source| TlsError::CaBundle {
        name: name.to_string(),
        source,
    };
    let mut config = api.get(name).await.map_err(err)?;
    for webhook in config.webhooks.iter_mut().flatten() {
        webhook.client_config.ca_bundle = Some(ByteString(ca_pem.as_bytes().to_vec()));
    }
    api.replace(name, &PostParams::default(), &config).await.map_err(err)?;
    Ok(())
}
