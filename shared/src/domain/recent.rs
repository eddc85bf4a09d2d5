//! Archives this process built or recalled lately, by the fingerprint of
//! the registry listing they came from. A warm function installs the same
//! few plugins again and again; with this, an install whose listing has not
//! changed skips the two S3 reads of a recall (the index entry and the
//! archive) and the read of its `plugin.yaml` back out of the archive.
//!
//! Only small archives are kept, and only a few: copies live in the
//! function's `/tmp`. A copy is hashed again on its way out, so a damaged
//! one is a miss, never a wrong archive. What is handed out is a new temp
//! file of the caller's, like any resolved archive.
//!
//! This is a cache of what an archive *is*, not of where it is: a hit says
//! nothing about the staged copy in S3, which the caller must still make
//! sure of (`stage`).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

use crate::domain::archive::ArchiveFile;

/// Name prefix of the kept copies in the temp dir (a cold start removes
/// any left by a process that was killed).
pub const KEPT_PREFIX: &str = "kept-";

/// Archives kept at most, and the largest one kept.
const KEEP: usize = 16;
const MAX_BYTES: u64 = 4 * 1024 * 1024;

struct Kept {
    fingerprint: String,
    file: NamedTempFile,
    sha256: String,
    size: u64,
    manifest: Option<Vec<u8>>,
}

#[derive(Default)]
pub struct RecentArchives {
    /// Oldest first.
    kept: Mutex<VecDeque<Kept>>,
}

impl RecentArchives {
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the archive kept for `fingerprint`, if any (and whole).
    pub fn get(&self, fingerprint: &str) -> Option<ArchiveFile> {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let i = kept.iter().position(|k| k.fingerprint == fingerprint)?;
        let k = &kept[i];
        match copy_checked(k.file.path(), &k.sha256, "plugin-") {
            Ok(file) => {
                let out = ArchiveFile {
                    file,
                    sha256: k.sha256.clone(),
                    size: k.size,
                    manifest: k.manifest.clone(),
                };
                // Most recently used last.
                if let Some(k) = kept.remove(i) {
                    kept.push_back(k);
                }
                Some(out)
            }
            Err(e) => {
                tracing::warn!(fingerprint, error = %e, "kept archive unusable; dropped");
                kept.remove(i);
                None
            }
        }
    }

    /// Keeps a copy of `archive` for `fingerprint` (a small one; best
    /// effort: a copy that cannot be made is simply not kept).
    pub fn put(&self, fingerprint: &str, archive: &ArchiveFile) {
        if archive.size > MAX_BYTES {
            return;
        }
        let file = match copy_checked(archive.path(), &archive.sha256, KEPT_PREFIX) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(fingerprint, error = %e, "could not keep a copy of the archive");
                return;
            }
        };
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.retain(|k| k.fingerprint != fingerprint);
        if kept.len() == KEEP {
            kept.pop_front();
        }
        kept.push_back(Kept {
            fingerprint: fingerprint.to_string(),
            file,
            sha256: archive.sha256.clone(),
            size: archive.size,
            manifest: archive.manifest.clone(),
        });
    }
}

/// A new temp file named `prefix...` with the bytes of `from`, which must
/// hash to `sha256`.
fn copy_checked(from: &std::path::Path, sha256: &str, prefix: &str) -> io::Result<NamedTempFile> {
    let mut src = File::open(from)?;
    let mut to = tempfile::Builder::new()
        .prefix(prefix)
        .suffix(".tar.gz")
        .tempfile()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        to.write_all(&buf[..n])?;
    }
    if hex::encode(h.finalize()) != sha256 {
        return Err(io::Error::other("bytes do not match the digest"));
    }
    to.flush()?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::archive::CanonicalArchive;

    fn archive(text: &str) -> ArchiveFile {
        let mut a = CanonicalArchive::create(1 << 20).unwrap();
        a.add_file("plugin.yaml", text.len() as u64, 0o644, text.as_bytes())
            .unwrap();
        a.finish().unwrap()
    }

    #[test]
    fn a_kept_archive_comes_back_as_a_new_file_with_the_same_bytes() {
        let r = RecentArchives::new();
        let a = archive("name: a\n");
        assert!(r.get("fp-a").is_none());
        r.put("fp-a", &a);
        let b = r.get("fp-a").unwrap();
        assert_ne!(a.path(), b.path());
        // The kept copy is named for the cold start's sweep; what is handed
        // out is an archive like any other.
        let name = |p: &std::path::Path| p.file_name().unwrap().to_string_lossy().into_owned();
        let kept = name(r.kept.lock().unwrap()[0].file.path());
        assert!(kept.starts_with(KEPT_PREFIX), "{kept}");
        assert!(name(b.path()).starts_with("plugin-"));
        assert_eq!(
            std::fs::read(a.path()).unwrap(),
            std::fs::read(b.path()).unwrap()
        );
        assert_eq!((b.sha256, b.size), (a.sha256, a.size));
        assert_eq!(b.manifest.as_deref(), Some(&b"name: a\n"[..]));
        assert!(r.get("fp-other").is_none());
        // Large archives are not kept.
        let big = ArchiveFile {
            size: MAX_BYTES + 1,
            ..archive("name: b\n")
        };
        r.put("fp-big", &big);
        assert!(r.get("fp-big").is_none());
    }

    #[test]
    fn a_damaged_copy_is_a_miss_and_is_dropped() {
        let r = RecentArchives::new();
        r.put("fp", &archive("name: a\n"));
        let path = r.kept.lock().unwrap()[0].file.path().to_path_buf();
        std::fs::write(&path, b"not the archive").unwrap();
        assert!(r.get("fp").is_none());
        assert!(r.kept.lock().unwrap().is_empty());
    }

    #[test]
    fn only_the_most_recent_are_kept() {
        let r = RecentArchives::new();
        let a = archive("name: a\n");
        for i in 0..KEEP + 2 {
            r.put(&format!("fp{i}"), &a);
        }
        assert!(r.get("fp0").is_none() && r.get("fp1").is_none());
        assert!(r.get("fp2").is_some() && r.get(&format!("fp{}", KEEP + 1)).is_some());
        assert_eq!(r.kept.lock().unwrap().len(), KEEP);
    }
}
