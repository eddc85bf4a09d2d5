//! Plugin sources: parse what the caller asked for and turn it into a
//! canonical archive on local disk: `local://` (the S3 registry), a pinned
//! `github://owner/repo#ref`, or a pinned `https://...#sha256=<hex>`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::AsyncBufReadExt;
use tokio_util::io::SyncIoBridge;

use crate::archive::{self, ArchiveFile, CanonicalArchive};
use crate::error::{Error, Result};
use crate::plugin::validate_name;
use crate::store::{ArchiveStore, Registry, RegistryFile};
use sha2::{Digest, Sha256};

use crate::fetch::Remote;
use crate::intake::{self, IntakeLimits, Skipped};

/// Registered schemes, sorted.
pub const SCHEMES: &[&str] = &["github", "https", "local"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A plugin published under `registry/<name>/` in the bucket.
    Local { name: String },
    /// A GitHub repository at a tag, branch or commit (`None`: unpinned).
    GitHub {
        owner: String,
        repo: String,
        reference: Option<String>,
    },
    /// An archive at an https URL, pinned by its SHA-256.
    Https {
        url: String,
        sha256: String,
        stem: String,
    },
}

/// What a fetch needs besides the source itself.
pub struct FetchContext<'a> {
    pub registry: &'a Arc<dyn Registry>,
    pub archives: &'a Arc<dyn ArchiveStore>,
    pub remote: &'a Remote,
    pub max_tree_bytes: u64,
    pub allow_unpinned: bool,
    /// Deadline of a remote fetch, body and checks included.
    pub fetch_timeout: std::time::Duration,
}

/// `[A-Za-z0-9][A-Za-z0-9_.-]{0,99}`: GitHub owner and repository names.
fn github_segment(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 100
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn parse_github(spec: &str) -> Result<Source> {
    let (path, reference) = match spec.split_once('#') {
        Some((p, r)) => (p, Some(r)),
        None => (spec, None),
    };
    let invalid = || Error::bad_request("invalid plugin source");
    let (owner, repo) = path.split_once('/').ok_or_else(invalid)?;
    if !github_segment(owner) || !github_segment(repo) {
        return Err(invalid());
    }
    if let Some(r) = reference {
        let ok = !r.is_empty()
            && r.len() <= 255
            && !r.starts_with('-')
            && !r.chars().any(|c| c.is_control() || c.is_whitespace());
        if !ok {
            return Err(invalid());
        }
    }
    Ok(Source::GitHub {
        owner: owner.to_string(),
        repo: repo.to_string(),
        reference: reference.map(str::to_string),
    })
}

fn parse_https(raw: &str) -> Result<Source> {
    let (url, fragment) = match raw.split_once('#') {
        Some((u, f)) => (u, Some(f)),
        None => (raw, None),
    };
    let Some(hex) = fragment.and_then(|f| f.strip_prefix("sha256=")) else {
        return Err(Error::unprocessable(
            "https sources must pin the archive: append #sha256=<hex of the archive>",
        ));
    };
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::unprocessable(
            "the #sha256= pin must be 64 hexadecimal characters",
        ));
    }
    let parsed =
        reqwest::Url::parse(url).map_err(|_| Error::bad_request("invalid plugin source"))?;
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(Error::bad_request("invalid plugin source"));
    }
    let file = parsed
        .path_segments()
        .and_then(|mut s| s.next_back())
        .unwrap_or_default();
    let stem = [".tar.gz", ".tgz", ".gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
        .unwrap_or(file)
        .to_string();
    Ok(Source::Https {
        url: url.to_string(),
        sha256: hex.to_ascii_lowercase(),
        stem,
    })
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
            "github" => parse_github(spec),
            "https" => parse_https(raw),
            "http" => Err(Error::bad_request(
                "plain http:// sources are refused; use https:// with a #sha256= pin",
            )
            .with_field("available_schemes", serde_json::json!(SCHEMES))),
            other => Err(
                Error::bad_request(format!("unsupported plugin source scheme {other:?}"))
                    .with_field("available_schemes", serde_json::json!(SCHEMES)),
            ),
        }
    }

    /// The plugin's name on the host when the source alone decides it
    /// (the registry name); other sources name it from what they fetch.
    pub fn known_name(&self) -> Option<&str> {
        match self {
            Source::Local { name } => Some(name),
            _ => None,
        }
    }

    pub fn scheme(&self) -> &'static str {
        match self {
            Source::Local { .. } => "local",
            Source::GitHub { .. } => "github",
            Source::Https { .. } => "https",
        }
    }

    /// The canonical archive of the plugin this source names. Each scheme
    /// brings its own fetcher; remote archives all pass `intake`'s checks.
    pub async fn fetch(&self, cx: &FetchContext<'_>) -> Result<Resolved> {
        if let Source::Local { name } = self {
            return fetch_local(cx.registry, cx.archives, name, cx.max_tree_bytes).await;
        }
        // One deadline over connect, headers, body and checks: a host that
        // trickles bytes cannot hold the operation past it.
        tokio::time::timeout(cx.fetch_timeout, self.fetch_remote(cx))
            .await
            .unwrap_or_else(|_| {
                Err(Error::deadline(format!(
                    "fetching {} ran past its deadline",
                    self.canonical()
                ))
                .with_field("scheme", serde_json::json!(self.scheme())))
            })
    }

    async fn fetch_remote(&self, cx: &FetchContext<'_>) -> Result<Resolved> {
        let limits = IntakeLimits {
            max_tree_bytes: cx.max_tree_bytes,
            ..Default::default()
        };
        let source = self.canonical();
        let (body, strip, fallback) = match self {
            Source::Local { name } => {
                return fetch_local(cx.registry, cx.archives, name, cx.max_tree_bytes).await
            }
            Source::GitHub {
                owner,
                repo,
                reference,
            } => {
                if reference.is_none() && !cx.allow_unpinned {
                    return Err(Error::unprocessable(format!(
                        "unpinned GitHub source: pin it as github://{owner}/{repo}#<tag, branch or full commit sha>"
                    )));
                }
                let r = reference.as_deref().unwrap_or("");
                (
                    cx.remote.github_tarball(owner, repo, r, &source).await?,
                    true,
                    repo.as_str(),
                )
            }
            Source::Https { url, .. } => (cx.remote.https(url, &source).await?, false, self.stem()),
        };
        let pin = match self {
            Source::Https { sha256, .. } => Some(sha256.clone()),
            _ => None,
        };
        let handle = tokio::runtime::Handle::current();
        let (intake, raw_sha) = tokio::task::spawn_blocking(move || {
            let mut reader = HashingRead {
                inner: SyncIoBridge::new_with_handle(body, handle),
                hasher: Sha256::new(),
            };
            let intake = intake::ingest(&mut reader, strip, &limits)?;
            Ok::<_, Error>((intake, hex::encode(reader.hasher.finalize())))
        })
        .await
        .map_err(Error::internal)?
        .map_err(|e| match e.kind {
            // The stream broke, not the archive: say which source failed.
            crate::ErrorKind::Unavailable => {
                Error::host_failed(format!("fetching {source} failed"))
                    .with_field("scheme", serde_json::json!(self.scheme()))
                    .with_detail(format!("{:?}", e.detail))
            }
            _ => e,
        })?;
        if let Some(pin) = pin {
            if raw_sha != pin {
                return Err(Error::unprocessable(
                    "the archive's sha256 does not match the #sha256= pin",
                )
                .with_field("expected", serde_json::json!(pin))
                .with_field("actual", serde_json::json!(raw_sha)));
            }
        }
        let (name, name_from) = derive_name(intake.archive.manifest.as_deref(), fallback)?;
        Ok(Resolved {
            archive: intake.archive,
            fingerprint: None,
            recalled: false,
            name,
            name_from,
            skipped: intake.skipped,
        })
    }

    fn stem(&self) -> &str {
        match self {
            Source::Https { stem, .. } => stem,
            _ => "",
        }
    }

    pub fn canonical(&self) -> String {
        match self {
            Source::Local { name } => format!("local://{name}"),
            Source::GitHub {
                owner,
                repo,
                reference: Some(r),
            } => format!("github://{owner}/{repo}#{r}"),
            Source::GitHub {
                owner,
                repo,
                reference: None,
            } => format!("github://{owner}/{repo}"),
            Source::Https { url, sha256, .. } => format!("{url}#sha256={sha256}"),
        }
    }
}

/// The name on the host for a fetched plugin: `plugin.yaml`'s `name` when
/// it is a valid plugin name, else the repository name or file stem.
fn derive_name(manifest: Option<&[u8]>, fallback: &str) -> Result<(String, &'static str)> {
    let declared = manifest
        .and_then(|m| crate::plugin::Manifest::parse(m).ok())
        .and_then(|m| m.name);
    if let Some(n) = declared.filter(|n| validate_name(n).is_ok()) {
        return Ok((n, "plugin.yaml"));
    }
    let lowered = fallback.to_ascii_lowercase();
    validate_name(&lowered).map_err(|_| {
        Error::unprocessable(format!(
            "cannot derive a plugin name: plugin.yaml has no valid name and {fallback:?} is not one"
        ))
    })?;
    Ok((lowered, "source"))
}

/// Hashes the raw bytes as they are read (the https pin is on the archive
/// as served, before any re-packing).
struct HashingRead<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: std::io::Read> std::io::Read for HashingRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A plugin's canonical archive on local disk.
#[derive(Debug)]
pub struct Resolved {
    pub archive: ArchiveFile,
    /// Set when a registry archive was built: record it under this
    /// fingerprint once it is staged.
    pub fingerprint: Option<String>,
    /// Recalled from the staged archives (already in S3).
    pub recalled: bool,
    /// The plugin's name on the host, and what decided it.
    pub name: String,
    pub name_from: &'static str,
    /// Symlinks and hardlinks that were dropped.
    pub skipped: Vec<Skipped>,
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
    let resolved = |archive, fingerprint, recalled| Resolved {
        archive,
        fingerprint,
        recalled,
        name: name.to_string(),
        name_from: "registry",
        skipped: Vec::new(),
    };
    if let Some(archive) = archives.recall(&print).await? {
        return Ok(resolved(archive, None, true));
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
    Ok(resolved(built?, Some(print), false))
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
