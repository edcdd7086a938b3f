//! The `granary.dev/mounts` annotation: `dataset/imagenet=/data,checkpoint/llama=/ckpt`.

pub const MOUNTS_ANNOTATION: &str = "granary.dev/mounts";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountKind {
    Dataset,
    Checkpoint,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRequest {
    pub kind: MountKind,
    /// The Dataset or CheckpointPolicy, in the object's namespace.
    pub name: String,
    /// Absolute path in every container.
    pub path: String,
}

const EXAMPLE: &str = "e.g. granary.dev/mounts: \"dataset/imagenet=/data,checkpoint/llama=/ckpt\"";

/// Parses the annotation; the error names the entry and what is wrong with it.
pub fn parse(value: &str) -> Result<Vec<MountRequest>, String> {
    let mut out: Vec<MountRequest> = Vec::new();
    for entry in value.split(',').map(str::trim) {
        if entry.is_empty() {
            continue;
        }
        let bad = |why: &str| format!("{MOUNTS_ANNOTATION} entry {entry:?}: {why} ({EXAMPLE})");
        let (target, path) = entry
            .split_once('=')
            .ok_or_else(|| bad("expected <kind>/<name>=<path>"))?;
        let (kind, name) = target
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("expected <kind>/<name> before `=`"))?;
        let kind = match kind {
            "dataset" => MountKind::Dataset,
            "checkpoint" => MountKind::Checkpoint,
            other => return Err(bad(&format!("unknown kind {other:?}; use dataset or checkpoint"))),
        };
        if !is_dns_label(name) {
            return Err(bad(&format!(
                "{name:?} is not a resource name (lowercase letters, digits and `-`)"
            )));
        }
        let path = path.trim();
        if !path.starts_with('/') || path == "/" {
            return Err(bad("the path must be absolute and not `/`"));
        }
        if path.split('/').any(|c| c == "..") {
            return Err(bad("the path must not contain `..`"));
        }
        let path = path.trim_end_matches('/').to_string();
        if let Some(other) = out.iter().find(|m| overlaps(&m.path, &path)) {
            return Err(bad(&format!(
                "{path} clashes with {} in the same annotation; give each mount its own directory",
                other.path
            )));
        }
        if out.iter().any(|m| m.kind == kind && m.name == name) {
            return Err(bad(&format!("{name} is mounted twice")));
        }
        out.push(MountRequest {
            kind,
            name: name.to_string(),
            path,
        });
    }
    if out.is_empty() {
        return Err(format!("{MOUNTS_ANNOTATION} is empty ({EXAMPLE})"));
    }
    Ok(out)
}

/// Whether one path is the other or inside it.
pub fn overlaps(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim_end_matches('/'), b.trim_end_matches('/'));
    a == b || b.starts_with(&format!("{a}/")) || a.starts_with(&format!("{b}/"))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_annotation_parses_and_its_mistakes_are_named() {
        let m = parse("dataset/imagenet=/data, checkpoint/llama=/ckpt/").expect("valid");
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].kind, m[0].name.as_str(), m[0].path.as_str()),
            (MountKind::Dataset, "imagenet", "/data")
        );
        assert_eq!((m[1].kind, m[1].path.as_str()), (MountKind::Checkpoint, "/ckpt"));
        for (bad, expected) in [
            ("dataset/imagenet", "expected <kind>/<name>=<path>"),
            ("imagenet=/data", "expected <kind>/<name> before"),
            ("volume/x=/data", "unknown kind \"volume\""),
            ("dataset/ImageNet=/data", "not a resource name"),
            ("dataset/a=data", "must be absolute"),
            ("dataset/a=/", "must be absolute"),
            ("dataset/a=/x/../y", "`..`"),
            ("dataset/a=/data,checkpoint/b=/data/ckpt", "clashes with /data"),
            ("dataset/a=/d1,dataset/a=/d2", "mounted twice"),
            (" , ", "is empty"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(expected), "{bad}: {e}");
        }
    }
}
