//! Tenancy checks that need the fleet: whose a workspace is (its
//! instance's `molecule:org-id` tag) and whether the caller may act on it.
//! Every workspace route passes here before anything else is looked up,
//! fetched or written; every refusal is the same 404 an unknown workspace
//! gets.

use crate::domain::caller::{unknown_workspace, workspace_org, Caller};
use crate::domain::error::{ErrorKind, Result};
use crate::domain::host::Host;
use crate::domain::plugin::validate_workspace_id;
use crate::ports::Deps;

/// The workspace's org, when the caller may act on it (read routes: the
/// instance may be stopped).
pub async fn workspace(deps: &Deps, caller: &Caller, ws: &str) -> Result<String> {
    validate_workspace_id(ws)?;
    let org = workspace_org(&deps.fleet.org_tags(ws).await?);
    caller.check_workspace(ws, org.as_deref())?;
    Ok(org.unwrap_or_default())
}

/// The workspace's running host, when the caller may act on it (routes
/// that reach the host). A workspace without one answers as an unknown
/// workspace does; other lookup errors are told only to the workspace's
/// own org (they would say that it exists).
pub async fn workspace_host(deps: &Deps, caller: &Caller, ws: &str) -> Result<Host> {
    validate_workspace_id(ws)?;
    match deps.fleet.locate(ws).await {
        Ok(host) => {
            caller.check_workspace(ws, host.org_id.as_deref())?;
            Ok(host)
        }
        Err(e) if e.kind == ErrorKind::NotFound => {
            Err(unknown_workspace(ws).with_detail(e.message))
        }
        Err(e) => {
            let org = workspace_org(&deps.fleet.org_tags(ws).await?);
            caller.check_workspace(ws, org.as_deref())?;
            Err(e)
        }
    }
}
