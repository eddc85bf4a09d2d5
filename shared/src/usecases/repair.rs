//! Drift repair on a schedule: each workspace's host is compared with its
//! desired state; what is missing or different is reinstalled (one
//! restart), extras are reported and never touched, and a restart an
//! earlier run missed is made up.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::domain::error::{Error, ErrorKind, Result};
use crate::domain::host::Host;
use crate::domain::hostscript::{interpret, HostCommand};
use crate::domain::plugin::{DesiredState, InstalledPlugin};
use crate::domain::records::{Kind, OperationRecord, PluginResult, PluginState, Trigger};
use crate::ports::Deps;
use crate::usecases::reinstall::{self, finish_set, install_set, Readiness, SetOutcome, SetResult};

/// What the host has, by plugin name: its digest (empty when unknown).
pub type OnHost = BTreeMap<String, String>;

/// Drift between a desired state and a host: what was found, and which
/// desired plugins need installing.
#[derive(Debug, Default, PartialEq)]
pub struct Drift<'a> {
    pub findings: Vec<PluginResult>,
    pub todo: Vec<&'a InstalledPlugin>,
}

/// Compares: desired but not on the host is `missing`, on the host with
/// another digest `different` (both to install); on the host but not
/// desired is `extra` (reported only: someone put it there on purpose).
pub fn drift<'a>(desired: &'a DesiredState, on_host: &OnHost) -> Drift<'a> {
    let mut d = Drift::default();
    for (name, entry) in &desired.plugins {
        let found = match on_host.get(name) {
            None => PluginState::Missing,
            Some(digest) if digest != &entry.digest => PluginState::Different,
            Some(_) => continue,
        };
        let digest = on_host.get(name).map(String::as_str);
        d.findings.push(PluginResult::new(name, found, digest));
        d.todo.push(entry);
    }
    for (name, digest) in on_host {
        if !desired.plugins.contains_key(name) {
            d.findings
                .push(PluginResult::new(name, PluginState::Extra, Some(digest)));
        }
    }
    d
}

/// Repairs one workspace. `None` (and no record) when there is nothing to
/// report: no drift, or no running host (its next start reinstalls it).
pub async fn repair_workspace(
    deps: &Deps,
    workspace: &str,
    trigger: Trigger,
    located: Option<Result<Host>>,
) -> Result<Option<OperationRecord>> {
    let mut rec = OperationRecord::start(Kind::Repair, trigger, Some(workspace));
    let result = repair_host(deps, workspace, located, &mut rec).await;
    if matches!(result, Ok(SetResult::Quiet)) {
        return Ok(None);
    }
    finish_set(deps, &mut rec, result).await?;
    Ok(Some(rec))
}

async fn repair_host(
    deps: &Deps,
    workspace: &str,
    located: Option<Result<Host>>,
    rec: &mut OperationRecord,
) -> Result<SetResult> {
    let state = deps.state.load(workspace).await?;
    let host = match located {
        Some(h) => h,
        None => deps.fleet.locate(workspace).await,
    };
    let host = match host {
        Err(e) if e.kind == ErrorKind::NotFound => return Ok(SetResult::Quiet),
        other => other?,
    };
    rec.transport = Some(host.access);
    let (on_host, pending_restart) = inventory(deps, &host).await?;
    let Drift { mut findings, todo } = drift(&state.state, &on_host);
    let mut set = if !todo.is_empty() {
        install_set(deps, &host, &todo, Readiness::none()).await?
    } else if pending_restart {
        let mut set = SetOutcome::default();
        set.restarted = reinstall::restart(deps, &host, &mut set).await?;
        // Only the restart's result: its output is not the record's.
        set.host_output = None;
        set
    } else if findings.is_empty() {
        return Ok(SetResult::Quiet);
    } else {
        SetOutcome::default()
    };
    // What was found, then what was done about it.
    findings.append(&mut set.plugins);
    set.plugins = findings;
    Ok(SetResult::Done(set))
}

/// The host's plugins and whether a restart is pending there.
async fn inventory(deps: &Deps, host: &Host) -> Result<(OnHost, bool)> {
    let profile = deps.config.host_profile(host)?;
    let cmd = HostCommand::inventory(&profile, &deps.config.owner);
    let inv = interpret(&deps.transport.run(host, &cmd, None).await?)?;
    let on_host = inv
        .plugins
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name, e.digest))
        .collect();
    Ok((on_host, inv.pending_restart == Some(true)))
}

/// Repairs every workspace that has a desired state, `concurrency` at a
/// time. Returns how many workspaces were checked and the records of those
/// that had something to report.
pub async fn repair_all(deps: &Deps, concurrency: usize) -> Result<(usize, Vec<OperationRecord>)> {
    let workspaces = deps.state.workspaces().await?;
    // Every host in one EC2 call, not one per workspace.
    let mut hosts = deps.fleet.locate_all(&workspaces).await?;
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    let mut tally = Tally::default();
    for ws in workspaces {
        // A slot before the task: only `concurrency` of them exist at once.
        let permit = sem.clone().acquire_owned().await.map_err(Error::internal)?;
        let deps = deps.clone();
        let host = hosts.remove(&ws);
        set.spawn(async move {
            let _permit = permit;
            repair_one(&deps, &ws, host).await
        });
        while let Some(r) = set.try_join_next() {
            tally.add(r);
        }
    }
    while let Some(r) = set.join_next().await {
        tally.add(r);
    }
    Ok((tally.checked, tally.records))
}

/// One workspace of the scheduled repair: `None` when it has no plugins
/// (not checked), `Some(None)` when checked with nothing to report.
async fn repair_one(
    deps: &Deps,
    ws: &str,
    host: Option<Result<Host>>,
) -> Option<Option<OperationRecord>> {
    let state = deps.state.load(ws).await;
    if matches!(&state, Ok(s) if s.state.plugins.is_empty()) {
        return None;
    }
    match repair_workspace(deps, ws, Trigger::Schedule, host).await {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(workspace = %ws, error = %e, detail = ?e.detail, "repair failed");
            Some(None)
        }
    }
}

#[derive(Default)]
struct Tally {
    checked: usize,
    records: Vec<OperationRecord>,
}

impl Tally {
    fn add(
        &mut self,
        r: std::result::Result<Option<Option<OperationRecord>>, tokio::task::JoinError>,
    ) {
        match r {
            Ok(Some(Some(rec))) => {
                self.checked += 1;
                self.records.push(rec);
            }
            Ok(Some(None)) => self.checked += 1,
            _ => {}
        }
    }
}
