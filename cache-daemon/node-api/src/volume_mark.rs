//! The operator's mark on the volumes it makes: an HMAC-SHA256 of a volume's handle and
//! attributes under a key only the operator and the node plugins hold (a Secret of the
//! release namespace). The node daemon runs privileged and takes a volume's attributes as
//! orders — a store endpoint, a credentials mode, a host directory — so granary-csi serves
//! only volumes whose attributes carry a valid mark: a PV written by hand, or an inline
//! `csi:` volume a pod author wrote, has none, and one copied from a marked PV fails on its
//! handle.
//!
//! The mark covers every attribute except the ones the kubelet adds per pod
//! (`csi.storage.k8s.io/…`) and the mark itself, in key order, each length-prefixed, so no
//! two different attribute sets encode alike. It does not cover the PV's
//! `nodePublishSecretRef`, which the node plugin never sees; only the operator and cluster
//! administrators write PVs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ring::hmac;

/// The volume attribute holding the mark.
pub const MARK_ATTRIBUTE: &str = "granary.dev/mark";

/// Keys the kubelet adds to every volume context of a pod; never part of a volume's spec.
pub const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";

/// The key, among the secrets granary-csi hands the node daemon, of the token a checkpoint
/// volume's node presents to its commit coordinator (see [`VolumeKey::commit_token`]).
pub const COMMIT_TOKEN_SECRET: &str = "granary.dev/commit-token";

/// The shortest key accepted: 32 bytes, the output size of SHA-256.
pub const MIN_KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    #[error("cannot read the volume key file {path:?}: {source}; mount the release's volume-key Secret there (helm creates it)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the volume key in {path:?} is {len} bytes; it must have at least {MIN_KEY_BYTES} (e.g. `openssl rand -hex 32`)")]
    TooShort { path: PathBuf, len: usize },
    #[error("volume {volume_id:?} carries no {MARK_ATTRIBUTE} attribute: granary.dev serves only volumes the Granary operator made (mount the Dataset's or CheckpointPolicy's PVC)")]
    Missing { volume_id: String },
    #[error("volume {volume_id:?} carries a {MARK_ATTRIBUTE} that does not match its handle and attributes: they were not written by this installation's operator, or were changed since")]
    Invalid { volume_id: String },
}

/// The key both sides share.
pub struct VolumeKey {
    key: hmac::Key,
}

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeKey(…)")
    }
}

impl VolumeKey {
    /// A key from its bytes; at least [`MIN_KEY_BYTES`] of them.
    pub fn new(secret: &[u8]) -> Option<Self> {
        (secret.len() >= MIN_KEY_BYTES).then(|| VolumeKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        })
    }

    /// Reads a key file (a mounted Secret's key); surrounding whitespace is not part of it.
    pub fn load(path: &Path) -> Result<Self, MarkError> {
        let bytes = std::fs::read(path).map_err(|source| MarkError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let trimmed = bytes.trim_ascii();
        VolumeKey::new(trimmed).ok_or(MarkError::TooShort {
            path: path.to_path_buf(),
            len: trimmed.len(),
        })
    }

    fn message(volume_id: &str, attributes: &BTreeMap<String, String>) -> Vec<u8> {
        let mut message = Vec::new();
        let mut put = |s: &str| {
            message.extend_from_slice(&(s.len() as u64).to_be_bytes());
            message.extend_from_slice(s.as_bytes());
        };
        put(volume_id);
        for (key, value) in attributes {
            if key == MARK_ATTRIBUTE || key.starts_with(KUBELET_PREFIX) {
                continue;
            }
            put(key);
            put(value);
        }
        message
    }

    /// The mark of a volume, as hex.
    pub fn sign(&self, volume_id: &str, attributes: &BTreeMap<String, String>) -> String {
        let tag = hmac::sign(&self.key, &Self::message(volume_id, attributes));
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The token of the commit coordinator of volume `volume_id`: derived from the key, so
    /// the operator (which gives it to the coordinator) and granary-csi (which gives it to
    /// the node daemon) agree without another Secret, and a pod, which has no key, cannot
    /// make one.
    pub fn commit_token(&self, volume_id: &str) -> String {
        let tag = hmac::sign(&self.key, format!("granary.dev/commit-token\0{volume_id}").as_bytes());
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Adds the mark to `attributes`.
    pub fn mark(&self, volume_id: &str, attributes: &mut BTreeMap<String, String>) {
        let mark = self.sign(volume_id, attributes);
        attributes.insert(MARK_ATTRIBUTE.to_string(), mark);
    }

    /// Checks the mark `attributes` carry (compared in constant time).
    pub fn verify(&self, volume_id: &str, attributes: &BTreeMap<String, String>) -> Result<(), MarkError> {
        let Some(mark) = attributes.get(MARK_ATTRIBUTE) else {
            return Err(MarkError::Missing {
                volume_id: volume_id.to_string(),
            });
        };
        let invalid = || MarkError::Invalid {
            volume_id: volume_id.to_string(),
        };
        let tag = decode_hex(mark).ok_or_else(invalid)?;
        hmac::verify(&self.key, &Self::message(volume_id, attributes), &tag).map_err(|_| invalid())
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_mark_holds_for_its_volume_only() {
        let key = VolumeKey::new(&[7; 32]).expect("a key");
        let mut a = attrs(&[("kind", "checkpoint"), ("target", "s3://ckpt/llama")]);
        key.mark("checkpoint.ml.llama.uid", &mut a);
        key.verify("checkpoint.ml.llama.uid", &a)
            .expect("the operator's own mark");

        // The kubelet's per-pod keys are not part of the spec.
        let mut with_pod = a.clone();
        with_pod.insert("csi.storage.k8s.io/pod.name".into(), "trainer-0".into());
        key.verify("checkpoint.ml.llama.uid", &with_pod)
            .expect("pod info added");

        // Another handle (an inline volume copying the attributes), a changed or an added
        // attribute, another key, no mark: all refused.
        assert!(matches!(key.verify("csi-4f2a", &a), Err(MarkError::Invalid { .. })));
        let mut changed = a.clone();
        changed.insert("writebackDir".into(), "/etc".into());
        assert!(matches!(
            key.verify("checkpoint.ml.llama.uid", &changed),
            Err(MarkError::Invalid { .. })
        ));
        let other = VolumeKey::new(&[8; 32]).expect("a key");
        assert!(matches!(
            other.verify("checkpoint.ml.llama.uid", &a),
            Err(MarkError::Invalid { .. })
        ));
        let mut garbled = a.clone();
        garbled.insert(MARK_ATTRIBUTE.into(), "zz".into());
        assert!(matches!(
            key.verify("checkpoint.ml.llama.uid", &garbled),
            Err(MarkError::Invalid { .. })
        ));
        let bare = attrs(&[("kind", "checkpoint"), ("target", "s3://ckpt/llama")]);
        let missing = key.verify("checkpoint.ml.llama.uid", &bare).unwrap_err();
        assert!(missing.to_string().contains("PVC"), "{missing}");

        // Moving bytes between a key and its value changes the mark.
        let ab = key.sign("v", &attrs(&[("ab", "c")]));
        let a_bc = key.sign("v", &attrs(&[("a", "bc")]));
        assert_ne!(ab, a_bc);
    }

    #[test]
    fn short_keys_are_refused_with_the_fix() {
        assert!(VolumeKey::new(&[1; 31]).is_none());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, "short\n").expect("write");
        let err = VolumeKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("at least 32") && err.contains("openssl rand"), "{err}");
        std::fs::write(&path, format!("{}\n", "a".repeat(64))).expect("write");
        VolumeKey::load(&path).expect("a 64-character key with its newline");
        let err = VolumeKey::load(&dir.path().join("none")).unwrap_err().to_string();
        assert!(err.contains("volume-key Secret"), "{err}");
    }
}
