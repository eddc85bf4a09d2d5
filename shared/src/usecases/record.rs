//! Keeping operation records: the steps every use case repeats when it
//! starts, fails or finishes an operation, written once.

use serde::Serialize;

use crate::domain::error::Error;
use crate::domain::host::Host;
use crate::domain::records::{Kind, OperationRecord, Trigger};
use crate::ports::RecordStore;

/// Saves a record, logging instead of failing: a record that cannot be
/// written must not turn a done change into an error.
pub async fn save(store: &dyn RecordStore, record: &OperationRecord) {
    if let Err(e) = store.put_record(record).await {
        tracing::warn!(id = %record.id, error = %e, detail = ?e.detail, "could not write an operation record");
    }
}

/// A new record for an operation on `workspace`'s `host`, or one finishing
/// the record `op_id` (a background job) when given.
pub fn start_on(
    kind: Kind,
    trigger: Trigger,
    workspace: &str,
    host: &Host,
    op_id: Option<&str>,
) -> OperationRecord {
    let mut rec = OperationRecord::start(kind, trigger, Some(workspace));
    if let Some(id) = op_id {
        rec.id = id.to_string();
    }
    rec.transport = Some(host.access);
    rec.org_id = host.org_id.clone();
    rec
}

/// Marks the record failed with `e`, saves it, and hands `e` back.
pub async fn fail(store: &dyn RecordStore, rec: &mut OperationRecord, e: Error) -> Error {
    rec.fail(&e);
    save(store, rec).await;
    e
}

/// Marks the record succeeded with `outcome` as its result and saves it.
pub async fn succeed<T: Serialize>(
    store: &dyn RecordStore,
    rec: &mut OperationRecord,
    outcome: &T,
) {
    rec.finish(true, serde_json::to_value(outcome).unwrap_or_default());
    save(store, rec).await;
}
