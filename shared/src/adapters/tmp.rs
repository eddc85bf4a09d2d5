//! The sandbox's temp space. Archives and intakes live in temp files and
//! dirs that are removed when dropped; an invocation killed at its timeout
//! drops nothing, and the sandbox may be reused. At a cold start nothing
//! else runs in the sandbox, so every entry with our prefixes left in the
//! temp dir is such a leftover and is removed.

use std::path::Path;

/// Name prefixes of our temp files (archives), dirs (intakes) and the
/// copies a warm process keeps (`domain::recent`).
pub const PREFIXES: [&str; 3] = ["plugin-", "intake-", crate::domain::recent::KEPT_PREFIX];

/// Removes our leftovers under `dir`: how many entries and bytes. Only
/// for a cold start (or a test's own dir): a running operation's files
/// carry the same prefixes.
pub fn remove_leftovers(dir: &Path) -> (usize, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    let (mut count, mut bytes) = (0, 0);
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        // Never follow a link out of the temp dir.
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        let size = if meta.is_dir() {
            dir_size(&e.path())
        } else if meta.is_file() {
            meta.len()
        } else {
            0
        };
        let removed = if meta.is_dir() {
            std::fs::remove_dir_all(e.path())
        } else {
            std::fs::remove_file(e.path())
        };
        if removed.is_ok() {
            count += 1;
            bytes += size;
        }
    }
    (count, bytes)
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match std::fs::symlink_metadata(e.path()) {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) if m.is_file() => m.len(),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_leftovers_go() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::write(d.join("plugin-abc.tar.gz"), vec![0u8; 1000]).unwrap();
        std::fs::create_dir_all(d.join("intake-x/tree/a")).unwrap();
        std::fs::write(d.join("intake-x/tree/a/f"), vec![0u8; 24]).unwrap();
        std::fs::write(d.join("kept-abc.tar.gz"), vec![0u8; 100]).unwrap();
        std::fs::write(d.join("other.txt"), b"keep").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), b"keep").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.join("plugin-link")).unwrap();
        assert_eq!(remove_leftovers(d), (4, 1124));
        assert!(d.join("other.txt").exists());
        assert!(
            outside.path().join("precious").exists(),
            "a link is removed, not followed"
        );
        assert!(!d.join("plugin-abc.tar.gz").exists() && !d.join("intake-x").exists());
        assert!(!d.join("kept-abc.tar.gz").exists());
    }
}
