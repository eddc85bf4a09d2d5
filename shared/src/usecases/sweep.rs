//! Retention of staged archives: an archive no desired state references
//! and that was last written longer ago than the retention is removed by
//! the scheduled sweep. Installs do not take locks for it, so the sweep
//! is careful instead:
//! - the references are read before anything is removed, and a state that
//!   cannot be read stops the sweep (nothing removed);
//! - a recent archive is kept (an install staging it now wrote it just now);
//! - after removing, the references are read again: an install that took
//!   an old archive meanwhile and wrote its state gets it back (the bucket
//!   is versioned, so removing only hid it). One still in flight delivers
//!   from its own copy over SSH; over SSM its host's download fails (a 502
//!   that a retry fixes by staging again), and a later reinstall fetches
//!   the source again if the archive stays gone.

use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;

use crate::domain::error::Result;
use crate::ports::Deps;

/// What a sweep found and did: objects and bytes before, removed, kept.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    pub objects_before: usize,
    pub bytes_before: u64,
    pub removed: usize,
    pub bytes_removed: u64,
    pub kept_referenced: usize,
    pub kept_recent: usize,
    /// Removed, then needed by an install that finished meanwhile.
    pub restored: usize,
}

/// Desired states read at once.
const READS: usize = 64;

/// Every digest some desired state references.
async fn referenced(deps: &Deps) -> Result<HashSet<String>> {
    let mut digests = HashSet::new();
    for chunk in deps.state.workspaces().await?.chunks(READS) {
        let states =
            futures_util::future::join_all(chunk.iter().map(|ws| deps.state.load(ws))).await;
        for state in states {
            digests.extend(state?.state.plugins.into_values().map(|p| p.digest));
        }
    }
    Ok(digests)
}

pub async fn sweep(deps: &Deps, retention: Duration) -> Result<SweepReport> {
    let before = referenced(deps).await?;
    let staged = deps.archives.staged().await?;
    let mut report = SweepReport {
        objects_before: staged.len(),
        bytes_before: staged.iter().map(|a| a.bytes).sum(),
        ..Default::default()
    };
    let mut removed = Vec::new();
    for a in staged {
        if before.contains(&a.digest) {
            report.kept_referenced += 1;
        } else if a.age < retention {
            report.kept_recent += 1;
        } else {
            deps.archives.unstage(&a.digest).await?;
            removed.push(a);
        }
    }
    let after = referenced(deps).await?;
    for a in removed {
        if after.contains(&a.digest) && deps.archives.restore(&a.digest).await? {
            report.restored += 1;
            tracing::info!(digest = %a.digest, "needed meanwhile; restored");
        } else {
            report.removed += 1;
            report.bytes_removed += a.bytes;
        }
    }
    Ok(report)
}
