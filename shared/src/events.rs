//! The EventBridge entrypoint of the reinstall function: one handler for
//! the three rules (instance state change, reinstall request, schedule).
//! A failure is returned as a Lambda error on purpose: EventBridge invokes
//! asynchronously, so Lambda retries the event and then hands it to the
//! on-failure destination (the dead-letter queue) instead of losing it.

use aws_lambda_events::event::cloudwatch_events::ec2::InstanceStateChange;
use aws_lambda_events::event::cloudwatch_events::CloudWatchEvent;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::reconcile::{self, Readiness, RolloutLimits, RolloutRequest, Threshold};
use crate::records::Trigger;
use crate::App;

pub const INSTANCE_STATE_CHANGE: &str = "EC2 Instance State-change Notification";
pub const REINSTALL_REQUESTED: &str = "Plugin Reinstall Requested";
pub const SCHEDULED: &str = "Scheduled Event";

/// `detail` of a "Plugin Reinstall Requested" event: one workspace's whole
/// set, or a rollout of one plugin to every workspace that has it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Request {
    Workspace { workspace_id: String },
    Rollout(RolloutRequest),
}

/// Handles one event; the returned JSON is what the invocation reports.
pub async fn handle(app: &App, event: Value) -> Result<Value> {
    // API operations handed to the background arrive from the operations
    // queue (an SQS event source: `{"Records": [...]}`).
    if let Some(records) = event.get("Records").and_then(Value::as_array) {
        let mut done = Vec::new();
        for r in records {
            let body = r.get("body").and_then(Value::as_str).unwrap_or_default();
            let job: crate::background::Job = serde_json::from_str(body)
                .map_err(|e| Error::bad_request(format!("malformed operation job: {e}")))?;
            crate::background::run(&app.deps, &job).await?;
            done.push(job.operation_id);
        }
        return Ok(json!({ "operations": done }));
    }
    let detail_type = event
        .get("detail-type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let deps = &app.deps;
    let cfg = &deps.config;
    let readiness = Readiness {
        budget: cfg.ready_budget,
        ..Readiness::default()
    };
    match detail_type.as_str() {
        INSTANCE_STATE_CHANGE => {
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
            let rec = reconcile::reinstall_workspace(
                deps,
                &ws,
                Some(&detail.instance_id),
                Trigger::InstanceStart,
                readiness,
            )
            .await?;
            Ok(serde_json::to_value(rec).map_err(Error::internal)?)
        }
        REINSTALL_REQUESTED => {
            let source = event
                .get("source")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if source != cfg.event_source {
                return Err(Error::bad_request(format!(
                    "reinstall requests are accepted from source {:?}, not {source:?}",
                    cfg.event_source
                )));
            }
            let detail = event.get("detail").cloned().unwrap_or(Value::Null);
            let req: Request = serde_json::from_value(detail).map_err(|_| {
                Error::bad_request("detail must be {\"workspace_id\"} or {\"plugin\", \"source\"}")
            })?;
            match req {
                Request::Workspace { workspace_id } => {
                    crate::plugin::validate_workspace_id(&workspace_id)?;
                    let rec = reconcile::reinstall_workspace(
                        deps,
                        &workspace_id,
                        None,
                        Trigger::Request,
                        readiness,
                    )
                    .await?;
                    Ok(serde_json::to_value(rec).map_err(Error::internal)?)
                }
                Request::Rollout(r) => {
                    let threshold = match &r.error_threshold {
                        None => Threshold::parse(&cfg.rollout_error_threshold)?,
                        Some(Value::Number(n)) => Threshold::parse(&n.to_string())?,
                        Some(Value::String(s)) => Threshold::parse(s)?,
                        Some(_) => {
                            return Err(Error::bad_request(
                                "error_threshold must be a count or a percentage",
                            ))
                        }
                    };
                    let limits = RolloutLimits {
                        max_concurrency: r.max_concurrency.unwrap_or(cfg.rollout_concurrency),
                        per_vpc: cfg.rollout_per_vpc,
                        threshold,
                    };
                    let rec = reconcile::rollout(deps, &r, limits).await?;
                    Ok(serde_json::to_value(rec).map_err(Error::internal)?)
                }
            }
        }
        SCHEDULED => {
            let (checked, recs) = reconcile::repair_all(deps, cfg.rollout_concurrency).await?;
            let repaired: Vec<_> = recs
                .iter()
                .filter(|r| !r.plugins.is_empty())
                .map(|r| json!({"workspace": r.workspace, "operation_id": r.id, "plugins": r.plugins}))
                .collect();
            Ok(json!({"checked": checked, "drift": repaired}))
        }
        other => Err(Error::bad_request(format!(
            "unsupported event detail-type {other:?}"
        ))),
    }
}

/// The whole `main` of the reinstall function.
pub async fn serve() -> Result<(), lambda_runtime::Error> {
    crate::telemetry::init();
    let app: &'static App = Box::leak(Box::new(App::from_env().await?));
    lambda_runtime::run(lambda_runtime::service_fn(
        move |ev: lambda_runtime::LambdaEvent<Value>| async move {
            // Boxed: the reconcile futures nest deeply; the binary's own
            // future stays small for the compiler's layout queries.
            match Box::pin(handle(app, ev.payload)).await {
                Ok(v) => Ok(v),
                Err(e) => {
                    tracing::error!(error = %e, detail = ?e.detail, "event failed");
                    Err(lambda_runtime::Error::from(e.message))
                }
            }
        },
    ))
    .await
}
