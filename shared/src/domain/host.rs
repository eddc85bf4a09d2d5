//! A workspace's host as the use cases see it: which instance, how it is
//! reached (SSH or SSM) and what its tags say. Filled in by the fleet
//! adapter from EC2; nothing here talks to AWS.

pub const TAG_WORKSPACE: &str = "molecule:workspace-id";
pub const TAG_RUNTIME: &str = "molecule:runtime";
pub const TAG_HOST_KEY: &str = "molecule:ssh-host-key";
pub const TAG_ORG: &str = "molecule:org-id";
/// `ssh` (sshd + EC2 Instance Connect) or `ssm` (hardened: SSM Run Command).
pub const TAG_ACCESS: &str = "molecule:access";
/// Optional: this instance keeps its runtime config somewhere other than
/// the runtime profile says (also how several local-stack hosts share a
/// machine).
pub const TAG_CONFIG_DIR: &str = "molecule:config-dir";

/// How a host is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    #[default]
    Ssh,
    Ssm,
}

impl Access {
    pub fn parse(v: &str) -> Option<Access> {
        match v.trim().to_ascii_lowercase().as_str() {
            "ssh" => Some(Access::Ssh),
            "ssm" => Some(Access::Ssm),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Access::Ssh => "ssh",
            Access::Ssm => "ssm",
        }
    }
}

/// A workspace's running instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub instance_id: String,
    pub access: Access,
    /// Where to connect: private IP (or the address tag on the local stack).
    /// Empty for SSM hosts without one: Run Command needs no address.
    pub address: String,
    pub port: u16,
    pub runtime: String,
    pub availability_zone: Option<String>,
    /// OpenSSH public key line from the `molecule:ssh-host-key` tag.
    pub published_host_key: Option<String>,
    pub org_id: Option<String>,
    /// The instance's own config dir (tag), overriding the runtime profile.
    pub config_dir: Option<String>,
    /// Rollouts bound concurrency per VPC (an EIC Endpoint takes 20).
    pub vpc_id: Option<String>,
}
