//! Getting a command (and an archive) to a host.
//!
//! `HostTransport` is the port. Two adapters implement it: `ssh` (EC2
//! Instance Connect + SSH, the archive on stdin) and `ssm` (SSM Run Command,
//! the host downloads the archive from a presigned URL). Both run the same
//! embedded host script (`hostscript`), so results and guarantees cannot
//! drift apart. `ByAccess` picks one per host from its `molecule:access` tag.

mod ssh;
mod ssm;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;
use crate::fleet::{Access, Host};
use crate::hostscript::{HostCommand, HostOutput};

pub use ssh::{EicKeyPusher, KeyPusher, SshTransport};
pub use ssm::{SsmSettings, SsmTransport};

/// The plugin archive an install delivers: already staged in S3 under its
/// digest, and on local disk for transports that stream it.
#[derive(Debug, Clone, Copy)]
pub struct Payload<'a> {
    pub path: &'a Path,
    pub sha256: &'a str,
}

impl<'a> From<&'a crate::archive::ArchiveFile> for Payload<'a> {
    fn from(a: &'a crate::archive::ArchiveFile) -> Self {
        Payload {
            path: a.path(),
            sha256: &a.sha256,
        }
    }
}

#[async_trait]
pub trait HostTransport: Send + Sync {
    /// Runs the host script with `cmd`, delivering `payload` (if any) to it,
    /// and returns its output; the caller interprets it.
    async fn run(
        &self,
        host: &Host,
        cmd: &HostCommand,
        payload: Option<&Payload<'_>>,
    ) -> Result<HostOutput>;
}

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
}
