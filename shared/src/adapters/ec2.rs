//! The fleet: which EC2 instance is a workspace's host, and how to trust it.

use async_trait::async_trait;
use std::collections::BTreeMap;

use aws_sdk_ec2::types::{Filter, Instance, InstanceStateName};
use aws_sdk_ec2::Client;
use base64::Engine;

use crate::domain::caller::workspace_org;
use crate::domain::error::{Error, Result};
use crate::domain::host::*;
use crate::ports::Fleet;

pub struct Ec2Fleet {
    client: Client,
    /// Default SSH port.
    port: u16,
    /// Read the address from this tag instead of the private IP.
    address_tag: Option<String>,
    /// Access mode of instances without a `molecule:access` tag.
    default_access: Access,
}

impl Ec2Fleet {
    pub fn new(
        client: Client,
        port: u16,
        address_tag: Option<String>,
        default_access: Access,
    ) -> Self {
        Ec2Fleet {
            client,
            port,
            address_tag,
            default_access,
        }
    }
}

fn ambiguous(workspace: &str, n: usize) -> Error {
    Error::conflict(format!(
        "{n} running instances carry the tag of workspace {workspace:?}; \
         refusing to guess which one is its host"
    ))
}

impl Ec2Fleet {
    /// Running instances matching `filter`, with their workspace tag.
    async fn running(&self, filter: Filter) -> Result<Vec<(Option<String>, Instance)>> {
        self.in_states(filter, &["running"]).await
    }

    /// The workspace's instances that are not gone (terminated).
    async fn not_gone(&self, workspace: &str) -> Result<Vec<(Option<String>, Instance)>> {
        let tagged = Filter::builder()
            .name(format!("tag:{TAG_WORKSPACE}"))
            .values(workspace)
            .build();
        self.in_states(tagged, &NOT_GONE).await
    }

    /// Instances matching `filter` in one of `states`, with their workspace tag.
    async fn in_states(
        &self,
        filter: Filter,
        states: &[&str],
    ) -> Result<Vec<(Option<String>, Instance)>> {
        let mut state_filter = Filter::builder().name("instance-state-name");
        for s in states {
            state_filter = state_filter.values(*s);
        }
        let mut pages = self
            .client
            .describe_instances()
            .filters(filter)
            .filters(state_filter.build())
            .into_paginator()
            .send();
        let mut found = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| ec2_error("describe instances", e))?;
            for r in page.reservations() {
                for inst in r.instances() {
                    let ws = inst
                        .tags()
                        .iter()
                        .find(|t| t.key() == Some(TAG_WORKSPACE))
                        .and_then(|t| t.value())
                        .map(str::to_string);
                    found.push((ws, inst.clone()));
                }
            }
        }
        Ok(found)
    }

    /// A workspace's host from its instance's tags and addresses.
    fn host_of(&self, workspace: &str, inst: Instance) -> Result<Host> {
        let tag = |k: &str| {
            inst.tags()
                .iter()
                .find(|t| t.key() == Some(k))
                .and_then(|t| t.value())
                .map(str::to_string)
                .filter(|v| !v.is_empty())
        };
        let instance_id = inst.instance_id().unwrap_or_default().to_string();
        let access = match tag(TAG_ACCESS) {
            None => self.default_access,
            // A typo must not silently pick a transport the host may refuse.
            Some(v) => Access::parse(&v).ok_or_else(|| {
                Error::host_failed(format!(
                    "workspace {workspace:?}'s instance has an invalid {TAG_ACCESS} tag \
                     (expected \"ssh\" or \"ssm\")"
                ))
                .with_detail(format!("instance {instance_id}: {TAG_ACCESS}={v:?}"))
            })?,
        };
        let raw_address = match &self.address_tag {
            Some(t) => tag(t),
            None => inst.private_ip_address().map(str::to_string),
        };
        let (address, port) = match (raw_address, access) {
            (Some(a), _) => split_address(&a, self.port),
            (None, Access::Ssm) => (String::new(), self.port),
            (None, Access::Ssh) => {
                return Err(Error::unavailable(format!(
                    "workspace {workspace:?}'s instance has no reachable address"
                ))
                .with_detail(format!(
                    "instance {instance_id} has no private IP / address tag"
                )))
            }
        };
        Ok(Host {
            instance_id,
            access,
            address,
            port,
            runtime: tag(TAG_RUNTIME).unwrap_or_default(),
            availability_zone: inst
                .placement()
                .and_then(|p| p.availability_zone())
                .map(str::to_string),
            published_host_key: tag(TAG_HOST_KEY),
            org_id: tag(TAG_ORG),
            config_dir: tag(TAG_CONFIG_DIR).filter(|d| d.starts_with('/')),
            vpc_id: inst.vpc_id().map(str::to_string),
        })
    }
}

/// Instance states that still belong to their workspace.
const NOT_GONE: [&str; 4] = ["pending", "running", "stopping", "stopped"];

fn org_tag(inst: &Instance) -> Option<String> {
    inst.tags()
        .iter()
        .find(|t| t.key() == Some(TAG_ORG))
        .and_then(|t| t.value())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

fn ec2_error<E: std::fmt::Debug>(what: &str, e: E) -> Error {
    Error::unavailable("the EC2 API is not available right now")
        .with_detail(format!("{what}: {e:?}"))
}

/// `host`, `host:port` or `[v6]:port`.
pub fn split_address(addr: &str, default_port: u16) -> (String, u16) {
    if let Some(rest) = addr.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once("]:") {
            if let Ok(p) = p.parse() {
                return (h.to_string(), p);
            }
        }
        return (rest.trim_end_matches(']').to_string(), default_port);
    }
    match addr.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(p) => (h.to_string(), p),
            Err(_) => (addr.to_string(), default_port),
        },
        _ => (addr.to_string(), default_port),
    }
}

#[async_trait]
impl Fleet for Ec2Fleet {
    async fn locate(&self, workspace: &str) -> Result<Host> {
        // Every instance that is not gone, in one call: the running one is
        // the host, and all of them together say whose the workspace is.
        let found = self.not_gone(workspace).await?;
        let orgs: Vec<Option<String>> = found.iter().map(|(_, i)| org_tag(i)).collect();
        let mut running: Vec<Instance> = found
            .into_iter()
            .map(|(_, i)| i)
            .filter(|i| i.state().and_then(|s| s.name()) == Some(&InstanceStateName::Running))
            .collect();
        match running.len() {
            0 => Err(Error::not_found(format!(
                "workspace {workspace:?} has no running instance"
            ))),
            1 => {
                let mut host = self.host_of(workspace, running.remove(0))?;
                // Instances that disagree on the org belong to nobody.
                host.org_id = workspace_org(&orgs);
                Ok(host)
            }
            n => Err(ambiguous(workspace, n)),
        }
    }

    async fn locate_all(&self, workspaces: &[String]) -> Result<BTreeMap<String, Result<Host>>> {
        // One paginated call for the whole fleet instead of one per
        // workspace: rollouts and repairs touch hundreds of workspaces.
        let found = self
            .running(
                Filter::builder()
                    .name("tag-key")
                    .values(TAG_WORKSPACE)
                    .build(),
            )
            .await?;
        let mut by_ws: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        for (ws, inst) in found {
            if let Some(ws) = ws {
                by_ws.entry(ws).or_default().push(inst);
            }
        }
        Ok(workspaces
            .iter()
            .map(|ws| {
                let host = match by_ws.remove(ws) {
                    None => Err(Error::not_found(format!(
                        "workspace {ws:?} has no running instance"
                    ))),
                    Some(mut v) if v.len() == 1 => self.host_of(ws, v.remove(0)),
                    Some(v) => Err(ambiguous(ws, v.len())),
                };
                (ws.clone(), host)
            })
            .collect())
    }

    async fn workspace_of(&self, instance_id: &str) -> Result<Option<String>> {
        let out = self
            .client
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await;
        let out = match out {
            Ok(o) => o,
            // An id EC2 does not know (terminated long ago): no workspace.
            Err(e) if format!("{e:?}").contains("InvalidInstanceID") => return Ok(None),
            Err(e) => return Err(ec2_error("describe instance", e)),
        };
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .flat_map(|i| i.tags())
            .find(|t| t.key() == Some(TAG_WORKSPACE))
            .and_then(|t| t.value())
            .filter(|v| {
                // A tag value is free text: only a valid id may name keys.
                let ok = crate::domain::plugin::validate_workspace_id(v).is_ok();
                if !ok {
                    tracing::warn!(instance = instance_id, "invalid workspace tag; ignored");
                }
                ok
            })
            .map(str::to_string))
    }

    async fn org_tags(&self, workspace: &str) -> Result<Vec<Option<String>>> {
        let found = self.not_gone(workspace).await?;
        Ok(found.iter().map(|(_, inst)| org_tag(inst)).collect())
    }

    async fn host_keys(&self, host: &Host) -> Result<Vec<String>> {
        if let Some(k) = &host.published_host_key {
            return Ok(vec![k.clone()]);
        }
        let out = self
            .client
            .get_console_output()
            .instance_id(&host.instance_id)
            .send()
            .await
            .map_err(|e| ec2_error("get console output", e))?;
        let text = out
            .output()
            .and_then(|b64| {
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .ok()
            })
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        Ok(console_host_keys(&text))
    }
}

/// The keys cloud-init prints between its `BEGIN/END SSH HOST KEY KEYS`
/// markers. Console lines may carry a kernel-log prefix; keep the key part.
pub fn console_host_keys(console: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut inside = false;
    for line in console.lines() {
        if line.contains("-----BEGIN SSH HOST KEY KEYS-----") {
            inside = true;
            continue;
        }
        if line.contains("-----END SSH HOST KEY KEYS-----") {
            inside = false;
            continue;
        }
        if !inside {
            continue;
        }
        let start = ["ssh-ed25519 ", "ecdsa-sha2-", "ssh-rsa "]
            .iter()
            .filter_map(|p| line.find(p))
            .min();
        if let Some(i) = start {
            keys.push(line[i..].trim().to_string());
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_keys() {
        let text = "boot\r\n-----BEGIN SSH HOST KEY KEYS-----\n[   12.3] ecdsa-sha2-nistp256 AAAAE2 root@h\nssh-ed25519 AAAAC3Nz root@h\r\n-----END SSH HOST KEY KEYS-----\nssh-rsa AAAAB3 later\n";
        assert_eq!(
            console_host_keys(text),
            [
                "ecdsa-sha2-nistp256 AAAAE2 root@h",
                "ssh-ed25519 AAAAC3Nz root@h"
            ]
        );
        assert!(console_host_keys("nothing").is_empty());
    }

    #[test]
    fn addresses() {
        assert_eq!(split_address("10.0.0.5", 22), ("10.0.0.5".into(), 22));
        assert_eq!(
            split_address("127.0.0.9:2222", 22),
            ("127.0.0.9".into(), 2222)
        );
        assert_eq!(split_address("[::1]:2200", 22), ("::1".into(), 2200));
    }
}
