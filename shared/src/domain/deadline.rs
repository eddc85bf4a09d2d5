//! The operation deadline (API Gateway gives up at 29 s). The API sets it
//! once per request; a transport that must stop remote work itself (SSM
//! cancels its command) reads it, so both paths answer the same 504.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::domain::error::{Error, Result};

tokio::task_local! {
    static DEADLINE: (Instant, Duration);
}

/// Runs `fut` with `limit` as its deadline, answering 504 when it passes.
pub async fn within<T>(limit: Duration, fut: impl Future<Output = Result<T>>) -> Result<T> {
    within_rest(limit, Duration::ZERO, fut).await
}

/// `within` a deadline of `total` of which `spent` is gone already (the
/// request's earlier steps); the error names the whole deadline.
pub async fn within_rest<T>(
    total: Duration,
    spent: Duration,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    let limit = total.saturating_sub(spent);
    let at = Instant::now() + limit;
    // Boxed: the whole operation's future nests deeply, and callers'
    // futures stay shallow enough for the compiler's layout queries.
    let fut = Box::pin(fut);
    DEADLINE
        .scope((at, total), async {
            tokio::time::timeout(limit, fut)
                .await
                .unwrap_or_else(|_| Err(exceeded(total)))
        })
        .await
}

/// When the current operation's deadline falls, and its length.
pub fn current() -> Option<(Instant, Duration)> {
    DEADLINE.try_with(|d| *d).ok()
}

const EXCEEDED: &str = "the operation did not finish within";

/// The one 504 an operation answers when its deadline passes.
pub fn exceeded(limit: Duration) -> Error {
    Error::deadline(format!("{EXCEEDED} {} s", limit.as_secs()))
}

/// Whether `e` is this deadline passing (not a host's own timeout).
pub fn is_exceeded(e: &Error) -> bool {
    e.kind == crate::domain::error::ErrorKind::DeadlineExceeded && e.message.starts_with(EXCEEDED)
}
