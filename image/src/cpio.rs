//! A reproducible `newc` cpio archive, the format the Linux kernel unpacks as an initramfs.
//!
//! Reproducible by construction: entries are sorted by path (parents before children), every
//! owner is 0:0, every time is 0, inode numbers count up from 1 in that order, and nothing of
//! the build host (names, times, umask, file order on disk) enters the archive. The same
//! entries always give the same bytes.

use std::collections::BTreeMap;

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir,
    File { data: Vec<u8>, executable: bool },
    Symlink { target: String },
}

/// Why an archive cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpioError {
    #[error("{0:?}: not a clean relative path (no leading /, no . or .. parts, no empty parts)")]
    BadPath(String),
    #[error("{0:?} is added twice with different contents")]
    Conflict(String),
    #[error("{0:?} is {1} bytes: larger than a newc entry can hold")]
    TooLarge(String, usize),
    #[error("{0:?} would sit under {1:?}, which is not a directory")]
    NotADirectory(String, String),
}

/// An archive being assembled: path (relative, `/`-separated) → node. Parent directories
/// are added implicitly.
#[derive(Clone, Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Node>,
}

fn clean(path: &str) -> Result<String, CpioError> {
    let p = path.trim_start_matches('/');
    if p.is_empty()
        || p.split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\0'))
    {
        return Err(CpioError::BadPath(path.to_string()));
    }
    Ok(p.to_string())
}

impl Archive {
    pub fn new() -> Archive {
        Archive::default()
    }

    /// Adds `node` at `path` (leading `/` allowed) and any missing parent directories. Adding
    /// the same node twice is harmless; a different one at the same path is an error.
    pub fn add(&mut self, path: &str, node: Node) -> Result<(), CpioError> {
        let p = clean(path)?;
        if let Node::File { data, .. } = &node
            && data.len() > u32::MAX as usize
        {
            return Err(CpioError::TooLarge(p, data.len()));
        }
        let parts: Vec<&str> = p.split('/').collect();
        for i in 1..parts.len() {
            let parent = parts[..i].join("/");
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent, Node::Dir);
                }
                Some(Node::Dir) => {}
                Some(_) => return Err(CpioError::NotADirectory(p.clone(), parent)),
            }
        }
        match self.entries.get(&p) {
            Some(existing) if *existing != node => Err(CpioError::Conflict(p)),
            Some(_) => Ok(()),
            None => {
                self.entries.insert(p, node);
                Ok(())
            }
        }
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, executable: bool) -> Result<(), CpioError> {
        self.add(path, Node::File { data, executable })
    }

    pub fn dir(&mut self, path: &str) -> Result<(), CpioError> {
        self.add(path, Node::Dir)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.add(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        )
    }

    /// The paths in archive order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The archive's bytes (`newc`, uncompressed, ending in the trailer).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // BTreeMap order is byte order of the path: a parent ("a") sorts before its children
        // ("a/b"), because a proper prefix sorts first.
        for (ino, (path, node)) in (1u32..).zip(&self.entries) {
            let (mode, nlink, body): (u32, u32, &[u8]) = match node {
                Node::Dir => (0o040_755, 2, &[]),
                Node::File { data, executable } => (
                    if *executable { 0o100_755 } else { 0o100_644 },
                    1,
                    data.as_slice(),
                ),
                Node::Symlink { target } => (0o120_777, 1, target.as_bytes()),
            };
            header(&mut out, ino, mode, nlink, body.len() as u32, path);
            out.extend_from_slice(body);
            pad4(&mut out);
        }
        header(&mut out, 0, 0, 1, 0, "TRAILER!!!");
        out
    }
}

/// One `070701` header and its name, padded.
fn header(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, size: u32, name: &str) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        size,
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_implied_and_sorted_first() {
        let mut a = Archive::new();
        a.file("/usr/bin/x", b"x".to_vec(), true).unwrap();
        a.file("init", b"#!/bin/sh\n".to_vec(), true).unwrap();
        a.symlink("bin/sh", "busybox").unwrap();
        assert_eq!(
            a.paths().collect::<Vec<_>>(),
            ["bin", "bin/sh", "init", "usr", "usr/bin", "usr/bin/x"]
        );
    }

    #[test]
    fn bad_paths_and_conflicts_are_refused() {
        let mut a = Archive::new();
        for bad in ["", "/", "a//b", "a/../b", "./a", "a/\0"] {
            assert!(matches!(a.dir(bad), Err(CpioError::BadPath(_))), "{bad:?}");
        }
        a.file("f", b"1".to_vec(), false).unwrap();
        a.file("f", b"1".to_vec(), false).unwrap();
        assert!(matches!(
            a.file("f", b"2".to_vec(), false),
            Err(CpioError::Conflict(_))
        ));
        assert!(matches!(
            a.file("f/g", b"2".to_vec(), false),
            Err(CpioError::NotADirectory(..))
        ));
    }

    #[test]
    fn the_bytes_are_newc_and_depend_only_on_the_entries() {
        let mut a = Archive::new();
        a.file("b", b"hello".to_vec(), false).unwrap();
        a.dir("a").unwrap();
        let mut b = Archive::new();
        b.dir("a").unwrap();
        b.file("b", b"hello".to_vec(), false).unwrap();
        let bytes = a.to_bytes();
        assert_eq!(bytes, b.to_bytes());
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        // "a": ino 1, directory, 0:0, time 0.
        assert_eq!(
            &bytes[6..6 + 6 * 8],
            b"00000001000041ed00000000000000000000000200000000"
        );
        let trailer = b"TRAILER!!!\0";
        assert!(bytes.windows(trailer.len()).any(|w| w == trailer));
    }
}
