//! Putting hosts back in line with their desired state, without anyone
//! asking: a replaced instance gets its plugins back (reinstall), drift is
//! repaired on a schedule (repair), and a new version of a plugin is rolled
//! out to every workspace that has it at a controlled pace (rollout).
//! Everything here runs from EventBridge through the reinstall function and
//! leaves operation records.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::archive::ArchiveFile;
use crate::error::{Error, ErrorKind, Result};
use crate::fleet::Host;
use crate::hostscript::{interpret, HostCommand};
use crate::ops::Deps;
use crate::plugin::{validate_name, InstalledPlugin, Manifest, PluginInfo};
use crate::records::{
    self, error_value, Kind, OperationRecord, PluginResult, Progress, RecordStore, Trigger,
};
use crate::source::{FetchContext, Source};
use crate::transport::Payload;

/// How long to wait for a host that is not ready yet (sshd not listening,
/// SSM agent not registered), and how to space the tries.
#[derive(Debug, Clone, Copy)]
pub struct Readiness {
    pub budget: Duration,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            budget: Duration::from_secs(600),
            first_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// Retries `f` while it fails with "not reachable" (503), "no such host
/// yet" (404) or "busy" (409), backing off, until the budget is spent.
async fn when_ready<T, F, Fut>(r: Readiness, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let until = Instant::now() + r.budget;
    let mut delay = r.first_delay;
    loop {
        match f().await {
            // 409: two instances during an overlapping replacement, or the
            // host lock held by another operation; both pass.
            Err(e)
                if matches!(
                    e.kind,
                    ErrorKind::Unavailable | ErrorKind::NotFound | ErrorKind::Conflict
                ) =>
            {
                let now = Instant::now();
                if now + delay > until {
                    return Err(Error::unavailable(format!(
                        "the workspace's host was not ready within {} s",
                        r.budget.as_secs()
                    ))
                    .with_detail(format!("last error: {} {:?}", e.message, e.detail)));
                }
                tracing::info!(error = %e.message, delay_ms = delay.as_millis() as u64, "host not ready; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(r.max_delay);
            }
            other => return other,
        }
    }
}

/// The archive of an installed plugin: the staged one by digest, else its
/// source again, which must still yield the same digest.
async fn archive_of(deps: &Deps, entry: &InstalledPlugin) -> Result<ArchiveFile> {
    if let Some(a) = deps.archives.fetch_staged(&entry.digest).await? {
        return Ok(a);
    }
    let source = Source::parse(&entry.source)?;
    let resolved = source.fetch(&fetch_context(deps)).await?;
    if resolved.archive.sha256 != entry.digest {
        return Err(Error::unprocessable(format!(
            "the source of plugin {:?} no longer yields the installed version",
            entry.info.name
        ))
        .with_field("expected", serde_json::json!(entry.digest))
        .with_field("actual", serde_json::json!(resolved.archive.sha256)));
    }
    deps.archives
        .stage(&resolved.archive.sha256, resolved.archive.path())
        .await?;
    Ok(resolved.archive)
}

fn fetch_context(deps: &Deps) -> FetchContext<'_> {
    FetchContext {
        registry: &deps.registry,
        archives: &deps.archives,
        remote: &deps.remote,
        max_tree_bytes: deps.config.max_tree_bytes,
        allow_unpinned: deps.config.allow_unpinned,
        fetch_timeout: deps.config.fetch_timeout,
    }
}

/// What a batch did on one host.
pub struct SetOutcome {
    pub plugins: Vec<PluginResult>,
    pub restarted: bool,
    pub host_output: Option<String>,
}

impl SetOutcome {
    pub fn failed(&self) -> bool {
        self.plugins.iter().any(|p| p.result == "failed")
    }
}

/// Installs `items` on `host` without restarting, then restarts the runtime
/// once if anything changed. The first host call waits for the host to be
/// ready; a plugin that fails is recorded and the others still go on.
pub async fn install_set(
    deps: &Deps,
    host: &Host,
    items: &[&InstalledPlugin],
    readiness: Readiness,
) -> Result<SetOutcome> {
    let cfg = &deps.config;
    let profile = cfg.host_profile(host)?;
    let mut plugins = Vec::new();
    let mut changed = false;
    let mut ready = false;
    let mut tail = None;
    for entry in items {
        let name = &entry.info.name;
        // An org may have dropped a plugin from its allowlist since.
        if let Err(e) = crate::ops::check_allowlist(deps, host, name).await {
            plugins.push(PluginResult {
                plugin: name.clone(),
                result: "failed".into(),
                digest: Some(entry.digest.clone()),
                error: Some(e.message.clone()),
            });
            continue;
        }
        let archive = match archive_of(deps, entry).await {
            Ok(a) => a,
            Err(e) => {
                plugins.push(PluginResult {
                    plugin: name.clone(),
                    result: "failed".into(),
                    digest: Some(entry.digest.clone()),
                    error: Some(e.message.clone()),
                });
                continue;
            }
        };
        let cmd = HostCommand::install_deferred(
            &profile,
            name,
            &archive.sha256,
            &cfg.owner,
            cfg.lock_wait_secs,
        );
        let payload = Payload::from(&archive);
        let out = if ready || readiness.budget.is_zero() {
            deps.transport.run(host, &cmd, Some(&payload)).await
        } else {
            // A host that never becomes ready fails the whole set: the
            // event is retried later (Lambda's retry, then the DLQ).
            let out =
                when_ready(readiness, || deps.transport.run(host, &cmd, Some(&payload))).await?;
            Ok(out)
        };
        ready = true;
        let result = out.and_then(|o| {
            tail = o.stderr_tail().or(tail.take());
            interpret(&o)
        });
        match result {
            Ok(r) => {
                changed |= r.status == "installed" || r.pending_restart == Some(true);
                plugins.push(PluginResult {
                    plugin: name.clone(),
                    result: if r.status == "unchanged" {
                        "unchanged"
                    } else {
                        "installed"
                    }
                    .into(),
                    digest: Some(archive.sha256.clone()),
                    error: None,
                });
            }
            Err(e) if e.kind == ErrorKind::Unavailable => return Err(e),
            Err(e) => plugins.push(PluginResult {
                plugin: name.clone(),
                result: "failed".into(),
                digest: Some(archive.sha256.clone()),
                error: Some(e.message.clone()),
            }),
        }
    }
    let mut restarted = false;
    if changed {
        let out = deps
            .transport
            .run(
                host,
                &HostCommand::restart(&profile, &cfg.owner, cfg.lock_wait_secs),
                None,
            )
            .await?;
        if let Some(t) = out.stderr_tail() {
            tail = Some(t);
        }
        restarted = interpret(&out)?.restarted.unwrap_or(false);
    }
    Ok(SetOutcome {
        plugins,
        restarted,
        host_output: tail,
    })
}

fn outcome_value(set: &SetOutcome) -> serde_json::Value {
    let count = |r: &str| set.plugins.iter().filter(|p| p.result == r).count();
    serde_json::json!({
        "installed": count("installed"),
        "unchanged": count("unchanged"),
        "failed": count("failed"),
        "restarted": set.restarted,
    })
}

/// Reinstalls a workspace's whole desired state on its (new) host.
/// `instance`: the instance the event was about; a workspace whose running
/// instance is another one by now is left alone (the event is stale).
pub async fn reinstall_workspace(
    deps: &Deps,
    workspace: &str,
    instance: Option<&str>,
    trigger: Trigger,
    readiness: Readiness,
) -> Result<OperationRecord> {
    let mut rec = OperationRecord::start(Kind::Reinstall, trigger, Some(workspace));
    let result = async {
        let state = deps.state.load(workspace).await?;
        let host = when_ready(readiness, || deps.fleet.locate(workspace)).await?;
        rec.transport = Some(host.access.as_str().into());
        if let Some(id) = instance {
            if host.instance_id != id {
                return Ok(None);
            }
        }
        let items: Vec<&InstalledPlugin> = state.state.plugins.values().collect();
        let set = install_set(deps, &host, &items, readiness).await?;
        Ok(Some(set))
    }
    .await;
    finish_set(deps, &mut rec, result).await?;
    if rec.status == records::Status::Failed {
        // Lambda retries the event, then the DLQ keeps it; the record says
        // which plugins failed.
        return Err(Error::host_failed(
            "some plugins could not be reinstalled; see the operation record",
        )
        .with_field("operation_id", serde_json::json!(rec.id)));
    }
    Ok(rec)
}

async fn finish_set(
    deps: &Deps,
    rec: &mut OperationRecord,
    result: Result<Option<SetOutcome>>,
) -> Result<()> {
    match result {
        Ok(None) => {
            rec.finish(
                true,
                serde_json::json!({"skipped": "the workspace runs on another instance now"}),
            );
        }
        Ok(Some(set)) => {
            rec.finish(!set.failed(), outcome_value(&set));
            rec.host_output = set.host_output;
            rec.plugins = set.plugins;
        }
        Err(e) => {
            rec.fail(&e);
            records::save(deps.records.as_ref(), rec).await;
            return Err(e);
        }
    }
    records::save(deps.records.as_ref(), rec).await;
    Ok(())
}

/// Compares the host's plugins with the desired state: reinstalls what is
/// missing or different (one restart), reports extras without touching
/// them, and makes up a restart an earlier run missed. `None` (and no
/// record) when there is nothing to report: no drift, or no running host.
pub async fn repair_workspace(
    deps: &Deps,
    workspace: &str,
    trigger: Trigger,
    located: Option<Result<Host>>,
) -> Result<Option<OperationRecord>> {
    let mut rec = OperationRecord::start(Kind::Repair, trigger, Some(workspace));
    let mut findings = Vec::new();
    let mut quiet = false;
    let result = async {
        let state = deps.state.load(workspace).await?;
        let host = match located {
            Some(h) => h,
            None => deps.fleet.locate(workspace).await,
        };
        let host = match host {
            // Stopped: its next start reinstalls it anyway.
            Err(e) if e.kind == ErrorKind::NotFound => {
                quiet = true;
                return Ok(None);
            }
            other => other?,
        };
        rec.transport = Some(host.access.as_str().into());
        let profile = deps.config.host_profile(&host)?;
        let out = deps
            .transport
            .run(
                &host,
                &HostCommand::inventory(&profile, &deps.config.owner),
                None,
            )
            .await?;
        let inv = interpret(&out)?;
        let on_host: BTreeMap<String, String> = inv
            .plugins
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.name, e.digest))
            .collect();
        let mut todo = Vec::new();
        for (name, entry) in &state.state.plugins {
            let finding = match on_host.get(name) {
                None => "missing",
                Some(d) if d != &entry.digest => "different",
                Some(_) => continue,
            };
            findings.push(PluginResult {
                plugin: name.clone(),
                result: finding.into(),
                digest: on_host.get(name).filter(|d| !d.is_empty()).cloned(),
                error: None,
            });
            todo.push(entry);
        }
        for (name, digest) in &on_host {
            if !state.state.plugins.contains_key(name) {
                // Reported, never deleted: someone put it there on purpose.
                findings.push(PluginResult {
                    plugin: name.clone(),
                    result: "extra".into(),
                    digest: Some(digest.clone()).filter(|d| !d.is_empty()),
                    error: None,
                });
            }
        }
        if todo.is_empty() {
            let mut restarted = false;
            if inv.pending_restart == Some(true) {
                let out = deps
                    .transport
                    .run(
                        &host,
                        &HostCommand::restart(
                            &profile,
                            &deps.config.owner,
                            deps.config.lock_wait_secs,
                        ),
                        None,
                    )
                    .await?;
                restarted = interpret(&out)?.restarted.unwrap_or(false);
            } else if findings.is_empty() {
                quiet = true;
                return Ok(None);
            }
            return Ok(Some(SetOutcome {
                plugins: Vec::new(),
                restarted,
                host_output: None,
            }));
        }
        let ready = Readiness {
            budget: Duration::ZERO,
            ..Readiness::default()
        };
        install_set(deps, &host, &todo, ready).await.map(Some)
    }
    .await;
    let result = result.map(|o| {
        o.map(|mut set| {
            // What was found, then what was done about it.
            let mut all = std::mem::take(&mut findings);
            all.append(&mut set.plugins);
            set.plugins = all;
            set
        })
    });
    if quiet {
        return Ok(None);
    }
    finish_set(deps, &mut rec, result).await?;
    Ok(Some(rec))
}

/// Repairs every workspace that has a desired state, a few at a time.
/// Returns how many workspaces were checked and the records of those that
/// had something to report.
pub async fn repair_all(deps: &Deps, concurrency: usize) -> Result<(usize, Vec<OperationRecord>)> {
    let workspaces = deps.state.workspaces().await?;
    // Every host in one EC2 call, not one per workspace.
    let mut hosts = deps.fleet.locate_all(&workspaces).await?;
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for ws in workspaces {
        let (deps, sem) = (deps.clone(), sem.clone());
        let host = hosts.remove(&ws);
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let state = deps.state.load(&ws).await;
            if matches!(&state, Ok(s) if s.state.plugins.is_empty()) {
                return None;
            }
            match repair_workspace(&deps, &ws, Trigger::Schedule, host).await {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(workspace = %ws, error = %e, detail = ?e.detail, "repair failed");
                    Some(None)
                }
            }
        });
    }
    let mut out = Vec::new();
    let mut checked = 0;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Some(Some(rec))) => {
                checked += 1;
                out.push(rec);
            }
            Ok(Some(None)) => checked += 1,
            _ => {}
        }
    }
    Ok((checked, out))
}

/// When a rollout stops starting new hosts: after more than `Count` failures,
/// or more than `Percent` of the targets (the semantics of SSM's MaxErrors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    Count(usize),
    Percent(u8),
}

impl Threshold {
    pub fn parse(v: &str) -> Result<Threshold> {
        let v = v.trim();
        let bad = || {
            Error::bad_request(format!(
                "error threshold {v:?} must be a count or a percentage like 10%"
            ))
        };
        match v.strip_suffix('%') {
            Some(p) => {
                let p: u8 = p.trim().parse().map_err(|_| bad())?;
                if p > 100 {
                    return Err(bad());
                }
                Ok(Threshold::Percent(p))
            }
            None => Ok(Threshold::Count(v.parse().map_err(|_| bad())?)),
        }
    }

    /// The most failures tolerated among `total` targets.
    pub fn allowed(self, total: usize) -> usize {
        match self {
            Threshold::Count(n) => n,
            Threshold::Percent(p) => total * p as usize / 100,
        }
    }
}

/// Hosts a rollout may work on at once, whatever the request says.
pub const MAX_ROLLOUT_CONCURRENCY: usize = 100;

#[derive(Debug, Clone, Deserialize)]
pub struct RolloutRequest {
    pub plugin: String,
    pub source: String,
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// A count (`"2"`) or a percentage (`"10%"`).
    #[serde(default)]
    pub error_threshold: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy)]
pub struct RolloutLimits {
    pub max_concurrency: usize,
    pub per_vpc: usize,
    pub threshold: Threshold,
}

/// Rolls a plugin version out to every workspace whose desired state has
/// the plugin: at most `max_concurrency` hosts at once (and `per_vpc` per
/// VPC), no new host once failures pass the threshold (running ones
/// finish). The parent record shows progress while it runs.
pub async fn rollout(
    deps: &Deps,
    req: &RolloutRequest,
    limits: RolloutLimits,
) -> Result<OperationRecord> {
    validate_name(&req.plugin)?;
    let source = Source::parse(&req.source)?;
    if let Some(known) = source.known_name() {
        if known != req.plugin {
            return Err(Error::bad_request(format!(
                "the source names plugin {known:?}, not {:?}",
                req.plugin
            )));
        }
    }
    let mut parent = OperationRecord::start(Kind::Rollout, Trigger::Request, None);
    parent.plugin = Some(req.plugin.clone());
    parent.source = Some(source.canonical());

    // One archive for the whole fleet.
    let resolved = source.fetch(&fetch_context(deps)).await;
    let resolved = match resolved {
        Ok(r) if r.name == req.plugin => r,
        Ok(r) => {
            let e = Error::bad_request(format!(
                "the source resolves to plugin {:?}, not {:?}",
                r.name, req.plugin
            ));
            parent.fail(&e);
            records::save(deps.records.as_ref(), &parent).await;
            return Err(e);
        }
        Err(e) => {
            parent.fail(&e);
            records::save(deps.records.as_ref(), &parent).await;
            return Err(e);
        }
    };
    let archive = resolved.archive;
    if !resolved.recalled {
        deps.archives.stage(&archive.sha256, archive.path()).await?;
    }
    if let Some(print) = &resolved.fingerprint {
        deps.archives.remember(print, &archive).await?;
    }
    let manifest = match archive.manifest.as_deref() {
        Some(b) => Manifest::parse(b)?,
        None => Manifest::default(),
    };
    let info = PluginInfo::from_manifest(&req.plugin, manifest);
    parent.digest = Some(archive.sha256.clone());

    // Targets: every workspace whose desired state has the plugin.
    let mut targets = Vec::new();
    for ws in deps.state.workspaces().await? {
        if deps
            .state
            .load(&ws)
            .await?
            .state
            .plugins
            .contains_key(&req.plugin)
        {
            targets.push(ws);
        }
    }
    targets.sort();
    let allowed = limits.threshold.allowed(targets.len());
    // Every target's host in one EC2 call (before the parent exists, so a
    // failure here leaves no record that never ends).
    let mut hosts = deps.fleet.locate_all(&targets).await?;
    parent.progress = Some(Progress {
        total: targets.len(),
        pending: targets.len(),
        ..Default::default()
    });
    records::save(deps.records.as_ref(), &parent).await;

    let archive = Arc::new(archive);
    let parent = Arc::new(Mutex::new(parent));
    // Progress is written at most once a second (and at the end), not once
    // per host: a large fleet would otherwise mostly write records.
    let last_write = Arc::new(Mutex::new(Instant::now()));
    let global = Arc::new(Semaphore::new(
        limits.max_concurrency.clamp(1, MAX_ROLLOUT_CONCURRENCY),
    ));
    let vpcs: Arc<Mutex<HashMap<String, Arc<Semaphore>>>> = Arc::default();
    let failures = Arc::new(Mutex::new(0usize));
    let mut running = tokio::task::JoinSet::new();
    let mut not_started = Vec::new();
    for ws in targets {
        // Wait for a slot before deciding: a failure that lands meanwhile
        // counts against this start.
        let permit = global
            .clone()
            .acquire_owned()
            .await
            .map_err(Error::internal)?;
        if *failures.lock().unwrap() > allowed {
            drop(permit);
            not_started.push(ws);
            continue;
        }
        let deps = deps.clone();
        let host = hosts
            .remove(&ws)
            .unwrap_or_else(|| Err(Error::not_found("workspace has no running instance")));
        let (archive, parent, vpcs, failures, last_write) = (
            archive.clone(),
            parent.clone(),
            vpcs.clone(),
            failures.clone(),
            last_write.clone(),
        );
        let (info, source) = (info.clone(), source.clone());
        let per_vpc = limits.per_vpc.max(1);
        running.spawn(async move {
            let parent_id = parent.lock().unwrap().id.clone();
            let mut child = OperationRecord::start(Kind::Install, Trigger::Request, Some(&ws));
            child.parent = Some(parent_id);
            child.plugin = Some(info.name.clone());
            child.source = Some(source.canonical());
            child.digest = Some(archive.sha256.clone());
            let gate = Gate {
                failures: &failures,
                allowed,
            };
            let outcome = rollout_one(
                &deps, &ws, host, &archive, &info, &source, per_vpc, &vpcs, gate, &mut child,
            )
            .await;
            let skipped = matches!(&outcome, Ok(v) if v["status"] == NOT_STARTED);
            // Count the failure before freeing the slot: the next start
            // must see it.
            match &outcome {
                Ok(v) => child.finish(true, v.clone()),
                Err(e) => {
                    child.fail(e);
                    *failures.lock().unwrap() += 1;
                }
            }
            drop(permit);
            if !skipped {
                records::save(deps.records.as_ref(), &child).await;
            }
            let snapshot = {
                let mut p = parent.lock().unwrap();
                let prog = p.progress.get_or_insert_with(Progress::default);
                prog.pending = prog.pending.saturating_sub(1);
                if skipped {
                    prog.not_started.push(ws.clone());
                } else if let Ok(v) = &outcome {
                    prog.done += 1;
                    if v["status"] == "deferred" {
                        prog.deferred.push(ws.clone());
                    }
                } else {
                    prog.failed += 1;
                    prog.failed_workspaces.push(ws.clone());
                }
                let mut last = last_write.lock().unwrap();
                if last.elapsed() >= Duration::from_secs(1) {
                    *last = Instant::now();
                    Some(p.clone())
                } else {
                    None
                }
            };
            if let Some(snapshot) = snapshot {
                records::save(deps.records.as_ref(), &snapshot).await;
            }
        });
    }
    while running.join_next().await.is_some() {}

    let mut parent = Arc::try_unwrap(parent)
        .map_err(|_| Error::internal("rollout tasks still hold the record"))?
        .into_inner()
        .unwrap();
    let mut prog = parent.progress.clone().unwrap_or_default();
    // Stopped before their slot or while waiting for their VPC's.
    prog.not_started.extend(not_started);
    prog.not_started.sort();
    prog.pending = 0;
    let stopped = !prog.not_started.is_empty();
    prog.failed_workspaces.sort();
    let ok = prog.failed <= allowed && !stopped;
    let summary = serde_json::json!({
        "done": prog.done,
        "failed": prog.failed,
        "not_started": prog.not_started.len(),
        "stopped_at_error_threshold": stopped,
    });
    parent.progress = Some(prog);
    parent.finish(ok, summary);
    records::save(deps.records.as_ref(), &parent).await;
    Ok(parent)
}

/// One workspace of a rollout: install (with its restart), then record the
/// new version in the desired state.
#[allow(clippy::too_many_arguments)]
async fn rollout_one(
    deps: &Deps,
    ws: &str,
    host: Result<Host>,
    archive: &ArchiveFile,
    info: &PluginInfo,
    source: &Source,
    per_vpc: usize,
    vpcs: &Mutex<HashMap<String, Arc<Semaphore>>>,
    gate: Gate<'_>,
    child: &mut OperationRecord,
) -> Result<serde_json::Value> {
    let entry = InstalledPlugin {
        info: info.clone(),
        digest: archive.sha256.clone(),
        source: source.canonical(),
        installed_at: records::now_rfc3339(),
    };
    let host = match host {
        // A stopped workspace gets the new version when it starts (the
        // instance-start reinstall installs its desired state): not a failure.
        Err(e) if e.kind == ErrorKind::NotFound => {
            record_if_present(deps, ws, &entry).await?;
            return Ok(serde_json::json!({
                "status": "deferred",
                "plugin": info.name,
                "digest": archive.sha256,
                "reason": "the workspace has no running instance; it gets this version when it starts",
            }));
        }
        other => other?,
    };
    crate::ops::check_allowlist(deps, &host, &info.name).await?;
    child.transport = Some(host.access.as_str().into());
    // EC2 Instance Connect Endpoints take 20 connections each: bound hosts
    // per VPC as well as overall.
    let vpc_sem = {
        let mut map = vpcs.lock().unwrap();
        map.entry(host.vpc_id.clone().unwrap_or_default())
            .or_insert_with(|| Arc::new(Semaphore::new(per_vpc)))
            .clone()
    };
    let _vpc = vpc_sem.acquire_owned().await.map_err(Error::internal)?;
    // Failures may have passed the threshold while this host waited for its
    // VPC's slot: then it is not started either.
    if *gate.failures.lock().unwrap() > gate.allowed {
        return Ok(serde_json::json!({ "status": NOT_STARTED }));
    }
    let cfg = &deps.config;
    let profile = cfg.host_profile(&host)?;
    let cmd = HostCommand::install(
        &profile,
        &info.name,
        &archive.sha256,
        &cfg.owner,
        cfg.lock_wait_secs,
    );
    let payload = Payload::from(archive);
    // Throttled key pushes and a briefly busy host back off here too, past
    // the SDK's own retries, before they count against the threshold.
    let patience = Readiness {
        budget: Duration::from_secs(20),
        first_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(5),
    };
    let out = when_ready(patience, || deps.transport.run(&host, &cmd, Some(&payload))).await?;
    child.host_output = out.stderr_tail();
    let r = interpret(&out)?;
    record_if_present(deps, ws, &entry).await?;
    Ok(serde_json::json!({
        "status": if r.status == "unchanged" { "unchanged" } else { "installed" },
        "plugin": info.name,
        "digest": archive.sha256,
        "restarted": r.restarted.unwrap_or(false),
    }))
}

/// The error threshold as seen by one host about to start.
struct Gate<'a> {
    failures: &'a Mutex<usize>,
    allowed: usize,
}

const NOT_STARTED: &str = "not-started";

/// Puts the rolled-out version in a workspace's desired state, unless the
/// plugin was uninstalled meanwhile (a rollout never adds a plugin back).
async fn record_if_present(deps: &Deps, ws: &str, entry: &InstalledPlugin) -> Result<()> {
    let name = &entry.info.name;
    crate::ops::update_state(deps.state.as_ref(), ws, |s| match s.plugins.get(name) {
        None => false,
        Some(cur) if cur.digest == entry.digest && cur.source == entry.source => false,
        Some(_) => {
            s.plugins.insert(name.clone(), entry.clone());
            true
        }
    })
    .await
}

/// Records for a workspace: a page, newest first.
pub async fn operations(
    store: &dyn RecordStore,
    workspace: &str,
    limit: usize,
    after: Option<&str>,
) -> Result<records::Page> {
    crate::plugin::validate_workspace_id(workspace)?;
    if let Some(a) = after {
        if !records::valid_id(a) {
            return Err(Error::bad_request("invalid next token"));
        }
    }
    store
        .list_records(workspace, limit.clamp(1, 100), after)
        .await
}

pub async fn operation(
    store: &dyn RecordStore,
    workspace: &str,
    id: &str,
) -> Result<OperationRecord> {
    crate::plugin::validate_workspace_id(workspace)?;
    let missing = || Error::not_found(format!("no operation {id:?} for workspace {workspace:?}"));
    if !records::valid_id(id) {
        return Err(missing());
    }
    if let Some(r) = store.get_record(Some(workspace), id).await? {
        return Ok(r);
    }
    // A rollout's parent, readable from any workspace it touched.
    match store.get_record(None, id).await? {
        Some(r) if r.kind == Kind::Rollout => {
            let touched = r
                .progress
                .as_ref()
                .map(|p| {
                    p.failed_workspaces.iter().any(|w| w == workspace)
                        || p.not_started.iter().any(|w| w == workspace)
                })
                .unwrap_or(false);
            let child = store
                .list_records(workspace, 100, None)
                .await?
                .records
                .iter()
                .any(|c| c.parent.as_deref() == Some(id));
            if touched || child {
                Ok(r)
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

/// `error_value` re-exported for the reinstall function's log lines.
pub fn public_error(e: &Error) -> serde_json::Value {
    error_value(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        assert_eq!(Threshold::parse("2").unwrap(), Threshold::Count(2));
        assert_eq!(Threshold::parse(" 10% ").unwrap(), Threshold::Percent(10));
        assert!(Threshold::parse("101%").is_err() && Threshold::parse("x").is_err());
        assert_eq!(Threshold::Percent(10).allowed(25), 2);
        assert_eq!(Threshold::Count(2).allowed(25), 2);
    }

    #[tokio::test]
    async fn readiness_retries_only_what_may_pass_later() {
        let r = Readiness {
            budget: Duration::from_millis(200),
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
        };
        let mut n = 0;
        let got = when_ready(r, || {
            n += 1;
            let k = n;
            async move {
                if k < 3 {
                    Err(Error::unavailable("not yet"))
                } else {
                    Ok(k)
                }
            }
        })
        .await;
        assert_eq!(got.unwrap(), 3);
        let mut calls = 0;
        let e = when_ready(r, || {
            calls += 1;
            async { Err::<(), _>(Error::host_failed("no")) }
        })
        .await
        .unwrap_err();
        assert_eq!((e.status(), calls), (502, 1));
        let e = when_ready(r, || async { Err::<(), _>(Error::unavailable("never")) })
            .await
            .unwrap_err();
        assert!(e.message.contains("not ready"), "{}", e.message);
    }
}
