//! The org allowlist: which plugins an org's workspaces may get. Read and
//! replaced through the API; checked (failing closed) before a plugin is
//! fetched or installed.

use serde::Serialize;

use crate::domain::error::{Error, ErrorKind, Result};
use crate::domain::host::Host;
use crate::domain::plugin::{validate_name, validate_workspace_id, Allowlist};
use crate::ports::Deps;
use crate::usecases::state::STATE_ATTEMPTS;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowlistView {
    pub org_id: String,
    pub plugins: Vec<String>,
    pub allow_all: bool,
}

fn view(org: &str, list: Allowlist) -> AllowlistView {
    AllowlistView {
        org_id: org.to_string(),
        allow_all: list.plugins.is_empty(),
        plugins: list.plugins,
    }
}

/// The gate. Fails closed: an unreadable list refuses.
pub async fn check(deps: &Deps, host: &Host, name: &str) -> Result<()> {
    let Some(org) = &host.org_id else {
        return Ok(());
    };
    let (list, _) = deps.allowlists.load_allowlist(org).await.map_err(|e| {
        Error::unavailable("the org allowlist could not be read, so the install is refused")
            .with_detail(format!("org {org}: {} {:?}", e.message, e.detail))
    })?;
    if list.plugins.is_empty() || list.plugins.iter().any(|p| p == name) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Forbidden,
            format!("plugin \"{name}\" is not in the org allowlist"),
        ))
    }
}

fn valid_org(org: &str) -> Result<()> {
    validate_workspace_id(org).map_err(|_| Error::bad_request(format!("invalid org id {org:?}")))
}

pub async fn get(deps: &Deps, org: &str) -> Result<AllowlistView> {
    valid_org(org)?;
    let (list, _) = deps.allowlists.load_allowlist(org).await?;
    Ok(view(org, list))
}

/// Replaces the list (sorted, without duplicates); an empty one allows all.
pub async fn put(deps: &Deps, org: &str, plugins: Vec<String>) -> Result<AllowlistView> {
    valid_org(org)?;
    for p in &plugins {
        validate_name(p)?;
    }
    let mut plugins = plugins;
    plugins.sort();
    plugins.dedup();
    let list = Allowlist { plugins };
    for _ in 0..STATE_ATTEMPTS {
        let (_, etag) = deps.allowlists.load_allowlist(org).await?;
        if deps
            .allowlists
            .save_allowlist(org, &list, etag.as_deref())
            .await?
        {
            return Ok(view(org, list));
        }
    }
    Err(Error::conflict(
        "the allowlist is changing too fast; try again",
    ))
}
