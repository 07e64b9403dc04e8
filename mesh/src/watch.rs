//! Which files changed since last asked, by modification time and length: how a mesh node and
//! the broker re-read certificates, rules and revocation lists without a restart (polling, so
//! it works on any filesystem and through symlink swaps).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

type Stamp = Option<(SystemTime, u64)>;

/// Writes `bytes` beside `path` and renames them into place, so whoever watches the file (a
/// node, the broker) never reads half of it. The temporary name is unique to this process and
/// call, so two writers of the same file cannot clash on it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = path.with_file_name(name);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The last seen state of some files (a missing file is a state too).
#[derive(Debug, Default)]
pub struct FileStamps {
    seen: HashMap<PathBuf, Stamp>,
}

impl FileStamps {
    /// Remembers the files' current state.
    pub fn new<'a>(paths: impl IntoIterator<Item = &'a Path>) -> FileStamps {
        FileStamps {
            seen: paths
                .into_iter()
                .map(|p| (p.to_path_buf(), stamp(p)))
                .collect(),
        }
    }

    /// Whether any of `paths` changed since it was last seen; remembers the new states.
    pub fn changed(&mut self, paths: &[&Path]) -> bool {
        let mut any = false;
        for p in paths {
            let now = stamp(p);
            let before = self.seen.insert(p.to_path_buf(), now).flatten();
            any |= before != now;
        }
        any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_writes_creations_and_removals_once() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, "1").unwrap();
        let mut s = FileStamps::new([a.as_path(), b.as_path()]);
        assert!(!s.changed(&[&a, &b]));
        std::fs::write(&a, "22").unwrap();
        assert!(s.changed(&[&a]));
        assert!(!s.changed(&[&a]), "reported once");
        std::fs::write(&b, "x").unwrap();
        assert!(s.changed(&[&a, &b]));
        std::fs::remove_file(&a).unwrap();
        assert!(s.changed(&[&a]));
        assert!(!s.changed(&[&a]));
    }
}
