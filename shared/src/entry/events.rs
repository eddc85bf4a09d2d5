//! The EventBridge entrypoint of the reinstall function: one handler for
//! the three rules (instance state change, reinstall request, schedule).
//! A failure is returned as a Lambda error on purpose: EventBridge invokes
//! asynchronously, so Lambda retries the event and then hands it to the
//! on-failure destination (the dead-letter queue) instead of losing it.
//!
//! Reinstall requests and rollouts come over the dedicated bus, whose
//! resource policy admits only configured principals, each with its own
//! `source`: the tenant server's (`PLUGIN_EVENT_SOURCE`) acts for one org
//! and must name it (`org_id`); only the platform's
//! (`PLUGIN_PLATFORM_EVENT_SOURCE`) may roll out across orgs.

use aws_lambda_events::event::cloudwatch_events::ec2::InstanceStateChange;
use aws_lambda_events::event::cloudwatch_events::CloudWatchEvent;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::domain::caller::{unknown_workspace, workspace_org};
use crate::domain::error::{Error, Result};
use crate::domain::job::Job;
use crate::domain::plugin::validate_workspace_id;
use crate::domain::records::Trigger;
use crate::domain::rollout::{RolloutLimits, RolloutRequest, Threshold};
use crate::ports::Deps;
use crate::usecases::reinstall::{reinstall_workspace, Readiness};
use crate::usecases::{background, repair, rollout, sweep};

pub const INSTANCE_STATE_CHANGE: &str = "EC2 Instance State-change Notification";
pub const REINSTALL_REQUESTED: &str = "Plugin Reinstall Requested";
pub const SCHEDULED: &str = "Scheduled Event";

/// `detail` of a "Plugin Reinstall Requested" event: one workspace's whole
/// set, or a rollout of one plugin to every workspace that has it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Request {
    Workspace {
        workspace_id: String,
        #[serde(default)]
        org_id: Option<String>,
    },
    Rollout(RolloutRequest),
}

/// Handles one event; the returned JSON is what the invocation reports.
pub async fn handle(deps: &Deps, event: Value) -> Result<Value> {
    // API operations handed to the background arrive from the operations
    // queue (an SQS event source: `{"Records": [...]}`).
    if let Some(records) = event.get("Records").and_then(Value::as_array) {
        return jobs(deps, records).await;
    }
    let detail_type = event
        .get("detail-type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    match detail_type.as_str() {
        INSTANCE_STATE_CHANGE => instance_started(deps, event).await,
        REINSTALL_REQUESTED => requested(deps, &event).await,
        SCHEDULED => scheduled(deps).await,
        other => Err(Error::bad_request(format!(
            "unsupported event detail-type {other:?}"
        ))),
    }
}

fn readiness(deps: &Deps) -> Readiness {
    Readiness {
        budget: deps.config.ready_budget,
        ..Readiness::default()
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(Error::internal)
}

/// Queued API operations, one job per SQS record.
async fn jobs(deps: &Deps, records: &[Value]) -> Result<Value> {
    let mut done = Vec::new();
    for r in records {
        let body = r.get("body").and_then(Value::as_str).unwrap_or_default();
        let job: Job = serde_json::from_str(body)
            .map_err(|e| Error::bad_request(format!("malformed operation job: {e}")))?;
        background::run(deps, &job).await?;
        done.push(job.operation_id);
    }
    Ok(json!({ "operations": done }))
}

/// An instance entered `running`: its workspace's plugins go back on it.
async fn instance_started(deps: &Deps, event: Value) -> Result<Value> {
    let ev: CloudWatchEvent<InstanceStateChange> = serde_json::from_value(event)
        .map_err(|e| Error::bad_request(format!("malformed instance state event: {e}")))?;
    let Some(detail) = ev.detail else {
        return Err(Error::bad_request("instance state event without detail"));
    };
    if detail.state != "running" {
        return Ok(json!({"ignored": format!("state {}", detail.state)}));
    }
    let Some(ws) = deps.fleet.workspace_of(&detail.instance_id).await? else {
        tracing::info!(instance = %detail.instance_id, "instance has no workspace tag; ignored");
        return Ok(json!({"ignored": "no workspace tag", "instance": detail.instance_id}));
    };
    let rec = reinstall_workspace(
        deps,
        &ws,
        Some(&detail.instance_id),
        Trigger::InstanceStart,
        readiness(deps),
    )
    .await?;
    to_value(&rec)
}

/// The org a request is limited to: the one it names; a request from the
/// tenant server's source must name one, only the platform's may not.
fn scope(deps: &Deps, source: &str, org: Option<&str>) -> Result<Option<String>> {
    let cfg = &deps.config;
    let platform = source == cfg.platform_event_source;
    if !platform && source != cfg.event_source {
        return Err(Error::bad_request(format!(
            "reinstall requests are accepted from sources {:?} and {:?}, not {source:?}",
            cfg.event_source, cfg.platform_event_source
        )));
    }
    match org {
        Some(o) => {
            validate_workspace_id(o)
                .map_err(|_| Error::bad_request(format!("invalid org id {o:?}")))?;
            Ok(Some(o.to_string()))
        }
        None if platform => Ok(None),
        None => Err(Error::bad_request(format!(
            "requests from {source:?} act for one org: name it in \"org_id\""
        ))),
    }
}

/// "Plugin Reinstall Requested", from our own event sources only.
async fn requested(deps: &Deps, event: &Value) -> Result<Value> {
    let cfg = &deps.config;
    let source = event
        .get("source")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let detail = event.get("detail").cloned().unwrap_or(Value::Null);
    let req: Request = serde_json::from_value(detail).map_err(|_| {
        Error::bad_request(
            "detail must be {\"workspace_id\", \"org_id\"} or {\"plugin\", \"source\", \"org_id\"}",
        )
    })?;
    match req {
        Request::Workspace {
            workspace_id,
            org_id,
        } => {
            let org = scope(deps, source, org_id.as_deref())?;
            validate_workspace_id(&workspace_id)?;
            if let Some(org) = &org {
                let actual = workspace_org(&deps.fleet.org_tags(&workspace_id).await?);
                if actual.as_deref() != Some(org.as_str()) {
                    return Err(unknown_workspace(&workspace_id).with_detail(format!(
                        "request for org {org:?}, workspace org {actual:?}"
                    )));
                }
            }
            let rec =
                reinstall_workspace(deps, &workspace_id, None, Trigger::Request, readiness(deps))
                    .await?;
            to_value(&rec)
        }
        Request::Rollout(mut r) => {
            r.org_id = scope(deps, source, r.org_id.as_deref())?;
            let limits = RolloutLimits {
                // Never more hosts at once than the temp space holds.
                max_concurrency: cfg
                    .hosts_at_once(r.max_concurrency.unwrap_or(cfg.rollout_concurrency)),
                per_vpc: cfg.rollout_per_vpc,
                threshold: threshold(&r, &cfg.rollout_error_threshold)?,
            };
            to_value(&rollout::rollout(deps, &r, limits).await?)
        }
    }
}

/// The request's error threshold, or the deployment's default.
fn threshold(r: &RolloutRequest, default: &str) -> Result<Threshold> {
    match &r.error_threshold {
        None => Threshold::parse(default),
        Some(Value::Number(n)) => Threshold::parse(&n.to_string()),
        Some(Value::String(s)) => Threshold::parse(s),
        Some(_) => Err(Error::bad_request(
            "error_threshold must be a count or a percentage",
        )),
    }
}

/// The schedule: drift repair across the fleet, then the retention sweep
/// of staged archives.
async fn scheduled(deps: &Deps) -> Result<Value> {
    let hosts = deps.config.hosts_at_once(deps.config.rollout_concurrency);
    let (checked, recs) = repair::repair_all(deps, hosts).await?;
    let swept = sweep::sweep(deps, deps.config.staged_retention).await?;
    let repaired: Vec<_> = recs
        .iter()
        .filter(|r| !r.plugins.is_empty())
        .map(|r| json!({"workspace": r.workspace, "operation_id": r.id, "plugins": r.plugins}))
        .collect();
    Ok(json!({"checked": checked, "drift": repaired, "staged": swept}))
}
