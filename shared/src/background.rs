//! Operations that cannot finish within API Gateway's 29 s go on in the
//! background: the API writes a "running" record, hands the request to the
//! operations queue (SQS) and answers 202 with the operation id; the
//! reinstall function takes it from the queue and runs it again without the
//! API's deadline, finishing the same record. The work cut off at the
//! deadline changed nothing (or finished: installs are idempotent), so
//! running it again is safe.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ops::{self, Deps, InstallRequest};
use crate::records::{self, Kind, OperationRecord, Trigger};

/// What to run, as the API received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Work {
    Install {
        source: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
    Uninstall {
        plugin: String,
    },
}

/// One queued operation: the record it finishes and the work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub operation_id: String,
    pub workspace: String,
    #[serde(flatten)]
    pub work: Work,
}

/// The port: somewhere a job survives until a worker runs it.
#[async_trait]
pub trait Handoff: Send + Sync {
    async fn hand_off(&self, job: &Job) -> Result<()>;
}

pub struct SqsHandoff {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

impl SqsHandoff {
    pub fn new(client: aws_sdk_sqs::Client, queue_url: impl Into<String>) -> Self {
        SqsHandoff {
            client,
            queue_url: queue_url.into(),
        }
    }
}

#[async_trait]
impl Handoff for SqsHandoff {
    async fn hand_off(&self, job: &Job) -> Result<()> {
        let body = serde_json::to_string(job).map_err(Error::internal)?;
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .send()
            .await
            .map_err(|e| crate::error::aws_error("SQS", "SendMessage", &e))?;
        Ok(())
    }
}

/// Writes the "running" record and queues the job; the operation id.
pub async fn start(
    deps: &Deps,
    handoff: &dyn Handoff,
    workspace: &str,
    work: Work,
) -> Result<String> {
    let kind = match work {
        Work::Install { .. } => Kind::Install,
        Work::Uninstall { .. } => Kind::Uninstall,
    };
    let mut rec = OperationRecord::start(kind, Trigger::Api, Some(workspace));
    match &work {
        Work::Install { source, .. } => rec.source = Some(source.clone()),
        Work::Uninstall { plugin } => rec.plugin = Some(plugin.clone()),
    }
    deps.records.put_record(&rec).await?;
    let job = Job {
        operation_id: rec.id.clone(),
        workspace: workspace.to_string(),
        work,
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
        rec.fail(&e);
        records::save(deps.records.as_ref(), &rec).await;
        return Err(e);
    }
    Ok(rec.id)
}

/// How long queueing a job may take at the end of an API call.
const HANDOFF_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Runs a queued job to the end and makes sure its record says how it
/// ended. Only an error worth retrying (the host or a service unavailable)
/// is returned, so the queue redelivers the job; others are on record.
pub async fn run(deps: &Deps, job: &Job) -> Result<()> {
    let id = job.operation_id.as_str();
    if !records::valid_id(id) {
        return Err(Error::bad_request("invalid operation id in job"));
    }
    crate::plugin::validate_workspace_id(&job.workspace)?;
    // SQS delivers at least once: a job whose record already ended is done
    // (running it again could undo a later change by the user).
    match deps.records.get_record(Some(&job.workspace), id).await? {
        Some(rec) if rec.status == records::Status::Running => {}
        Some(_) => {
            tracing::info!(operation = id, "job already finished; acknowledged");
            return Ok(());
        }
        None => {
            tracing::warn!(operation = id, "job without a record; dropped");
            return Ok(());
        }
    }
    let result = match &job.work {
        Work::Install { source, sha256 } => {
            let req = InstallRequest {
                source: source.clone(),
                sha256: sha256.clone(),
            };
            ops::install_as(deps, &job.workspace, req, Some(id))
                .await
                .map(|_| ())
        }
        Work::Uninstall { plugin } => ops::uninstall_as(deps, &job.workspace, plugin, Some(id))
            .await
            .map(|_| ()),
    };
    let Err(e) = result else {
        return Ok(());
    };
    let retry = matches!(
        e.kind,
        crate::ErrorKind::Unavailable | crate::ErrorKind::Conflict
    );
    // End the record, except when the queue will run the job again: then it
    // stays "running" (or is set back to it) for the next delivery.
    if let Ok(Some(mut rec)) = deps.records.get_record(Some(&job.workspace), id).await {
        if retry {
            if rec.status != records::Status::Running {
                rec.status = records::Status::Running;
                rec.ended_at = None;
                rec.result = None;
                records::save(deps.records.as_ref(), &rec).await;
            }
        } else if rec.status == records::Status::Running {
            rec.fail(&e);
            records::save(deps.records.as_ref(), &rec).await;
        }
    }
    // Unreachable or busy (the attempt cut off at the API deadline may still
    // hold the host lock) pass: the queue redelivers the job.
    if retry {
        Err(e)
    } else {
        tracing::warn!(operation = id, error = %e.message, detail = ?e.detail, "background operation failed");
        Ok(())
    }
}
