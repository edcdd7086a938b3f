//! What of the host a volume may reach. The node daemon runs privileged, and a volume's
//! attributes come from a CheckpointPolicy's or a Dataset's spec, which a namespace's users
//! write: a `writebackDir`, an `fs://` store or `credentials=auto` would otherwise hand
//! them the node's directories and the node's cloud identity. Each is served only where the
//! node's own flags allow it, checked before anything is created on the host.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use granary_store::source::SourceUri;

/// The node's rules, from its flags.
#[derive(Debug, Clone, Default)]
pub struct HostAccess {
    /// Host directories under which a checkpoint volume's `writebackDir` may lie
    /// (`--writeback-root`).
    pub writeback_roots: Vec<PathBuf>,
    /// Host directories under which an `fs://` source or target may lie (`--fs-store-root`);
    /// none by default.
    pub fs_store_roots: Vec<PathBuf>,
    /// Whether `credentials=auto` (the node's own instance or workload identity) may be used
    /// (`--allow-auto-credentials`).
    pub allow_auto_credentials: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error("{what} {value:?} is not an absolute host path")]
    NotAbsolute { what: &'static str, value: String },
    #[error("{what} {value:?} resolves to {resolved:?}, which is not under a directory this node allows ({allowed}); the node's administrator adds one with {flag}")]
    OutsideRoots {
        what: &'static str,
        value: String,
        resolved: PathBuf,
        allowed: String,
        flag: &'static str,
    },
    #[error("{how} would act with this node's own cloud identity, which this node does not lend to volumes; give the store's keys (access_key_id, secret_access_key) in the Dataset's or CheckpointPolicy's secretRef, set anonymous=true for a public bucket, or start the node daemon with --allow-auto-credentials (helm: node.allowAutoCredentials)")]
    NodeIdentity { how: &'static str },
    #[error("cannot resolve {what} {value:?}: {cause}")]
    Unresolvable {
        what: &'static str,
        value: String,
        cause: String,
    },
}

/// `path` with `.` and `..` taken out lexically and every symlink of its existing part
/// resolved; the part that does not exist yet is appended as written (it holds no `..`).
pub fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let mut lexical = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Normal(c) => lexical.push(c),
            Component::ParentDir => {
                lexical.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    let mut existing = lexical.as_path();
    let mut rest = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(real) => {
                let mut resolved = real;
                resolved.extend(rest.iter().rev());
                return Ok(resolved);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_owned());
                    existing = parent;
                }
                _ => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
}

impl HostAccess {
    fn under_roots(
        &self,
        what: &'static str,
        value: &str,
        roots: &[PathBuf],
        flag: &'static str,
    ) -> Result<PathBuf, AccessError> {
        let path = Path::new(value);
        if !path.is_absolute() {
            return Err(AccessError::NotAbsolute {
                what,
                value: value.to_string(),
            });
        }
        let unresolvable = |e: std::io::Error| AccessError::Unresolvable {
            what,
            value: value.to_string(),
            cause: e.to_string(),
        };
        let resolved = resolve(path).map_err(unresolvable)?;
        for root in roots {
            let Ok(root) = resolve(root) else { continue };
            if resolved.starts_with(&root) {
                return Ok(resolved);
            }
        }
        let allowed = if roots.is_empty() {
            "none".to_string()
        } else {
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        Err(AccessError::OutsideRoots {
            what,
            value: value.to_string(),
            resolved,
            allowed,
            flag,
        })
    }

    /// The host directory a `writebackDir` attribute names, resolved, when it is allowed.
    pub fn writeback_dir(&self, value: &str) -> Result<PathBuf, AccessError> {
        self.under_roots(
            "writebackDir",
            value,
            &self.writeback_roots,
            "--writeback-root (helm: node.extraHostPaths)",
        )
    }

    /// Checks a store URI and its options: an `fs://` store must lie under an allowed root,
    /// and an S3 store must sign with the volume's own keys unless the node lends its
    /// identity. Other URIs are checked by the store itself.
    pub fn store(&self, uri: &str, options: &BTreeMap<String, String>) -> Result<(), AccessError> {
        let Ok(parsed) = SourceUri::parse(uri) else {
            return Ok(());
        };
        match parsed.scheme.as_str() {
            "fs" | "file" => {
                self.under_roots("fs:// store", &parsed.root, &self.fs_store_roots, "--fs-store-root")?;
            }
            "s3" if !self.allow_auto_credentials => {
                if let Some(how) = s3_node_identity(options) {
                    return Err(AccessError::NodeIdentity { how });
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// How an S3 store with `options` would sign with the node's credentials rather than the
/// volume's: `credentials=auto`, an AWS profile (the node's config files), or no keys at all
/// (the store then takes the node's environment, web identity or instance profile, as the
/// AWS credential chain does). Keys from the volume's Secret, or an anonymous bucket, do not.
fn s3_node_identity(options: &BTreeMap<String, String>) -> Option<&'static str> {
    if options.get("credentials").is_some_and(|c| c == "auto") {
        return Some("credentials=auto");
    }
    if options.contains_key("profile") {
        return Some("an AWS profile");
    }
    let anonymous = options.get("anonymous").is_some_and(|a| a == "true");
    if !anonymous && !options.contains_key("access_key_id") {
        return Some("a store with no access_key_id of its own");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_are_resolved_before_they_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("nvme");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::os::unix::fs::symlink("/etc", root.join("etc-link")).expect("symlink");
        let access = HostAccess {
            writeback_roots: vec![root.clone()],
            ..HostAccess::default()
        };
        let real_root = root.canonicalize().expect("canonical");
        let inside = format!("{}/granary", root.display());
        assert_eq!(access.writeback_dir(&inside), Ok(real_root.join("granary")));
        // A `..` back in is fine; one escaping is not, nor a symlink out, nor a relative path.
        let back_in = format!("{}/x/../granary", root.display());
        assert_eq!(access.writeback_dir(&back_in), Ok(real_root.join("granary")));
        for escaping in [
            format!("{}/../../../../../../etc", root.display()),
            format!("{}/etc-link/granary", root.display()),
            "/etc".to_string(),
        ] {
            let err = access.writeback_dir(&escaping).unwrap_err();
            assert!(matches!(err, AccessError::OutsideRoots { .. }), "{escaping}: {err}");
            assert!(err.to_string().contains("--writeback-root"), "{err}");
        }
        assert!(matches!(
            access.writeback_dir("nvme/granary"),
            Err(AccessError::NotAbsolute { .. })
        ));
        // Nothing was created while checking.
        assert!(!root.join("granary").exists());
    }

    #[test]
    fn fs_stores_and_auto_credentials_need_the_nodes_consent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let none = HostAccess::default();
        let uri = format!("fs://{}", dir.path().display());
        let err = none.store(&uri, &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("--fs-store-root"), "{err}");
        let fs_ok = HostAccess {
            fs_store_roots: vec![dir.path().to_path_buf()],
            ..HostAccess::default()
        };
        fs_ok.store(&uri, &BTreeMap::new()).expect("under the root");
        assert!(fs_ok.store("fs:///etc/", &BTreeMap::new()).is_err());

        let auto = BTreeMap::from([("credentials".to_string(), "auto".to_string())]);
        assert_eq!(
            none.store("s3://b/p", &auto),
            Err(AccessError::NodeIdentity {
                how: "credentials=auto"
            })
        );
        let keys = BTreeMap::from([
            ("access_key_id".to_string(), "k".to_string()),
            ("secret_access_key".to_string(), "s".to_string()),
        ]);
        none.store("s3://b/p", &keys).expect("keys from the Secret");
        let public = BTreeMap::from([("anonymous".to_string(), "true".to_string())]);
        none.store("s3://b/p", &public).expect("a public bucket");
        // No keys, or a profile: the node's own credential chain would sign.
        for options in [
            BTreeMap::new(),
            BTreeMap::from([("role_arn".to_string(), "arn:aws:iam::1:role/r".to_string())]),
            BTreeMap::from([("profile".to_string(), "default".to_string())]),
        ] {
            let err = none.store("s3://b/p", &options).unwrap_err();
            assert!(matches!(err, AccessError::NodeIdentity { .. }), "{options:?}: {err}");
            assert!(err.to_string().contains("--allow-auto-credentials"), "{err}");
        }
        let lend = HostAccess {
            allow_auto_credentials: true,
            ..HostAccess::default()
        };
        lend.store("s3://b/p", &auto).expect("the node lends its identity");
    }
}
