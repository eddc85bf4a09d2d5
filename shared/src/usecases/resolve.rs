//! Resolving a plugin source into its canonical archive on local disk, and
//! staging that archive in S3 under its digest. `local://` builds from the
//! registry (or recalls the archive the same listing built before);
//! `github://` and `https://` are fetched through the `Fetcher` port and
//! pass `intake`'s checks before anything is staged. A registry plugin can
//! also be planned (`plan_local`) and built with a `Tap` that follows its
//! file as it grows, for an install that sends it while it is built.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::io::AsyncBufReadExt;
use tokio_util::io::SyncIoBridge;

use crate::domain::archive::{self, ArchiveFile, CanonicalArchive};
use crate::domain::error::{Error, ErrorKind, Result};
use crate::domain::intake::{self, IntakeLimits};
use crate::domain::source::{derive_name, fingerprint, NameFrom, RegistryFile, Resolved, Source};
use crate::ports::{Body, Deps, Registry};

/// The canonical archive of the plugin `source` names, fetched (when it
/// is remote) with `org`'s own credentials, never another org's.
pub async fn resolve(deps: &Deps, source: &Source, org: Option<&str>) -> Result<Resolved> {
    if let Source::Local { name } = source {
        return resolve_local(deps, name).await;
    }
    // One deadline over connect, headers, body and checks: a host that
    // trickles bytes cannot hold the operation past it.
    tokio::time::timeout(deps.config.fetch_timeout, resolve_remote(deps, source, org))
        .await
        .unwrap_or_else(|_| {
            Err(Error::deadline(format!(
                "fetching {} ran past its deadline",
                source.redacted()
            ))
            .with_field("scheme", serde_json::json!(source.scheme())))
        })
}

/// Puts a resolved archive in S3 (unless it came from there) and remembers
/// which registry listing built it. The memo is a cache: failing to write
/// it costs the next install a rebuild, not this one its result.
pub async fn stage(deps: &Deps, resolved: &Resolved) -> Result<()> {
    if !resolved.recalled {
        deps.archives
            .stage(&resolved.archive.sha256, resolved.archive.path())
            .await?;
    }
    if let Some(print) = &resolved.fingerprint {
        if let Err(e) = deps.archives.remember(print, &resolved.archive).await {
            tracing::warn!(error = %e.message, detail = ?e.detail, "could not remember which listing built the archive");
        }
    }
    Ok(())
}

async fn resolve_remote(deps: &Deps, source: &Source, org: Option<&str>) -> Result<Resolved> {
    // Named in errors and logs: never a signed URL's query string.
    let canonical = source.redacted();
    let (body, strip, fallback, pin) = match source {
        Source::Local { .. } => {
            return Err(Error::internal(
                "a registry source reached the remote fetch",
            ))
        }
        Source::GitHub {
            owner,
            repo,
            reference,
        } => {
            if reference.is_none() && !deps.config.allow_unpinned {
                return Err(Error::unprocessable(format!(
                    "unpinned GitHub source: pin it as github://{owner}/{repo}#<tag, branch or full commit sha>"
                )));
            }
            let r = reference.as_deref().unwrap_or("");
            let token = match org {
                Some(org) => deps.credentials.github_token(org).await.map_err(|e| {
                    Error::unavailable("the org's GitHub credential could not be read")
                        .with_detail(format!("org {org}: {} {:?}", e.message, e.detail))
                })?,
                None => None,
            };
            let body = deps
                .fetcher
                .github_tarball(owner, repo, r, token.as_deref(), &canonical)
                .await?;
            (body, true, repo.as_str(), None)
        }
        Source::Https { url, sha256, .. } => {
            let body = deps.fetcher.https(url, &canonical).await?;
            (body, false, source.stem(), Some(sha256.as_str()))
        }
    };
    let limits = IntakeLimits {
        max_tree_bytes: deps.config.max_tree_bytes,
        ..Default::default()
    };
    let (intake, raw_sha) = ingest(body, strip, limits)
        .await
        .map_err(|e| match e.kind {
            // The stream broke, not the archive: say which source failed.
            ErrorKind::Unavailable => Error::host_failed(format!("fetching {canonical} failed"))
                .with_field("scheme", serde_json::json!(source.scheme()))
                .with_detail(format!("{:?}", e.detail)),
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
    tracing::info!(
        source = %source.redacted(),
        size = intake.archive.size,
        spooled = intake.spooled,
        "archive taken in"
    );
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

/// Runs `intake` over a fetched body on a blocking thread; also the SHA-256
/// of the raw bytes as served (the https pin is on those).
async fn ingest(body: Body, strip: bool, limits: IntakeLimits) -> Result<(intake::Intake, String)> {
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let mut reader = HashingRead {
            inner: SyncIoBridge::new_with_handle(body, handle),
            hasher: Sha256::new(),
        };
        let intake = intake::ingest(&mut reader, strip, &limits)?;
        Ok((intake, hex::encode(reader.hasher.finalize())))
    })
    .await
    .map_err(Error::internal)?
}

/// Hashes the bytes as they are read.
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

/// The canonical archive of a registry plugin. The same listing always
/// yields the same archive, so one this process resolved lately is copied
/// from its own `/tmp` (`deps.recent`), and one built before is recalled
/// from S3 (two small requests), instead of re-reading every file. A copy
/// from `/tmp` is not known to be staged still (a retention sweep may have
/// removed it): it goes back through `stage`, which checks.
async fn resolve_local(deps: &Deps, name: &str) -> Result<Resolved> {
    match plan_local(deps, name).await? {
        Local::AtHand(resolved) => Ok(resolved),
        Local::ToBuild(build) => build.build(deps, None).await,
    }
}

/// A registry plugin's archive: at hand (built lately or recalled), or
/// still to be built from its listing.
pub enum Local {
    AtHand(Resolved),
    ToBuild(LocalBuild),
}

/// A checked registry listing whose archive is to be built.
pub struct LocalBuild {
    name: String,
    files: Vec<RegistryFile>,
    print: String,
}

/// `resolve` for a registry plugin, short of building its archive.
pub async fn plan_local(deps: &Deps, name: &str) -> Result<Local> {
    let max = deps.config.max_tree_bytes;
    let files = checked_listing(deps.registry.as_ref(), name, max).await?;
    let print = fingerprint(&files);
    if let Some(archive) = deps.recent.get(&print) {
        return Ok(Local::AtHand(local_resolved(name, archive, None, false)));
    }
    if let Some(archive) = deps.archives.recall(&print).await? {
        deps.recent.put(&print, &archive);
        return Ok(Local::AtHand(local_resolved(name, archive, None, true)));
    }
    Ok(Local::ToBuild(LocalBuild {
        name: name.to_string(),
        files,
        print,
    }))
}

fn local_resolved(
    name: &str,
    archive: ArchiveFile,
    fingerprint: Option<String>,
    recalled: bool,
) -> Resolved {
    Resolved {
        archive,
        fingerprint,
        recalled,
        name: name.to_string(),
        name_from: NameFrom::Registry,
        skipped: Vec::new(),
    }
}

impl LocalBuild {
    /// The listed files' bytes: about the size of the archive, before it
    /// is built.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Whether the archive has a check that only its end can make (a
    /// `manifest.json` pinning the whole tree): such an archive is not
    /// sent anywhere before it is whole.
    pub fn checked_at_its_end(&self) -> bool {
        self.files.iter().any(|f| f.path == archive::TREE_MANIFEST)
    }

    /// The `plugin.yaml` of the listing, read on its own ahead of the
    /// build (a caller that sends the archive as it is built checks it
    /// first; the built archive must then hold these very bytes).
    pub async fn manifest(&self, deps: &Deps) -> Result<Option<Vec<u8>>> {
        let Some(listed) = self.files.iter().find(|f| f.path == "plugin.yaml") else {
            return Ok(None);
        };
        if listed.size as usize > archive::MAX_MANIFEST_BYTES {
            return Err(Error::unprocessable("plugin.yaml is larger than 1 MiB"));
        }
        match deps.registry.manifest(&self.name).await? {
            Some(bytes) if bytes.len() as u64 == listed.size => Ok(Some(bytes)),
            _ => Err(changed_in_registry()),
        }
    }

    /// Builds the archive, every byte of it also written to `tap` as it is
    /// made (see `CanonicalArchive::create_tapped`).
    pub async fn build(self, deps: &Deps, tap: Option<archive::Tap>) -> Result<Resolved> {
        let built =
            build_from_registry(&deps.registry, self.files, deps.config.max_tree_bytes, tap)
                .await?;
        deps.recent.put(&self.print, &built);
        Ok(local_resolved(&self.name, built, Some(self.print), false))
    }
}

/// The plugin's registry files, sorted by path, refused before a byte is
/// read when they are too many bytes or could not form a file tree.
async fn checked_listing(
    registry: &dyn Registry,
    name: &str,
    max_tree_bytes: u64,
) -> Result<Vec<RegistryFile>> {
    let mut files = registry.list(name).await?;
    if files.is_empty() {
        return Err(Error::not_found(format!(
            "plugin {name:?} is not in the registry"
        )));
    }
    let total: u64 = files.iter().map(|f| f.size).sum();
    if total > max_tree_bytes {
        return Err(archive::too_large(max_tree_bytes));
    }
    for f in &files {
        archive::validate_relative_path(&f.path)?;
    }
    files.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    // S3 can hold both `a` and `a/b`; no file system can.
    let paths: HashSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
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
    Ok(files)
}

/// Registry objects open at once: the one being archived and those ahead.
const PREFETCH: usize = 8;

/// Streams each registry object through the gzip encoder into a temporary
/// file. Up to `PREFETCH` objects are opened ahead of the archiver: plugins
/// are many small files, and one S3 round trip per file in sequence would
/// dominate install latency. tar and gzip are synchronous, so the build
/// runs on a blocking thread with each body bridged into it: only a
/// buffer's worth of any file is ever in memory.
async fn build_from_registry(
    registry: &Arc<dyn Registry>,
    files: Vec<RegistryFile>,
    max_tree_bytes: u64,
    tap: Option<archive::Tap>,
) -> Result<ArchiveFile> {
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
    let handle = tokio::runtime::Handle::current();
    // If the caller goes away (deadline, or the host lookup failed first),
    // the guard stops the prefetch and the blocking build at the next file.
    let cancel = Cancel(Arc::new(AtomicBool::new(false)), opener.abort_handle());
    let cancelled = Arc::clone(&cancel.0);
    let built = tokio::task::spawn_blocking(move || {
        let mut out = CanonicalArchive::create_tapped(max_tree_bytes, tap)?;
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
    built
}

/// The registry gave other bytes than its listing (or than it gave a
/// moment ago): a publish raced the read.
pub fn changed_in_registry() -> Error {
    Error::conflict("the plugin changed in the registry while it was being read; try again")
}

struct Cancel(Arc<AtomicBool>, tokio::task::AbortHandle);

impl Drop for Cancel {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        self.1.abort();
    }
}
