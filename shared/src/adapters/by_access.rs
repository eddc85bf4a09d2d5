//! One host transport over the two real ones: each host goes to the
//! transport its access mode (`molecule:access` tag) names.

use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::error::Result;
use crate::domain::host::{Access, Host};
use crate::domain::hostscript::{HostCommand, HostOutput};
use crate::ports::{Growing, HostTransport, Opened, Payload};

/// Routes each host to the transport its access mode names.
pub struct ByAccess {
    pub ssh: Arc<dyn HostTransport>,
    pub ssm: Arc<dyn HostTransport>,
}

#[async_trait]
impl HostTransport for ByAccess {
    async fn run(
        &self,
        host: &Host,
        cmd: &HostCommand,
        payload: Option<&Payload<'_>>,
    ) -> Result<HostOutput> {
        match host.access {
            Access::Ssh => self.ssh.run(host, cmd, payload).await,
            Access::Ssm => self.ssm.run(host, cmd, payload).await,
        }
    }

    async fn open(&self, host: &Host) -> Result<Option<Opened>> {
        match host.access {
            Access::Ssh => self.ssh.open(host).await,
            Access::Ssm => self.ssm.open(host).await,
        }
    }

    async fn start(
        &self,
        opened: Option<Opened>,
        host: &Host,
        cmd: &HostCommand,
    ) -> Result<Option<Opened>> {
        match host.access {
            Access::Ssh => self.ssh.start(opened, host, cmd).await,
            Access::Ssm => self.ssm.start(opened, host, cmd).await,
        }
    }

    async fn close(&self, opened: Opened, host: &Host) {
        match host.access {
            Access::Ssh => self.ssh.close(opened, host).await,
            Access::Ssm => self.ssm.close(opened, host).await,
        }
    }

    async fn run_opened(
        &self,
        opened: Option<Opened>,
        host: &Host,
        cmd: &HostCommand,
        payload: Option<&Payload<'_>>,
    ) -> Result<HostOutput> {
        match host.access {
            Access::Ssh => self.ssh.run_opened(opened, host, cmd, payload).await,
            Access::Ssm => self.ssm.run_opened(opened, host, cmd, payload).await,
        }
    }

    async fn run_framed(
        &self,
        opened: Option<Opened>,
        host: &Host,
        started: &HostCommand,
        name: &str,
        growing: Growing,
    ) -> Result<HostOutput> {
        match host.access {
            Access::Ssh => {
                self.ssh
                    .run_framed(opened, host, started, name, growing)
                    .await
            }
            Access::Ssm => {
                self.ssm
                    .run_framed(opened, host, started, name, growing)
                    .await
            }
        }
    }
}
