//! Client-supplied paths inside a workspace, checked before any system call.
//!
//! A path is relative to the workspace; a leading `/` means the workspace
//! root, as in the older API. Refused outright: NUL bytes and backslashes
//! (`invalid_path`), any `..` component, even one that would stay inside
//! (`path_escape`), paths over 4096 bytes and components over 255 bytes
//! (`invalid_path`). `.` and empty components are dropped. The kernel then
//! enforces confinement again at every open (see `workspace`).

use crate::SandboxError;

pub const MAX_PATH_BYTES: usize = 4096;
pub const MAX_COMPONENT_BYTES: usize = 255;

/// A validated path: its components, none of them `.`, `..` or empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPath {
    components: Vec<String>,
}

impl SandboxPath {
    pub fn parse(raw: &str) -> Result<SandboxPath, SandboxError> {
        if raw.len() > MAX_PATH_BYTES {
            return Err(SandboxError::InvalidPath(format!(
                "the path is longer than {MAX_PATH_BYTES} bytes"
            )));
        }
        if raw.contains('\0') {
            return Err(SandboxError::InvalidPath(
                "the path contains a NUL byte".into(),
            ));
        }
        if raw.contains('\\') {
            return Err(SandboxError::InvalidPath(
                "the path contains a backslash; use '/'".into(),
            ));
        }
        let mut components = Vec::new();
        for component in raw.split('/') {
            match component {
                "" | "." => {}
                ".." => {
                    return Err(SandboxError::PathEscape(
                        "'..' is not allowed in paths".into(),
                    ));
                }
                name if name.len() > MAX_COMPONENT_BYTES => {
                    return Err(SandboxError::InvalidPath(format!(
                        "a path component is longer than {MAX_COMPONENT_BYTES} bytes"
                    )));
                }
                name => components.push(name.to_owned()),
            }
        }
        Ok(SandboxPath { components })
    }

    pub fn root() -> SandboxPath {
        SandboxPath {
            components: Vec::new(),
        }
    }

    pub fn is_root(&self) -> bool {
        self.components.is_empty()
    }

    /// The path as the API shows it: `.` for the root, else `a/b`.
    pub fn display(&self) -> String {
        if self.is_root() {
            ".".to_owned()
        } else {
            self.components.join("/")
        }
    }

    /// Relative form for `openat2`: `.` for the root.
    pub(crate) fn relative(&self) -> String {
        self.display()
    }

    /// The parent (root for a top-level name) and the last component.
    pub(crate) fn split_last(&self) -> Option<(SandboxPath, &str)> {
        let (last, parents) = self.components.split_last()?;
        Some((
            SandboxPath {
                components: parents.to_vec(),
            },
            last,
        ))
    }

    pub(crate) fn components(&self) -> &[String] {
        &self.components
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_paths_are_normalised() {
        assert_eq!(
            SandboxPath::parse("a/b.txt").expect("ok").display(),
            "a/b.txt"
        );
        assert_eq!(SandboxPath::parse("/a//./b/").expect("ok").display(), "a/b");
        assert!(SandboxPath::parse("").expect("ok").is_root());
        assert!(SandboxPath::parse("/").expect("ok").is_root());
        assert!(SandboxPath::parse(".").expect("ok").is_root());
        assert_eq!(
            SandboxPath::parse("%2e%2e").expect("literal").display(),
            "%2e%2e"
        );
        assert_eq!(SandboxPath::parse("...").expect("a name").display(), "...");
    }

    #[test]
    fn hostile_paths_are_refused() {
        for raw in ["..", "../x", "a/../b", "a/..", "/..", "./../etc"] {
            assert!(
                matches!(SandboxPath::parse(raw), Err(SandboxError::PathEscape(_))),
                "{raw}"
            );
        }
        let long_component = "a".repeat(256);
        let long_path = "a/".repeat(2049);
        for raw in [
            "a\0b",
            "a\\b",
            "..\\x",
            long_component.as_str(),
            long_path.as_str(),
        ] {
            assert!(
                matches!(SandboxPath::parse(raw), Err(SandboxError::InvalidPath(_))),
                "{raw:?}"
            );
        }
    }
}
