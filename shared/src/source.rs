//! Plugin sources: parse what the caller asked for and turn it into a
//! canonical archive on local disk. Only `local://` (the S3 registry) exists
//! today; other schemes plug in as further `Source` variants and resolvers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::AsyncBufReadExt;
use tokio_util::io::SyncIoBridge;

use crate::archive::{self, ArchiveFile, CanonicalArchive};
use crate::error::{Error, Result};
use crate::plugin::validate_name;
use crate::store::{ArchiveStore, Registry, RegistryFile};
use sha2::{Digest, Sha256};

pub const SCHEMES: &[&str] = &["local"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A plugin published under `registry/<name>/` in the bucket.
    Local { name: String },
}

impl Source {
    /// `local://<name>` or a bare `<name>`.
    pub fn parse(raw: &str) -> Result<Source> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(Error::bad_request("source must not be empty"));
        }
        let (scheme, spec) = match raw.split_once("://") {
            Some((s, rest)) => (s, rest),
            None => ("local", raw),
        };
        // RFC 3986 scheme syntax; anything else is not a source at all.
        let mut chars = scheme.chars();
        let scheme_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-'));
        if !scheme_ok || spec.is_empty() {
            return Err(Error::bad_request("invalid plugin source"));
        }
        match scheme {
            "local" => {
                validate_name(spec)?;
                Ok(Source::Local {
                    name: spec.to_string(),
                })
            }
            other => Err(
                Error::bad_request(format!("unsupported plugin source scheme {other:?}"))
                    .with_field("available_schemes", serde_json::json!(SCHEMES)),
            ),
        }
    }

    /// The plugin's name on the host.
    pub fn name(&self) -> &str {
        match self {
            Source::Local { name } => name,
        }
    }

    /// The canonical archive of the plugin this source names. Each scheme
    /// brings its own fetcher; all of them end in the same checks.
    pub async fn fetch(
        &self,
        registry: &Arc<dyn Registry>,
        archives: &Arc<dyn ArchiveStore>,
        max_tree_bytes: u64,
    ) -> Result<Resolved> {
        match self {
            Source::Local { name } => fetch_local(registry, archives, name, max_tree_bytes).await,
        }
    }

    pub fn canonical(&self) -> String {
        match self {
            Source::Local { name } => format!("local://{name}"),
        }
    }
}

/// A plugin's canonical archive on local disk.
#[derive(Debug)]
pub struct Resolved {
    pub archive: ArchiveFile,
    /// Set when the archive was built rather than recalled: record it under
    /// this fingerprint once it is staged.
    pub fingerprint: Option<String>,
}

/// Identifies a registry listing: paths, sizes and object versions, plus
/// the archive format, so any change to the source or to the way archives
/// are built yields a new fingerprint.
pub fn fingerprint(files: &[RegistryFile]) -> String {
    let mut h = Sha256::new();
    h.update(b"plugin-delivery canonical archive v1\n");
    for f in files {
        h.update(f.path.as_bytes());
        h.update(format!("\0{}\0{}\n", f.size, f.version).as_bytes());
    }
    hex::encode(h.finalize())
}

/// The canonical archive of a registry plugin. The same listing always
/// yields the same archive, so one built before is recalled from S3
/// (two small requests) instead of re-reading every file; otherwise each
/// object is streamed from S3 through the gzip encoder into a temporary file.
pub async fn fetch_local(
    registry: &Arc<dyn Registry>,
    archives: &Arc<dyn ArchiveStore>,
    name: &str,
    max_tree_bytes: u64,
) -> Result<Resolved> {
    let mut files = registry.list(name).await?;
    if files.is_empty() {
        return Err(Error::not_found(format!(
            "plugin {name:?} is not in the registry"
        )));
    }
    // Refuse oversize plugins from the listing, before reading a byte.
    let total: u64 = files.iter().map(|f| f.size).sum();
    if total > max_tree_bytes {
        return Err(archive::too_large(max_tree_bytes));
    }
    for f in &files {
        archive::validate_relative_path(&f.path)?;
    }
    files.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    // S3 can hold both `a` and `a/b`; no file system can.
    let paths: std::collections::HashSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
    for f in &files {
        let mut parent = f.path.as_str();
        while let Some((p, _)) = parent.rsplit_once('/') {
            if paths.contains(p) {
                return Err(Error::unprocessable(format!(
                    "plugin has both a file and a directory named {p:?}"
                )));
            }
            parent = p;
        }
    }

    let print = fingerprint(&files);
    if let Some(archive) = archives.recall(&print).await? {
        return Ok(Resolved {
            archive,
            fingerprint: None,
        });
    }

    // Open up to PREFETCH objects ahead of the archiver: plugins are many
    // small files, and one S3 round trip per file in sequence would dominate
    // install latency. Bounded, so a large plugin is still streamed.
    let (tx, mut rx) = tokio::sync::mpsc::channel(PREFETCH - 1);
    let opener = {
        let registry = Arc::clone(registry);
        let files = files.clone();
        tokio::spawn(async move {
            for file in files {
                let registry = Arc::clone(&registry);
                let opened = tokio::spawn(async move { registry.open(&file).await });
                if tx.send(opened).await.is_err() {
                    break; // the archiver stopped early (an error)
                }
            }
        })
    };

    // tar and gzip are synchronous: run the whole build on a blocking thread
    // and bridge each S3 body into it, so only a buffer's worth of any file
    // is ever in memory.
    let handle = tokio::runtime::Handle::current();
    // If the caller goes away (deadline, or the host lookup failed first),
    // the guard stops the prefetch and the blocking build at the next file.
    let cancel = Cancel(Arc::new(AtomicBool::new(false)), opener.abort_handle());
    let cancelled = Arc::clone(&cancel.0);
    let built = tokio::task::spawn_blocking(move || {
        let mut out = CanonicalArchive::create(max_tree_bytes)?;
        for file in &files {
            if cancelled.load(Ordering::Relaxed) {
                return Err(Error::internal("archive build cancelled"));
            }
            let opened = handle
                .block_on(rx.recv())
                .ok_or_else(|| Error::internal("registry prefetch ended early"))?;
            let mut obj = handle.block_on(opened).map_err(Error::internal)??;
            let mode = match obj.mode {
                Some(m) => m,
                // `aws s3 sync` drops modes; a shebang is the evidence of an
                // executable that survives the trip through S3.
                None => {
                    let head = handle
                        .block_on(obj.body.fill_buf())
                        .map_err(|e| Error::internal(format!("read {}: {e}", file.key)))?;
                    if head.starts_with(b"#!") {
                        0o755
                    } else {
                        0o644
                    }
                }
            };
            let body = SyncIoBridge::new_with_handle(obj.body, handle.clone());
            out.add_file(&file.path, file.size, mode, body)?;
        }
        out.finish()
    })
    .await
    .map_err(Error::internal)?;
    drop(cancel);
    Ok(Resolved {
        archive: built?,
        fingerprint: Some(print),
    })
}

struct Cancel(Arc<AtomicBool>, tokio::task::AbortHandle);

impl Drop for Cancel {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        self.1.abort();
    }
}

/// Registry objects open at once: the one being archived and those ahead.
const PREFETCH: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            Source::parse(" hello ").unwrap(),
            Source::Local {
                name: "hello".into()
            }
        );
        assert_eq!(
            Source::parse("local://x-1").unwrap().canonical(),
            "local://x-1"
        );
        assert_eq!(Source::parse("").unwrap_err().status(), 400);
        for bad in ["local://", "1x://a", "a b://c", "://x"] {
            let e = Source::parse(bad).unwrap_err();
            assert_eq!(
                (e.status(), e.message.as_str()),
                (400, "invalid plugin source"),
                "{bad}"
            );
        }
        assert_eq!(Source::parse("local://../etc").unwrap_err().status(), 400);
        let e = Source::parse("ftp://x").unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.fields.contains_key("available_schemes"));
    }
}
