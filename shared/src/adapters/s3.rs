//! The S3 adapter: one bucket holds the plugin registry, the staged
//! archives, the desired states, the org allowlists and the operation
//! records; `S3Store` implements the five store ports over it.

use std::path::Path;

use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::adapters::aws::aws_error;
use crate::domain::allowlist::Allowlist;
use crate::domain::archive::{manifest_in, ArchiveFile};
use crate::domain::error::{Error, Result};
use crate::domain::plugin::DesiredState;
use crate::domain::records::{Kind, OperationRecord};
use crate::domain::source::RegistryFile;
use crate::ports::{
    AllowlistStore, ArchiveStore, Page, RecordStore, Registry, RegistryObject, StagedArchive,
    StateStore, Versioned,
};

/// `staged/index/<fingerprint>.json`: what a registry listing built.
#[derive(Debug, Serialize, Deserialize)]
struct IndexEntry {
    digest: String,
    /// `plugin.yaml` bytes, base64 (pins and manifests need them exact).
    manifest: Option<String>,
}

pub fn allowlist_key(org: &str) -> String {
    format!("orgs/{org}/plugins/allowlist.json")
}

pub fn registry_prefix(name: &str) -> String {
    format!("registry/{name}/")
}
pub fn staged_key(digest: &str) -> String {
    format!("staged/{digest}.tar.gz")
}
/// The tag every operation record carries, so that a lifecycle rule can
/// expire records (their keys share no prefix: `workspaces/<id>/operations/`)
/// without touching desired states beside them.
pub const RECORD_TAG: (&str, &str) = ("plugin-delivery", "operation-record");

pub fn index_key(fingerprint: &str) -> String {
    format!("staged/index/{fingerprint}.json")
}
pub fn state_key(workspace: &str) -> String {
    format!("workspaces/{workspace}/plugins.json")
}

#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
}

impl S3Store {
    pub fn new(client: Client, bucket: impl Into<String>) -> Self {
        S3Store {
            client,
            bucket: bucket.into(),
        }
    }
}

type SdkError<E> = aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>;

fn s3_error<E: std::fmt::Debug>(what: &str, e: SdkError<E>) -> Error {
    aws_error("S3", what, &e)
}

fn http_status<E>(e: &SdkError<E>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

#[async_trait]
impl Registry for S3Store {
    async fn list(&self, name: &str) -> Result<Vec<RegistryFile>> {
        let prefix = registry_prefix(name);
        let mut files = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_error("list registry", e))?;
            for obj in page.contents() {
                let Some(key) = obj.key() else { continue };
                let path = &key[prefix.len()..];
                // "Folder" placeholder objects some consoles create.
                if path.is_empty() || path.ends_with('/') {
                    continue;
                }
                files.push(RegistryFile {
                    path: path.to_string(),
                    key: key.to_string(),
                    size: obj.size().unwrap_or(0).max(0) as u64,
                    version: format!(
                        "{}@{}",
                        obj.e_tag().unwrap_or_default(),
                        obj.last_modified()
                            .map(|t| t.to_string())
                            .unwrap_or_default()
                    ),
                });
            }
        }
        Ok(files)
    }

    async fn names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix("registry/")
            .delimiter("/")
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_error("list registry", e))?;
            for p in page.common_prefixes() {
                let name = p
                    .prefix()
                    .unwrap_or_default()
                    .trim_start_matches("registry/")
                    .trim_end_matches('/');
                if !name.is_empty() {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    async fn manifest(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.get_optional(&format!("{}plugin.yaml", registry_prefix(name)))
            .await
    }

    async fn open(&self, file: &RegistryFile) -> Result<RegistryObject> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&file.key)
            .send()
            .await
            .map_err(|e| s3_error("get registry object", e))?;
        // The listing's size is what the cap and the tar header were based
        // on; a different object now means a publish raced this read.
        if out.content_length().map(|n| n as u64) != Some(file.size) {
            return Err(Error::conflict(
                "the plugin changed in the registry while it was being read; try again",
            )
            .with_detail(format!(
                "{}: listed {} bytes, got {:?}",
                file.key,
                file.size,
                out.content_length()
            )));
        }
        let mode = out
            .metadata()
            .and_then(|m| m.get("mode"))
            .and_then(|m| parse_mode(m));
        Ok(RegistryObject {
            body: Box::new(out.body.into_async_read()),
            mode,
        })
    }
}

/// `x-amz-meta-mode` as s3fs/goofys write it (decimal `st_mode`) or octal.
fn parse_mode(v: &str) -> Option<u32> {
    let v = v.trim();
    if let Some(oct) = v.strip_prefix("0o").or_else(|| v.strip_prefix('0')) {
        u32::from_str_radix(oct, 8).ok()
    } else {
        v.parse().ok()
    }
}

#[async_trait]
impl ArchiveStore for S3Store {
    async fn stage(&self, digest: &str, path: &Path) -> Result<()> {
        let key = staged_key(digest);
        // S3 keeps (and checks on upload) the object's SHA-256: an object
        // whose stored checksum is this digest holds exactly these bytes.
        // Anything else (damaged, or staged without a checksum) is replaced,
        // because SSM hosts download this very object.
        let checksum = hex::decode(digest)
            .map(|b| B64.encode(b))
            .map_err(|e| Error::internal(format!("digest {digest}: {e}")))?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&key)
            .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
            .send()
            .await
        {
            Ok(head) if head.checksum_sha256() == Some(checksum.as_str()) => return Ok(()),
            Ok(_) => tracing::info!(digest, "staged archive unverified or damaged; restaging"),
            Err(e) if http_status(&e) == Some(404) => {}
            Err(e) => return Err(s3_error("head staged archive", e)),
        }
        let body = ByteStream::from_path(path)
            .await
            .map_err(|e| Error::internal(format!("open archive: {e}")))?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_type("application/gzip")
            // Both: S3 stores a given checksum either way; the algorithm
            // header is what the SDK (and moto) key the stored value on.
            .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Sha256)
            .checksum_sha256(checksum)
            .body(body)
            .send()
            .await
            .map_err(|e| s3_error("put staged archive", e))?;
        Ok(())
    }

    async fn recall(&self, fingerprint: &str) -> Result<Option<ArchiveFile>> {
        let Some(bytes) = self.get_optional(&index_key(fingerprint)).await? else {
            return Ok(None);
        };
        let Ok(entry) = serde_json::from_slice::<IndexEntry>(&bytes) else {
            return Ok(None);
        };
        let Some(archive) = self.download_staged(&entry.digest).await? else {
            tracing::warn!(
                fingerprint,
                "staged archive missing or not matching its index entry; rebuilding"
            );
            // The rebuild's `stage` sees the stored checksum differ and
            // replaces the object, so SSM hosts never download it again.
            return Ok(None);
        };
        // The index only says which archive; what the archive contains
        // (the plugin.yaml a sha256 pin is checked against) is read from
        // the archive itself, whose digest was just verified.
        let path = archive.path().to_path_buf();
        let manifest = tokio::task::spawn_blocking(move || manifest_in(&path))
            .await
            .map_err(Error::internal)??;
        let told = match entry.manifest.as_deref().map(|m| B64.decode(m)) {
            Some(Ok(m)) => Some(m),
            Some(Err(_)) => None,
            None => None,
        };
        if told != manifest {
            tracing::warn!(
                fingerprint,
                "index entry's plugin.yaml differs from its archive's; ignored"
            );
        }
        Ok(Some(ArchiveFile {
            manifest,
            ..archive
        }))
    }

    async fn fetch_staged(&self, digest: &str) -> Result<Option<ArchiveFile>> {
        self.download_staged(digest).await
    }

    async fn presign(&self, digest: &str, ttl: std::time::Duration) -> Result<String> {
        let conf =
            aws_sdk_s3::presigning::PresigningConfig::expires_in(ttl).map_err(Error::internal)?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(staged_key(digest))
            .presigned(conf)
            .await
            .map_err(|e| s3_error("presign staged archive", e))?;
        Ok(req.uri().to_string())
    }

    async fn staged(&self) -> Result<Vec<StagedArchive>> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let mut found = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix("staged/")
            .delimiter("/")
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_error("list staged archives", e))?;
            for obj in page.contents() {
                let Some(digest) = obj
                    .key()
                    .and_then(|k| k.strip_prefix("staged/"))
                    .and_then(|k| k.strip_suffix(".tar.gz"))
                else {
                    continue;
                };
                let modified = obj.last_modified().map(|d| d.secs()).unwrap_or(now);
                found.push(StagedArchive {
                    digest: digest.to_string(),
                    bytes: obj.size().unwrap_or(0).max(0) as u64,
                    age: std::time::Duration::from_secs((now - modified).max(0) as u64),
                });
            }
        }
        Ok(found)
    }

    async fn unstage(&self, digest: &str) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(staged_key(digest))
            .send()
            .await
            .map_err(|e| s3_error("delete staged archive", e))?;
        Ok(())
    }

    async fn restore(&self, digest: &str) -> Result<bool> {
        // The delete marker `unstage` left on top: removing it makes the
        // archive's last version current again.
        let key = staged_key(digest);
        let out = self
            .client
            .list_object_versions()
            .bucket(&self.bucket)
            .prefix(&key)
            .send()
            .await
            .map_err(|e| s3_error("list staged archive versions", e))?;
        let marker = out
            .delete_markers()
            .iter()
            .find(|m| m.key() == Some(key.as_str()) && m.is_latest() == Some(true))
            .and_then(|m| m.version_id().map(str::to_string));
        let Some(version) = marker else {
            return Ok(false);
        };
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .version_id(version)
            .send()
            .await
            .map_err(|e| s3_error("restore staged archive", e))?;
        Ok(true)
    }

    async fn remember(&self, fingerprint: &str, archive: &ArchiveFile) -> Result<()> {
        let entry = IndexEntry {
            digest: archive.sha256.clone(),
            manifest: archive.manifest.as_deref().map(|m| B64.encode(m)),
        };
        let body = serde_json::to_vec(&entry).map_err(Error::internal)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(index_key(fingerprint))
            .content_type("application/json")
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| s3_error("put source index", e))?;
        Ok(())
    }
}

#[async_trait]
impl StateStore for S3Store {
    async fn load(&self, workspace: &str) -> Result<Versioned> {
        let key = state_key(workspace);
        let Some((bytes, etag)) = self.get_versioned(&key).await? else {
            return Ok(Versioned {
                state: DesiredState::default(),
                etag: None,
            });
        };
        let state = serde_json::from_slice(&bytes)
            .map_err(|e| Error::internal(format!("corrupt desired state {key}: {e}")))?;
        Ok(Versioned { state, etag })
    }

    async fn save(
        &self,
        workspace: &str,
        state: &DesiredState,
        etag: Option<&str>,
    ) -> Result<bool> {
        let body = serde_json::to_vec_pretty(state).map_err(Error::internal)?;
        self.put_conditional(&state_key(workspace), body, etag)
            .await
    }

    async fn workspaces(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix("workspaces/")
            .delimiter("/")
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_error("list workspaces", e))?;
            for p in page.common_prefixes() {
                let id = p
                    .prefix()
                    .and_then(|p| p.strip_prefix("workspaces/"))
                    .map(|p| p.trim_end_matches('/'));
                if let Some(id) =
                    id.filter(|id| crate::domain::plugin::validate_workspace_id(id).is_ok())
                {
                    out.push(id.to_string());
                }
            }
        }
        Ok(out)
    }
}

pub fn record_key(workspace: Option<&str>, id: &str) -> String {
    match workspace {
        Some(ws) => format!("workspaces/{ws}/operations/{id}.json"),
        None => format!("rollouts/{id}.json"),
    }
}

#[async_trait]
impl RecordStore for S3Store {
    async fn put_record(&self, record: &OperationRecord) -> Result<()> {
        let workspace = match record.kind {
            Kind::Rollout => None,
            _ => record.workspace.as_deref(),
        };
        let body = serde_json::to_vec_pretty(record).map_err(Error::internal)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(record_key(workspace, &record.id))
            .content_type("application/json")
            .tagging(format!("{}={}", RECORD_TAG.0, RECORD_TAG.1))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| s3_error("put operation record", e))?;
        Ok(())
    }

    async fn get_record(
        &self,
        workspace: Option<&str>,
        id: &str,
    ) -> Result<Option<OperationRecord>> {
        let key = record_key(workspace, id);
        let Some(bytes) = self.get_optional(&key).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::internal(format!("corrupt operation record {key}: {e}")))
    }

    async fn list_records(
        &self,
        workspace: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page> {
        let prefix = format!("workspaces/{workspace}/operations/");
        let mut req = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&prefix)
            // One more than asked: tells whether there is a next page.
            .max_keys(limit as i32 + 1);
        if let Some(after) = after {
            req = req.start_after(format!("{prefix}{after}.json"));
        }
        let out = req
            .send()
            .await
            .map_err(|e| s3_error("list operation records", e))?;
        let mut ids: Vec<String> = out
            .contents()
            .iter()
            .filter_map(|o| o.key())
            .filter_map(|k| k.strip_prefix(&prefix)?.strip_suffix(".json"))
            .filter(|id| crate::domain::records::valid_id(id))
            .map(str::to_string)
            .collect();
        let next = if ids.len() > limit {
            ids.truncate(limit);
            ids.last().cloned()
        } else {
            None
        };
        // Small documents, fetched concurrently.
        let fetched = futures_util::future::join_all(
            ids.iter().map(|id| self.get_record(Some(workspace), id)),
        )
        .await;
        let mut records = Vec::new();
        for r in fetched {
            match r {
                Ok(Some(rec)) => records.push(rec),
                Ok(None) => {}
                // One unreadable record must not hide the others.
                Err(e) if e.kind == crate::domain::error::ErrorKind::Internal => {
                    tracing::warn!(error = ?e.detail, "skipping an unreadable operation record")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Page { records, next })
    }
}

#[async_trait]
impl AllowlistStore for S3Store {
    async fn load_allowlist(&self, org: &str) -> Result<(Allowlist, Option<String>)> {
        let key = allowlist_key(org);
        let Some((bytes, etag)) = self.get_versioned(&key).await? else {
            return Ok((Allowlist::default(), None));
        };
        let list = serde_json::from_slice(&bytes)
            .map_err(|e| Error::internal(format!("corrupt allowlist {key}: {e}")))?;
        Ok((list, etag))
    }

    async fn save_allowlist(
        &self,
        org: &str,
        list: &Allowlist,
        etag: Option<&str>,
    ) -> Result<bool> {
        let body = serde_json::to_vec_pretty(list).map_err(Error::internal)?;
        self.put_conditional(&allowlist_key(org), body, etag).await
    }
}

impl S3Store {
    /// `staged/<digest>.tar.gz` streamed to a temp file while hashing; a
    /// missing object or a mismatch is `None`, not an error.
    async fn download_staged(&self, digest: &str) -> Result<Option<ArchiveFile>> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(staged_key(digest))
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if http_status(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(s3_error("get staged archive", e)),
        };
        let file = tempfile::Builder::new()
            .prefix("plugin-")
            .suffix(".tar.gz")
            .tempfile()
            .map_err(Error::internal)?;
        let mut dst = tokio::fs::File::from_std(file.reopen().map_err(Error::internal)?);
        let mut body = out.body;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = body.try_next().await.map_err(|e| {
            Error::unavailable("S3 is not available right now").with_detail(format!("{e:?}"))
        })? {
            hasher.update(&chunk);
            size += chunk.len() as u64;
            dst.write_all(&chunk).await.map_err(Error::internal)?;
        }
        dst.flush().await.map_err(Error::internal)?;
        let sha256 = hex::encode(hasher.finalize());
        if sha256 != digest {
            return Ok(None);
        }
        Ok(Some(ArchiveFile {
            file,
            sha256,
            size,
            manifest: None,
        }))
    }

    /// A small object's bytes; `None` when it does not exist.
    async fn get_optional(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.get_versioned(key).await?.map(|(bytes, _)| bytes))
    }

    /// A small JSON document and its ETag; `None` when it does not exist.
    async fn get_versioned(&self, key: &str) -> Result<Option<(Vec<u8>, Option<String>)>> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if http_status(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(s3_error("get document", e)),
        };
        let etag = out.e_tag().map(str::to_string);
        let bytes = out.body.collect().await.map_err(|e| {
            Error::unavailable("S3 is not available right now")
                .with_detail(format!("read {key}: {e:?}"))
        })?;
        Ok(Some((bytes.into_bytes().to_vec(), etag)))
    }

    /// Conditional write: `If-Match` the version read, or `If-None-Match: *`
    /// to create. `Ok(false)` when another writer got there first.
    async fn put_conditional(&self, key: &str, body: Vec<u8>, etag: Option<&str>) -> Result<bool> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(body));
        req = match etag {
            Some(tag) => req.if_match(tag),
            None => req.if_none_match("*"),
        };
        match req.send().await {
            Ok(_) => Ok(true),
            // 412: precondition failed; 409: a concurrent conditional write
            // is in flight (S3 says ConditionalRequestConflict). Both: retry.
            Err(e) if matches!(http_status(&e), Some(412) | Some(409)) => Ok(false),
            Err(e) => Err(s3_error("put document", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn modes() {
        assert_eq!(super::parse_mode("33261"), Some(0o100755));
        assert_eq!(super::parse_mode("0755"), Some(0o755));
        assert_eq!(super::parse_mode("x"), None);
    }
}
