//! One error type for every operation, and the one place that maps it to an
//! HTTP status. The public `message` is what callers see; `detail` (AWS error
//! text, paths, host stderr) only ever goes to the log.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    /// No valid caller token.
    Unauthorized,
    /// Refused by policy (scope, the org allowlist).
    Forbidden,
    NotFound,
    Conflict,
    TooLarge,
    Unprocessable,
    /// The host refused us or its script failed.
    HostFailed,
    /// The host (or the service in front of it) could not be reached.
    Unavailable,
    DeadlineExceeded,
    Internal,
}

impl ErrorKind {
    /// The single HTTP status mapping for the whole API.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::TooLarge => 413,
            ErrorKind::Unprocessable => 422,
            ErrorKind::HostFailed => 502,
            ErrorKind::Unavailable => 503,
            ErrorKind::DeadlineExceeded => 504,
            ErrorKind::Internal => 500,
        }
    }
}

#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    /// Safe to show to callers: no paths, no AWS text, no host output.
    pub message: String,
    /// Extra public JSON fields (for example `available_schemes`).
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// Log-only context.
    pub detail: Option<String>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            fields: serde_json::Map::new(),
            detail: None,
        }
    }

    pub fn with_detail(mut self, detail: impl fmt::Display) -> Self {
        self.detail = Some(detail.to_string());
        self
    }

    pub fn with_field(mut self, key: &str, value: serde_json::Value) -> Self {
        self.fields.insert(key.to_string(), value);
        self
    }

    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, m)
    }
    pub fn too_large(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::TooLarge, m)
    }
    pub fn unprocessable(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unprocessable, m)
    }
    pub fn host_failed(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::HostFailed, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, m)
    }
    pub fn deadline(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::DeadlineExceeded, m)
    }
    /// Internal failures never say more than this publicly.
    pub fn internal(detail: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Internal, "internal error").with_detail(detail)
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }
}

/// Only the public message: `detail` reaches the log explicitly, never
/// through formatting an error into a response by accident.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.kind.status())
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;
