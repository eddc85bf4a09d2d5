//! The ports: every trait the use cases need from the outside world, and
//! `Deps`, the bundle of them an operation runs with. Use cases see only
//! these traits; `adapters` implements them for AWS, SSH and HTTPS (and in
//! memory, for unit tests and simulations); `app` picks the adapters.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufRead, AsyncRead};

use crate::domain::allowlist::Allowlist;
use crate::domain::archive::ArchiveFile;
use crate::domain::caller::Caller;
use crate::domain::config::Config;
use crate::domain::error::{Error, Result};
use crate::domain::host::Host;
use crate::domain::hostscript::{HostCommand, HostOutput};
use crate::domain::job::Job;
use crate::domain::plugin::DesiredState;
use crate::domain::recent::RecentArchives;
use crate::domain::records::OperationRecord;
use crate::domain::source::RegistryFile;

/// Everything an operation needs. `app` builds it from the real adapters;
/// unit tests and the fleet simulation from `adapters::memory`.
#[derive(Clone)]
pub struct Deps {
    pub config: Arc<Config>,
    pub registry: Arc<dyn Registry>,
    pub archives: Arc<dyn ArchiveStore>,
    pub state: Arc<dyn StateStore>,
    pub fleet: Arc<dyn Fleet>,
    pub transport: Arc<dyn HostTransport>,
    pub allowlists: Arc<dyn AllowlistStore>,
    pub records: Arc<dyn RecordStore>,
    pub fetcher: Arc<dyn Fetcher>,
    pub credentials: Arc<dyn Credentials>,
    pub auth: Arc<dyn Authenticator>,
    pub clock: Arc<dyn Clock>,
    /// Where API operations that outlast the deadline go on (optional:
    /// without it they answer 504).
    pub handoff: Option<Arc<dyn Handoff>>,
    /// Small archives this process resolved lately (warm invocations).
    pub recent: Arc<RecentArchives>,
}

// ---- S3: registry, staged archives, desired state, allowlists, records

/// A file being read from the registry.
pub struct RegistryObject {
    pub body: Box<dyn AsyncBufRead + Send + Unpin>,
    /// Unix mode from `x-amz-meta-mode` when the publisher set it.
    pub mode: Option<u32>,
}

#[async_trait]
pub trait Registry: Send + Sync {
    /// The plugin's files, unsorted; empty when the plugin is not published.
    async fn list(&self, name: &str) -> Result<Vec<RegistryFile>>;
    async fn open(&self, file: &RegistryFile) -> Result<RegistryObject>;
    /// Names of the published plugins (the folders under `registry/`).
    async fn names(&self) -> Result<Vec<String>>;
    /// A published plugin's `plugin.yaml`, if it has one.
    async fn manifest(&self, name: &str) -> Result<Option<Vec<u8>>>;
}

#[async_trait]
pub trait ArchiveStore: Send + Sync {
    /// Uploads the archive under its digest unless it is already there.
    async fn stage(&self, digest: &str, path: &Path) -> Result<()>;
    /// The staged archive recorded for a source fingerprint, downloaded to a
    /// local file and verified against its digest; `None` on any miss.
    async fn recall(&self, fingerprint: &str) -> Result<Option<ArchiveFile>>;
    /// A staged archive by digest, downloaded and verified; `None` when it
    /// is missing or its bytes do not match.
    async fn fetch_staged(&self, digest: &str) -> Result<Option<ArchiveFile>>;
    /// Records that `fingerprint` produced `archive` (already staged).
    async fn remember(&self, fingerprint: &str, archive: &ArchiveFile) -> Result<()>;
    /// A presigned GET URL of a staged archive, valid for `ttl`.
    async fn presign(&self, digest: &str, ttl: std::time::Duration) -> Result<String>;
    /// Every staged archive: digest, size and age (retention sweep).
    async fn staged(&self) -> Result<Vec<StagedArchive>>;
    /// Removes a staged archive (in a versioned bucket its bytes stay, as
    /// an old version, until the noncurrent-version rule expires them).
    async fn unstage(&self, digest: &str) -> Result<()>;
    /// Undoes `unstage` for an archive needed meanwhile; `false` when it
    /// cannot (an unversioned bucket: the source is fetched again).
    async fn restore(&self, digest: &str) -> Result<bool>;
}

/// One staged archive as the retention sweep sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedArchive {
    pub digest: String,
    pub bytes: u64,
    /// Since it was last written.
    pub age: Duration,
}

/// The stored desired state and the version token to write against.
pub struct Versioned {
    pub state: DesiredState,
    /// `None` when the document does not exist yet.
    pub etag: Option<String>,
}

#[async_trait]
pub trait StateStore: Send + Sync {
    async fn load(&self, workspace: &str) -> Result<Versioned>;
    /// Conditional write: `Ok(false)` when someone else wrote first (412),
    /// so the caller re-reads and re-applies its change.
    async fn save(&self, workspace: &str, state: &DesiredState, etag: Option<&str>)
        -> Result<bool>;
    /// Every workspace that has a desired state (fleet operations).
    async fn workspaces(&self) -> Result<Vec<String>>;
}

#[async_trait]
pub trait AllowlistStore: Send + Sync {
    async fn load_allowlist(&self, org: &str) -> Result<(Allowlist, Option<String>)>;
    /// Conditional write, as `StateStore::save`.
    async fn save_allowlist(&self, org: &str, list: &Allowlist, etag: Option<&str>)
        -> Result<bool>;
}

/// A page of records, newest first, and where the next page starts.
#[derive(Debug)]
pub struct Page {
    pub records: Vec<OperationRecord>,
    pub next: Option<String>,
}

#[async_trait]
pub trait RecordStore: Send + Sync {
    /// Writes (or overwrites) a record: a workspace's, or a rollout parent.
    async fn put_record(&self, record: &OperationRecord) -> Result<()>;
    async fn get_record(
        &self,
        workspace: Option<&str>,
        id: &str,
    ) -> Result<Option<OperationRecord>>;
    /// Newest first, `limit` at most, starting after the id `after`.
    async fn list_records(
        &self,
        workspace: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page>;
}

// ---- EC2: the fleet

#[async_trait]
pub trait Fleet: Send + Sync {
    /// 404 when no running instance carries the tag, 409 when several do.
    async fn locate(&self, workspace: &str) -> Result<Host>;
    /// `locate` for many workspaces at once (fleet operations).
    async fn locate_all(&self, workspaces: &[String]) -> Result<BTreeMap<String, Result<Host>>>;
    /// The host keys published for the instance: the tag, else the keys
    /// cloud-init printed to the console. Empty when none were published.
    async fn host_keys(&self, host: &Host) -> Result<Vec<String>>;
    /// The workspace an instance serves (its workspace tag), if any.
    async fn workspace_of(&self, instance_id: &str) -> Result<Option<String>>;
    /// The `molecule:org-id` tag of each of the workspace's instances that
    /// is not terminated (stopped ones too), `None` where it has none.
    async fn org_tags(&self, workspace: &str) -> Result<Vec<Option<String>>>;
}

// ---- the host: SSH or SSM

/// The plugin archive an install delivers: already staged in S3 under its
/// digest, and on local disk for transports that stream it.
#[derive(Debug, Clone, Copy)]
pub struct Payload<'a> {
    pub path: &'a Path,
    pub sha256: &'a str,
}

impl<'a> From<&'a ArchiveFile> for Payload<'a> {
    fn from(a: &'a ArchiveFile) -> Self {
        Payload {
            path: a.path(),
            sha256: &a.sha256,
        }
    }
}

#[async_trait]
pub trait HostTransport: Send + Sync {
    /// Runs the host script with `cmd`, delivering `payload` (if any) to it,
    /// and returns its output; the caller interprets it.
    async fn run(
        &self,
        host: &Host,
        cmd: &HostCommand,
        payload: Option<&Payload<'_>>,
    ) -> Result<HostOutput>;

    /// Does ahead of time what `run` would do first (over SSH: push a key,
    /// connect, authenticate), so an operation can overlap it with its own
    /// work (resolving and staging the plugin). `None`: nothing to open.
    async fn open(&self, _host: &Host) -> Result<Option<Opened>> {
        Ok(None)
    }

    /// Starts `cmd`, an install naming its plugin on stdin
    /// (`HostCommand::install_named_on_stdin`), on what `open` made: the
    /// host starts the script and checks what it can while the operation
    /// is still resolving the plugin. `run_opened` with the full command
    /// then sends the line naming the plugin and the archive. Dropping the
    /// result instead ends the command with nothing changed on the host.
    /// Transports without a stdin to send on leave `opened` as it is.
    async fn start(
        &self,
        opened: Option<Opened>,
        _host: &Host,
        _cmd: &HostCommand,
    ) -> Result<Option<Opened>> {
        Ok(opened)
    }

    /// Ends what `open` or `start` made, when the operation stops before
    /// `run_opened` (a plugin refused once fetched): a started command's
    /// stdin ends before any line naming a plugin, so it ends with nothing
    /// changed, and it is waited for briefly. A connection left clean is
    /// kept for the next operation on the host, like one `run_opened` used.
    async fn close(&self, _opened: Opened, _host: &Host) {}

    /// `run` on what `open` made (or from scratch, given `None`). On a
    /// command `start` began, `cmd` must be the same install naming its
    /// plugin in its arguments (`HostCommand::named_on_stdin`); any other
    /// is refused (an internal error) and the started one ended unsent.
    async fn run_opened(
        &self,
        _opened: Option<Opened>,
        host: &Host,
        cmd: &HostCommand,
        payload: Option<&Payload<'_>>,
    ) -> Result<HostOutput> {
        self.run(host, cmd, payload).await
    }

    /// The install `started` (`HostCommand::install_named_on_stdin`, begun
    /// with `start` or not) for plugin `name`, whose archive is still being
    /// built: `growing` tells how far its file is written, and its digest
    /// once it is complete and checked. If `growing` closes without the
    /// digest, the host publishes nothing. This default, for transports
    /// without a stdin to stream on, waits for the whole archive and then
    /// runs the install as `run_opened` does.
    async fn run_framed(
        &self,
        opened: Option<Opened>,
        host: &Host,
        started: &HostCommand,
        name: &str,
        mut growing: Growing,
    ) -> Result<HostOutput> {
        let done = growing
            .wait_for(|g| g.end.is_some())
            .await
            .map(|g| g.clone())
            .ok()
            .and_then(|g| Some((g.path?, g.end?, g.written)));
        let Some((path, sha, written)) = done else {
            if let Some(o) = opened {
                self.close(o, host).await;
            }
            return Err(Error::internal("the archive ended before its digest"));
        };
        let cmd = started
            .naming(name, &sha)
            .ok_or_else(|| Error::internal("run_framed takes an install named on stdin"))?
            .with_archive_bytes(written);
        let payload = Payload {
            path: &path,
            sha256: &sha,
        };
        self.run_opened(opened, host, &cmd, Some(&payload)).await
    }
}

/// An archive file being written, as an install sent while it is built
/// sees it. The file stays in place until the install is over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Growth {
    /// The file, once it exists.
    pub path: Option<std::path::PathBuf>,
    /// How many of its bytes are in it (a reader may read that far).
    pub written: u64,
    /// Its digest, once it is complete and has passed every check; the
    /// last thing the host is told.
    pub end: Option<String>,
    /// The size it is expected to reach (its files' bytes before
    /// compression; 0 if not known), known before the first byte: a hint
    /// for the host's choice of tools.
    pub about: u64,
}

/// The archive's growth as it is built. Closed without an `end`: the build
/// failed or the archive was refused.
pub type Growing = tokio::sync::watch::Receiver<Growth>;

/// A connection `HostTransport::open` made, opaque to the use cases; only
/// the transport that made it can use it.
pub struct Opened(pub Box<dyn std::any::Any + Send + Sync>);

// ---- the background queue

/// The port: somewhere a job survives until a worker runs it.
#[async_trait]
pub trait Handoff: Send + Sync {
    async fn hand_off(&self, job: &Job) -> Result<()>;
}

// ---- fetching from outside: GitHub and pinned https URLs

/// A response body as a byte stream.
pub type Body = Box<dyn AsyncRead + Send + Unpin>;

#[async_trait]
pub trait Fetcher: Send + Sync {
    /// The tarball of `owner/repo` at `reference` (GitHub's tarball
    /// endpoint), with the org's own `token` for private repositories.
    /// `source` names the plugin source in errors.
    async fn github_tarball(
        &self,
        owner: &str,
        repo: &str,
        reference: &str,
        token: Option<&str>,
        source: &str,
    ) -> Result<Body>;
    /// The body of an https URL.
    async fn https(&self, url: &str, source: &str) -> Result<Body>;
}

/// Each org's own credentials for the sources it fetches from. There is no
/// deployment-wide one: a caller only ever gets its own org's.
#[async_trait]
pub trait Credentials: Send + Sync {
    /// The org's GitHub token for private repositories, if it stored one.
    async fn github_token(&self, org: &str) -> Result<Option<String>>;
}

// ---- who is calling

#[async_trait]
pub trait Authenticator: Send + Sync {
    /// The caller an `Authorization` header value proves (a platform-issued
    /// bearer JWT); 401 when it proves none, 503 when the keys to check it
    /// cannot be had.
    async fn authenticate(&self, authorization: Option<&str>) -> Result<Caller>;
}

// ---- time

/// Time as the use cases see it: waits between retries and how long
/// something took. Tests and simulations swap in a clock that does not
/// really wait.
#[async_trait]
pub trait Clock: Send + Sync {
    /// A monotonic instant.
    fn now(&self) -> std::time::Instant;
    async fn sleep(&self, d: Duration);
}
