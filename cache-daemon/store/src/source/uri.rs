//! Turning `--source s3://bucket/prefix` plus `--source-option key=value` into an opendal
//! operator, with every configuration mistake reported at start and naming its fix.

use std::collections::BTreeMap;
use std::path::Path;

use opendal::Operator;

/// How a file's version is derived, per kind of store: an ETag where the store has one, else
/// size + modification time. It must be the same for stat and list, or blocks cached by a
/// prewarm would not be found by reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionScheme {
    ETag,
    SizeAndMtime,
}

/// A source store configuration error; each message names what to change.
#[derive(Debug, thiserror::Error)]
pub enum SourceConfigError {
    #[error("malformed source URI {uri:?}: {reason}")]
    MalformedUri { uri: String, reason: String },
    #[error("unknown source scheme {scheme:?} in {uri:?}: use one of {supported}")]
    UnknownScheme {
        scheme: String,
        uri: String,
        supported: String,
    },
    #[error("the {scheme} store is not built into this binary: rebuild granary-cache with `--features {feature}`")]
    NotBuilt {
        scheme: &'static str,
        feature: &'static str,
    },
    #[error("unknown option {key:?} for a {scheme} source: known options are {known}")]
    UnknownOption {
        scheme: &'static str,
        key: String,
        known: String,
    },
    #[error("{scheme} source {uri:?} is missing {what}: {fix}")]
    MissingOption {
        scheme: &'static str,
        uri: String,
        what: &'static str,
        fix: &'static str,
    },
    #[error("option {key}={value:?} is invalid: {reason}")]
    InvalidOption { key: String, value: String, reason: String },
    #[error("the store rejected the configuration for {uri:?}: {detail}")]
    Rejected { uri: String, detail: String },
}

/// Options accepted for `s3://` sources, as opendal names them.
const S3_OPTIONS: &[&str] = &[
    "endpoint",
    "region",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "role_arn",
    "external_id",
    "role_session_name",
    "profile",
    "anonymous",
    "credentials",
    "enable_virtual_host_style",
    "server_side_encryption",
    "server_side_encryption_aws_kms_key_id",
    "enable_request_payer",
];

/// A parsed source location: the scheme, the bucket (or host), and the root inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceUri {
    pub scheme: String,
    pub authority: String,
    pub root: String,
}

impl SourceUri {
    pub fn parse(uri: &str) -> Result<Self, SourceConfigError> {
        let malformed = |reason: &str| SourceConfigError::MalformedUri {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
            malformed("expected <scheme>://<bucket>/<prefix>, e.g. s3://datasets/imagenet/ or fs:///data/imagenet")
        })?;
        if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(malformed("the scheme must be letters and digits, e.g. s3 or fs"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if path.split('/').any(|c| c == "..") {
            return Err(malformed("the path must not contain `..`"));
        }
        let mut root = path.to_string();
        if !root.ends_with('/') {
            root.push('/');
        }
        Ok(SourceUri {
            scheme: scheme.to_ascii_lowercase(),
            authority: authority.to_string(),
            root,
        })
    }
}

/// Builds the operator for `uri` and says how its files are versioned.
pub fn build_operator(
    uri: &str,
    options: &BTreeMap<String, String>,
) -> Result<(Operator, VersionScheme), SourceConfigError> {
    // opendal's HTTP client is rustls without a provider of its own (one provider per process).
    crate::tls::install();
    let parsed = SourceUri::parse(uri)?;
    let rejected = |e: opendal::Error| SourceConfigError::Rejected {
        uri: uri.to_string(),
        detail: e.to_string(),
    };
    match parsed.scheme.as_str() {
        "s3" => {
            let config = s3_config(uri, &parsed, options)?;
            let op = Operator::from_iter::<opendal::services::S3>(config).map_err(rejected)?;
            Ok((op, VersionScheme::ETag))
        }
        "fs" | "file" => {
            if !parsed.authority.is_empty() {
                return Err(SourceConfigError::MalformedUri {
                    uri: uri.to_string(),
                    reason: "fs URIs take an absolute path with an empty host: fs:///data/imagenet".into(),
                });
            }
            if let Some(key) = options.keys().next() {
                return Err(SourceConfigError::UnknownOption {
                    scheme: "fs",
                    key: key.clone(),
                    known: "none".into(),
                });
            }
            if !Path::new(&parsed.root).is_dir() {
                return Err(SourceConfigError::MalformedUri {
                    uri: uri.to_string(),
                    reason: format!("{} is not a directory on this machine", parsed.root),
                });
            }
            let op = Operator::new(opendal::services::Fs::default().root(&parsed.root)).map_err(rejected)?;
            Ok((op, VersionScheme::SizeAndMtime))
        }
        "gcs" | "gs" => generic::<GcsService>(uri, &parsed, options),
        "azblob" => generic::<AzblobService>(uri, &parsed, options),
        "oss" => generic::<OssService>(uri, &parsed, options),
        "webhdfs" => generic::<WebhdfsService>(uri, &parsed, options),
        "hdfs" => Err(SourceConfigError::UnknownScheme {
            scheme: "hdfs".into(),
            uri: uri.to_string(),
            supported: "webhdfs://namenode:9870/path for HDFS (no JVM needed), s3, fs, gcs, azblob, oss".into(),
        }),
        other => Err(SourceConfigError::UnknownScheme {
            scheme: other.to_string(),
            uri: uri.to_string(),
            supported: "s3://, fs://, gcs://, azblob://, oss://, webhdfs://".into(),
        }),
    }
}

fn s3_config(
    uri: &str,
    parsed: &SourceUri,
    options: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, SourceConfigError> {
    for key in options.keys() {
        if !S3_OPTIONS.contains(&key.as_str()) {
            return Err(SourceConfigError::UnknownOption {
                scheme: "s3",
                key: key.clone(),
                known: S3_OPTIONS.join(", "),
            });
        }
    }
    if parsed.authority.is_empty() {
        return Err(SourceConfigError::MalformedUri {
            uri: uri.to_string(),
            reason: "the bucket is missing: s3://<bucket>/<prefix>".into(),
        });
    }
    let flag = |key: &str| -> Result<bool, SourceConfigError> {
        match options.get(key).map(String::as_str) {
            None => Ok(false),
            Some("true") | Some("1") | Some("yes") => Ok(true),
            Some("false") | Some("0") | Some("no") => Ok(false),
            Some(other) => Err(SourceConfigError::InvalidOption {
                key: key.into(),
                value: other.into(),
                reason: "expected true or false".into(),
            }),
        }
    };
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let missing = |what, fix| SourceConfigError::MissingOption {
        scheme: "s3",
        uri: uri.to_string(),
        what,
        fix,
    };

    let mut config: Vec<(String, String)> = vec![
        ("bucket".into(), parsed.authority.clone()),
        ("root".into(), parsed.root.clone()),
    ];
    let region = options
        .get("region")
        .cloned()
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .ok_or_else(|| missing("a region", "pass --source-option region=us-east-1 or set AWS_REGION"))?;
    config.push(("region".into(), region));

    let anonymous = flag("anonymous")?;
    let auto_credentials = match options.get("credentials").map(String::as_str) {
        None => false,
        Some("auto") => true,
        Some(other) => {
            return Err(SourceConfigError::InvalidOption {
                key: "credentials".into(),
                value: other.into(),
                reason: "the only value is `auto` (let the AWS credential chain find them: instance profile, IRSA, profile files)".into(),
            })
        }
    };
    match (options.get("access_key_id"), options.get("secret_access_key")) {
        (Some(_), None) => {
            return Err(missing(
                "secret_access_key",
                "access_key_id was given: pass --source-option secret_access_key=… as well",
            ))
        }
        (None, Some(_)) => {
            return Err(missing(
                "access_key_id",
                "secret_access_key was given: pass --source-option access_key_id=… as well",
            ))
        }
        _ => {}
    }
    let has_static = options.contains_key("access_key_id")
        || (env("AWS_ACCESS_KEY_ID").is_some() && env("AWS_SECRET_ACCESS_KEY").is_some());
    let has_other = options.contains_key("role_arn")
        || options.contains_key("profile")
        || env("AWS_WEB_IDENTITY_TOKEN_FILE").is_some()
        || env("AWS_PROFILE").is_some()
        || env("AWS_CONTAINER_CREDENTIALS_FULL_URI").is_some()
        || env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").is_some();
    if !(has_static || has_other || anonymous || auto_credentials) {
        return Err(missing(
            "credentials",
            "pass --source-option access_key_id=… and secret_access_key=…, set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
             use --source-option credentials=auto for instance or workload identities, or --source-option anonymous=true for a public bucket",
        ));
    }
    if anonymous {
        config.push(("allow_anonymous".into(), "true".into()));
        config.push(("skip_signature".into(), "true".into()));
    }
    for (key, value) in options {
        match key.as_str() {
            "region" | "anonymous" | "credentials" => {}
            _ => config.push((key.clone(), value.clone())),
        }
    }
    Ok(config)
}

/// Stores with no Granary-specific checks: their options go to opendal by opendal's names.
trait GenericService {
    const SCHEME: &'static str;
    const FEATURE: &'static str;
    const AUTHORITY_KEY: &'static str;
    const VERSION: VersionScheme;
    fn build(config: Vec<(String, String)>) -> Option<opendal::Result<Operator>>;
}

fn generic<S: GenericService>(
    uri: &str,
    parsed: &SourceUri,
    options: &BTreeMap<String, String>,
) -> Result<(Operator, VersionScheme), SourceConfigError> {
    let mut config: Vec<(String, String)> = vec![("root".into(), parsed.root.clone())];
    if !S::AUTHORITY_KEY.is_empty() {
        config.push((S::AUTHORITY_KEY.into(), parsed.authority.clone()));
    }
    config.extend(options.iter().map(|(k, v)| (k.clone(), v.clone())));
    match S::build(config) {
        None => Err(SourceConfigError::NotBuilt {
            scheme: S::SCHEME,
            feature: S::FEATURE,
        }),
        Some(Err(e)) => Err(SourceConfigError::Rejected {
            uri: uri.to_string(),
            detail: e.to_string(),
        }),
        Some(Ok(op)) => Ok((op, S::VERSION)),
    }
}

macro_rules! generic_service {
    ($name:ident, $scheme:literal, $feature:literal, $authority:literal, $version:expr, $builder:ident) => {
        struct $name;
        impl GenericService for $name {
            const SCHEME: &'static str = $scheme;
            const FEATURE: &'static str = $feature;
            const AUTHORITY_KEY: &'static str = $authority;
            const VERSION: VersionScheme = $version;
            #[allow(unused_variables)]
            fn build(config: Vec<(String, String)>) -> Option<opendal::Result<Operator>> {
                #[cfg(feature = $feature)]
                return Some(Operator::from_iter::<opendal::services::$builder>(config));
                #[cfg(not(feature = $feature))]
                return None;
            }
        }
    };
}

generic_service!(GcsService, "gcs", "gcs", "bucket", VersionScheme::ETag, Gcs);
generic_service!(
    AzblobService,
    "azblob",
    "azblob",
    "container",
    VersionScheme::ETag,
    Azblob
);
generic_service!(OssService, "oss", "oss", "bucket", VersionScheme::ETag, Oss);
generic_service!(
    WebhdfsService,
    "webhdfs",
    "webhdfs",
    "",
    VersionScheme::SizeAndMtime,
    Webhdfs
);

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn parses_bucket_and_prefix() {
        let uri = SourceUri::parse("s3://datasets/imagenet").unwrap();
        assert_eq!(uri.scheme, "s3");
        assert_eq!(uri.authority, "datasets");
        assert_eq!(uri.root, "/imagenet/");
        assert_eq!(SourceUri::parse("s3://datasets").unwrap().root, "/");
        assert_eq!(SourceUri::parse("fs:///data/x/").unwrap().root, "/data/x/");
    }

    #[test]
    fn malformed_uris_are_explained() {
        let err = SourceUri::parse("datasets/imagenet").unwrap_err().to_string();
        assert!(err.contains("expected <scheme>://"), "{err}");
        let err = SourceUri::parse("s3://b/../etc").unwrap_err().to_string();
        assert!(err.contains(".."), "{err}");
    }

    #[test]
    fn unknown_scheme_lists_the_supported_ones() {
        let err = build_operator("ftp://host/x", &opts(&[])).unwrap_err().to_string();
        assert!(err.contains("unknown source scheme \"ftp\""), "{err}");
        assert!(err.contains("s3://"), "{err}");
    }

    #[test]
    fn s3_needs_region_and_credentials() {
        let base = [("endpoint", "http://127.0.0.1:9")];
        // Both come from options here; the environment may hold AWS_* variables on a laptop.
        let err = build_operator("s3://b/p", &opts(&[base[0], ("region", "r"), ("access_key_id", "a")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("secret_access_key"), "{err}");
        if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
            let err = build_operator("s3://b/p", &opts(&[base[0]])).unwrap_err().to_string();
            assert!(err.contains("missing a region"), "{err}");
        }
        let ok = build_operator(
            "s3://b/p",
            &opts(&[base[0], ("region", "us-east-1"), ("anonymous", "true")]),
        );
        assert!(ok.is_ok(), "{:?}", ok.err());
        let err = build_operator("s3://b/p", &opts(&[("endpont", "x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown option \"endpont\""), "{err}");
    }

    #[test]
    fn fs_rejects_a_missing_directory() {
        let err = build_operator("fs:///no/such/dir/granary", &opts(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a directory"), "{err}");
    }

    #[test]
    fn stores_left_out_of_the_build_say_which_feature_adds_them() {
        if cfg!(feature = "gcs") {
            return;
        }
        let err = build_operator("gcs://bucket/x", &opts(&[])).unwrap_err().to_string();
        assert!(err.contains("--features gcs"), "{err}");
    }
}
