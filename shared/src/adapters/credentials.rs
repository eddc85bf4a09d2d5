//! The credentials port over SSM Parameter Store: each org keeps its own
//! GitHub token as a SecureString at `<prefix>/<org>/github-token`. The
//! function role may read only that path; an org without one fetches public
//! repositories only. Values are never logged.

use async_trait::async_trait;

use crate::adapters::aws::aws_error;
use crate::domain::error::{Error, Result};
use crate::domain::plugin::validate_workspace_id;
use crate::ports::Credentials;

pub struct SsmCredentials {
    ssm: aws_sdk_ssm::Client,
    prefix: String,
}

impl SsmCredentials {
    pub fn new(ssm: aws_sdk_ssm::Client, prefix: &str) -> Self {
        SsmCredentials {
            ssm,
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// The parameter holding `org`'s GitHub token.
    pub fn github_parameter(&self, org: &str) -> String {
        format!("{}/{org}/github-token", self.prefix)
    }
}

#[async_trait]
impl Credentials for SsmCredentials {
    async fn github_token(&self, org: &str) -> Result<Option<String>> {
        // The org id becomes a path segment: only a plain id may.
        validate_workspace_id(org).map_err(|_| Error::internal(format!("org id {org:?}")))?;
        let out = self
            .ssm
            .get_parameter()
            .name(self.github_parameter(org))
            .with_decryption(true)
            .send()
            .await;
        match out {
            Ok(o) => Ok(o
                .parameter()
                .and_then(|p| p.value())
                .filter(|v| !v.is_empty())
                .map(str::to_string)),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_parameter_not_found()) =>
            {
                Ok(None)
            }
            // Fail closed: a token we cannot read is not "no token".
            Err(e) => Err(aws_error("SSM", "GetParameter (org GitHub token)", &e)),
        }
    }
}
