//! Changing a workspace's desired state (`plugins.json`) safely while other
//! operations change it too: read, change, conditional write, and again on
//! a conflict, so no update is ever lost. The store being briefly
//! unavailable (S3 500/503 past the SDK's own retries) is retried too, a few
//! times with a growing pause: by then the host has usually been changed,
//! and the desired state must follow it.

use std::time::Duration;

use crate::domain::error::{Error, ErrorKind, Result};
use crate::domain::plugin::{DesiredState, InstalledPlugin};
use crate::ports::{Clock, StateStore, Versioned};

/// Max attempts at a conditional write. Each conflict means another writer
/// succeeded, so progress is guaranteed overall.
pub const STATE_ATTEMPTS: u32 = 50;

/// Times an unavailable store is tried again, pausing 100, 200, 400, 800 ms
/// (1.5 s in all, on top of the SDK's retries).
pub const UNAVAILABLE_RETRIES: u32 = 4;

/// Read-modify-write of a workspace's desired state with optimistic
/// concurrency. `change` returns false when there is nothing to write.
pub async fn update_state<F>(
    state: &dyn StateStore,
    clock: &dyn Clock,
    workspace: &str,
    change: F,
) -> Result<()>
where
    F: FnMut(&mut DesiredState) -> bool,
{
    update_state_from(state, clock, workspace, None, change).await
}

/// `update_state` starting from a state read ahead (beside the host
/// delivery), when there is one: a stale one only costs a conflict and a
/// fresh read, as any other writer's change would.
async fn update_state_from<F>(
    state: &dyn StateStore,
    clock: &dyn Clock,
    workspace: &str,
    mut ahead: Option<Versioned>,
    mut change: F,
) -> Result<()>
where
    F: FnMut(&mut DesiredState) -> bool,
{
    let mut unavailable = 0;
    let mut attempt = 0;
    let pause = |n: u32| Duration::from_millis(100 << n);
    while attempt < STATE_ATTEMPTS {
        let loaded = match ahead.take() {
            Some(c) => Ok(c),
            None => state.load(workspace).await,
        };
        let mut current = match loaded {
            Ok(c) => c,
            Err(e) if e.kind == ErrorKind::Unavailable && unavailable < UNAVAILABLE_RETRIES => {
                clock.sleep(pause(unavailable)).await;
                unavailable += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        if !change(&mut current.state) {
            return Ok(());
        }
        match state
            .save(workspace, &current.state, current.etag.as_deref())
            .await
        {
            Ok(true) => return Ok(()),
            Ok(false) => {
                clock.sleep(backoff(attempt)).await;
                attempt += 1;
            }
            Err(e) if e.kind == ErrorKind::Unavailable && unavailable < UNAVAILABLE_RETRIES => {
                clock.sleep(pause(unavailable)).await;
                unavailable += 1;
                // A write that timed out may still have landed: if the
                // stored state is the one we wrote, it did, and applying
                // the change again would misread it (an uninstall would
                // find the plugin already gone).
                if let Ok(now) = state.load(workspace).await {
                    if now.state == current.state {
                        return Ok(());
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::conflict(
        "the workspace's plugin list is changing too fast; try again",
    ))
}

/// A small randomized pause, growing with the attempt, so racing writers
/// spread out.
fn backoff(attempt: u32) -> Duration {
    let ms = 5 + rand::random::<u64>() % (10 * (attempt as u64 + 1)).min(200);
    Duration::from_millis(ms)
}

/// Whether `entry` would change what the state holds for its plugin: a new
/// digest or source does; the same ones keep the original install time.
fn differs(current: Option<&InstalledPlugin>, entry: &InstalledPlugin) -> bool {
    !matches!(current, Some(cur) if cur.digest == entry.digest && cur.source == entry.source)
}

/// Records an installed plugin in the workspace's desired state.
pub async fn record_installed(
    state: &dyn StateStore,
    clock: &dyn Clock,
    workspace: &str,
    entry: &InstalledPlugin,
) -> Result<()> {
    put_entry(state, clock, workspace, entry, true, None).await
}

/// `record_installed` from a state read ahead (`None`: read it now).
pub async fn record_installed_from(
    state: &dyn StateStore,
    clock: &dyn Clock,
    workspace: &str,
    entry: &InstalledPlugin,
    ahead: Option<Versioned>,
) -> Result<()> {
    put_entry(state, clock, workspace, entry, true, ahead).await
}

/// As `record_installed`, unless the plugin is no longer desired at all
/// (uninstalled meanwhile): a rollout never adds a plugin back.
pub async fn record_if_present(
    state: &dyn StateStore,
    clock: &dyn Clock,
    workspace: &str,
    entry: &InstalledPlugin,
) -> Result<()> {
    put_entry(state, clock, workspace, entry, false, None).await
}

async fn put_entry(
    state: &dyn StateStore,
    clock: &dyn Clock,
    workspace: &str,
    entry: &InstalledPlugin,
    add: bool,
    ahead: Option<Versioned>,
) -> Result<()> {
    let name = &entry.info.name;
    update_state_from(state, clock, workspace, ahead, |s| {
        let current = s.plugins.get(name);
        let change = (add || current.is_some()) && differs(current, entry);
        if change {
            s.plugins.insert(name.clone(), entry.clone());
        }
        change
    })
    .await
}

/// Removes a plugin from the desired state; whether it was there.
pub async fn record_removed(
    state: &dyn StateStore,
    clock: &dyn Clock,
    workspace: &str,
    name: &str,
) -> Result<bool> {
    let mut was_desired = false;
    update_state(state, clock, workspace, |s| {
        was_desired = s.plugins.remove(name).is_some();
        was_desired
    })
    .await?;
    Ok(was_desired)
}
