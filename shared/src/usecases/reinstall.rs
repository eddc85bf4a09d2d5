//! A replaced instance gets its plugins back: on an instance-start event (or
//! a request) the workspace's whole desired state is installed on its host
//! as one batch with a single runtime restart. Also the batch step itself
//! (`install_set`), which repair uses too, and the readiness wait.

use std::time::Duration;

use serde::Serialize;

use crate::domain::archive::ArchiveFile;
use crate::domain::error::{Error, ErrorKind, Result};
use crate::domain::host::Host;
use crate::domain::hostscript::{interpret, HostCommand, HostResult, HostStatus};
use crate::domain::plugin::InstalledPlugin;
use crate::domain::records::{Kind, OperationRecord, PluginResult, PluginState, Status, Trigger};
use crate::domain::source::Source;
use crate::ports::{Clock, Deps, Payload};
use crate::usecases::install::{install_status, InstallStatus};
use crate::usecases::{allowlist, record, resolve};

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

impl Readiness {
    /// No waiting: the first answer counts.
    pub fn none() -> Self {
        Readiness {
            budget: Duration::ZERO,
            ..Readiness::default()
        }
    }
}

/// Whether an error may pass if tried again later: not reachable (503), no
/// such host yet (404), busy (409: two instances during an overlapping
/// replacement, or the host lock held by another operation).
fn may_pass_later(e: &Error) -> bool {
    matches!(
        e.kind,
        ErrorKind::Unavailable | ErrorKind::NotFound | ErrorKind::Conflict
    )
}

/// Retries `f` while it fails with an error that may pass later, backing
/// off (doubling up to `max_delay`), until the budget is spent.
pub async fn when_ready<T, F, Fut>(clock: &dyn Clock, r: Readiness, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let until = clock.now() + r.budget;
    let mut delay = r.first_delay;
    loop {
        match f().await {
            Err(e) if may_pass_later(&e) => {
                if clock.now() + delay > until {
                    return Err(Error::unavailable(format!(
                        "the workspace's host was not ready within {} s",
                        r.budget.as_secs()
                    ))
                    .with_detail(format!("last error: {} {:?}", e.message, e.detail)));
                }
                tracing::info!(error = %e.message, delay_ms = delay.as_millis() as u64, "host not ready; retrying");
                clock.sleep(delay).await;
                delay = (delay * 2).min(r.max_delay);
            }
            other => return other,
        }
    }
}

/// The archive of an installed plugin: the staged one by digest, else its
/// source again, which must still yield the same digest.
async fn archive_of(
    deps: &Deps,
    org: Option<&str>,
    source: &Source,
    entry: &InstalledPlugin,
) -> Result<ArchiveFile> {
    if let Some(a) = deps.archives.fetch_staged(&entry.digest).await? {
        return Ok(a);
    }
    let resolved = resolve::resolve(deps, source, org).await?;
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

/// What a batch did on one host.
#[derive(Debug, Default)]
pub struct SetOutcome {
    pub plugins: Vec<PluginResult>,
    pub restarted: bool,
    pub host_output: Option<String>,
}

/// A batch's counts, the result of its record.
#[derive(Debug, Serialize)]
struct SetSummary {
    installed: usize,
    unchanged: usize,
    failed: usize,
    restarted: bool,
}

impl SetOutcome {
    pub fn failed(&self) -> bool {
        self.plugins.iter().any(|p| p.result == PluginState::Failed)
    }

    fn summary(&self) -> SetSummary {
        let count = |s: PluginState| self.plugins.iter().filter(|p| p.result == s).count();
        SetSummary {
            installed: count(PluginState::Installed),
            unchanged: count(PluginState::Unchanged),
            failed: count(PluginState::Failed),
            restarted: self.restarted,
        }
    }

    /// Keeps the newest non-empty stderr tail of the host.
    fn keep_output(&mut self, tail: Option<String>) {
        if tail.is_some() {
            self.host_output = tail;
        }
    }
}

/// One batch in progress on one host.
struct Batch<'a> {
    deps: &'a Deps,
    host: &'a Host,
    readiness: Readiness,
    /// The host answered once: later calls do not wait for it again.
    ready: bool,
    /// Something changed that the runtime must be restarted for.
    changed: bool,
    out: SetOutcome,
}

impl Batch<'_> {
    /// Installs one plugin without restarting. A plugin that fails is
    /// recorded and the batch goes on; a host that stays unreachable
    /// fails the whole batch.
    async fn install(&mut self, entry: &InstalledPlugin) -> Result<()> {
        let name = &entry.info.name;
        // An org may have dropped a plugin from its allowlist since.
        let archive = match self.checked_archive(entry).await {
            Ok(a) => a,
            Err(e) => {
                self.out
                    .plugins
                    .push(PluginResult::failed(name, &entry.digest, &e));
                return Ok(());
            }
        };
        let cfg = &self.deps.config;
        let profile = cfg.host_profile(self.host)?;
        let cmd = HostCommand::install_deferred(
            &profile,
            name,
            &archive.sha256,
            &cfg.owner,
            cfg.lock_wait_secs,
        );
        match self.run(&cmd, Some(&Payload::from(&archive))).await? {
            Ok(r) => {
                self.changed |=
                    r.status == HostStatus::Installed || r.pending_restart == Some(true);
                let state = match install_status(&r) {
                    InstallStatus::Unchanged => PluginState::Unchanged,
                    InstallStatus::Installed => PluginState::Installed,
                };
                self.out
                    .plugins
                    .push(PluginResult::new(name, state, Some(&archive.sha256)));
            }
            Err(e) if e.kind == ErrorKind::Unavailable => return Err(e),
            Err(e) => self
                .out
                .plugins
                .push(PluginResult::failed(name, &archive.sha256, &e)),
        }
        Ok(())
    }

    /// The archive of a desired plugin, if the org allowlist still admits
    /// it (source, name and digest) today.
    async fn checked_archive(&self, entry: &InstalledPlugin) -> Result<ArchiveFile> {
        let source = Source::parse(&entry.source)?;
        allowlist::admit(
            self.deps,
            self.host,
            &source,
            &entry.info.name,
            &entry.digest,
        )
        .await?;
        archive_of(self.deps, self.host.org_id.as_deref(), &source, entry).await
    }

    /// Runs a command. The first one waits for the host to be ready, and
    /// a host that never becomes ready fails the whole set (the outer
    /// error: the event is retried later, Lambda's retry then the DLQ);
    /// the inner result is this command's.
    async fn run(
        &mut self,
        cmd: &HostCommand,
        payload: Option<&Payload<'_>>,
    ) -> Result<Result<HostResult>> {
        let transport = &self.deps.transport;
        let out = if self.ready || self.readiness.budget.is_zero() {
            transport.run(self.host, cmd, payload).await
        } else {
            let clock = self.deps.clock.as_ref();
            Ok(when_ready(clock, self.readiness, || {
                transport.run(self.host, cmd, payload)
            })
            .await?)
        };
        self.ready = true;
        Ok(out.and_then(|o| {
            self.out.keep_output(o.stderr_tail());
            interpret(&o)
        }))
    }
}

/// Restarts the runtime once; whether it was restarted.
pub async fn restart(deps: &Deps, host: &Host, out: &mut SetOutcome) -> Result<bool> {
    let cfg = &deps.config;
    let profile = cfg.host_profile(host)?;
    let cmd = HostCommand::restart(&profile, &cfg.owner, cfg.lock_wait_secs);
    let o = deps.transport.run(host, &cmd, None).await?;
    out.keep_output(o.stderr_tail());
    Ok(interpret(&o)?.restarted.unwrap_or(false))
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
    // A bad config dir tag fails the set before any host call.
    deps.config.host_profile(host)?;
    let mut batch = Batch {
        deps,
        host,
        readiness,
        ready: false,
        changed: false,
        out: SetOutcome::default(),
    };
    for entry in items {
        batch.install(entry).await?;
    }
    let mut out = batch.out;
    if batch.changed {
        out.restarted = restart(deps, host, &mut out).await?;
    }
    Ok(out)
}

/// What a reinstall or repair found to do: nothing worth a record, the
/// workspace moved to another instance, or a batch's outcome.
pub enum SetResult {
    Quiet,
    Stale,
    Done(SetOutcome),
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
        let host = when_ready(deps.clock.as_ref(), readiness, || {
            deps.fleet.locate(workspace)
        })
        .await?;
        rec.transport = Some(host.access);
        if instance.is_some_and(|id| host.instance_id != id) {
            return Ok(SetResult::Stale);
        }
        let items: Vec<&InstalledPlugin> = state.state.plugins.values().collect();
        Ok(SetResult::Done(
            install_set(deps, &host, &items, readiness).await?,
        ))
    }
    .await;
    finish_set(deps, &mut rec, result).await?;
    if rec.status == Status::Failed {
        // Lambda retries the event, then the DLQ keeps it; the record says
        // which plugins failed.
        return Err(Error::host_failed(
            "some plugins could not be reinstalled; see the operation record",
        )
        .with_field("operation_id", serde_json::json!(rec.id)));
    }
    Ok(rec)
}

/// Ends a reinstall's or repair's record with what the batch did.
pub async fn finish_set(
    deps: &Deps,
    rec: &mut OperationRecord,
    result: Result<SetResult>,
) -> Result<()> {
    match result {
        Ok(SetResult::Quiet) => return Ok(()),
        Ok(SetResult::Stale) => rec.finish(
            true,
            serde_json::json!({"skipped": "the workspace runs on another instance now"}),
        ),
        Ok(SetResult::Done(set)) => {
            rec.finish(
                !set.failed(),
                serde_json::to_value(set.summary()).unwrap_or_default(),
            );
            rec.host_output = set.host_output;
            rec.plugins = set.plugins;
        }
        Err(e) => return Err(record::fail(deps.records.as_ref(), rec, e).await),
    }
    record::save(deps.records.as_ref(), rec).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::FakeClock;

    #[tokio::test]
    async fn readiness_retries_only_what_may_pass_later() {
        let clock = FakeClock::new();
        let r = Readiness {
            budget: Duration::from_millis(200),
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
        };
        let mut n = 0;
        let got = when_ready(&clock, r, || {
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
        let e = when_ready(&clock, r, || {
            calls += 1;
            async { Err::<(), _>(Error::host_failed("no")) }
        })
        .await
        .unwrap_err();
        assert_eq!((e.status(), calls), (502, 1));
        let e = when_ready(&clock, r, || async {
            Err::<(), _>(Error::unavailable("never"))
        })
        .await
        .unwrap_err();
        assert!(e.message.contains("not ready"), "{}", e.message);
    }
}
