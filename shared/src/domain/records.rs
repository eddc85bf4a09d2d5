//! Operation records: every install, uninstall, reinstall, repair and
//! rollout leaves one the user can read (`GET .../plugins/operations`).
//!
//! Keys: `workspaces/<id>/operations/<op>.json` per workspace and
//! `rollouts/<op>.json` for a rollout's parent. Operation ids start with
//! the time inverted, so S3's ascending key order is newest first and a page
//! is one `ListObjectsV2` call.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::error::Error;
use crate::domain::host::Access;

/// What started an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    Api,
    InstanceStart,
    Request,
    Schedule,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Install,
    Uninstall,
    Reinstall,
    Repair,
    Rollout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Running,
    Succeeded,
    Failed,
}

/// What happened to (or was found about) one plugin in a reinstall or repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginState {
    Installed,
    Unchanged,
    /// Repair: desired but not on the host.
    Missing,
    /// Repair: on the host with another digest.
    Different,
    /// Repair: on the host but not desired (reported, never removed).
    Extra,
    Failed,
}

/// One plugin's part in a reinstall or repair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginResult {
    pub plugin: String,
    pub result: PluginState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PluginResult {
    pub fn new(plugin: &str, result: PluginState, digest: Option<&str>) -> Self {
        PluginResult {
            plugin: plugin.to_string(),
            result,
            digest: digest.filter(|d| !d.is_empty()).map(str::to_string),
            error: None,
        }
    }

    /// A plugin that failed, with the public message of why.
    pub fn failed(plugin: &str, digest: &str, e: &Error) -> Self {
        PluginResult {
            error: Some(e.message.clone()),
            ..PluginResult::new(plugin, PluginState::Failed, Some(digest))
        }
    }
}

/// A rollout's counts while it runs and when it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub total: usize,
    pub done: usize,
    pub failed: usize,
    pub pending: usize,
    /// Workspaces never started because the error threshold was reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_started: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_workspaces: Vec<String>,
    /// Workspaces with no running instance: their desired state has the new
    /// version, which they get when they start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deferred: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationRecord {
    pub id: String,
    pub kind: Kind,
    pub trigger: Trigger,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// The org of the workspace; on a rollout parent, the org it was
    /// limited to (none: a platform rollout across orgs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// `ssh` or `ssm`, once the host is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Access>,
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// The outcome (the API's response body) or `{"error", "status"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The last lines the host script wrote to stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_output: Option<String>,
    /// A rollout child's parent record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<PluginResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

impl OperationRecord {
    pub fn start(kind: Kind, trigger: Trigger, workspace: Option<&str>) -> Self {
        OperationRecord {
            id: new_id(),
            kind,
            trigger,
            status: Status::Running,
            workspace: workspace.map(str::to_string),
            org_id: None,
            plugin: None,
            source: None,
            digest: None,
            transport: None,
            started_at: now_rfc3339(),
            ended_at: None,
            result: None,
            host_output: None,
            parent: None,
            plugins: Vec::new(),
            progress: None,
        }
    }

    /// Marks the record finished with `result` (an outcome or an error).
    pub fn finish(&mut self, ok: bool, result: Value) {
        self.status = if ok {
            Status::Succeeded
        } else {
            Status::Failed
        };
        self.ended_at = Some(now_rfc3339());
        self.result = Some(result);
    }

    pub fn fail(&mut self, e: &Error) {
        self.finish(false, error_value(e));
    }
}

/// The public face of an error in a record: the same message and status an
/// API caller gets, never the log-only detail.
pub fn error_value(e: &Error) -> Value {
    let mut v = serde_json::json!({ "error": e.message, "status": e.status() });
    for (k, val) in &e.fields {
        v[k] = val.clone();
    }
    v
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Inverted milliseconds (13 digits) then randomness: ascending order is
/// newest first, and ids of one millisecond do not collide.
pub fn new_id() -> String {
    let ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let inverted = 9_999_999_999_999i128 - ms;
    format!("op-{inverted:013}-{:08x}", rand::random::<u32>())
}

/// Only ids we could have made reach S3 keys.
pub fn valid_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("op-") else {
        return false;
    };
    let Some((time, rand)) = rest.split_once('-') else {
        return false;
    };
    time.len() == 13
        && time.bytes().all(|b| b.is_ascii_digit())
        && rand.len() == 8
        && rand.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_newest_first_and_validate() {
        let a = new_id();
        std::thread::sleep(std::time::Duration::from_millis(3));
        let b = new_id();
        assert!(b < a, "{b} sorts before {a}");
        assert!(valid_id(&a) && valid_id(&b));
        for bad in ["", "op-", "op-123-abc", "../x", "op-0000000000000-zzzzzzzz"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn records_serialize_kebab_case_and_skip_empty() {
        let mut r = OperationRecord::start(Kind::Reinstall, Trigger::InstanceStart, Some("ws-1"));
        r.finish(true, serde_json::json!({"installed": 2}));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["trigger"], "instance-start");
        assert_eq!(v["kind"], "reinstall");
        assert_eq!(v["status"], "succeeded");
        assert!(v.get("plugins").is_none() && v.get("progress").is_none());
        let back: OperationRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }
}
