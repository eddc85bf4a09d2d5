//! The SSM adapter, for hardened hosts that run no sshd: SSM Run Command
//! (`AWS-RunShellScript`) runs the same host script as root. There is no
//! stdin, so the host downloads the staged archive itself from a presigned
//! S3 URL that expires within minutes; the script checks its SHA-256 as it
//! does for the SSH stream.
//!
//! Sequence: DescribeInstanceInformation (agent online?; an install asks it
//! through `open`, beside its resolve and staging) → SendCommand →
//! GetCommandInvocation with backoff until a terminal status → `HostOutput`.
//! A command still running when our wait ends is cancelled, so nothing
//! changes behind a caller who was told 504.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_ssm::error::ProvideErrorMetadata;
use aws_sdk_ssm::operation::get_command_invocation::{
    GetCommandInvocationError, GetCommandInvocationOutput as Invocation,
};
use aws_sdk_ssm::types::{CommandInvocationStatus, InstanceInformationStringFilter, PingStatus};

use crate::adapters::aws::aws_error;
use crate::domain::error::{Error, Result};
use crate::domain::host::Host;
use crate::domain::hostscript::{HostCommand, HostOutput};
use crate::ports::{ArchiveStore, HostTransport, Opened, Payload};

/// The document every command uses; the IAM policy allows only this one.
pub const DOCUMENT: &str = "AWS-RunShellScript";

#[derive(Debug, Clone)]
pub struct SsmSettings {
    /// Lifetime of the archive's presigned URL (at most 5 minutes).
    pub url_ttl: Duration,
    /// How long we poll before cancelling the command and answering 504.
    pub max_wait: Duration,
    /// The command's own `executionTimeout`: a backstop should our cancel
    /// never arrive (the function itself timed out).
    pub execution_timeout: Duration,
    /// SendCommand `TimeoutSeconds`: how long an undelivered command waits
    /// for its agent (the service's minimum is 30).
    pub delivery_timeout: Duration,
}

pub struct SsmTransport {
    client: aws_sdk_ssm::Client,
    archives: Arc<dyn ArchiveStore>,
    settings: SsmSettings,
}

impl SsmTransport {
    /// GetCommandInvocation is polled and SendCommand bursts in rollouts:
    /// the SDK's standard retry (with jitter) absorbs throttling.
    pub fn new(
        client: aws_sdk_ssm::Client,
        archives: Arc<dyn ArchiveStore>,
        settings: SsmSettings,
    ) -> Self {
        let retry = aws_config::retry::RetryConfig::standard()
            .with_max_attempts(6)
            .with_initial_backoff(Duration::from_millis(100))
            .with_max_backoff(Duration::from_secs(2));
        // One slow call must not eat the operation's budget: polls retry.
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .operation_attempt_timeout(Duration::from_secs(5))
            .build();
        let conf = client
            .config()
            .to_builder()
            .retry_config(retry)
            .timeout_config(timeouts)
            .build();
        SsmTransport {
            client: aws_sdk_ssm::Client::from_conf(conf),
            archives,
            settings,
        }
    }

    fn not_reachable(detail: impl std::fmt::Display) -> Error {
        Error::unavailable(
            "SSM agent not reachable: the workspace's host is not online in Systems Manager",
        )
        .with_detail(detail)
    }

    /// An agent that is not `Online` would leave the command pending until
    /// the delivery timeout: refuse at once instead, with nothing sent.
    async fn check_online(&self, host: &Host) -> Result<()> {
        let filter = InstanceInformationStringFilter::builder()
            .key("InstanceIds")
            .values(&host.instance_id)
            .build()
            .map_err(Error::internal)?;
        let out = self
            .client
            .describe_instance_information()
            .filters(filter)
            .send()
            .await
            .map_err(|e| aws_error("Systems Manager", "DescribeInstanceInformation", &e))?;
        let info = out
            .instance_information_list()
            .iter()
            .find(|i| i.instance_id() == Some(host.instance_id.as_str()));
        match info.and_then(|i| i.ping_status()) {
            Some(PingStatus::Online) => Ok(()),
            Some(other) => Err(Self::not_reachable(format!(
                "instance {} ping status {}",
                host.instance_id,
                other.as_str()
            ))),
            None => Err(Self::not_reachable(format!(
                "instance {} is not a managed instance",
                host.instance_id
            ))),
        }
    }

    async fn send(&self, host: &Host, cmd: &HostCommand, script: String) -> Result<String> {
        let out = self
            .client
            .send_command()
            .document_name(DOCUMENT)
            .instance_ids(&host.instance_id)
            .parameters("commands", vec![script])
            .parameters(
                "executionTimeout",
                vec![self.settings.execution_timeout.as_secs().max(1).to_string()],
            )
            .timeout_seconds(self.settings.delivery_timeout.as_secs().max(30) as i32)
            // Visible in the console's command history: what, never how.
            // The service caps comments at 100 characters (names go to 128).
            .comment(truncate(&format!("plugin-delivery {}", cmd.summary()), 100))
            .send()
            .await;
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                let code = e.code().unwrap_or_default().to_string();
                let detail = format!("SendCommand {code}: {e:?}");
                return Err(match code.as_str() {
                    // The instance is not (or no longer) a managed instance.
                    "InvalidInstanceId" => Self::not_reachable(detail),
                    _ => aws_error("Systems Manager", "SendCommand", &e),
                });
            }
        };
        out.command()
            .and_then(|c| c.command_id())
            .map(str::to_string)
            .ok_or_else(|| Error::internal("SendCommand returned no command id"))
    }

    /// The invocation's state; `None` while it does not exist yet (right
    /// after SendCommand the service may not know it).
    async fn get(&self, host: &Host, command_id: &str) -> Result<Option<Invocation>> {
        let r = self
            .client
            .get_command_invocation()
            .command_id(command_id)
            .instance_id(&host.instance_id)
            .send()
            .await;
        match r {
            Ok(inv) => Ok(Some(inv)),
            Err(e)
                if matches!(
                    e.as_service_error(),
                    Some(GetCommandInvocationError::InvocationDoesNotExist(_))
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(aws_error("Systems Manager", "GetCommandInvocation", &e)),
        }
    }

    /// Asks the agent to stop the command, within `CANCEL_BUDGET`. The agent
    /// kills the script outright (SIGKILL); the script's atomic swap means
    /// the host keeps either the old or the complete new version.
    async fn cancel(&self, host: &Host, command_id: &str) -> bool {
        let call = self
            .client
            .cancel_command()
            .command_id(command_id)
            .instance_ids(&host.instance_id)
            .send();
        match tokio::time::timeout(CANCEL_BUDGET, call).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::warn!(command_id, error = ?e, "could not cancel an SSM command");
                false
            }
            Err(_) => {
                tracing::warn!(command_id, "cancelling an SSM command timed out");
                false
            }
        }
    }

    /// The deadline has come: cancel, then one last look. A result that
    /// landed just before the cancel stands; otherwise 504, or 503 when the
    /// agent never even started the command.
    async fn give_up(
        &self,
        host: &Host,
        command_id: &str,
        guard: &mut CancelOnDrop,
        started: bool,
        limit: Duration,
    ) -> Result<Invocation> {
        if self.cancel(host, command_id).await {
            guard.armed = false;
        }
        if let Ok(Ok(Some(inv))) =
            tokio::time::timeout(LAST_LOOK_BUDGET, self.get(host, command_id)).await
        {
            if matches!(
                inv.status(),
                Some(CommandInvocationStatus::Success | CommandInvocationStatus::Failed)
            ) {
                return Ok(inv);
            }
        }
        let detail = format!(
            "command {command_id} on {} not finished at the deadline; cancelled",
            host.instance_id
        );
        if started {
            Err(crate::domain::deadline::exceeded(limit).with_detail(detail))
        } else {
            Err(Self::not_reachable(detail))
        }
    }
}

/// Last resort if the operation is dropped mid-poll (an outer deadline we
/// did not see coming): a best-effort cancel from a spawned task. The normal
/// path cancels synchronously in `give_up`, before the deadline; in Lambda a
/// spawned task may not run once the response is sent.
struct CancelOnDrop {
    client: aws_sdk_ssm::Client,
    command_id: String,
    instance_id: String,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let client = self.client.clone();
        let (command_id, instance_id) = (self.command_id.clone(), self.instance_id.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = client
                    .cancel_command()
                    .command_id(command_id)
                    .instance_ids(instance_id)
                    .send()
                    .await;
            });
        }
    }
}

/// Time kept before the operation deadline to cancel the command and take
/// one last look (each bounded below), so the 504 comes from us.
const CANCEL_MARGIN: Duration = Duration::from_millis(1500);
const CANCEL_BUDGET: Duration = Duration::from_millis(1000);
const LAST_LOOK_BUDGET: Duration = Duration::from_millis(400);

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// The next poll interval: quick first looks (a plugin install takes well
/// under a second on the host), then slower, capped at one second.
fn next_delay(d: Duration) -> Duration {
    (d.mul_f32(1.6)).min(Duration::from_secs(1))
}

impl SsmTransport {
    /// Sends the command: the archive as a short-lived presigned URL (SSM
    /// keeps command parameters in its history for 30 days; the URL is never
    /// logged). Run Command runs as root: no privilege prefix.
    async fn start(
        &self,
        host: &Host,
        cmd: &HostCommand,
        payload: Option<&Payload<'_>>,
    ) -> Result<CancelOnDrop> {
        let mut env = Vec::new();
        if let Some(p) = payload {
            let url = self
                .archives
                .presign(p.sha256, self.settings.url_ttl)
                .await?;
            env.push(("PLUGIN_ARCHIVE_URL", url));
        }
        let script = cmd.render_with_env("", &env);
        let command_id = self.send(host, cmd, script).await?;
        Ok(CancelOnDrop {
            client: self.client.clone(),
            command_id,
            instance_id: host.instance_id.clone(),
            armed: true,
        })
    }

    /// Polls until the command ends, backing off. Stops early enough to
    /// cancel before the operation's own deadline answers: the caller's 504
    /// then means "nothing changed". The invocation and the number of polls.
    async fn wait(
        &self,
        host: &Host,
        guard: &mut CancelOnDrop,
        t0: Instant,
    ) -> Result<(Invocation, u32)> {
        let command_id = guard.command_id.clone();
        let (stop_at, limit) = match crate::domain::deadline::current() {
            Some((at, limit)) => (at.checked_sub(CANCEL_MARGIN).unwrap_or(at), limit),
            None => (t0 + self.settings.max_wait, self.settings.max_wait),
        };
        let stop_at = stop_at.min(t0 + self.settings.max_wait);
        let mut delay = Duration::from_millis(25);
        let mut polls = 0u32;
        // Seen running: a command never picked up is the agent's fault (503),
        // one that ran too long is the host's (504).
        let mut started = false;
        loop {
            let now = Instant::now();
            if now >= stop_at {
                let inv = self
                    .give_up(host, &command_id, guard, started, limit)
                    .await?;
                return Ok((inv, polls));
            }
            tokio::time::sleep(delay.min(stop_at - now)).await;
            delay = next_delay(delay);
            polls += 1;
            // A slow poll must not carry us past the deadline either.
            let left = stop_at.saturating_duration_since(Instant::now());
            let Ok(polled) = tokio::time::timeout(left, self.get(host, &command_id)).await else {
                continue;
            };
            let Some(inv) = polled? else {
                continue;
            };
            match inv.status() {
                Some(CommandInvocationStatus::Pending | CommandInvocationStatus::Delayed)
                | None => continue,
                Some(CommandInvocationStatus::InProgress | CommandInvocationStatus::Cancelling) => {
                    started = true;
                }
                Some(_) => return Ok((inv, polls)),
            }
        }
    }
}

/// What an ended invocation means: the script's output (its result line
/// decides, exactly as over SSH), or the service's own verdict.
fn outcome(inv: &Invocation, detail: String) -> Result<HostOutput> {
    let status = inv.status().map(|s| s.as_str()).unwrap_or_default();
    let details = inv.status_details().unwrap_or_default();
    let timed_out = || {
        Error::deadline("the host did not finish the operation in time (the command timed out)")
            .with_detail(detail.clone())
    };
    match (status, details) {
        // Details first: an undeliverable command may carry any status.
        (_, "Undeliverable" | "DeliveryTimedOut") => Err(SsmTransport::not_reachable(detail)),
        (_, "ExecutionTimedOut") => Err(timed_out()),
        // A failed command still reports busy, digest_mismatch, ...
        ("Success" | "Failed", _) => Ok(HostOutput {
            exit_status: u32::try_from(inv.response_code()).ok(),
            exit_signal: None,
            exec_refused: false,
            stdout: inv
                .standard_output_content()
                .unwrap_or_default()
                .to_string(),
            stderr: inv.standard_error_content().unwrap_or_default().to_string(),
        }),
        ("TimedOut", _) => Err(timed_out()),
        ("Cancelled", _) => Err(Error::host_failed(
            "the command was cancelled on the host before it finished",
        )
        .with_detail(detail)),
        _ => Err(Error::host_failed("the host command did not complete").with_detail(detail)),
    }
}

#[async_trait]
impl HostTransport for SsmTransport {
    async fn run(
        &self,
        host: &Host,
        cmd: &HostCommand,
        payload: Option<&Payload<'_>>,
    ) -> Result<HostOutput> {
        self.run_opened(None, host, cmd, payload).await
    }

    /// The agent's online check, ahead of the command (beside the resolve
    /// and staging): an offline agent is still a 503 with nothing sent.
    async fn open(&self, host: &Host) -> Result<Option<Opened>> {
        self.check_online(host).await?;
        Ok(Some(Opened(Box::new(OnlineChecked(
            host.instance_id.clone(),
        )))))
    }

    async fn run_opened(
        &self,
        opened: Option<Opened>,
        host: &Host,
        cmd: &HostCommand,
        payload: Option<&Payload<'_>>,
    ) -> Result<HostOutput> {
        let t0 = Instant::now();
        let checked = opened
            .and_then(|o| o.0.downcast::<OnlineChecked>().ok())
            .is_some_and(|c| c.0 == host.instance_id);
        if !checked {
            self.check_online(host).await?;
        }
        let mut guard = self.start(host, cmd, payload).await?;
        let sent_ms = t0.elapsed().as_millis() as u64;
        let (inv, polls) = self.wait(host, &mut guard, t0).await?;
        guard.armed = false;
        let status = inv.status().map(|s| s.as_str()).unwrap_or_default();
        tracing::debug!(
            instance = %host.instance_id,
            sent_ms,
            polls,
            total_ms = t0.elapsed().as_millis() as u64,
            status = %status,
            "ssm timings"
        );
        let detail = format!(
            "command {} on {}: {status}/{} exit {}",
            guard.command_id,
            host.instance_id,
            inv.status_details().unwrap_or_default(),
            inv.response_code()
        );
        outcome(&inv, detail)
    }
}

/// `open` found this instance's agent online.
struct OnlineChecked(String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_backs_off_to_a_second() {
        let mut d = Duration::from_millis(25);
        let mut total = Duration::ZERO;
        for _ in 0..20 {
            total += d;
            d = next_delay(d);
        }
        assert_eq!(d, Duration::from_secs(1));
        // Twenty polls cover about ten seconds, not hundreds of calls.
        assert!(total > Duration::from_secs(8) && total < Duration::from_secs(16));
    }
}
