//! Ports a function has no use for, wired as refusals. The allowlist
//! function is built with these in place of the fleet (EC2), the host
//! transports (EC2 Instance Connect + SSH, SSM Run Command) and the
//! fetcher (https); the read functions in place of the transports and the
//! fetcher; the download function in place of the transports. A binary
//! then links none of those clients. Should a call reach one anyway (a
//! wiring mistake), it fails closed with an internal error instead of
//! acting.

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::domain::error::{Error, Result};
use crate::domain::host::Host;
use crate::domain::hostscript::{HostCommand, HostOutput};
use crate::ports::{Body, Fetcher, Fleet, Growing, HostTransport, Opened, Payload};

/// Workspaces, their hosts and outside sources, all absent.
pub struct NoHosts;

fn absent(what: &str) -> Error {
    Error::internal(format!("this function is built without {what}"))
}

#[async_trait]
impl Fleet for NoHosts {
    async fn locate(&self, _workspace: &str) -> Result<Host> {
        Err(absent("the fleet"))
    }

    async fn locate_all(&self, _workspaces: &[String]) -> Result<BTreeMap<String, Result<Host>>> {
        Err(absent("the fleet"))
    }

    async fn host_keys(&self, _host: &Host) -> Result<Vec<String>> {
        Err(absent("the fleet"))
    }

    async fn workspace_of(&self, _instance_id: &str) -> Result<Option<String>> {
        Err(absent("the fleet"))
    }

    async fn org_tags(&self, _workspace: &str) -> Result<Vec<Option<String>>> {
        Err(absent("the fleet"))
    }
}

/// Every way in refuses, `open` and `start` too: an install reaching this
/// wiring fails before anything is started, not after its plugin is built.
#[async_trait]
impl HostTransport for NoHosts {
    async fn run(
        &self,
        _host: &Host,
        _cmd: &HostCommand,
        _payload: Option<&Payload<'_>>,
    ) -> Result<HostOutput> {
        Err(absent("host transports"))
    }

    async fn open(&self, _host: &Host) -> Result<Option<Opened>> {
        Err(absent("host transports"))
    }

    async fn start(
        &self,
        _opened: Option<Opened>,
        _host: &Host,
        _cmd: &HostCommand,
    ) -> Result<Option<Opened>> {
        Err(absent("host transports"))
    }

    async fn run_opened(
        &self,
        _opened: Option<Opened>,
        _host: &Host,
        _cmd: &HostCommand,
        _payload: Option<&Payload<'_>>,
    ) -> Result<HostOutput> {
        Err(absent("host transports"))
    }

    async fn run_framed(
        &self,
        _opened: Option<Opened>,
        _host: &Host,
        _started: &HostCommand,
        _name: &str,
        _growing: Growing,
    ) -> Result<HostOutput> {
        Err(absent("host transports"))
    }
}

#[async_trait]
impl Fetcher for NoHosts {
    async fn github_tarball(
        &self,
        _owner: &str,
        _repo: &str,
        _reference: &str,
        _token: Option<&str>,
        _source: &str,
    ) -> Result<Body> {
        Err(absent("fetching"))
    }

    async fn https(&self, _url: &str, _source: &str) -> Result<Body> {
        Err(absent("fetching"))
    }
}
