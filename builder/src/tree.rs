//! The in-memory root tree every emitter reads.
//!
//! Paths are stored relative to the root, without a leading `/` ("usr/bin/busybox");
//! the root itself is the empty path. A `BTreeMap` keeps them sorted, so every
//! walk over the tree is in the same order and emitters are reproducible.
//! Metadata is normalised: there is no per-entry mtime (emitters use the build's
//! SOURCE_DATE_EPOCH), owners default to root.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

/// File content, shared so that hard links and copies cost nothing.
pub type Content = Arc<[u8]>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File(Content),
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits, including setuid/setgid/sticky (no file-type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Entry {
    pub fn dir(mode: u32) -> Self {
        Entry {
            kind: Kind::Dir,
            mode,
            uid: 0,
            gid: 0,
        }
    }
    pub fn file(content: impl Into<Content>, mode: u32) -> Self {
        Entry {
            kind: Kind::File(content.into()),
            mode,
            uid: 0,
            gid: 0,
        }
    }
    pub fn symlink(target: impl Into<String>) -> Self {
        Entry {
            kind: Kind::Symlink(target.into()),
            mode: 0o777,
            uid: 0,
            gid: 0,
        }
    }
    pub fn char_device(major: u32, minor: u32, mode: u32) -> Self {
        Entry {
            kind: Kind::CharDevice { major, minor },
            mode,
            uid: 0,
            gid: 0,
        }
    }
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir)
    }
}

/// A whole file system tree.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

/// Normalises a path: strips leading `/` and `./`, drops empty and `.` parts.
/// `..` is refused: trees are built from archives and overlays, and nothing may
/// climb out of the root.
pub fn normalize(path: &str) -> Result<String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => bail!("path {path:?} climbs out of the root with '..'"),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        None
    } else {
        Some(path.rfind('/').map_or("", |i| &path[..i]))
    }
}

impl Tree {
    pub fn new() -> Self {
        let mut entries = BTreeMap::new();
        entries.insert(String::new(), Entry::dir(0o755));
        Tree { entries }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.len() <= 1
    }

    /// Every entry in sorted path order (the root, "", first).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(p, e)| (p.as_str(), e))
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(&normalize(path).ok()?)
    }

    /// Resolves symlinks in the directory part of `path` (not the last
    /// component), so that a file for `bin/sh` lands in `usr/bin/sh` when `bin`
    /// is a link to `usr/bin`, as on a merged-/usr system.
    pub fn resolve_parent(&self, path: &str) -> Result<String> {
        let norm = normalize(path)?;
        let Some(idx) = norm.rfind('/') else {
            return Ok(norm);
        };
        let (dir, name) = (&norm[..idx], &norm[idx + 1..]);
        let dir = self.resolve(dir, 0)?;
        Ok(if dir.is_empty() {
            name.to_string()
        } else {
            format!("{dir}/{name}")
        })
    }

    /// Resolves every symlink in `path` (all components), within the tree.
    pub fn resolve(&self, path: &str, depth: usize) -> Result<String> {
        if depth > 40 {
            bail!("too many levels of symbolic links resolving {path:?}");
        }
        let mut cur = String::new();
        for part in normalize(path)?.split('/').filter(|p| !p.is_empty()) {
            let next = if cur.is_empty() {
                part.to_string()
            } else {
                format!("{cur}/{part}")
            };
            match self.entries.get(&next).map(|e| &e.kind) {
                Some(Kind::Symlink(target)) => {
                    let joined = if target.starts_with('/') {
                        target.clone()
                    } else {
                        format!("{cur}/{target}")
                    };
                    cur = self.resolve(&lexical(&joined), depth + 1)?;
                }
                _ => cur = next,
            }
        }
        Ok(cur)
    }

    /// Creates `path` and its missing parents as root-owned 0755 directories.
    pub fn mkdir_p(&mut self, path: &str) -> Result<()> {
        let norm = self.resolve(path, 0)?;
        let mut cur = String::new();
        for part in norm.split('/').filter(|p| !p.is_empty()) {
            cur = if cur.is_empty() {
                part.to_string()
            } else {
                format!("{cur}/{part}")
            };
            match self.entries.get(&cur) {
                Some(e) if e.is_dir() => {}
                Some(_) => bail!("cannot create directory /{cur}: a non-directory is in the way"),
                None => {
                    self.entries.insert(cur.clone(), Entry::dir(0o755));
                }
            }
        }
        Ok(())
    }

    /// Inserts an entry, creating missing parents; symlinks in the parent path
    /// are followed. A directory over an existing directory only updates its
    /// metadata; anything else replaces what was there (later layers win).
    pub fn insert(&mut self, path: &str, entry: Entry) -> Result<()> {
        let path = self.resolve_parent(path)?;
        if let Some(p) = parent(&path) {
            self.mkdir_p(p)
                .with_context(|| format!("creating the parents of /{path}"))?;
        }
        match self.entries.get_mut(&path) {
            Some(old) if old.is_dir() && entry.is_dir() => {
                old.mode = entry.mode;
                old.uid = entry.uid;
                old.gid = entry.gid;
            }
            Some(old) if old.is_dir() => {
                // Replacing a directory by a file or link drops what it held.
                self.remove_below(&path);
                self.entries.insert(path, entry);
            }
            _ => {
                self.entries.insert(path, entry);
            }
        }
        Ok(())
    }

    /// Removes an entry and, for a directory, everything below it.
    pub fn remove(&mut self, path: &str) -> Result<Option<Entry>> {
        let path = normalize(path)?;
        self.remove_below(&path);
        Ok(self.entries.remove(&path))
    }

    /// Removes everything below `dir`: the keys that start with `dir/` are
    /// one sorted run of the map, so only they are visited (no whole-tree
    /// scan per removal; modules and docs are removed by the thousand).
    fn remove_below(&mut self, dir: &str) {
        let prefix = format!("{dir}/");
        let below: Vec<String> = self
            .entries
            .range::<str, _>((
                std::ops::Bound::Included(prefix.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            self.entries.remove(&k);
        }
    }

    /// Paths of the direct and indirect children of `dir` (sorted).
    pub fn walk<'a>(&'a self, dir: &str) -> impl Iterator<Item = (&'a str, &'a Entry)> + 'a {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        self.entries
            .range(prefix.clone()..)
            .take_while(move |(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, e)| (k.as_str(), e))
    }

    /// Reads a file's content, following symlinks.
    pub fn read(&self, path: &str) -> Option<&Content> {
        let p = self.resolve(path, 0).ok()?;
        match &self.entries.get(&p)?.kind {
            Kind::File(c) => Some(c),
            _ => None,
        }
    }

    /// Total size of all file contents, in bytes.
    pub fn content_size(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match &e.kind {
                Kind::File(c) => c.len() as u64,
                _ => 0,
            })
            .sum()
    }
}

/// Folds `.` and `..` lexically (`..` at the root stays at the root, as the
/// kernel does for `/..`).
fn lexical(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            p => out.push(p),
        }
    }
    out.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_usr_links_redirect_files() {
        let mut t = Tree::new();
        t.insert("usr/bin", Entry::dir(0o755)).unwrap();
        t.insert("bin", Entry::symlink("usr/bin")).unwrap();
        t.insert("/bin/sh", Entry::file(b"x".to_vec(), 0o755))
            .unwrap();
        assert!(t.get("usr/bin/sh").is_some());
        assert!(t.get("bin/sh").is_none(), "bin is a link, not a directory");
        assert_eq!(t.read("bin/sh").unwrap().as_ref(), b"x");
    }

    #[test]
    fn parents_are_created_and_order_is_sorted() {
        let mut t = Tree::new();
        t.insert("b/c/d", Entry::file(b"1".to_vec(), 0o644))
            .unwrap();
        t.insert("a", Entry::file(b"2".to_vec(), 0o644)).unwrap();
        let paths: Vec<_> = t.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(paths, ["", "a", "b", "b/c", "b/c/d"]);
        let under_b: Vec<_> = t.walk("b").map(|(p, _)| p).collect();
        assert_eq!(under_b, ["b/c", "b/c/d"]);
    }

    #[test]
    fn dotdot_is_refused_and_absolute_links_stay_inside() {
        assert!(normalize("../etc/passwd").is_err());
        let mut t = Tree::new();
        t.insert("lib", Entry::symlink("/../../usr/lib")).unwrap();
        t.insert("lib/x", Entry::file(b"".to_vec(), 0o644)).unwrap();
        assert!(t.get("usr/lib/x").is_some());
    }

    #[test]
    fn replacing_a_directory_drops_its_children() {
        let mut t = Tree::new();
        t.insert("d/f", Entry::file(b"".to_vec(), 0o644)).unwrap();
        t.insert("d", Entry::symlink("e")).unwrap();
        assert!(t.get("d/f").is_none());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn removing_a_directory_takes_exactly_what_is_below_it() {
        let mut t = Tree::new();
        for p in ["a/b/c", "a/d", "a.b", "a0", "ab/x"] {
            t.insert(p, Entry::file(b"".to_vec(), 0o644)).unwrap();
        }
        assert!(t.remove("a").unwrap().is_some_and(|e| e.is_dir()));
        let left: Vec<&str> = t.walk("").map(|(p, _)| p).collect();
        assert_eq!(left, ["a.b", "a0", "ab", "ab/x"]);
        assert!(t.remove("nothing").unwrap().is_none());
    }
}
