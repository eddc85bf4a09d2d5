//! The read side: a workspace's desired state, the registry as the canvas
//! shows it, runtime compatibility and the operation records. Nothing here
//! contacts a host. Every workspace read needs the read scope and a
//! workspace of the caller's (`access`); records show the caller's org only.

use std::sync::Arc;

use crate::domain::caller::{Caller, Scope};
use crate::domain::catalog::{self, supports, Compatibility, WithSupport};
use crate::domain::error::{Error, Result};
use crate::domain::plugin::{InstalledPlugin, Manifest, PluginInfo};
use crate::domain::records::{self, Kind, OperationRecord};
use crate::domain::source::Source;
use crate::ports::{Deps, Page, RecordStore, Registry};
use crate::usecases::access;

/// 403 without the read scope, 404 unless the workspace is the caller's.
async fn readable(deps: &Deps, caller: &Caller, workspace: &str) -> Result<()> {
    caller.require(Scope::Read)?;
    access::workspace(deps, caller, workspace).await.map(drop)
}

/// The workspace's desired state, without a host round trip; with
/// `supported_on_runtime` when the workspace's runtime is known.
pub async fn list(
    deps: &Deps,
    caller: &Caller,
    workspace: &str,
) -> Result<Vec<WithSupport<InstalledPlugin>>> {
    readable(deps, caller, workspace).await?;
    let (current, host) = tokio::join!(deps.state.load(workspace), deps.fleet.locate(workspace));
    let current = current?;
    // A stopped workspace lists its desired state without runtime support.
    let runtime = host.ok().map(|h| h.runtime);
    Ok(current
        .state
        .plugins
        .into_values()
        .map(|mut p| {
            // The desired state keeps the whole source (a reinstall may
            // fetch it again); readers see it without a query string.
            if let Ok(s) = Source::parse(&p.source) {
                p.source = s.redacted();
            }
            WithSupport {
                supported_on_runtime: runtime.as_deref().map(|r| supports(&p.info.runtimes, r)),
                item: p,
            }
        })
        .collect())
}

/// The registry filtered by the workspace's runtime.
pub async fn available(
    deps: &Deps,
    caller: &Caller,
    workspace: &str,
) -> Result<Vec<WithSupport<PluginInfo>>> {
    caller.require(Scope::Read)?;
    let host = access::workspace_host(deps, caller, workspace).await?;
    Ok(registry(&deps.registry, Some(&host.runtime)).await)
}

pub async fn compatibility(
    deps: &Deps,
    caller: &Caller,
    workspace: &str,
    runtime: &str,
) -> Result<Compatibility> {
    readable(deps, caller, workspace).await?;
    let current = deps.state.load(workspace).await?;
    Ok(catalog::compatibility(
        current.state.plugins.values(),
        runtime,
    ))
}

/// Every published plugin, filtered by runtime when one is given. The
/// registry is a read model for the canvas: an unreadable registry or an
/// unreadable manifest shows as fewer entries, never as an error.
pub async fn registry(
    registry: &Arc<dyn Registry>,
    runtime: Option<&str>,
) -> Vec<WithSupport<PluginInfo>> {
    let names = match registry.names().await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e.message, detail = ?e.detail, "registry unreadable; answering []");
            return Vec::new();
        }
    };
    // Manifests are small and independent: fetch them concurrently.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, name) in names.into_iter().enumerate() {
        let registry = Arc::clone(registry);
        tasks.spawn(async move {
            let m = registry.manifest(&name).await;
            (i, name, m)
        });
    }
    let mut found = Vec::new();
    while let Some(Ok((i, name, m))) = tasks.join_next().await {
        let manifest = match m {
            Ok(Some(bytes)) => Manifest::parse(&bytes).unwrap_or_default(),
            Ok(None) => Manifest::default(),
            Err(e) => {
                tracing::warn!(plugin = %name, detail = ?e.detail, "manifest unreadable; skipped");
                continue;
            }
        };
        found.push((i, PluginInfo::from_manifest(&name, manifest)));
    }
    found.sort_by_key(|(i, _)| *i);
    found
        .into_iter()
        .map(|(_, p)| WithSupport {
            supported_on_runtime: runtime.map(|r| supports(&p.runtimes, r)),
            item: p,
        })
        .filter(|p| p.supported_on_runtime != Some(false))
        .collect()
}

/// Records for a workspace: a page, newest first (only the caller's
/// org's, should the workspace id once have been another org's).
pub async fn operations(
    deps: &Deps,
    caller: &Caller,
    workspace: &str,
    limit: usize,
    after: Option<&str>,
) -> Result<Page> {
    readable(deps, caller, workspace).await?;
    if let Some(a) = after {
        if !records::valid_id(a) {
            return Err(Error::bad_request("invalid next token"));
        }
    }
    let mut page = deps
        .records
        .list_records(workspace, limit.clamp(1, 100), after)
        .await?;
    page.records.retain(|r| visible(caller, r));
    Ok(page)
}

/// Records written before orgs were recorded belong to their workspace.
fn visible(caller: &Caller, r: &OperationRecord) -> bool {
    r.org_id.is_none() || caller.sees_org(r.org_id.as_deref())
}

/// One record of a workspace, or a rollout's parent that touched it (as
/// the caller may see it: another org's workspaces are left out).
pub async fn operation(
    deps: &Deps,
    caller: &Caller,
    workspace: &str,
    id: &str,
) -> Result<OperationRecord> {
    readable(deps, caller, workspace).await?;
    let store = deps.records.as_ref();
    let missing = || Error::not_found(format!("no operation {id:?} for workspace {workspace:?}"));
    if !records::valid_id(id) {
        return Err(missing());
    }
    if let Some(r) = store.get_record(Some(workspace), id).await? {
        return if visible(caller, &r) {
            Ok(r)
        } else {
            Err(missing())
        };
    }
    match store.get_record(None, id).await? {
        Some(r) if r.kind == Kind::Rollout => {
            if rollout_touched(store, &r, workspace).await? {
                Ok(parent_as_seen(caller, r, workspace))
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

/// A rollout parent limited to the caller's org is shown whole; one across
/// orgs (a platform rollout) names no workspace but the one asked about,
/// unless the platform itself asks.
fn parent_as_seen(caller: &Caller, mut r: OperationRecord, workspace: &str) -> OperationRecord {
    let whole = caller.platform || (r.org_id.is_some() && caller.sees_org(r.org_id.as_deref()));
    if !whole {
        if let Some(p) = &mut r.progress {
            for list in [
                &mut p.not_started,
                &mut p.failed_workspaces,
                &mut p.deferred,
            ] {
                list.retain(|w| w == workspace);
            }
        }
    }
    r
}

/// Whether a rollout's parent record concerns `workspace`: it failed or was
/// not started there, or one of the workspace's records is its child.
async fn rollout_touched(
    store: &dyn RecordStore,
    parent: &OperationRecord,
    workspace: &str,
) -> Result<bool> {
    let listed = parent.progress.as_ref().is_some_and(|p| {
        p.failed_workspaces.iter().any(|w| w == workspace)
            || p.not_started.iter().any(|w| w == workspace)
    });
    if listed {
        return Ok(true);
    }
    Ok(store
        .list_records(workspace, 100, None)
        .await?
        .records
        .iter()
        .any(|c| c.parent.as_deref() == Some(parent.id.as_str())))
}
