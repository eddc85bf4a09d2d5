//! Rolling a new version of a plugin out to every workspace whose desired
//! state has it, at a controlled pace: at most `max_concurrency` hosts at
//! once and `per_vpc` per VPC (an EC2 Instance Connect Endpoint takes 20
//! connections), and no new host once failures pass the error threshold
//! (running ones finish). A parent record shows progress while it runs;
//! each workspace gets a child record. A rollout with an `org_id` touches
//! that org's workspaces only (the instance's org tag decides, stopped
//! instances included) and fetches with that org's credentials; only the
//! platform may send one without.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::domain::archive::ArchiveFile;
use crate::domain::caller::workspace_org;
use crate::domain::error::{Error, ErrorKind, Result};
use crate::domain::host::Host;
use crate::domain::hostscript::{interpret, HostCommand};
use crate::domain::plugin::{
    validate_name, validate_workspace_id, InstalledPlugin, Manifest, PluginInfo,
};
use crate::domain::records::{now_rfc3339, Kind, OperationRecord, Progress, Trigger};
use crate::domain::rollout::{RolloutLimits, RolloutRequest, MAX_ROLLOUT_CONCURRENCY};
use crate::domain::source::{Resolved, Source};
use crate::ports::{Deps, Payload};
use crate::usecases::install::{install_status, InstallStatus};
use crate::usecases::reinstall::{when_ready, Readiness};
use crate::usecases::{allowlist, record, resolve, state};

/// How one workspace of a rollout ended (a child record's result).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChildStatus {
    Installed,
    Unchanged,
    /// No running instance: the desired state has the new version, which
    /// the workspace gets when it starts.
    Deferred,
    /// Stopped by the error threshold before it began.
    NotStarted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChildOutcome {
    pub status: ChildStatus,
    pub plugin: String,
    pub digest: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restarted: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

/// The parent record's result.
#[derive(Debug, Serialize)]
struct Summary {
    done: usize,
    failed: usize,
    not_started: usize,
    stopped_at_error_threshold: bool,
}

/// Progress is written at most this often (and at the end), not once per
/// host: a large fleet would otherwise mostly write records.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Throttled key pushes and a briefly busy host back off this long, past
/// the SDK's own retries, before they count against the threshold.
const PATIENCE: Readiness = Readiness {
    budget: Duration::from_secs(20),
    first_delay: Duration::from_secs(1),
    max_delay: Duration::from_secs(5),
};

/// Rolls `req.source` out as `req.plugin`. The parent record is returned
/// once every started host has finished.
pub async fn rollout(
    deps: &Deps,
    req: &RolloutRequest,
    limits: RolloutLimits,
) -> Result<OperationRecord> {
    validate_name(&req.plugin)?;
    if let Some(org) = &req.org_id {
        validate_workspace_id(org)
            .map_err(|_| Error::bad_request(format!("invalid org id {org:?}")))?;
    }
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
    parent.source = Some(source.redacted());
    parent.org_id = req.org_id.clone();
    // One archive for the whole fleet. An org's rollout fetches nothing
    // its allowlist does not admit (a platform rollout is checked against
    // each host's org below).
    let org = req.org_id.as_deref();
    let resolved = async {
        let list = match org {
            Some(o) => Some(allowlist::admit_source_in(deps, Some(o), &source).await?),
            None => None,
        };
        let r = resolve_named(deps, &source, &req.plugin, org).await?;
        if let Some(list) = list {
            list.admit_archive(&source, &r.name, &r.archive.sha256)?;
        }
        Ok(r)
    }
    .await;
    let resolved = match resolved {
        Ok(r) => r,
        Err(e) => return Err(record::fail(deps.records.as_ref(), &mut parent, e).await),
    };
    resolve::stage(deps, &resolved).await?;
    let archive = resolved.archive;
    let manifest = match archive.manifest.as_deref() {
        Some(b) => Manifest::parse(b)?,
        None => Manifest::default(),
    };
    parent.digest = Some(archive.sha256.clone());
    let entry = InstalledPlugin {
        info: PluginInfo::from_manifest(&req.plugin, manifest),
        digest: archive.sha256.clone(),
        source: source.canonical(),
        installed_at: now_rfc3339(),
    };
    let targets = targets(deps, &req.plugin).await?;
    // Every target's host in one EC2 call (before the parent is saved, so a
    // failure here leaves no record that never ends).
    let hosts = deps.fleet.locate_all(&targets).await?;
    let (targets, hosts) = match org {
        Some(org) => in_org(deps, org, targets, hosts).await?,
        None => (targets, hosts),
    };
    parent.progress = Some(Progress {
        total: targets.len(),
        pending: targets.len(),
        ..Default::default()
    });
    record::save(deps.records.as_ref(), &parent).await;
    let run = Arc::new(Run {
        deps: deps.clone(),
        source,
        archive,
        entry,
        allowed: limits.threshold.allowed(targets.len()),
        per_vpc: limits.per_vpc.max(1),
        failures: Mutex::new(0),
        vpcs: Mutex::new(HashMap::new()),
        last_write: Mutex::new(deps.clock.now()),
        parent: Mutex::new(parent),
    });
    let not_started = run
        .clone()
        .start_all(targets, hosts, limits.max_concurrency)
        .await?;
    let run =
        Arc::try_unwrap(run).map_err(|_| Error::internal("rollout tasks still hold the record"))?;
    let mut parent = run.parent.into_inner().unwrap_or_else(|p| p.into_inner());
    finish_parent(&mut parent, not_started, run.allowed);
    record::save(deps.records.as_ref(), &parent).await;
    Ok(parent)
}

/// The targets of org `org`: by the org tag of the running host, else (a
/// stopped workspace) of its other instances.
async fn in_org(
    deps: &Deps,
    org: &str,
    targets: Vec<String>,
    mut hosts: BTreeMap<String, Result<Host>>,
) -> Result<(Vec<String>, BTreeMap<String, Result<Host>>)> {
    let mut kept = Vec::new();
    for ws in targets {
        let ours = match hosts.get(&ws) {
            Some(Ok(h)) => h.org_id.as_deref() == Some(org),
            _ => workspace_org(&deps.fleet.org_tags(&ws).await?).as_deref() == Some(org),
        };
        if ours {
            kept.push(ws);
        } else {
            hosts.remove(&ws);
        }
    }
    Ok((kept, hosts))
}

/// The source's archive, which must be the plugin the request names.
async fn resolve_named(
    deps: &Deps,
    source: &Source,
    plugin: &str,
    org: Option<&str>,
) -> Result<Resolved> {
    let resolved = resolve::resolve(deps, source, org).await?;
    if resolved.name != plugin {
        return Err(Error::bad_request(format!(
            "the source resolves to plugin {:?}, not {plugin:?}",
            resolved.name
        )));
    }
    Ok(resolved)
}

/// Desired states read at once while looking for targets: one by one,
/// 100,000 workspaces would take longer than an invocation may run.
const TARGET_READS: usize = 64;

/// Every workspace whose desired state has the plugin, sorted.
async fn targets(deps: &Deps, plugin: &str) -> Result<Vec<String>> {
    let mut targets = Vec::new();
    for chunk in deps.state.workspaces().await?.chunks(TARGET_READS) {
        let states =
            futures_util::future::join_all(chunk.iter().map(|ws| deps.state.load(ws))).await;
        for (ws, state) in chunk.iter().zip(states) {
            if state?.state.plugins.contains_key(plugin) {
                targets.push(ws.clone());
            }
        }
    }
    targets.sort();
    Ok(targets)
}

/// The final counts: stopped before their slot or while waiting for their
/// VPC's are `not_started`; the rollout succeeded when failures stayed
/// within the threshold and nothing was left out.
fn finish_parent(parent: &mut OperationRecord, not_started: Vec<String>, allowed: usize) {
    let mut prog = parent.progress.clone().unwrap_or_default();
    prog.not_started.extend(not_started);
    prog.not_started.sort();
    prog.pending = 0;
    prog.failed_workspaces.sort();
    let stopped = !prog.not_started.is_empty();
    let ok = prog.failed <= allowed && !stopped;
    let summary = Summary {
        done: prog.done,
        failed: prog.failed,
        not_started: prog.not_started.len(),
        stopped_at_error_threshold: stopped,
    };
    parent.progress = Some(prog);
    parent.finish(ok, serde_json::to_value(summary).unwrap_or_default());
}

/// One rollout in progress: what every host task shares.
struct Run {
    deps: Deps,
    source: Source,
    archive: ArchiveFile,
    /// The desired-state entry of the new version.
    entry: InstalledPlugin,
    /// The most failures tolerated.
    allowed: usize,
    per_vpc: usize,
    failures: Mutex<usize>,
    vpcs: Mutex<HashMap<String, Arc<Semaphore>>>,
    last_write: Mutex<Instant>,
    parent: Mutex<OperationRecord>,
}

impl Run {
    fn stopped(&self) -> bool {
        *self.failures.lock().unwrap() > self.allowed
    }

    /// Starts a task per target as slots free up; the targets never started
    /// because the threshold was passed first.
    async fn start_all(
        self: Arc<Self>,
        targets: Vec<String>,
        mut hosts: std::collections::BTreeMap<String, Result<Host>>,
        max_concurrency: usize,
    ) -> Result<Vec<String>> {
        let global = Arc::new(Semaphore::new(
            max_concurrency.clamp(1, MAX_ROLLOUT_CONCURRENCY),
        ));
        let mut running = tokio::task::JoinSet::new();
        let mut not_started = Vec::new();
        for ws in targets {
            // Wait for a slot before deciding: a failure that lands
            // meanwhile counts against this start.
            let permit = global
                .clone()
                .acquire_owned()
                .await
                .map_err(Error::internal)?;
            if self.stopped() {
                not_started.push(ws);
                continue;
            }
            let host = hosts
                .remove(&ws)
                .unwrap_or_else(|| Err(Error::not_found("workspace has no running instance")));
            let run = self.clone();
            running.spawn(async move { run.one(ws, host, permit).await });
            // A finished task keeps its memory until joined: reap as we go,
            // or a large fleet holds one per workspace to the end.
            while running.try_join_next().is_some() {}
        }
        while running.join_next().await.is_some() {}
        Ok(not_started)
    }

    /// One workspace, start to record.
    async fn one(&self, ws: String, host: Result<Host>, permit: OwnedSemaphorePermit) {
        let records = self.deps.records.as_ref();
        let mut child = OperationRecord::start(Kind::Install, Trigger::Request, Some(&ws));
        child.parent = Some(self.parent.lock().unwrap().id.clone());
        child.plugin = Some(self.entry.info.name.clone());
        child.source = Some(self.source.redacted());
        child.digest = Some(self.archive.sha256.clone());
        let outcome = self.install(&ws, host, &mut child).await;
        // Count the failure before freeing the slot: the next start must
        // see it.
        match &outcome {
            Ok(o) => child.finish(true, serde_json::to_value(o).unwrap_or_default()),
            Err(e) => {
                child.fail(e);
                *self.failures.lock().unwrap() += 1;
            }
        }
        drop(permit);
        let status = outcome.as_ref().map(|o| o.status).ok();
        if status != Some(ChildStatus::NotStarted) {
            record::save(records, &child).await;
        }
        if let Some(snapshot) = self.progress(&ws, status) {
            record::save(records, &snapshot).await;
        }
    }

    /// Counts one workspace in the parent's progress; a copy to write when
    /// the last write is old enough.
    fn progress(&self, ws: &str, status: Option<ChildStatus>) -> Option<OperationRecord> {
        let mut p = self.parent.lock().unwrap();
        let prog = p.progress.get_or_insert_with(Progress::default);
        prog.pending = prog.pending.saturating_sub(1);
        match status {
            Some(ChildStatus::NotStarted) => prog.not_started.push(ws.to_string()),
            Some(s) => {
                prog.done += 1;
                if s == ChildStatus::Deferred {
                    prog.deferred.push(ws.to_string());
                }
            }
            None => {
                prog.failed += 1;
                prog.failed_workspaces.push(ws.to_string());
            }
        }
        let now = self.deps.clock.now();
        let mut last = self.last_write.lock().unwrap();
        if now.saturating_duration_since(*last) >= PROGRESS_EVERY {
            *last = now;
            Some(p.clone())
        } else {
            None
        }
    }

    fn outcome(&self, status: ChildStatus) -> ChildOutcome {
        ChildOutcome {
            status,
            plugin: self.entry.info.name.clone(),
            digest: self.archive.sha256.clone(),
            restarted: None,
            reason: None,
        }
    }

    /// Installs (with its restart), then records the new version in the
    /// desired state.
    async fn install(
        &self,
        ws: &str,
        host: Result<Host>,
        child: &mut OperationRecord,
    ) -> Result<ChildOutcome> {
        let deps = &self.deps;
        let host = match host {
            // A stopped workspace gets the new version when it starts (the
            // instance-start reinstall installs its desired state).
            Err(e) if e.kind == ErrorKind::NotFound => {
                // Its org's allowlist is checked now, not only at its next
                // start. A workspace with no instance at all has no org to
                // ask (only a platform rollout reaches it): its start checks.
                let org = workspace_org(&deps.fleet.org_tags(ws).await?);
                if let Some(org) = &org {
                    let (source, name) = (&self.source, &self.entry.info.name);
                    allowlist::admit_in(deps, Some(org), source, name, &self.archive.sha256)
                        .await?;
                }
                child.org_id = org;
                self.record(ws).await?;
                return Ok(ChildOutcome {
                    reason: Some(
                        "the workspace has no running instance; it gets this version when it starts",
                    ),
                    ..self.outcome(ChildStatus::Deferred)
                });
            }
            other => other?,
        };
        allowlist::admit(
            deps,
            &host,
            &self.source,
            &self.entry.info.name,
            &self.archive.sha256,
        )
        .await?;
        child.org_id = host.org_id.clone();
        child.transport = Some(host.access);
        let _vpc = self.vpc_slot(&host).await?;
        // Failures may have passed the threshold while this host waited
        // for its VPC's slot: then it is not started either.
        if self.stopped() {
            return Ok(self.outcome(ChildStatus::NotStarted));
        }
        let cfg = &deps.config;
        let profile = cfg.host_profile(&host)?;
        let cmd = HostCommand::install(
            &profile,
            &self.entry.info.name,
            &self.archive.sha256,
            &cfg.owner,
            cfg.lock_wait_secs,
        )
        .with_archive_bytes(self.archive.size);
        let payload = Payload::from(&self.archive);
        let out = when_ready(deps.clock.as_ref(), PATIENCE, || {
            deps.transport.run(&host, &cmd, Some(&payload))
        })
        .await?;
        child.host_output = out.stderr_tail();
        let r = interpret(&out)?;
        self.record(ws).await?;
        Ok(ChildOutcome {
            status: match install_status(&r) {
                InstallStatus::Unchanged => ChildStatus::Unchanged,
                InstallStatus::Installed => ChildStatus::Installed,
            },
            restarted: Some(r.restarted.unwrap_or(false)),
            ..self.outcome(ChildStatus::Installed)
        })
    }

    /// A slot of the host's VPC.
    async fn vpc_slot(&self, host: &Host) -> Result<OwnedSemaphorePermit> {
        let sem = {
            let mut map = self.vpcs.lock().unwrap();
            map.entry(host.vpc_id.clone().unwrap_or_default())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_vpc)))
                .clone()
        };
        sem.acquire_owned().await.map_err(Error::internal)
    }

    /// The new version into `ws`'s desired state, installed now.
    async fn record(&self, ws: &str) -> Result<()> {
        let deps = &self.deps;
        let entry = InstalledPlugin {
            installed_at: now_rfc3339(),
            ..self.entry.clone()
        };
        state::record_if_present(deps.state.as_ref(), deps.clock.as_ref(), ws, &entry).await
    }
}
