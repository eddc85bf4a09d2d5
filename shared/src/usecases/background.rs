//! Operations that cannot finish within API Gateway's 29 s go on in the
//! background: the API writes a "running" record, hands the request to the
//! operations queue and answers 202 with the operation id; the reinstall
//! function takes it from the queue and runs it again without the API's
//! deadline, finishing the same record. The work cut off at the deadline
//! changed nothing (or finished: installs are idempotent), so running it
//! again is safe.

use std::future::Future;
use std::time::Duration;

use crate::domain::caller::{unauthorized, Caller};
use crate::domain::deadline;
use crate::domain::error::{Error, ErrorKind, Result};
use crate::domain::job::{Job, Work};
use crate::domain::plugin::validate_workspace_id;
use crate::domain::records::{self, OperationRecord, Status, Trigger};
use crate::domain::source::Source;
use crate::ports::{Deps, Handoff};
use crate::usecases::install::{self, InstallRequest};
use crate::usecases::record;

/// How long queueing a job may take at the end of an API call.
const HANDOFF_TIMEOUT: Duration = Duration::from_millis(1500);

/// Time kept after handing an operation off: the record and the queue
/// message must be written before API Gateway gives up.
pub const HANDOFF_MARGIN: Duration = Duration::from_secs(2);

/// Finished within the deadline, or handed to the background (202).
#[derive(Debug)]
pub enum Done<T> {
    Finished(T),
    Accepted(String),
}

/// A change the caller has been authorized for, which may go on in the
/// background: who asked, where, and what.
pub struct Change<'a> {
    pub caller: &'a Caller,
    pub workspace: &'a str,
    /// The workspace's org, found while authorizing.
    pub org: Option<&'a str>,
    pub work: Work,
    /// Time the request already spent (authorizing): the deadline is one.
    pub spent: Duration,
}

/// Runs an authorized change under what is left of the API deadline. With
/// a hand-off, one that cannot finish in time is handed to the background
/// instead of failing: its operation id (the work cut off here is redone
/// there, checked again as its caller). Without one, the deadline answers
/// 504. Only authorized changes come here: a request cut off while its
/// caller was being checked is never handed off.
pub async fn within_or_hand_off<T>(
    deps: &Deps,
    change: Change<'_>,
    fut: impl Future<Output = Result<T>>,
) -> Result<Done<T>> {
    let timeout = deps.config.operation_timeout;
    let spent = change.spent;
    let Some(handoff) = deps.handoff.as_deref() else {
        return deadline::within_rest(timeout, spent, fut)
            .await
            .map(Done::Finished);
    };
    let limit = timeout
        .saturating_sub(HANDOFF_MARGIN)
        .max(Duration::from_secs(1));
    match deadline::within_rest(limit, spent, fut).await {
        Ok(v) => Ok(Done::Finished(v)),
        Err(e) if deadline::is_exceeded(&e) => match start(deps, handoff, &change).await {
            Ok(id) => Ok(Done::Accepted(id)),
            Err(h) => {
                tracing::error!(error = %h.message, detail = ?h.detail, "could not hand the operation off");
                Err(e)
            }
        },
        Err(e) => Err(e),
    }
}

/// Writes the "running" record and queues the job; the operation id.
pub async fn start(deps: &Deps, handoff: &dyn Handoff, change: &Change<'_>) -> Result<String> {
    let workspace = change.workspace;
    let mut rec = OperationRecord::start(change.work.kind(), Trigger::Api, Some(workspace));
    rec.org_id = change.org.map(str::to_string);
    match &change.work {
        Work::Install { source, .. } => {
            rec.source = Source::parse(source).ok().map(|s| s.redacted())
        }
        Work::Uninstall { plugin } => rec.plugin = Some(plugin.clone()),
    }
    deps.records.put_record(&rec).await?;
    let job = Job {
        operation_id: rec.id.clone(),
        workspace: workspace.to_string(),
        work: change.work.clone(),
        caller: Some(change.caller.clone()),
    };
    // Bounded: the answer must still beat API Gateway's 29 s.
    let sent = tokio::time::timeout(HANDOFF_TIMEOUT, handoff.hand_off(&job))
        .await
        .unwrap_or_else(|_| {
            Err(Error::unavailable(
                "the operations queue did not answer in time",
            ))
        });
    if let Err(e) = sent {
        // Nobody will run it: the record must not stay "running".
        return Err(record::fail(deps.records.as_ref(), &mut rec, e).await);
    }
    Ok(rec.id)
}

/// Runs a queued job to the end and makes sure its record says how it
/// ended. Only an error worth retrying (the host or a service unavailable,
/// or busy) is returned, so the queue redelivers the job; others are on
/// record.
pub async fn run(deps: &Deps, job: &Job) -> Result<()> {
    let id = job.operation_id.as_str();
    if !records::valid_id(id) {
        return Err(Error::bad_request("invalid operation id in job"));
    }
    validate_workspace_id(&job.workspace)?;
    // SQS delivers at least once: a job whose record already ended is done
    // (running it again could undo a later change by the user).
    match deps.records.get_record(Some(&job.workspace), id).await? {
        Some(rec) if rec.status == Status::Running => {}
        Some(_) => {
            tracing::info!(operation = id, "job already finished; acknowledged");
            return Ok(());
        }
        None => {
            tracing::warn!(operation = id, "job without a record; dropped");
            return Ok(());
        }
    }
    let Err(e) = run_work(deps, job).await else {
        return Ok(());
    };
    let retry = matches!(e.kind, ErrorKind::Unavailable | ErrorKind::Conflict);
    settle_record(deps, job, &e, retry).await;
    // Unreachable or busy (the attempt cut off at the API deadline may still
    // hold the host lock) pass: the queue redelivers the job.
    if retry {
        Err(e)
    } else {
        tracing::warn!(operation = id, error = %e.message, detail = ?e.detail, "background operation failed");
        Ok(())
    }
}

async fn run_work(deps: &Deps, job: &Job) -> Result<()> {
    let id = Some(job.operation_id.as_str());
    let caller = job
        .caller
        .as_ref()
        .ok_or_else(|| unauthorized("a queued job without its caller"))?;
    match &job.work {
        Work::Install { source, sha256 } => {
            let req = InstallRequest {
                source: source.clone(),
                sha256: sha256.clone(),
            };
            install::install_as(deps, caller, &job.workspace, req, id)
                .await
                .map(|_| ())
        }
        Work::Uninstall { plugin } => {
            install::uninstall_as(deps, caller, &job.workspace, plugin, id)
                .await
                .map(|_| ())
        }
    }
}

/// Ends the job's record after a failure, except when the queue will run
/// the job again: then it stays "running" (or is set back to it).
async fn settle_record(deps: &Deps, job: &Job, e: &Error, retry: bool) {
    let Ok(Some(mut rec)) = deps
        .records
        .get_record(Some(&job.workspace), &job.operation_id)
        .await
    else {
        return;
    };
    if retry {
        if rec.status != Status::Running {
            rec.status = Status::Running;
            rec.ended_at = None;
            rec.result = None;
            record::save(deps.records.as_ref(), &rec).await;
        }
    } else if rec.status == Status::Running {
        rec.fail(e);
        record::save(deps.records.as_ref(), &rec).await;
    }
}
