//! What every AWS adapter shares: turning an SDK failure into our error,
//! with the service's own words kept for the log only.

use std::fmt;

use crate::domain::error::Error;

/// Maps an AWS SDK failure: throttling, timeouts, connection failures and
/// 5xx are the service being unavailable (503, worth retrying); any other
/// 4xx is our configuration or permissions (500, and the log says which).
pub fn aws_error<E: fmt::Debug>(
    service: &str,
    what: &str,
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Error {
    use aws_sdk_s3::error::SdkError;
    let transient = match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => true,
        SdkError::ResponseError(_) => true,
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            status >= 500 || status == 429 || format!("{:?}", se.err()).contains("Throttl")
        }
        _ => false,
    };
    let detail = format!("{service} {what}: {e:?}");
    if transient {
        Error::unavailable(format!("{service} is not available right now")).with_detail(detail)
    } else {
        Error::internal(detail)
    }
}
