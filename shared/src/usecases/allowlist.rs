//! The org allowlist: read and replaced through the API (admin scope, own
//! org), and the gate every install passes in two steps (the rules are in
//! `domain::allowlist`): the source before anything is fetched, the
//! archive's own name and digest before anything is staged. The gate fails
//! closed: an unreadable list, or a workspace without an org, refuses.

use serde::Serialize;

use crate::domain::allowlist::{AllowEntry, Allowlist};
use crate::domain::caller::{Caller, Scope};
use crate::domain::error::{Error, ErrorKind, Result};
use crate::domain::host::{Host, TAG_ORG};
use crate::domain::plugin::validate_workspace_id;
use crate::domain::source::Source;
use crate::ports::Deps;
use crate::usecases::state::STATE_ATTEMPTS;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowlistView {
    pub org_id: String,
    pub plugins: Vec<AllowEntry>,
    pub allow_all: bool,
}

fn view(org: &str, list: Allowlist) -> AllowlistView {
    AllowlistView {
        org_id: org.to_string(),
        allow_all: list.allows_all(),
        plugins: list.plugins,
    }
}

/// The caller's own org list, read while the workspace is looked up (the
/// two do not depend on each other). Nothing is decided on it until the
/// workspace is known to be the caller's, and it is used only for a host
/// of that same org.
pub struct ReadAhead {
    org: String,
    read: Result<(Allowlist, Option<String>)>,
}

/// Reads the list of `caller`'s org (none for a caller without one: a
/// platform token acts for the host's org, known only after the lookup).
pub async fn read_ahead(deps: &Deps, caller: &Caller) -> Option<ReadAhead> {
    if caller.org.is_empty() {
        return None;
    }
    Some(ReadAhead {
        org: caller.org.clone(),
        read: deps.allowlists.load_allowlist(&caller.org).await,
    })
}

/// Step one of the gate: the host's org list admits `source`. Returns the
/// list for step two. `ahead`: the list read beside the workspace lookup,
/// used when it is the host's org's.
pub async fn admit_source(
    deps: &Deps,
    host: &Host,
    source: &Source,
    ahead: Option<ReadAhead>,
) -> Result<Allowlist> {
    let org = host.org_id.as_deref();
    let ahead = ahead.filter(|a| Some(a.org.as_str()) == org);
    admit_source_from(deps, org, source, ahead)
        .await
        .map_err(|e| e.with_detail(format!("instance {}", host.instance_id)))
}

/// Step one for org `org` (`None`: a workspace without an org, refused).
pub async fn admit_source_in(deps: &Deps, org: Option<&str>, source: &Source) -> Result<Allowlist> {
    admit_source_from(deps, org, source, None).await
}

async fn admit_source_from(
    deps: &Deps,
    org: Option<&str>,
    source: &Source,
    ahead: Option<ReadAhead>,
) -> Result<Allowlist> {
    let Some(org) = org else {
        return Err(Error::new(
            ErrorKind::Forbidden,
            format!("the workspace's instance has no {TAG_ORG} tag, so no plugin may be installed"),
        ));
    };
    let read = match ahead {
        Some(a) => a.read,
        None => deps.allowlists.load_allowlist(org).await,
    };
    let (list, _) = read.map_err(|e| {
        Error::unavailable("the org allowlist could not be read, so the install is refused")
            .with_detail(format!("org {org}: {} {:?}", e.message, e.detail))
    })?;
    list.admit_source(source)?;
    Ok(list)
}

/// Both steps at once, for an archive already known (reinstalls and
/// rollouts of a staged archive).
pub async fn admit(
    deps: &Deps,
    host: &Host,
    source: &Source,
    name: &str,
    digest: &str,
) -> Result<()> {
    admit_in(deps, host.org_id.as_deref(), source, name, digest).await
}

/// Both steps for org `org`.
pub async fn admit_in(
    deps: &Deps,
    org: Option<&str>,
    source: &Source,
    name: &str,
    digest: &str,
) -> Result<()> {
    admit_source_in(deps, org, source)
        .await?
        .admit_archive(source, name, digest)
}

fn valid_org(org: &str) -> Result<()> {
    validate_workspace_id(org).map_err(|_| Error::bad_request(format!("invalid org id {org:?}")))
}

pub async fn get(deps: &Deps, caller: &Caller, org: &str) -> Result<AllowlistView> {
    caller.require(Scope::Read)?;
    valid_org(org)?;
    caller.check_org(org)?;
    let (list, _) = deps.allowlists.load_allowlist(org).await?;
    Ok(view(org, list))
}

/// Replaces the list; an empty one allows every plugin.
pub async fn put(
    deps: &Deps,
    caller: &Caller,
    org: &str,
    entries: Vec<AllowEntry>,
) -> Result<AllowlistView> {
    caller.require(Scope::Admin)?;
    valid_org(org)?;
    caller.check_org(org)?;
    caller.require_org_wide()?;
    let list = Allowlist::new(entries)?;
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
