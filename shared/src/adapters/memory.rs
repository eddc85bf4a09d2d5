//! Every port in memory: the stores (registry, staged archives, desired
//! states, allowlists, records), a fleet, simulated hosts that run the host
//! script's protocol, a hand-off, a fetcher and a clock that does not
//! really wait. For the use cases' unit tests and the fleet simulation:
//! no stack, no network. Each adapter counts its calls and lets a test
//! script failures, so tests can assert what was (not) touched.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::domain::allowlist::Allowlist;
use crate::domain::archive::{sha256_hex, ArchiveFile};
use crate::domain::config::Config;
use crate::domain::error::{Error, Result};
use crate::domain::host::{Access, Host};
use crate::domain::hostscript::{HostCommand, HostOutput, RESULT_MARKER};
use crate::domain::job::Job;
use crate::domain::plugin::DesiredState;
use crate::domain::records::{Kind, OperationRecord};
use crate::domain::source::RegistryFile;

/// The org every simulated host belongs to unless a test says otherwise.
pub const MEMORY_ORG: &str = "org-1";
use crate::domain::caller::{unauthorized, Caller};
use crate::ports::{
    AllowlistStore, ArchiveStore, Authenticator, Body, Clock, Credentials, Deps, Fetcher, Fleet,
    Handoff, HostTransport, Page, Payload, RecordStore, Registry, RegistryObject, StagedArchive,
    StateStore, Versioned,
};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One of each adapter, and `Deps` over them.
pub struct Memory {
    pub store: Arc<MemoryStore>,
    pub fleet: Arc<MemoryFleet>,
    pub hosts: Arc<MemoryHosts>,
    pub fetcher: Arc<MemoryFetcher>,
    pub credentials: Arc<MemoryCredentials>,
    pub auth: Arc<MemoryAuth>,
    pub handoff: Arc<MemoryHandoff>,
    pub clock: Arc<FakeClock>,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            store: Arc::default(),
            fleet: Arc::default(),
            hosts: Arc::default(),
            fetcher: Arc::default(),
            credentials: Arc::default(),
            auth: Arc::default(),
            handoff: Arc::default(),
            clock: Arc::new(FakeClock::new()),
        }
    }
}

impl Memory {
    /// `Deps` over these adapters with the fake clock and no hand-off.
    pub fn deps(&self, config: Config) -> Deps {
        self.deps_with_clock(config, self.clock.clone())
    }

    pub fn deps_with_clock(&self, config: Config, clock: Arc<dyn Clock>) -> Deps {
        Deps {
            config: Arc::new(config),
            registry: self.store.clone(),
            archives: self.store.clone(),
            state: self.store.clone(),
            fleet: self.fleet.clone(),
            transport: self.hosts.clone(),
            allowlists: self.store.clone(),
            records: self.store.clone(),
            fetcher: self.fetcher.clone(),
            credentials: self.credentials.clone(),
            auth: self.auth.clone(),
            clock,
            handoff: None,
            recent: Default::default(),
        }
    }

    /// As `deps`, with the in-memory hand-off (the 202 path).
    pub fn deps_with_handoff(&self, config: Config) -> Deps {
        Deps {
            handoff: Some(self.handoff.clone()),
            ..self.deps(config)
        }
    }
}

// ---- the stores

/// A published file: bytes, mode, version.
type Published = (Vec<u8>, Option<u32>, u64);

#[derive(Default)]
struct Stored {
    /// name → path → file
    registry: BTreeMap<String, BTreeMap<String, Published>>,
    staged: HashMap<String, Vec<u8>>,
    /// Unstaged archives a restore can bring back (a versioned bucket).
    unstaged: HashMap<String, Vec<u8>>,
    /// fingerprint → (digest, plugin.yaml)
    index: HashMap<String, (String, Option<Vec<u8>>)>,
    states: BTreeMap<String, (DesiredState, u64)>,
    allowlists: BTreeMap<String, (Allowlist, u64)>,
    /// (workspace or none for a rollout parent, id) → record
    records: BTreeMap<(Option<String>, String), OperationRecord>,
    version: u64,
}

/// The bucket: registry, staged archives, states, allowlists and records.
#[derive(Default)]
pub struct MemoryStore {
    data: Mutex<Stored>,
    /// Calls made, as S3 requests would be counted.
    requests: AtomicUsize,
    /// The next this many conditional writes lose to another writer.
    conflicts: AtomicUsize,
    outages: AtomicUsize,
    lost_replies: AtomicUsize,
    /// The next this many archive stagings fail (S3 down).
    stage_outages: AtomicUsize,
    /// Allowlists cannot be read (the store is down).
    allowlists_down: std::sync::atomic::AtomicBool,
    /// The age every staged archive reports.
    staged_age: Mutex<Duration>,
}

impl MemoryStore {
    /// Every staged archive is this old (retention tests).
    pub fn set_staged_age(&self, age: Duration) {
        *lock(&self.staged_age) = age;
    }

    fn count(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests made so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// Publishes a plugin in the registry (files by path).
    pub fn publish(&self, name: &str, files: &[(&str, &[u8])]) {
        let mut d = lock(&self.data);
        d.version += 1;
        let v = d.version;
        let tree = d.registry.entry(name.to_string()).or_default();
        for (path, bytes) in files {
            tree.insert(path.to_string(), (bytes.to_vec(), None, v));
        }
    }

    /// The next `n` conditional writes fail as if another writer came first.
    pub fn conflict_next_saves(&self, n: usize) {
        self.conflicts.store(n, Ordering::SeqCst);
    }

    /// The next `n` desired-state saves fail as an S3 outage does (503).
    pub fn fail_next_saves(&self, n: usize) {
        self.outages.store(n, Ordering::SeqCst);
    }

    /// The next `n` archive stagings fail as an S3 outage does (503).
    pub fn fail_next_stages(&self, n: usize) {
        self.stage_outages.store(n, Ordering::SeqCst);
    }

    /// The next `n` desired-state saves land but answer 503, as a write
    /// whose reply timed out does.
    pub fn lose_next_save_replies(&self, n: usize) {
        self.lost_replies.store(n, Ordering::SeqCst);
    }

    pub fn set_allowlists_down(&self, down: bool) {
        self.allowlists_down.store(down, Ordering::SeqCst);
    }

    fn lose_race(&self) -> bool {
        self.conflicts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// A conditional write as S3 does it: `etag` must be the stored
    /// version (`None`: nothing stored yet), else `false`.
    fn put_if<T>(
        &self,
        etag: Option<&str>,
        table: impl FnOnce(&mut Stored) -> &mut BTreeMap<String, (T, u64)>,
        key: &str,
        value: T,
    ) -> Result<bool> {
        self.count();
        if self.lose_race() {
            return Ok(false);
        }
        let mut d = lock(&self.data);
        d.version += 1;
        let v = d.version;
        let map = table(&mut d);
        if map.get(key).map(|(_, v)| v.to_string()).as_deref() != etag {
            return Ok(false);
        }
        map.insert(key.to_string(), (value, v));
        Ok(true)
    }

    pub fn state_of(&self, ws: &str) -> DesiredState {
        lock(&self.data)
            .states
            .get(ws)
            .map(|(s, _)| s.clone())
            .unwrap_or_default()
    }

    pub fn set_state(&self, ws: &str, state: DesiredState) {
        let mut d = lock(&self.data);
        d.version += 1;
        let v = d.version;
        d.states.insert(ws.to_string(), (state, v));
    }

    /// A workspace's records, newest first.
    pub fn records_of(&self, ws: &str) -> Vec<OperationRecord> {
        lock(&self.data)
            .records
            .iter()
            .filter(|((w, _), _)| w.as_deref() == Some(ws))
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Rollout parents.
    pub fn parents(&self) -> Vec<OperationRecord> {
        lock(&self.data)
            .records
            .iter()
            .filter(|((w, _), _)| w.is_none())
            .map(|(_, r)| r.clone())
            .collect()
    }

    pub fn staged_digests(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.data).staged.keys().cloned().collect();
        v.sort();
        v
    }
}

fn temp_archive(bytes: &[u8], digest: &str, manifest: Option<Vec<u8>>) -> Result<ArchiveFile> {
    let mut file = tempfile::Builder::new()
        .prefix("plugin-")
        .suffix(".tar.gz")
        .tempfile()
        .map_err(Error::internal)?;
    file.write_all(bytes).map_err(Error::internal)?;
    Ok(ArchiveFile {
        file,
        sha256: digest.to_string(),
        size: bytes.len() as u64,
        manifest,
    })
}

#[async_trait]
impl Registry for MemoryStore {
    async fn list(&self, name: &str) -> Result<Vec<RegistryFile>> {
        self.count();
        let d = lock(&self.data);
        Ok(d.registry
            .get(name)
            .map(|tree| {
                tree.iter()
                    .map(|(path, (bytes, _, v))| RegistryFile {
                        path: path.clone(),
                        key: format!("registry/{name}/{path}"),
                        size: bytes.len() as u64,
                        version: v.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn open(&self, file: &RegistryFile) -> Result<RegistryObject> {
        self.count();
        let d = lock(&self.data);
        let (name, path) = file
            .key
            .strip_prefix("registry/")
            .and_then(|k| k.split_once('/'))
            .ok_or_else(|| Error::internal("bad registry key"))?;
        let (bytes, mode, _) = d
            .registry
            .get(name)
            .and_then(|t| t.get(path))
            .cloned()
            .ok_or_else(|| Error::conflict("the plugin changed in the registry"))?;
        Ok(RegistryObject {
            body: Box::new(std::io::Cursor::new(bytes)),
            mode,
        })
    }

    async fn names(&self) -> Result<Vec<String>> {
        self.count();
        Ok(lock(&self.data).registry.keys().cloned().collect())
    }

    async fn manifest(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.count();
        Ok(lock(&self.data)
            .registry
            .get(name)
            .and_then(|t| t.get("plugin.yaml"))
            .map(|(b, _, _)| b.clone()))
    }
}

#[async_trait]
impl ArchiveStore for MemoryStore {
    async fn stage(&self, digest: &str, path: &Path) -> Result<()> {
        self.count();
        let outage = self
            .stage_outages
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if outage.is_ok() {
            return Err(Error::unavailable("the store is unavailable"));
        }
        let bytes = tokio::fs::read(path).await.map_err(Error::internal)?;
        lock(&self.data).staged.insert(digest.to_string(), bytes);
        Ok(())
    }

    async fn recall(&self, fingerprint: &str) -> Result<Option<ArchiveFile>> {
        self.count();
        let d = lock(&self.data);
        let Some((digest, manifest)) = d.index.get(fingerprint) else {
            return Ok(None);
        };
        match d.staged.get(digest) {
            Some(bytes) if sha256_hex(bytes) == *digest => {
                temp_archive(bytes, digest, manifest.clone()).map(Some)
            }
            _ => Ok(None),
        }
    }

    async fn fetch_staged(&self, digest: &str) -> Result<Option<ArchiveFile>> {
        self.count();
        let d = lock(&self.data);
        match d.staged.get(digest) {
            Some(bytes) if sha256_hex(bytes) == digest => {
                temp_archive(bytes, digest, None).map(Some)
            }
            _ => Ok(None),
        }
    }

    async fn remember(&self, fingerprint: &str, archive: &ArchiveFile) -> Result<()> {
        self.count();
        lock(&self.data).index.insert(
            fingerprint.to_string(),
            (archive.sha256.clone(), archive.manifest.clone()),
        );
        Ok(())
    }

    async fn presign(&self, digest: &str, ttl: Duration) -> Result<String> {
        self.count();
        Ok(format!(
            "https://memory.invalid/staged/{digest}.tar.gz?expires={}",
            ttl.as_secs()
        ))
    }

    async fn staged(&self) -> Result<Vec<StagedArchive>> {
        let d = lock(&self.data);
        Ok(d.staged
            .iter()
            .map(|(digest, b)| StagedArchive {
                digest: digest.clone(),
                bytes: b.len() as u64,
                age: *lock(&self.staged_age),
            })
            .collect())
    }

    async fn unstage(&self, digest: &str) -> Result<()> {
        let mut d = lock(&self.data);
        if let Some(b) = d.staged.remove(digest) {
            d.unstaged.insert(digest.to_string(), b);
        }
        Ok(())
    }

    async fn restore(&self, digest: &str) -> Result<bool> {
        let mut d = lock(&self.data);
        match d.unstaged.remove(digest) {
            Some(b) => {
                d.staged.insert(digest.to_string(), b);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn load(&self, workspace: &str) -> Result<Versioned> {
        self.count();
        Ok(match lock(&self.data).states.get(workspace) {
            Some((s, v)) => Versioned {
                state: s.clone(),
                etag: Some(v.to_string()),
            },
            None => Versioned {
                state: DesiredState::default(),
                etag: None,
            },
        })
    }

    async fn save(
        &self,
        workspace: &str,
        state: &DesiredState,
        etag: Option<&str>,
    ) -> Result<bool> {
        let down = self
            .outages
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if down {
            self.count();
            return Err(Error::unavailable("S3 is not available right now"));
        }
        let saved = self.put_if(etag, |d| &mut d.states, workspace, state.clone())?;
        let lost = self
            .lost_replies
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if saved && lost {
            return Err(Error::unavailable("S3 is not available right now"));
        }
        Ok(saved)
    }

    async fn workspaces(&self) -> Result<Vec<String>> {
        self.count();
        Ok(lock(&self.data).states.keys().cloned().collect())
    }
}

#[async_trait]
impl AllowlistStore for MemoryStore {
    async fn load_allowlist(&self, org: &str) -> Result<(Allowlist, Option<String>)> {
        self.count();
        if self.allowlists_down.load(Ordering::SeqCst) {
            return Err(Error::unavailable("S3 is not available right now"));
        }
        Ok(match lock(&self.data).allowlists.get(org) {
            Some((l, v)) => (l.clone(), Some(v.to_string())),
            None => (Allowlist::default(), None),
        })
    }

    async fn save_allowlist(
        &self,
        org: &str,
        list: &Allowlist,
        etag: Option<&str>,
    ) -> Result<bool> {
        self.put_if(etag, |d| &mut d.allowlists, org, list.clone())
    }
}

#[async_trait]
impl RecordStore for MemoryStore {
    async fn put_record(&self, record: &OperationRecord) -> Result<()> {
        self.count();
        // Rollout parents are kept apart from workspaces, as in S3.
        let workspace = match record.kind {
            Kind::Rollout => None,
            _ => record.workspace.clone(),
        };
        let key = (workspace, record.id.clone());
        lock(&self.data).records.insert(key, record.clone());
        Ok(())
    }

    async fn get_record(
        &self,
        workspace: Option<&str>,
        id: &str,
    ) -> Result<Option<OperationRecord>> {
        self.count();
        let key = (workspace.map(str::to_string), id.to_string());
        Ok(lock(&self.data).records.get(&key).cloned())
    }

    async fn list_records(
        &self,
        workspace: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page> {
        self.count();
        let d = lock(&self.data);
        let mut ids: Vec<&OperationRecord> = d
            .records
            .iter()
            .filter(|((w, id), _)| {
                w.as_deref() == Some(workspace) && after.is_none_or(|a| id.as_str() > a)
            })
            .map(|(_, r)| r)
            .collect();
        let next = (ids.len() > limit).then(|| ids[limit - 1].id.clone());
        ids.truncate(limit);
        Ok(Page {
            records: ids.into_iter().cloned().collect(),
            next,
        })
    }
}

// ---- the fleet

/// Running instances by workspace, and the org tags of stopped ones;
/// scripted `locate` failures first.
#[derive(Default)]
pub struct MemoryFleet {
    hosts: Mutex<BTreeMap<String, Host>>,
    stopped: Mutex<BTreeMap<String, Option<String>>>,
    failures: Mutex<VecDeque<Error>>,
    pub locates: AtomicUsize,
}

impl MemoryFleet {
    /// A running SSH host for `ws` (instance `i-<ws>`) in `vpc`.
    pub fn add(&self, ws: &str, vpc: &str) -> Host {
        let host = Host {
            instance_id: format!("i-{ws}"),
            access: Access::Ssh,
            address: "192.0.2.1".into(),
            port: 22,
            runtime: "claude-code".into(),
            availability_zone: None,
            published_host_key: None,
            org_id: Some(MEMORY_ORG.into()),
            config_dir: None,
            vpc_id: Some(vpc.to_string()),
        };
        self.put(ws, host.clone());
        host
    }

    pub fn put(&self, ws: &str, host: Host) {
        lock(&self.stopped).remove(ws);
        lock(&self.hosts).insert(ws.to_string(), host);
    }

    /// The instance stopped: no running host, its org tag still there.
    pub fn remove(&self, ws: &str) {
        if let Some(h) = lock(&self.hosts).remove(ws) {
            lock(&self.stopped).insert(ws.to_string(), h.org_id);
        }
    }

    /// The next `locate` calls fail with these errors, in order.
    pub fn fail_next(&self, errors: impl IntoIterator<Item = Error>) {
        lock(&self.failures).extend(errors);
    }

    fn find(&self, ws: &str) -> Result<Host> {
        lock(&self.hosts)
            .get(ws)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("workspace {ws:?} has no running instance")))
    }
}

#[async_trait]
impl Fleet for MemoryFleet {
    async fn locate(&self, workspace: &str) -> Result<Host> {
        self.locates.fetch_add(1, Ordering::Relaxed);
        if let Some(e) = lock(&self.failures).pop_front() {
            return Err(e);
        }
        self.find(workspace)
    }

    async fn locate_all(&self, workspaces: &[String]) -> Result<BTreeMap<String, Result<Host>>> {
        self.locates.fetch_add(1, Ordering::Relaxed);
        Ok(workspaces
            .iter()
            .map(|ws| (ws.clone(), self.find(ws)))
            .collect())
    }

    async fn host_keys(&self, _host: &Host) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn workspace_of(&self, instance_id: &str) -> Result<Option<String>> {
        Ok(lock(&self.hosts)
            .iter()
            .find(|(_, h)| h.instance_id == instance_id)
            .map(|(ws, _)| ws.clone()))
    }

    async fn org_tags(&self, workspace: &str) -> Result<Vec<Option<String>>> {
        let running = lock(&self.hosts).get(workspace).map(|h| h.org_id.clone());
        let stopped = lock(&self.stopped).get(workspace).cloned();
        Ok(running.into_iter().chain(stopped).collect())
    }
}

// ---- the hosts

/// What one simulated host has.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SimHost {
    /// name → digest of the live tree
    pub installed: BTreeMap<String, String>,
    pub pending_restart: bool,
    pub restarts: usize,
}

/// One call a host got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub instance: String,
    /// The host script's operation and arguments.
    pub args: Vec<String>,
    /// The digest of the archive that came with it.
    pub payload: Option<String>,
}

impl Call {
    pub fn op(&self) -> &str {
        self.args.first().map(String::as_str).unwrap_or_default()
    }
}

/// A scripted answer, instead of the simulation's.
pub type Script = Box<dyn Fn(&Host, &HostCommand) -> Option<Result<HostOutput>> + Send + Sync>;
/// How long a host takes to answer.
pub type Delay = Box<dyn Fn() -> Duration + Send + Sync>;
/// A delay and the clock it is waited on.
type TimedDelay = (Arc<dyn Clock>, Arc<Delay>);

/// Hosts that speak the host script's protocol: install, uninstall,
/// inventory and restart change and report a `SimHost`. Records every
/// call, how many ran at once (overall and per VPC), and answers scripted
/// results first when a script is set.
#[derive(Default)]
pub struct MemoryHosts {
    hosts: Mutex<HashMap<String, SimHost>>,
    calls: Mutex<Vec<Call>>,
    script: Mutex<Option<Arc<Script>>>,
    delay: Mutex<Option<TimedDelay>>,
    running: Mutex<(usize, HashMap<String, usize>)>,
    pub max_running: AtomicUsize,
    max_per_vpc: Mutex<HashMap<String, usize>>,
}

impl MemoryHosts {
    pub fn script(
        &self,
        f: impl Fn(&Host, &HostCommand) -> Option<Result<HostOutput>> + Send + Sync + 'static,
    ) {
        *lock(&self.script) = Some(Arc::new(Box::new(f)));
    }

    /// Each call first waits `f()` on `clock`.
    pub fn delay(&self, clock: Arc<dyn Clock>, f: impl Fn() -> Duration + Send + Sync + 'static) {
        *lock(&self.delay) = Some((clock, Arc::new(Box::new(f))));
    }

    pub fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    pub fn host(&self, instance: &str) -> SimHost {
        lock(&self.hosts).get(instance).cloned().unwrap_or_default()
    }

    pub fn set_host(&self, instance: &str, host: SimHost) {
        lock(&self.hosts).insert(instance.to_string(), host);
    }

    /// The most calls that ran at once in one VPC.
    pub fn max_per_vpc(&self, vpc: &str) -> usize {
        lock(&self.max_per_vpc).get(vpc).copied().unwrap_or(0)
    }

    fn enter(&self, vpc: &str) {
        let mut r = lock(&self.running);
        r.0 += 1;
        self.max_running.fetch_max(r.0, Ordering::SeqCst);
        let n = r.1.entry(vpc.to_string()).or_default();
        *n += 1;
        let n = *n;
        let mut m = lock(&self.max_per_vpc);
        let max = m.entry(vpc.to_string()).or_default();
        *max = (*max).max(n);
    }

    fn leave(&self, vpc: &str) {
        let mut r = lock(&self.running);
        r.0 -= 1;
        if let Some(n) = r.1.get_mut(vpc) {
            *n -= 1;
        }
    }

    /// The host script's answer to `args` on `instance`'s simulated host.
    fn simulate(
        &self,
        instance: &str,
        args: &[String],
        payload: Option<&Payload<'_>>,
    ) -> HostOutput {
        let mut hosts = lock(&self.hosts);
        let h = hosts.entry(instance.to_string()).or_default();
        let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
        let line = match arg(0) {
            "install" => {
                let (name, digest, restart) = (arg(2), arg(3), !arg(6).is_empty());
                if payload.map(|p| p.sha256) != Some(digest) {
                    return result_line(
                        r#"{"status":"error","code":"digest_mismatch","message":"x"}"#,
                        65,
                    );
                }
                let previous = h.installed.insert(name.to_string(), digest.to_string());
                let changed = previous.as_deref() != Some(digest);
                let status = if changed { "installed" } else { "unchanged" };
                h.pending_restart |= changed;
                let restarted = restart && h.pending_restart;
                if restarted {
                    h.pending_restart = false;
                    h.restarts += 1;
                }
                format!(
                    r#"{{"status":"{status}","plugin":"{name}","digest":"{digest}","previous":"{}","previous_kind":"{}","restarted":{restarted},"pending_restart":{}}}"#,
                    previous.clone().unwrap_or_default(),
                    if previous.is_some() { "link" } else { "none" },
                    h.pending_restart
                )
            }
            "uninstall" => {
                let name = arg(2);
                let status = match h.installed.remove(name) {
                    Some(_) => {
                        h.restarts += 1;
                        "uninstalled"
                    }
                    None => "absent",
                };
                format!(
                    r#"{{"status":"{status}","plugin":"{name}","restarted":true,"pending_restart":false}}"#
                )
            }
            "inventory" => {
                let items: Vec<String> = h
                    .installed
                    .iter()
                    .map(|(n, d)| format!(r#"{{"name":"{n}","digest":"{d}"}}"#))
                    .collect();
                format!(
                    r#"{{"status":"inventory","plugins":[{}],"pending_restart":{}}}"#,
                    items.join(","),
                    h.pending_restart
                )
            }
            "restart" => {
                h.pending_restart = false;
                h.restarts += 1;
                r#"{"status":"restarted","restarted":true,"pending_restart":false}"#.to_string()
            }
            _ => return result_line(r#"{"status":"error","code":"usage","message":"x"}"#, 64),
        };
        result_line(&line, 0)
    }
}

/// Host output carrying one result line and an exit status.
pub fn result_line(json: &str, exit: u32) -> HostOutput {
    HostOutput {
        exit_status: Some(exit),
        stdout: format!("{RESULT_MARKER}{json}\n"),
        ..Default::default()
    }
}

#[async_trait]
impl HostTransport for MemoryHosts {
    async fn run(
        &self,
        host: &Host,
        cmd: &HostCommand,
        payload: Option<&Payload<'_>>,
    ) -> Result<HostOutput> {
        lock(&self.calls).push(Call {
            instance: host.instance_id.clone(),
            args: cmd.args.clone(),
            payload: payload.map(|p| p.sha256.to_string()),
        });
        let vpc = host.vpc_id.clone().unwrap_or_default();
        self.enter(&vpc);
        let delay = lock(&self.delay).clone();
        if let Some((clock, d)) = delay {
            clock.sleep(d()).await;
        }
        let script = lock(&self.script).clone();
        let out = match script.and_then(|s| s(host, cmd)) {
            Some(answer) => answer,
            None => Ok(self.simulate(&host.instance_id, &cmd.args, payload)),
        };
        self.leave(&vpc);
        out
    }
}

// ---- hand-off, fetcher, clock

/// Jobs handed off, in order; or a queue that refuses.
#[derive(Default)]
pub struct MemoryHandoff {
    pub jobs: Mutex<Vec<Job>>,
    pub down: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Handoff for MemoryHandoff {
    async fn hand_off(&self, job: &Job) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::unavailable("SQS is not available right now"));
        }
        lock(&self.jobs).push(job.clone());
        Ok(())
    }
}

/// Archives served by URL (`https`) or `owner/repo#ref` (`github`).
#[derive(Default)]
pub struct MemoryFetcher {
    bodies: Mutex<HashMap<String, Vec<u8>>>,
    pub fetches: AtomicUsize,
    /// The token each GitHub fetch carried.
    pub github_tokens: Mutex<Vec<Option<String>>>,
}

impl MemoryFetcher {
    pub fn serve(&self, key: &str, body: Vec<u8>) {
        lock(&self.bodies).insert(key.to_string(), body);
    }

    fn get(&self, key: &str, source: &str) -> Result<Body> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let bytes = lock(&self.bodies)
            .get(key)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("{source} was not found")))?;
        Ok(Box::new(std::io::Cursor::new(bytes)))
    }
}

#[async_trait]
impl Fetcher for MemoryFetcher {
    async fn github_tarball(
        &self,
        owner: &str,
        repo: &str,
        reference: &str,
        token: Option<&str>,
        source: &str,
    ) -> Result<Body> {
        lock(&self.github_tokens).push(token.map(str::to_string));
        self.get(&format!("{owner}/{repo}#{reference}"), source)
    }

    async fn https(&self, url: &str, source: &str) -> Result<Body> {
        self.get(url, source)
    }
}

/// Org credentials by org.
#[derive(Default)]
pub struct MemoryCredentials {
    github: Mutex<HashMap<String, String>>,
}

impl MemoryCredentials {
    pub fn set_github(&self, org: &str, token: &str) {
        lock(&self.github).insert(org.to_string(), token.to_string());
    }
}

#[async_trait]
impl Credentials for MemoryCredentials {
    async fn github_token(&self, org: &str) -> Result<Option<String>> {
        Ok(lock(&self.github).get(org).cloned())
    }
}

/// Bearer tokens that stand for callers, as a verifier would answer.
#[derive(Default)]
pub struct MemoryAuth {
    callers: Mutex<HashMap<String, Caller>>,
}

impl MemoryAuth {
    pub fn issue(&self, token: &str, caller: Caller) {
        lock(&self.callers).insert(token.to_string(), caller);
    }
}

#[async_trait]
impl Authenticator for MemoryAuth {
    async fn authenticate(&self, authorization: Option<&str>) -> Result<Caller> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| unauthorized("no bearer token"))?;
        lock(&self.callers)
            .get(token)
            .cloned()
            .ok_or_else(|| unauthorized("unknown token"))
    }
}

/// A clock whose sleeps return at once and move its time forward; it keeps
/// every sleep it was asked for.
pub struct FakeClock {
    start: Instant,
    elapsed: Mutex<Duration>,
    pub sleeps: Mutex<Vec<Duration>>,
}

impl FakeClock {
    pub fn new() -> Self {
        FakeClock {
            start: Instant::now(),
            elapsed: Mutex::new(Duration::ZERO),
            sleeps: Mutex::new(Vec::new()),
        }
    }

    pub fn slept(&self) -> Vec<Duration> {
        lock(&self.sleeps).clone()
    }
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.start + *lock(&self.elapsed)
    }

    async fn sleep(&self, d: Duration) {
        *lock(&self.elapsed) += d;
        lock(&self.sleeps).push(d);
        tokio::task::yield_now().await;
    }
}
