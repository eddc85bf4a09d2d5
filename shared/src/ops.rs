//! The operations, written against the ports only.

use std::sync::Arc;

use serde::Serialize;

use crate::archive::sha256_hex;
use crate::catalog::{self, Compatibility, WithSupport};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::fetch::Remote;
use crate::fleet::Fleet;
use crate::fleet::Host;
use crate::hostscript::{interpret, HostCommand};
use crate::intake::Skipped;
use crate::plugin::{
    validate_name, validate_workspace_id, DesiredState, InstalledPlugin, Manifest, PluginInfo,
};
use crate::records::{self, Kind, OperationRecord, RecordStore, Trigger};
use crate::source::Source;
use crate::source::{FetchContext, Resolved};
use crate::store::{Allowlist, AllowlistStore, ArchiveStore, Registry, StateStore};
use crate::transport::{HostTransport, Payload};

/// Everything an operation needs; adapters are chosen by `App`, fakes never.
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
    pub remote: Arc<Remote>,
    /// Where API operations that outlast the deadline go on (optional:
    /// without it they answer 504).
    pub handoff: Option<Arc<dyn crate::background::Handoff>>,
}

#[derive(Debug, Clone)]
pub struct InstallRequest {
    pub source: String,
    /// SHA-256 of the plugin's `plugin.yaml`, to pin what gets installed.
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstallOutcome {
    pub status: String,
    pub plugin: String,
    /// What decided the name: `registry`, `plugin.yaml` or `source`.
    pub name_from: String,
    /// Links dropped from a fetched archive.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<Skipped>,
    pub source: String,
    pub version: String,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UninstallOutcome {
    pub status: String,
    pub plugin: String,
}

/// Max attempts at a conditional write of the desired state. Each conflict
/// means another writer succeeded, so progress is guaranteed overall.
const STATE_ATTEMPTS: u32 = 50;

/// Read-modify-write of a workspace's desired state with optimistic
/// concurrency: concurrent operations never lose each other's updates.
pub async fn update_state<F>(state: &dyn StateStore, workspace: &str, mut change: F) -> Result<()>
where
    F: FnMut(&mut DesiredState) -> bool,
{
    for attempt in 0..STATE_ATTEMPTS {
        let mut current = state.load(workspace).await?;
        if !change(&mut current.state) {
            return Ok(());
        }
        if state
            .save(workspace, &current.state, current.etag.as_deref())
            .await?
        {
            return Ok(());
        }
        // Small randomized pause so racing writers spread out.
        let ms = 5 + rand::random::<u64>() % (10 * (attempt as u64 + 1)).min(200);
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    Err(Error::conflict(
        "the workspace's plugin list is changing too fast; try again",
    ))
}

/// Records an installed plugin in the workspace's desired state, keeping
/// the original install time when digest and source did not change.
pub async fn record_installed(
    state: &dyn StateStore,
    workspace: &str,
    entry: &InstalledPlugin,
) -> Result<()> {
    let name = &entry.info.name;
    update_state(state, workspace, |s| match s.plugins.get(name) {
        Some(cur) if cur.digest == entry.digest && cur.source == entry.source => false,
        _ => {
            s.plugins.insert(name.clone(), entry.clone());
            true
        }
    })
    .await
}

/// Milliseconds since `t`, restarting the stopwatch (per-stage timings).
fn lap(t: &mut std::time::Instant) -> u64 {
    let ms = t.elapsed().as_millis() as u64;
    *t = std::time::Instant::now();
    ms
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What install and download share: the host found, the plugin fetched,
/// checked (allowlist, pin, manifest) and staged.
struct Prepared {
    host: Host,
    archive: crate::archive::ArchiveFile,
    manifest: Manifest,
    name: String,
    name_from: &'static str,
    skipped: Vec<Skipped>,
    resolve_ms: u64,
    stage_ms: u64,
}

async fn prepare(
    deps: &Deps,
    workspace: &str,
    source: &Source,
    pin: Option<&str>,
) -> Result<Prepared> {
    let early_name = source.known_name().map(str::to_string);
    let cfg = &deps.config;

    // Finding the host and building the archive are independent; neither
    // writes anything, so a bad workspace or plugin leaves no trace. The
    // first failure cancels the other.
    let mut t = std::time::Instant::now();
    let cx = FetchContext {
        registry: &deps.registry,
        archives: &deps.archives,
        remote: &deps.remote,
        max_tree_bytes: cfg.max_tree_bytes,
        allow_unpinned: cfg.allow_unpinned,
        fetch_timeout: cfg.fetch_timeout,
    };
    let (host, resolved) = tokio::try_join!(
        async {
            let host = deps.fleet.locate(workspace).await?;
            // As soon as name and org are known: a refusal cancels the fetch.
            if let Some(name) = &early_name {
                check_allowlist(deps, &host, name).await?;
            }
            Ok(host)
        },
        source.fetch(&cx)
    )?;
    let name = resolved.name.clone();
    if early_name.is_none() {
        // Fetched sources name themselves: checked before anything is staged.
        check_allowlist(deps, &host, &name).await?;
    }
    let Resolved {
        archive,
        fingerprint,
        recalled,
        name_from,
        skipped,
        ..
    } = resolved;

    let manifest_bytes = archive.manifest.as_deref();
    if let Some(pin) = pin {
        let Some(bytes) = manifest_bytes else {
            return Err(Error::unprocessable(
                "the plugin has no plugin.yaml to check sha256 against",
            ));
        };
        let actual = sha256_hex(bytes);
        if actual != pin {
            return Err(
                Error::unprocessable("sha256 does not match the plugin's plugin.yaml")
                    .with_field("expected", serde_json::json!(pin))
                    .with_field("actual", serde_json::json!(actual)),
            );
        }
    }
    let manifest = match manifest_bytes {
        Some(b) => Manifest::parse(b)?,
        None => Manifest::default(),
    };

    let resolve_ms = lap(&mut t);
    if !recalled {
        deps.archives.stage(&archive.sha256, archive.path()).await?;
    }
    if let Some(print) = &fingerprint {
        deps.archives.remember(print, &archive).await?;
    }
    let stage_ms = lap(&mut t);

    Ok(Prepared {
        host,
        archive,
        manifest,
        name,
        name_from,
        skipped,
        resolve_ms,
        stage_ms,
    })
}

pub async fn install(deps: &Deps, workspace: &str, req: InstallRequest) -> Result<InstallOutcome> {
    install_as(deps, workspace, req, None).await
}

/// `install`, finishing the operation record `op_id` (a background job)
/// instead of starting a new one.
pub async fn install_as(
    deps: &Deps,
    workspace: &str,
    req: InstallRequest,
    op_id: Option<&str>,
) -> Result<InstallOutcome> {
    validate_workspace_id(workspace)?;
    let source = Source::parse(&req.source)?;
    let pin = match req.sha256.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s) if valid_sha256(s) => Some(s.to_ascii_lowercase()),
        Some(_) => {
            return Err(Error::bad_request(
                "sha256 must be 64 hexadecimal characters",
            ))
        }
    };
    let cfg = &deps.config;
    let started = std::time::Instant::now();
    let Prepared {
        host,
        archive,
        manifest,
        name,
        name_from,
        skipped,
        resolve_ms,
        stage_ms,
    } = prepare(deps, workspace, &source, pin.as_deref()).await?;
    let mut t = std::time::Instant::now();

    let profile = cfg.host_profile(&host)?;
    let cmd = HostCommand::install(
        &profile,
        &name,
        &archive.sha256,
        &cfg.owner,
        cfg.lock_wait_secs,
    );
    let payload = Payload::from(&archive);
    // From here on the operation touches the host: it gets a record (bad
    // requests, unknown workspaces and refused plugins do not).
    let mut rec = OperationRecord::start(Kind::Install, Trigger::Api, Some(workspace));
    if let Some(id) = op_id {
        rec.id = id.to_string();
    }
    rec.plugin = Some(name.clone());
    rec.source = Some(source.canonical());
    rec.digest = Some(archive.sha256.clone());
    rec.transport = Some(host.access.as_str().into());
    let ran = deps.transport.run(&host, &cmd, Some(&payload)).await;
    let host_ms = lap(&mut t);
    if let Ok(out) = &ran {
        rec.host_output = out.stderr_tail();
    }
    let result = match ran.and_then(|out| interpret(&out)) {
        Ok(r) => r,
        Err(e) => {
            rec.fail(&e);
            records::save(deps.records.as_ref(), &rec).await;
            return Err(e);
        }
    };

    let entry = InstalledPlugin {
        info: PluginInfo::from_manifest(&name, manifest),
        digest: archive.sha256.clone(),
        source: source.canonical(),
        installed_at: now_rfc3339(),
    };
    let saved = record_installed(deps.state.as_ref(), workspace, &entry).await;
    if let Err(e) = saved {
        rec.fail(&e);
        records::save(deps.records.as_ref(), &rec).await;
        return Err(e);
    }

    // Where the time goes, per install, in the log.
    tracing::info!(
        plugin = %name,
        resolve_ms,
        stage_ms,
        host_ms,
        state_ms = lap(&mut t),
        total_ms = started.elapsed().as_millis() as u64,
        "install timings"
    );
    let outcome = InstallOutcome {
        status: if result.status == "unchanged" {
            "unchanged"
        } else {
            "installed"
        }
        .into(),
        plugin: name,
        name_from: name_from.to_string(),
        skipped,
        source: source.canonical(),
        version: entry.info.version.clone(),
        digest: archive.sha256,
    };
    rec.finish(true, serde_json::to_value(&outcome).unwrap_or_default());
    records::save(deps.records.as_ref(), &rec).await;
    Ok(outcome)
}

pub async fn uninstall(deps: &Deps, workspace: &str, name: &str) -> Result<UninstallOutcome> {
    uninstall_as(deps, workspace, name, None).await
}

/// `uninstall`, finishing the operation record `op_id` (a background job).
pub async fn uninstall_as(
    deps: &Deps,
    workspace: &str,
    name: &str,
    op_id: Option<&str>,
) -> Result<UninstallOutcome> {
    validate_workspace_id(workspace)?;
    validate_name(name)?;
    let cfg = &deps.config;
    let host = deps.fleet.locate(workspace).await?;
    let profile = cfg.host_profile(&host)?;
    let cmd = HostCommand::uninstall(&profile, name, &cfg.owner, cfg.lock_wait_secs);
    let mut rec = OperationRecord::start(Kind::Uninstall, Trigger::Api, Some(workspace));
    if let Some(id) = op_id {
        rec.id = id.to_string();
    }
    rec.plugin = Some(name.to_string());
    rec.transport = Some(host.access.as_str().into());
    let result = async {
        let out = deps.transport.run(&host, &cmd, None).await?;
        rec.host_output = out.stderr_tail();
        let result = interpret(&out)?;
        if !matches!(result.status.as_str(), "uninstalled" | "absent") {
            return Err(
                Error::host_failed("the host reported an unexpected uninstall result")
                    .with_detail(format!("{result:?}")),
            );
        }
        let mut was_desired = false;
        update_state(deps.state.as_ref(), workspace, |s| {
            was_desired = s.plugins.remove(name).is_some();
            was_desired
        })
        .await?;
        let removed = result.status == "uninstalled" || was_desired;
        Ok(UninstallOutcome {
            status: if removed { "uninstalled" } else { "absent" }.into(),
            plugin: name.to_string(),
        })
    }
    .await;
    match &result {
        Ok(o) => rec.finish(true, serde_json::to_value(o).unwrap_or_default()),
        Err(e) => rec.fail(e),
    }
    records::save(deps.records.as_ref(), &rec).await;
    result
}

/// Resolves and stages a plugin as install does, for a workspace, and
/// returns a short-lived presigned URL of its canonical archive (plugins
/// over Lambda's 6 MB response limit still download).
pub async fn download(
    deps: &Deps,
    workspace: &str,
    name: &str,
    source: Option<&str>,
) -> Result<String> {
    validate_workspace_id(workspace)?;
    validate_name(name)?;
    let raw = source
        .map(str::to_string)
        .unwrap_or_else(|| format!("local://{name}"));
    let source = Source::parse(&raw)?;
    if let Some(known) = source.known_name() {
        if known != name {
            return Err(name_mismatch(known, name));
        }
    }
    let p = prepare(deps, workspace, &source, None).await?;
    if p.name != name {
        return Err(name_mismatch(&p.name, name));
    }
    deps.archives
        .presign(&p.archive.sha256, DOWNLOAD_URL_TTL)
        .await
}

/// Presigned download URLs live long enough to start a download, no more.
const DOWNLOAD_URL_TTL: std::time::Duration = std::time::Duration::from_secs(300);

fn name_mismatch(resolved: &str, requested: &str) -> Error {
    Error::bad_request(format!(
        "the source resolves to plugin {resolved:?}, not {requested:?}"
    ))
    .with_field("resolved_name", serde_json::json!(resolved))
    .with_field("requested_name", serde_json::json!(requested))
}

/// The org allowlist gate. Fails closed: an unreadable list refuses.
pub(crate) async fn check_allowlist(deps: &Deps, host: &Host, name: &str) -> Result<()> {
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
            crate::ErrorKind::Forbidden,
            format!("plugin \"{name}\" is not in the org allowlist"),
        ))
    }
}

/// The workspace's desired state, without a host round trip; with
/// `supported_on_runtime` when the workspace's runtime is known.
pub async fn list(deps: &Deps, workspace: &str) -> Result<Vec<WithSupport<InstalledPlugin>>> {
    validate_workspace_id(workspace)?;
    let (current, host) = tokio::join!(deps.state.load(workspace), deps.fleet.locate(workspace));
    let current = current?;
    let runtime = match host {
        Ok(h) => Some(h.runtime),
        // No document and no instance: an unknown workspace.
        Err(e) if e.kind == crate::ErrorKind::NotFound && current.etag.is_none() => return Err(e),
        Err(_) => None,
    };
    Ok(current
        .state
        .plugins
        .into_values()
        .map(|p| WithSupport {
            supported_on_runtime: runtime
                .as_deref()
                .map(|r| catalog::supports(&p.info.runtimes, r)),
            item: p,
        })
        .collect())
}

/// The registry filtered by the workspace's runtime.
pub async fn available(deps: &Deps, workspace: &str) -> Result<Vec<WithSupport<PluginInfo>>> {
    validate_workspace_id(workspace)?;
    let host = deps.fleet.locate(workspace).await?;
    Ok(catalog::registry(&deps.registry, Some(&host.runtime)).await)
}

pub async fn compatibility(deps: &Deps, workspace: &str, runtime: &str) -> Result<Compatibility> {
    validate_workspace_id(workspace)?;
    let current = deps.state.load(workspace).await?;
    if current.etag.is_none() {
        match deps.fleet.locate(workspace).await {
            Err(e) if e.kind == crate::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(catalog::compatibility(
        current.state.plugins.values(),
        runtime,
    ))
}

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

pub async fn get_allowlist(deps: &Deps, org: &str) -> Result<AllowlistView> {
    validate_workspace_id(org)
        .map_err(|_| Error::bad_request(format!("invalid org id {org:?}")))?;
    let (list, _) = deps.allowlists.load_allowlist(org).await?;
    Ok(view(org, list))
}

pub async fn put_allowlist(deps: &Deps, org: &str, plugins: Vec<String>) -> Result<AllowlistView> {
    validate_workspace_id(org)
        .map_err(|_| Error::bad_request(format!("invalid org id {org:?}")))?;
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
