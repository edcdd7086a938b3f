//! Paths inside a mount: relative, '/'-separated, "" for the root.

/// `path` is `dir` or lies under it ("" is the root, holding everything).
pub fn is_under(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || (path.starts_with(dir) && path.as_bytes().get(dir.len()) == Some(&b'/'))
}

/// The directory holding `path` ("" for the root); a marker's checkpoint directory.
pub fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map(|(dir, _)| dir).unwrap_or("")
}
