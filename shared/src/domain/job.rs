//! A job: an API operation handed to the background (the operations queue)
//! because it could not finish within API Gateway's deadline. It carries
//! the operation record it finishes and the work as the API received it.

use serde::{Deserialize, Serialize};

use crate::domain::caller::Caller;

use crate::domain::records::Kind;

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
    /// Who asked: the worker checks the job as this caller, so a job
    /// handed off before its checks finished is checked all the same.
    /// A job without one is refused.
    #[serde(default)]
    pub caller: Option<Caller>,
}

impl Work {
    /// The record kind of this work.
    pub fn kind(&self) -> Kind {
        match self {
            Work::Install { .. } => Kind::Install,
            Work::Uninstall { .. } => Kind::Uninstall,
        }
    }
}
