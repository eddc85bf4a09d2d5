//! The hand-off port on SQS: a job is one message on the operations queue,
//! which the reinstall function consumes (and redelivers after a failure).

use async_trait::async_trait;

use crate::adapters::aws::aws_error;
use crate::domain::error::{Error, Result};
use crate::domain::job::Job;
use crate::ports::Handoff;

pub struct SqsHandoff {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

impl SqsHandoff {
    pub fn new(client: aws_sdk_sqs::Client, queue_url: impl Into<String>) -> Self {
        SqsHandoff {
            client,
            queue_url: queue_url.into(),
        }
    }
}

#[async_trait]
impl Handoff for SqsHandoff {
    async fn hand_off(&self, job: &Job) -> Result<()> {
        let body = serde_json::to_string(job).map_err(Error::internal)?;
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .send()
            .await
            .map_err(|e| aws_error("SQS", "SendMessage", &e))?;
        Ok(())
    }
}
