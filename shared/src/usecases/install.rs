//! Install, uninstall and download of one plugin on one workspace, as the
//! API asks for them. Order of checks (each refuses before anything later
//! happens): the caller's scope (403), the request's own shape (400), the
//! workspace (404 unless it is the caller's and running), the org allowlist
//! for the source (403), and only then the fetch; then the allowlist for
//! the name and digest the archive gives itself (403), the sha256 pin and
//! the manifest (422); only then is the archive staged, a record started
//! and the plugin named to the host; the desired state is written last.
//! (The host connection, and an install's command, which waits for the
//! plugin's name on stdin, start beside the fetch once the source is
//! admitted: a plugin refused later ends that command with nothing written.)
//! A registry plugin not built yet goes to an SSH host while it is built
//! (`deliver_while_building`), once every check but those of its digest
//! has passed, its plugin.yaml read ahead for them; the host gets the
//! digest, and publishes, only once the whole archive has passed those too.

use std::time::Instant;

use serde::Serialize;

use crate::domain::archive;
use crate::domain::archive::{sha256_hex, ArchiveFile};
use crate::domain::caller::{Caller, Scope};
use crate::domain::config::RuntimeProfile;
use crate::domain::error::{Error, Result};
use crate::domain::host::{Access, Host};
use crate::domain::hostscript::{interpret, HostCommand, HostOutput, HostResult, HostStatus};
use crate::domain::intake::Skipped;
use crate::domain::plugin::{
    validate_name, validate_workspace_id, InstalledPlugin, Manifest, PluginInfo,
};
use crate::domain::records::{now_rfc3339, Kind, OperationRecord, Trigger};
use crate::domain::source::{NameFrom, Resolved, Source};
use crate::ports::{Deps, Growing, Growth, Opened, Payload};
use crate::usecases::resolve::LocalBuild;
use crate::usecases::{access, allowlist, record, resolve, state};

#[derive(Debug, Clone)]
pub struct InstallRequest {
    pub source: String,
    /// SHA-256 of the plugin's `plugin.yaml`, to pin what gets installed.
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstallStatus {
    Installed,
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstallOutcome {
    pub status: InstallStatus,
    pub plugin: String,
    /// What decided the name: `registry`, `plugin.yaml` or `source`.
    pub name_from: NameFrom,
    /// Links dropped from a fetched archive.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<Skipped>,
    pub source: String,
    pub version: String,
    pub digest: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UninstallStatus {
    Uninstalled,
    Absent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UninstallOutcome {
    pub status: UninstallStatus,
    pub plugin: String,
}

/// What the host said of an install: `unchanged` when the same digest was
/// already live, `installed` otherwise.
pub fn install_status(r: &HostResult) -> InstallStatus {
    if r.status == HostStatus::Unchanged {
        InstallStatus::Unchanged
    } else {
        InstallStatus::Installed
    }
}

/// Milliseconds since `t`, restarting the stopwatch (per-stage timings).
fn lap(deps: &Deps, t: &mut Instant) -> u64 {
    let now = deps.clock.now();
    let ms = now.saturating_duration_since(*t).as_millis() as u64;
    *t = now;
    ms
}

/// The optional `sha256` pin of an install request, normalised.
fn parse_pin(raw: Option<&str>) -> Result<Option<String>> {
    match raw.map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(Some(s.to_ascii_lowercase()))
        }
        Some(_) => Err(Error::bad_request(
            "sha256 must be 64 hexadecimal characters",
        )),
    }
}

/// What install and download share: the host found, the plugin fetched,
/// checked (allowlist, pin, manifest) and staged.
struct Prepared {
    host: Host,
    resolved: Resolved,
    manifest: Manifest,
    resolve_ms: u64,
    stage_ms: u64,
    /// False when staging was left to run beside the delivery.
    staged: bool,
    /// The host connection, opened beside the resolve when asked for (an
    /// error here is the operation's, reported once it has a record).
    opened: Result<Option<Opened>>,
    /// Set when the archive went to the host while it was built: the
    /// install has run (on the command started ahead) and the archive was
    /// staged beside it.
    framed: Option<Framed>,
}

/// What an install whose archive was sent while it was built did on the
/// host and in S3.
struct Framed {
    output: Result<HostOutput>,
    host_ms: u64,
    staged: Result<()>,
}

/// Aborts a spawned task when dropped (the operation gave up on it).
struct Aborting(tokio::task::AbortHandle);

impl Drop for Aborting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A registry archive being built and sent to the host at once.
struct Building {
    task: tokio::task::JoinHandle<Result<Resolved>>,
    _guard: Aborting,
    growing: Growing,
    /// Tells the digest after the last byte, once the archive passed.
    end: std::sync::Arc<tokio::sync::watch::Sender<Growth>>,
    /// The plugin.yaml checked before the first byte went anywhere: the
    /// archive must hold the same.
    manifest_bytes: Option<Vec<u8>>,
    manifest: Manifest,
}

/// What `prepare`'s resolve gave: the archive, or one being built.
enum Work {
    Ready(Resolved, Manifest, u64, u64),
    Building(Building),
}

/// Starts building a registry plugin's archive, telling how far its file is
/// written as it grows (the host reads it that far, never holding the
/// build back), once everything that can be checked without
/// the archive has passed: its listing (`plan_local`), the org allowlist
/// for its name with any digest (the caller's condition), and its
/// plugin.yaml, read ahead, against the pin.
async fn begin_building(deps: &Deps, build: LocalBuild, pin: Option<&str>) -> Result<Building> {
    let manifest_bytes = build.manifest(deps).await?;
    let manifest = checked_manifest_bytes(manifest_bytes.as_deref(), pin)?;
    let (tx, growing) = tokio::sync::watch::channel(Growth {
        about: build.bytes(),
        ..Growth::default()
    });
    let tx = std::sync::Arc::new(tx);
    let told = tx.clone();
    let tap: archive::Tap = Box::new(move |path, written| {
        told.send_modify(|g| {
            if g.path.is_none() {
                g.path = Some(path.to_path_buf());
            }
            g.written = written;
        })
    });
    let owned = deps.clone();
    let task = tokio::spawn(async move { build.build(&owned, Some(tap)).await });
    Ok(Building {
        _guard: Aborting(task.abort_handle()),
        task,
        growing,
        end: tx,
        manifest_bytes,
        manifest,
    })
}

/// What `prepare` does with the host while the plugin is resolved.
enum HostAhead {
    /// Nothing: the operation is not for the host (a download).
    Nothing,
    /// Nothing yet: an install that cannot be started ahead (its host has
    /// no runtime profile, which it fails on once the plugin was checked).
    NotYet,
    /// Connect and start this install, which names its plugin on stdin
    /// (`HostCommand::install_named_on_stdin`): the SSH session, `sudo`
    /// and the script's own start are done meanwhile (it looks at nothing
    /// on the host before it has the plugin's name). Transports without
    /// stdin only connect.
    Start(HostCommand),
}

/// The plugin resolved, checked and staged for `host`. With `host_ahead`,
/// the connection to the host is made at the same time (they do not depend
/// on each other), once the source has passed the org's allowlist: nothing
/// reaches a host for a source the org refuses. An install's command is
/// started on it too, but learns which plugin only once the plugin has
/// passed every check (a refused one ends it with nothing written). An SSH
/// host reads the archive from local disk, not from S3, so its staging is
/// left to run beside the delivery (`staged` false); an SSM host downloads
/// the staged object, so it is staged first.
async fn prepare(
    deps: &Deps,
    host: Host,
    source: &Source,
    pin: Option<&str>,
    host_ahead: HostAhead,
    ahead: Option<allowlist::ReadAhead>,
) -> Result<Prepared> {
    let mut t = deps.clock.now();
    let stage_beside = !matches!(host_ahead, HostAhead::Nothing) && host.access == Access::Ssh;
    // The caller was authorized for the host; nothing is fetched from a
    // source its org's allowlist does not admit.
    let list = allowlist::admit_source(deps, &host, source, ahead).await?;
    // Set once the plugin is refused or broken: a command not started by
    // then is not started at all.
    let refused = std::sync::atomic::AtomicBool::new(false);
    // A registry plugin not built yet goes to an SSH host while it is
    // built, when nothing but its digest is left to check after the build
    // (none the allowlist pins) and its command can be started ahead.
    let started = match &host_ahead {
        HostAhead::Start(cmd) if stage_beside => Some(cmd.clone()),
        _ => None,
    };
    let framable = match source {
        Source::Local { name } => started.is_some() && list.admits_any_digest(source, name),
        _ => false,
    };
    let work = async {
        let at_hand = match source {
            Source::Local { name } if framable => match resolve::plan_local(deps, name).await? {
                resolve::Local::AtHand(r) => Some(r),
                resolve::Local::ToBuild(b) if b.checked_at_its_end() => {
                    Some(b.build(deps, None).await?)
                }
                resolve::Local::ToBuild(b) => {
                    return Ok(Work::Building(begin_building(deps, b, pin).await?));
                }
            },
            _ => None,
        };
        let resolved = match at_hand {
            Some(r) => r,
            None => resolve::resolve(deps, source, host.org_id.as_deref()).await?,
        };
        // A fetched archive names itself: it may not borrow an admitted name.
        list.admit_archive(source, &resolved.name, &resolved.archive.sha256)?;
        let manifest = checked_manifest(&resolved.archive, pin)?;
        let resolve_ms = lap(deps, &mut t);
        if !stage_beside {
            resolve::stage(deps, &resolved).await?;
        }
        let stage_ms = lap(deps, &mut t);
        Ok::<_, Error>(Work::Ready(resolved, manifest, resolve_ms, stage_ms))
    };
    let work = async {
        let r = work.await;
        if r.is_err() {
            refused.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        r
    };
    let open = async {
        match host_ahead {
            HostAhead::Nothing | HostAhead::NotYet => Ok(None),
            HostAhead::Start(cmd) => {
                let opened = deps.transport.open(&host).await?;
                if refused.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(opened);
                }
                deps.transport.start(opened, &host, &cmd).await
            }
        }
    };
    let (work, opened) = tokio::join!(work, open);
    // A refused or broken plugin is the answer even if the host is down;
    // what was opened or started on the host for it is ended first.
    let (resolved, manifest, resolve_ms, stage_ms) = match work {
        Ok(Work::Ready(r, m, resolve_ms, stage_ms)) => (r, m, resolve_ms, stage_ms),
        Ok(Work::Building(b)) => {
            let started =
                started.ok_or_else(|| Error::internal("a framed build without its command"))?;
            return deliver_while_building(deps, host, source, &list, b, &started, opened, t).await;
        }
        Err(e) => {
            if let Ok(Some(opened)) = opened {
                deps.transport.close(opened, &host).await;
            }
            return Err(e);
        }
    };
    Ok(Prepared {
        host,
        resolved,
        manifest,
        resolve_ms,
        stage_ms,
        staged: !stage_beside,
        opened,
        framed: None,
    })
}

/// The rest of `prepare` for an archive being built (`Building`): its
/// bytes go to the install started ahead as they come. Once built, the
/// archive must hold the plugin.yaml that was checked and pass the
/// allowlist with its digest; only then does the host get the digest,
/// and the archive is staged beside the host's remaining work. A plugin
/// refused or broken now is still the answer (its frames end without the
/// digest, so the host publishes nothing), as is one the host never got
/// because the connection failed (the build finishes first).
#[allow(clippy::too_many_arguments)]
async fn deliver_while_building(
    deps: &Deps,
    host: Host,
    source: &Source,
    list: &crate::domain::allowlist::Allowlist,
    b: Building,
    started: &HostCommand,
    opened: Result<Option<Opened>>,
    mut t: Instant,
) -> Result<Prepared> {
    let Building {
        task,
        _guard,
        growing,
        end,
        manifest_bytes,
        manifest,
    } = b;
    let finish = async {
        let built = task
            .await
            .map_err(|e| Error::internal(format!("archive build: {e}")))?;
        let resolved = built?;
        if resolved.archive.manifest != manifest_bytes {
            return Err(resolve::changed_in_registry());
        }
        list.admit_archive(source, &resolved.name, &resolved.archive.sha256)?;
        Ok(resolved)
    };
    let opened = match opened {
        Ok(o) => o,
        Err(e) => {
            drop((growing, end));
            let resolved = finish.await?;
            let resolve_ms = lap(deps, &mut t);
            return Ok(Prepared {
                host,
                resolved,
                manifest,
                resolve_ms,
                stage_ms: 0,
                staged: false,
                opened: Err(e),
                framed: None,
            });
        }
    };
    let name = match source {
        Source::Local { name } => name.clone(),
        _ => return Err(Error::internal("a framed build of a remote source")),
    };
    let host_t = deps.clock.now();
    let run = async {
        let r = deps
            .transport
            .run_framed(opened, &host, started, &name, growing)
            .await;
        (r, deps.clock.now().saturating_duration_since(host_t))
    };
    let finish_and_stage = async {
        let checked = finish.await;
        let resolve_ms = lap(deps, &mut t);
        let resolved = match checked {
            Ok(r) => r,
            Err(e) => {
                drop(end);
                return Err(e);
            }
        };
        let (sha, size) = (resolved.archive.sha256.clone(), resolved.archive.size);
        end.send_modify(|g| {
            g.written = size;
            g.end = Some(sha);
        });
        drop(end);
        let staged = stage_leaving_time_to_undo(deps, &resolved).await;
        let stage_ms = lap(deps, &mut t);
        Ok((resolved, resolve_ms, staged, stage_ms))
    };
    let ((output, host_took), finished) = tokio::join!(run, finish_and_stage);
    let (resolved, resolve_ms, staged, stage_ms) = finished?;
    // A host that cannot cut frames said so before it touched anything:
    // it gets the archive whole, now that it is built.
    let output = match output {
        Ok(out) if host_error(&out).as_deref() == Some("no_frames") => {
            tracing::info!(instance = %host.instance_id, "the host cannot take frames; sending the archive whole");
            let archive = &resolved.archive;
            let cmd = started
                .naming(&name, &archive.sha256)
                .ok_or_else(|| Error::internal("a framed build without its command"))?
                .with_archive_bytes(archive.size);
            deps.transport
                .run_opened(None, &host, &cmd, Some(&Payload::from(archive)))
                .await
        }
        other => other,
    };
    Ok(Prepared {
        host,
        resolved,
        manifest,
        resolve_ms,
        stage_ms,
        staged: true,
        opened: Ok(None),
        framed: Some(Framed {
            output,
            host_ms: host_took.as_millis() as u64,
            staged,
        }),
    })
}

/// Time kept back from staging for taking a new plugin off the host again
/// if staging fails (a kept connection makes that undo one short command).
const UNDO_RESERVE: std::time::Duration = std::time::Duration::from_secs(3);

/// `resolve::stage` beside the delivery, ending before the operation's
/// deadline by `UNDO_RESERVE`: a staging cut off by the deadline itself
/// would leave the new plugin on the host with nothing to undo it.
async fn stage_leaving_time_to_undo(deps: &Deps, resolved: &Resolved) -> Result<()> {
    let Some((at, _)) = crate::domain::deadline::current() else {
        return resolve::stage(deps, resolved).await;
    };
    let budget = at
        .saturating_duration_since(Instant::now())
        .saturating_sub(UNDO_RESERVE);
    tokio::time::timeout(budget, resolve::stage(deps, resolved))
        .await
        .unwrap_or_else(|_| {
            Err(Error::unavailable(
                "staging the plugin archive did not finish in time",
            ))
        })
}

/// The archive's `plugin.yaml`, checked against the pin when there is one.
fn checked_manifest(archive: &ArchiveFile, pin: Option<&str>) -> Result<Manifest> {
    checked_manifest_bytes(archive.manifest.as_deref(), pin)
}

/// `checked_manifest` of a plugin.yaml's bytes (`None`: the plugin has none).
fn checked_manifest_bytes(bytes: Option<&[u8]>, pin: Option<&str>) -> Result<Manifest> {
    if let Some(pin) = pin {
        let Some(bytes) = bytes else {
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
    match bytes {
        Some(b) => Manifest::parse(b),
        None => Ok(Manifest::default()),
    }
}

/// The first step of every change: the caller may change this workspace
/// (403 without the write scope, 404 unless it is the caller's and
/// running). Its host.
pub async fn authorize(deps: &Deps, caller: &Caller, workspace: &str) -> Result<Host> {
    caller.require(Scope::Write)?;
    validate_workspace_id(workspace)?;
    access::workspace_host(deps, caller, workspace).await
}

/// `authorize`, with the caller's org allowlist read beside it for the
/// install or download that follows (looked at only once authorized).
pub async fn authorize_reading_allowlist(
    deps: &Deps,
    caller: &Caller,
    workspace: &str,
) -> Result<(Host, Option<allowlist::ReadAhead>)> {
    let (host, ahead) = tokio::join!(
        authorize(deps, caller, workspace),
        allowlist::read_ahead(deps, caller)
    );
    Ok((host?, ahead))
}

pub async fn install(
    deps: &Deps,
    caller: &Caller,
    workspace: &str,
    req: InstallRequest,
) -> Result<InstallOutcome> {
    install_as(deps, caller, workspace, req, None).await
}

/// `install`, finishing the operation record `op_id` (a background job)
/// instead of starting a new one.
pub async fn install_as(
    deps: &Deps,
    caller: &Caller,
    workspace: &str,
    req: InstallRequest,
    op_id: Option<&str>,
) -> Result<InstallOutcome> {
    caller.require(Scope::Write)?;
    validate_workspace_id(workspace)?;
    // The request's own shape first (400), then the workspace (404).
    Source::parse(&req.source)?;
    parse_pin(req.sha256.as_deref())?;
    let (host, ahead) = authorize_reading_allowlist(deps, caller, workspace).await?;
    install_on(deps, host, workspace, req, op_id, ahead).await
}

/// The install on a host the caller was authorized for (`authorize`);
/// `ahead`, the caller's org allowlist if it was read beside that.
pub async fn install_on(
    deps: &Deps,
    host: Host,
    workspace: &str,
    req: InstallRequest,
    op_id: Option<&str>,
    ahead: Option<allowlist::ReadAhead>,
) -> Result<InstallOutcome> {
    let source = Source::parse(&req.source)?;
    let pin = parse_pin(req.sha256.as_deref())?;
    let started = deps.clock.now();
    let cfg = &deps.config;
    // A host without a runtime profile is not contacted: it fails below,
    // once the plugin has been checked (a plugin's error comes first).
    let host_ahead = match cfg.host_profile(&host) {
        Ok(profile) => HostAhead::Start(HostCommand::install_named_on_stdin(
            &profile,
            &cfg.owner,
            cfg.lock_wait_secs,
        )),
        Err(_) => HostAhead::NotYet,
    };
    let mut p = prepare(deps, host, &source, pin.as_deref(), host_ahead, ahead).await?;
    let mut t = deps.clock.now();
    let (name, archive) = (&p.resolved.name, &p.resolved.archive);
    let profile = cfg.host_profile(&p.host)?;
    let cmd = HostCommand::install(
        &profile,
        name,
        &archive.sha256,
        &cfg.owner,
        cfg.lock_wait_secs,
    )
    .with_archive_bytes(archive.size);
    // From here on the operation touches the host: it gets a record (bad
    // requests, unknown workspaces and refused plugins do not).
    let mut rec = record::start_on(Kind::Install, Trigger::Api, workspace, &p.host, op_id);
    rec.plugin = Some(name.clone());
    rec.source = Some(source.redacted());
    rec.digest = Some(archive.sha256.clone());
    let opened = std::mem::replace(&mut p.opened, Ok(None));
    let mut staged = Ok(());
    let mut host_ms = 0;
    let mut ahead = None;
    let framed = p.framed.is_some();
    let ran = match (p.framed.take(), opened) {
        (Some(f), _) => {
            staged = f.staged;
            host_ms = f.host_ms;
            ahead = deps.state.load(workspace).await.ok();
            f.output.and_then(|out| host_result(&out, &mut rec))
        }
        (None, Ok(opened)) => {
            let payload = Payload::from(&p.resolved.archive);
            let run = async {
                let r =
                    run_opened_on_host(deps, opened, &p.host, &cmd, Some(&payload), &mut rec).await;
                host_ms = lap(deps, &mut t);
                r
            };
            // The desired state is read while the host works: its write
            // after the host is then one request (a conditional one, so a
            // change made meanwhile is read again, never lost).
            let read_ahead = async { deps.state.load(workspace).await.ok() };
            if p.staged {
                let (ran, read) = tokio::join!(run, read_ahead);
                ahead = read;
                ran
            } else {
                // The archive goes to the host and to S3 at once (reinstalls,
                // SSM hosts and downloads read the staged copy).
                let stage = async {
                    let t = deps.clock.now();
                    let r = stage_leaving_time_to_undo(deps, &p.resolved).await;
                    (r, deps.clock.now().saturating_duration_since(t))
                };
                let (ran, (r, took), read) = tokio::join!(run, stage, read_ahead);
                staged = r;
                ahead = read;
                p.stage_ms = took.as_millis() as u64;
                ran
            }
        }
        (None, Err(e)) => Err(e),
    };
    // The host must say it holds this very archive (a result of another
    // digest, from a confused or tampered host step, is not a success).
    let ran = ran.and_then(|r| match r.digest.as_deref() {
        Some(d) if d == archive.sha256 => Ok(r),
        _ => Err(
            Error::host_failed("the host reported another plugin digest")
                .with_detail(format!("expected {}, got {:?}", archive.sha256, r)),
        ),
    });
    let result = match ran {
        Ok(r) => r,
        Err(e) => return Err(record::fail(deps.records.as_ref(), &mut rec, e).await),
    };
    // (The state write's lap starts once both the host and staging are done.)
    lap(deps, &mut t);
    // On the host but not in S3: the desired state must not name an archive
    // that cannot be fetched again, so this fails like its write would.
    if let Err(e) = staged {
        let e = match op_id {
            Some(_) => e,
            None => undo_new_install(deps, &p.host, workspace, &profile, name, &result, e).await,
        };
        return Err(record::fail(deps.records.as_ref(), &mut rec, e).await);
    }
    let entry = InstalledPlugin {
        info: PluginInfo::from_manifest(name, p.manifest.clone()),
        digest: archive.sha256.clone(),
        source: source.canonical(),
        installed_at: now_rfc3339(),
    };
    if let Err(e) = state::record_installed_from(
        deps.state.as_ref(),
        deps.clock.as_ref(),
        workspace,
        &entry,
        ahead,
    )
    .await
    {
        // A queued job is delivered again on this error: it finishes then.
        let e = match op_id {
            Some(_) => e,
            None => undo_new_install(deps, &p.host, workspace, &profile, name, &result, e).await,
        };
        return Err(record::fail(deps.records.as_ref(), &mut rec, e).await);
    }
    // Where the time goes, per install, in the log.
    tracing::info!(
        plugin = %name,
        resolve_ms = p.resolve_ms,
        stage_ms = p.stage_ms,
        host_ms,
        framed,
        state_ms = lap(deps, &mut t),
        total_ms = deps.clock.now().saturating_duration_since(started).as_millis() as u64,
        "install timings"
    );
    let outcome = InstallOutcome {
        status: install_status(&result),
        plugin: name.clone(),
        name_from: p.resolved.name_from,
        skipped: p.resolved.skipped,
        // The response and the record: a signed URL's query left out.
        source: source.redacted(),
        version: entry.info.version,
        digest: archive.sha256.clone(),
    };
    record::succeed(deps.records.as_ref(), &mut rec, &outcome).await;
    Ok(outcome)
}

/// Runs `cmd` on the host, keeps the end of its stderr in the record and
/// turns its output into a result or an error.
pub async fn run_on_host(
    deps: &Deps,
    host: &Host,
    cmd: &HostCommand,
    payload: Option<&Payload<'_>>,
    rec: &mut OperationRecord,
) -> Result<HostResult> {
    run_opened_on_host(deps, None, host, cmd, payload, rec).await
}

/// `run_on_host` on a connection opened ahead (`HostTransport::open`).
async fn run_opened_on_host(
    deps: &Deps,
    opened: Option<Opened>,
    host: &Host,
    cmd: &HostCommand,
    payload: Option<&Payload<'_>>,
    rec: &mut OperationRecord,
) -> Result<HostResult> {
    let out = deps
        .transport
        .run_opened(opened, host, cmd, payload)
        .await?;
    host_result(&out, rec)
}

/// The code of the error a command's output reports, if it reports one.
fn host_error(out: &HostOutput) -> Option<String> {
    interpret(out)
        .err()
        .and_then(|e| e.fields.get("host_error")?.as_str().map(str::to_string))
}

/// The end of a command's stderr kept in the record; its output as a
/// result or an error.
fn host_result(out: &HostOutput, rec: &mut OperationRecord) -> Result<HostResult> {
    if let Some(tail) = out.stderr_tail() {
        rec.host_output = Some(tail);
    }
    interpret(out)
}

pub async fn uninstall(
    deps: &Deps,
    caller: &Caller,
    workspace: &str,
    name: &str,
) -> Result<UninstallOutcome> {
    uninstall_as(deps, caller, workspace, name, None).await
}

/// `uninstall`, finishing the operation record `op_id` (a background job).
pub async fn uninstall_as(
    deps: &Deps,
    caller: &Caller,
    workspace: &str,
    name: &str,
    op_id: Option<&str>,
) -> Result<UninstallOutcome> {
    caller.require(Scope::Write)?;
    validate_name(name)?;
    let host = authorize(deps, caller, workspace).await?;
    uninstall_on(deps, host, workspace, name, op_id).await
}

/// The host has the plugin but the desired state could not be told. An
/// upgrade is put back by the next repair (the desired state still names
/// the old digest), but a plugin new to the host would be an "extra", which
/// repair reports and leaves alone: it is taken off the host again, so the
/// failed install changed nothing. Only when nothing at all was at
/// `plugins/NAME` before (not a legacy or hand-made directory, which the
/// install replaced) and the desired state, read again, does not name it
/// (another request may have installed and recorded it meanwhile; a state
/// that cannot be read leaves the plugin where it is). If the undo fails
/// too, the error says so and the repair's drift report shows it.
async fn undo_new_install(
    deps: &Deps,
    host: &Host,
    workspace: &str,
    profile: &RuntimeProfile,
    name: &str,
    result: &HostResult,
    e: Error,
) -> Error {
    let new_to_host =
        result.status == HostStatus::Installed && result.previous_kind.as_deref() == Some("none");
    if !new_to_host {
        return e;
    }
    match deps.state.load(workspace).await {
        Ok(now) if !now.state.plugins.contains_key(name) => {}
        _ => return e,
    }
    let cfg = &deps.config;
    let cmd = HostCommand::uninstall(profile, name, &cfg.owner, cfg.lock_wait_secs);
    let undone = match deps.transport.run(host, &cmd, None).await {
        Ok(out) => interpret(&out),
        Err(e) => Err(e),
    };
    match undone.as_ref().map(|r| r.status) {
        Ok(HostStatus::Uninstalled | HostStatus::Absent) => Error::new(
            e.kind,
            format!("{}; the plugin was taken off the host again", e.message),
        )
        .with_detail(format!("{:?}", e.detail)),
        _ => Error::new(
            e.kind,
            format!(
                "{}; the plugin is on the host but not in the workspace's plugin list (drift repair reports it)",
                e.message
            ),
        )
        .with_detail(format!(
            "{:?}; undo: {:?}",
            e.detail,
            undone.map_err(|u| (u.message, u.detail))
        )),
    }
}

/// The uninstall on a host the caller was authorized for (`authorize`).
pub async fn uninstall_on(
    deps: &Deps,
    host: Host,
    workspace: &str,
    name: &str,
    op_id: Option<&str>,
) -> Result<UninstallOutcome> {
    validate_name(name)?;
    let cfg = &deps.config;
    let profile = cfg.host_profile(&host)?;
    let cmd = HostCommand::uninstall(&profile, name, &cfg.owner, cfg.lock_wait_secs);
    let mut rec = record::start_on(Kind::Uninstall, Trigger::Api, workspace, &host, op_id);
    rec.plugin = Some(name.to_string());
    let result = async {
        let result = run_on_host(deps, &host, &cmd, None, &mut rec).await?;
        let on_host = match result.status {
            HostStatus::Uninstalled => UninstallStatus::Uninstalled,
            HostStatus::Absent => UninstallStatus::Absent,
            _ => {
                return Err(
                    Error::host_failed("the host reported an unexpected uninstall result")
                        .with_detail(format!("{result:?}")),
                )
            }
        };
        let was_desired =
            state::record_removed(deps.state.as_ref(), deps.clock.as_ref(), workspace, name)
                .await?;
        let removed = on_host == UninstallStatus::Uninstalled || was_desired;
        Ok(UninstallOutcome {
            status: if removed {
                UninstallStatus::Uninstalled
            } else {
                UninstallStatus::Absent
            },
            plugin: name.to_string(),
        })
    }
    .await;
    match result {
        Ok(o) => {
            record::succeed(deps.records.as_ref(), &mut rec, &o).await;
            Ok(o)
        }
        Err(e) => Err(record::fail(deps.records.as_ref(), &mut rec, e).await),
    }
}

/// Presigned download URLs live long enough to start a download, no more.
const DOWNLOAD_URL_TTL: std::time::Duration = std::time::Duration::from_secs(300);

/// Resolves and stages a plugin as install does, for a workspace, and
/// returns a short-lived presigned URL of its canonical archive (plugins
/// over Lambda's 6 MB response limit still download).
pub async fn download(
    deps: &Deps,
    caller: &Caller,
    workspace: &str,
    name: &str,
    source: Option<&str>,
) -> Result<String> {
    // It fetches and stages as an install does: the same checks.
    caller.require(Scope::Write)?;
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
    let (host, ahead) = authorize_reading_allowlist(deps, caller, workspace).await?;
    let p = prepare(deps, host, &source, None, HostAhead::Nothing, ahead).await?;
    if p.resolved.name != name {
        return Err(name_mismatch(&p.resolved.name, name));
    }
    deps.archives
        .presign(&p.resolved.archive.sha256, DOWNLOAD_URL_TTL)
        .await
}

pub fn name_mismatch(resolved: &str, requested: &str) -> Error {
    Error::bad_request(format!(
        "the source resolves to plugin {resolved:?}, not {requested:?}"
    ))
    .with_field("resolved_name", serde_json::json!(resolved))
    .with_field("requested_name", serde_json::json!(requested))
}
