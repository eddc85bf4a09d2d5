//! The rules of a rollout that need no I/O: what a request may ask for, the
//! limits it runs under and when failures stop it.

use serde::Deserialize;

use crate::domain::error::{Error, Result};

/// When a rollout stops starting new hosts: after more than `Count` failures,
/// or more than `Percent` of the targets (the semantics of SSM's MaxErrors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    Count(usize),
    Percent(u8),
}

impl Threshold {
    pub fn parse(v: &str) -> Result<Threshold> {
        let v = v.trim();
        let bad = || {
            Error::bad_request(format!(
                "error threshold {v:?} must be a count or a percentage like 10%"
            ))
        };
        match v.strip_suffix('%') {
            Some(p) => {
                let p: u8 = p.trim().parse().map_err(|_| bad())?;
                if p > 100 {
                    return Err(bad());
                }
                Ok(Threshold::Percent(p))
            }
            None => Ok(Threshold::Count(v.parse().map_err(|_| bad())?)),
        }
    }

    /// The most failures tolerated among `total` targets.
    pub fn allowed(self, total: usize) -> usize {
        match self {
            Threshold::Count(n) => n,
            Threshold::Percent(p) => total * p as usize / 100,
        }
    }
}

/// Hosts a rollout may work on at once, whatever the request says.
pub const MAX_ROLLOUT_CONCURRENCY: usize = 100;

#[derive(Debug, Clone, Deserialize)]
pub struct RolloutRequest {
    pub plugin: String,
    pub source: String,
    /// The one org whose workspaces get it; required unless the request
    /// comes from the platform (then `None` means every org).
    #[serde(default)]
    pub org_id: Option<String>,
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// A count (`"2"`) or a percentage (`"10%"`).
    #[serde(default)]
    pub error_threshold: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy)]
pub struct RolloutLimits {
    pub max_concurrency: usize,
    pub per_vpc: usize,
    pub threshold: Threshold,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        assert_eq!(Threshold::parse("2").unwrap(), Threshold::Count(2));
        assert_eq!(Threshold::parse(" 10% ").unwrap(), Threshold::Percent(10));
        assert!(Threshold::parse("101%").is_err() && Threshold::parse("x").is_err());
        assert_eq!(Threshold::Percent(10).allowed(25), 2);
        assert_eq!(Threshold::Count(2).allowed(25), 2);
    }
}
