//! The read side: a workspace's desired state, the registry as the canvas
//! shows it, runtime compatibility and the operation records. Nothing here
//! contacts a host.

use std::sync::Arc;

use crate::domain::catalog::{self, supports, Compatibility, WithSupport};
use crate::domain::error::{Error, ErrorKind, Result};
use crate::domain::plugin::{validate_workspace_id, InstalledPlugin, Manifest, PluginInfo};
use crate::domain::records::{self, Kind, OperationRecord};
use crate::ports::{Deps, Page, RecordStore, Registry};

/// The workspace's desired state, without a host round trip; with
/// `supported_on_runtime` when the workspace's runtime is known.
pub async fn list(deps: &Deps, workspace: &str) -> Result<Vec<WithSupport<InstalledPlugin>>> {
    validate_workspace_id(workspace)?;
    let (current, host) = tokio::join!(deps.state.load(workspace), deps.fleet.locate(workspace));
    let current = current?;
    let runtime = match host {
        Ok(h) => Some(h.runtime),
        // No document and no instance: an unknown workspace.
        Err(e) if e.kind == ErrorKind::NotFound && current.etag.is_none() => return Err(e),
        Err(_) => None,
    };
    Ok(current
        .state
        .plugins
        .into_values()
        .map(|p| WithSupport {
            supported_on_runtime: runtime.as_deref().map(|r| supports(&p.info.runtimes, r)),
            item: p,
        })
        .collect())
}

/// The registry filtered by the workspace's runtime.
pub async fn available(deps: &Deps, workspace: &str) -> Result<Vec<WithSupport<PluginInfo>>> {
    validate_workspace_id(workspace)?;
    let host = deps.fleet.locate(workspace).await?;
    Ok(registry(&deps.registry, Some(&host.runtime)).await)
}

pub async fn compatibility(deps: &Deps, workspace: &str, runtime: &str) -> Result<Compatibility> {
    validate_workspace_id(workspace)?;
    let current = deps.state.load(workspace).await?;
    if current.etag.is_none() {
        if let Err(e) = deps.fleet.locate(workspace).await {
            if e.kind == ErrorKind::NotFound {
                return Err(e);
            }
        }
    }
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

/// Records for a workspace: a page, newest first.
pub async fn operations(
    store: &dyn RecordStore,
    workspace: &str,
    limit: usize,
    after: Option<&str>,
) -> Result<Page> {
    validate_workspace_id(workspace)?;
    if let Some(a) = after {
        if !records::valid_id(a) {
            return Err(Error::bad_request("invalid next token"));
        }
    }
    store
        .list_records(workspace, limit.clamp(1, 100), after)
        .await
}

/// One record of a workspace, or a rollout's parent that touched it.
pub async fn operation(
    store: &dyn RecordStore,
    workspace: &str,
    id: &str,
) -> Result<OperationRecord> {
    validate_workspace_id(workspace)?;
    let missing = || Error::not_found(format!("no operation {id:?} for workspace {workspace:?}"));
    if !records::valid_id(id) {
        return Err(missing());
    }
    if let Some(r) = store.get_record(Some(workspace), id).await? {
        return Ok(r);
    }
    match store.get_record(None, id).await? {
        Some(r) if r.kind == Kind::Rollout => {
            if rollout_touched(store, &r, workspace).await? {
                Ok(r)
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
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
