//! Deployment configuration, read once at cold start from the environment.
//! Endpoints are not configured here: the AWS SDK reads the standard
//! `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_<SERVICE>` variables itself.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::domain::error::{Error, Result};
use crate::domain::host::{Access, Host, TAG_CONFIG_DIR};
use crate::domain::netguard::FetchPolicy;
use crate::domain::rollout::Threshold;

/// Where a runtime keeps its config and how to restart it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RuntimeProfile {
    pub config_dir: String,
    pub restart: String,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bucket: String,
    /// OS user the ephemeral key is pushed for and SSH logs in as.
    pub ssh_user: String,
    pub ssh_port: u16,
    /// When set, the SSH address (`host` or `host:port`) is read from this
    /// instance tag instead of the private IP (the local stack uses it).
    pub address_tag: Option<String>,
    /// Local experiments only: accept any host key.
    pub insecure_ignore_host_key: bool,
    /// Run the host script through this (default `sudo -n`; empty when the
    /// login user is already root).
    pub command_prefix: String,
    /// Overrides of the built-in runtime profiles, by runtime name;
    /// the key `default` replaces the fallback profile.
    pub profiles: BTreeMap<String, RuntimeProfile>,
    /// Owner of the installed files on the host: numeric `uid:gid`, never
    /// root's. Everything the host script does in the config dir runs as it.
    pub owner: String,
    /// Directories a `molecule:config-dir` tag may name (or lie under),
    /// beside the runtime profiles' own dirs.
    pub config_dir_roots: Vec<String>,
    pub operation_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long an authenticated SSH connection is kept after an operation
    /// for the next one on the same instance (zero: never kept).
    pub ssh_reuse: Duration,
    pub max_tree_bytes: u64,
    /// How long the host script waits for the per-config-dir lock.
    pub lock_wait_secs: u64,
    /// GitHub API base URL (GitHub Enterprise, or the tests' own server).
    pub github_api: String,
    /// `github://owner/repo` without `#ref` is refused unless this is set.
    pub allow_unpinned: bool,
    /// SSM path under which each org keeps its own credentials
    /// (`<path>/<org>/github-token`). There is no deployment-wide token.
    pub org_credentials_path: String,
    /// How caller tokens are verified; `None` refuses every API request.
    pub tokens: Option<TokenSettings>,
    /// `source` of rollout events from the platform itself (any org).
    pub platform_event_source: String,
    /// Extra trusted CA certificates (PEM) for private mirrors.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// Deadline of one remote fetch.
    pub fetch_timeout: Duration,
    /// The temp space the function was granted (EphemeralStorage), when
    /// known: it bounds how many hosts a rollout or repair works on at once.
    pub temp_space: Option<u64>,
    /// Staged archives no desired state references are removed once this
    /// old (the scheduled sweep).
    pub staged_retention: Duration,
    /// Where remote fetches may go (`domain::netguard`).
    pub fetch_policy: FetchPolicy,
    /// Transport of instances without a `molecule:access` tag.
    pub default_access: Access,
    /// Lifetime of the presigned archive URL an SSM host downloads from.
    pub ssm_url_ttl: Duration,
    /// How long a reinstall waits for a new host to become reachable.
    pub ready_budget: Duration,
    /// `source` of the custom "Plugin Reinstall Requested" events we accept.
    pub event_source: String,
    /// Rollout defaults: hosts at once, hosts at once per VPC, and the error
    /// threshold (a count, or a percentage like `10%`).
    pub rollout_concurrency: usize,
    pub rollout_per_vpc: usize,
    pub rollout_error_threshold: String,
    /// SQS queue for API operations that outlast the deadline (202).
    pub operation_queue_url: Option<String>,
}

/// Where the keys that sign caller tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksFrom {
    /// An https URL serving the JWKS (the issuer's `jwks_uri`).
    Url(String),
    /// An SSM parameter holding the JWKS document.
    Parameter(String),
    /// The JWKS document itself (local runs).
    Inline(String),
}

/// What a caller token must be: from `issuer`, for `audience`, signed by
/// one of the keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSettings {
    pub issuer: String,
    pub audience: String,
    pub keys: JwksFrom,
}

impl TokenSettings {
    /// `PLUGIN_JWT_ISSUER`, `PLUGIN_JWT_AUDIENCE` and one of
    /// `PLUGIN_JWKS_URL`, `PLUGIN_JWKS_PARAMETER`, `PLUGIN_JWKS`. None of
    /// them: not configured. Some but not all: a cold-start error.
    fn from_env(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<TokenSettings>> {
        let keys = match (
            var("PLUGIN_JWKS_URL"),
            var("PLUGIN_JWKS_PARAMETER"),
            var("PLUGIN_JWKS"),
        ) {
            (Some(u), None, None) if u.starts_with("https://") => Some(JwksFrom::Url(u)),
            (Some(_), None, None) => {
                return Err(Error::internal("PLUGIN_JWKS_URL must be an https URL"))
            }
            (None, Some(p), None) => Some(JwksFrom::Parameter(p)),
            (None, None, Some(j)) => Some(JwksFrom::Inline(j)),
            (None, None, None) => None,
            _ => {
                return Err(Error::internal(
                    "set only one of PLUGIN_JWKS_URL, PLUGIN_JWKS_PARAMETER and PLUGIN_JWKS",
                ))
            }
        };
        match (var("PLUGIN_JWT_ISSUER"), var("PLUGIN_JWT_AUDIENCE"), keys) {
            (None, None, None) => Ok(None),
            (Some(issuer), Some(audience), Some(keys)) => Ok(Some(TokenSettings {
                issuer,
                audience,
                keys,
            })),
            _ => Err(Error::internal(
                "caller tokens need PLUGIN_JWT_ISSUER, PLUGIN_JWT_AUDIENCE and a JWKS source",
            )),
        }
    }
}

/// The longest presigned URL lifetime we hand to a host.
pub const MAX_SSM_URL_TTL: Duration = Duration::from_secs(300);

impl Config {
    /// Defaults for everything but the bucket.
    pub fn new(bucket: impl Into<String>) -> Self {
        Config {
            bucket: bucket.into(),
            ssh_user: "ubuntu".into(),
            ssh_port: 22,
            address_tag: None,
            insecure_ignore_host_key: false,
            command_prefix: "sudo -n".into(),
            profiles: BTreeMap::new(),
            owner: "1000:1000".into(),
            config_dir_roots: DEFAULT_CONFIG_DIR_ROOTS
                .iter()
                .map(|r| r.to_string())
                .collect(),
            operation_timeout: Duration::from_secs(25),
            connect_timeout: Duration::from_secs(10),
            ssh_reuse: Duration::from_secs(20),
            max_tree_bytes: 100 * 1024 * 1024,
            lock_wait_secs: 20,
            github_api: "https://api.github.com".into(),
            allow_unpinned: false,
            org_credentials_path: "/plugin-delivery/orgs".into(),
            tokens: None,
            platform_event_source: "molecule.plugin-delivery.platform".into(),
            extra_ca_pem: None,
            fetch_timeout: Duration::from_secs(300),
            fetch_policy: FetchPolicy::default(),
            staged_retention: Duration::from_secs(30 * 86400),
            temp_space: None,
            default_access: Access::Ssh,
            ssm_url_ttl: MAX_SSM_URL_TTL,
            ready_budget: Duration::from_secs(600),
            event_source: "molecule.plugin-delivery".into(),
            rollout_concurrency: 10,
            // An EC2 Instance Connect Endpoint takes at most 20 connections.
            rollout_per_vpc: 20,
            rollout_error_threshold: "0".into(),
            operation_queue_url: None,
        }
    }

    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let bucket =
            var("PLUGIN_BUCKET").ok_or_else(|| Error::internal("PLUGIN_BUCKET is not set"))?;
        let mut c = Config::new(bucket);
        if let Some(v) = var("PLUGIN_SSH_USER") {
            c.ssh_user = v;
        }
        if let Some(v) = var("PLUGIN_SSH_PORT") {
            c.ssh_port = parse(&v, "PLUGIN_SSH_PORT")?;
        }
        c.address_tag = var("PLUGIN_SSH_ADDRESS_TAG");
        c.insecure_ignore_host_key = var("PLUGIN_SSH_INSECURE_IGNORE_HOST_KEY")
            .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "yes"));
        // An explicitly empty prefix is meaningful (root login), so read raw.
        if let Ok(v) = std::env::var("PLUGIN_HOST_COMMAND_PREFIX") {
            c.command_prefix = v.trim().to_string();
        }
        if let Some(v) = var("PLUGIN_RUNTIME_PROFILES") {
            c.profiles = serde_json::from_str(&v)
                .map_err(|e| Error::internal(format!("PLUGIN_RUNTIME_PROFILES: {e}")))?;
        }
        if let Some(v) = var("PLUGIN_OWNER") {
            if !valid_owner(v.trim()) {
                return Err(Error::internal(
                    "PLUGIN_OWNER must be a numeric uid:gid other than root's",
                ));
            }
            c.owner = v.trim().to_string();
        }
        if let Some(v) = var("PLUGIN_CONFIG_DIR_ROOTS") {
            let roots: Vec<String> = v
                .split([',', ':'])
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(str::to_string)
                .collect();
            if let Some(bad) = roots.iter().find(|r| !plain_dir(r)) {
                return Err(Error::internal(format!(
                    "PLUGIN_CONFIG_DIR_ROOTS: {bad:?} is not an absolute, normalised directory other than /"
                )));
            }
            c.config_dir_roots = roots;
        }
        if let Some(v) = var("PLUGIN_OPERATION_TIMEOUT_SECS") {
            c.operation_timeout = Duration::from_secs(parse(&v, "PLUGIN_OPERATION_TIMEOUT_SECS")?);
        }
        if let Some(v) = var("PLUGIN_MAX_TREE_BYTES") {
            c.max_tree_bytes = parse(&v, "PLUGIN_MAX_TREE_BYTES")?;
        }
        if let Some(v) = var("PLUGIN_SSH_REUSE_SECS") {
            c.ssh_reuse = Duration::from_secs(parse(&v, "PLUGIN_SSH_REUSE_SECS")?);
        }
        if let Some(v) = var("PLUGIN_LOCK_WAIT_SECS") {
            c.lock_wait_secs = parse(&v, "PLUGIN_LOCK_WAIT_SECS")?;
        }
        if let Some(v) = var("PLUGIN_GITHUB_API_URL") {
            c.github_api = v;
        }
        c.allow_unpinned = var("PLUGIN_ALLOW_UNPINNED")
            .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "yes"));
        if let Some(v) = var("PLUGIN_ORG_CREDENTIALS_PATH") {
            if !v.starts_with('/') || v.contains("//") || v.contains("..") {
                return Err(Error::internal(
                    "PLUGIN_ORG_CREDENTIALS_PATH must be an absolute SSM path",
                ));
            }
            c.org_credentials_path = v;
        }
        c.tokens = TokenSettings::from_env(&var)?;
        if let Some(v) = var("PLUGIN_PLATFORM_EVENT_SOURCE") {
            c.platform_event_source = v;
        }
        // PEM text, or the path of a PEM file.
        if let Some(v) = var("PLUGIN_EXTRA_CA_CERTS") {
            c.extra_ca_pem = Some(if v.contains("-----BEGIN") {
                v.into_bytes()
            } else {
                std::fs::read(&v)
                    .map_err(|e| Error::internal(format!("PLUGIN_EXTRA_CA_CERTS {v}: {e}")))?
            });
        }
        if let Some(v) = var("PLUGIN_TEMP_SPACE_MIB") {
            let mib: u64 = parse(&v, "PLUGIN_TEMP_SPACE_MIB")?;
            c.temp_space = Some(mib * 1024 * 1024);
        }
        if let Some(v) = var("PLUGIN_STAGED_RETENTION_DAYS") {
            let days: u64 = parse(&v, "PLUGIN_STAGED_RETENTION_DAYS")?;
            c.staged_retention = Duration::from_secs(days * 86400);
        }
        if let Some(v) = var("PLUGIN_FETCH_ALLOWED_HOSTS") {
            c.fetch_policy.allowed_hosts = v
                .split(',')
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect();
        }
        if let Some(v) = var("PLUGIN_FETCH_TEST_ALLOW_ADDRESSES") {
            c.fetch_policy.test_allowed_addresses = v
                .split(',')
                .map(|a| a.trim().parse())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| {
                    Error::internal("PLUGIN_FETCH_TEST_ALLOW_ADDRESSES: not IP addresses")
                })?;
            tracing::warn!(
                "PLUGIN_FETCH_TEST_ALLOW_ADDRESSES is set: fetches may reach those non-public \
                 addresses. Local tests only; never deploy this."
            );
        }
        if let Some(v) = var("PLUGIN_FETCH_TIMEOUT_SECS") {
            c.fetch_timeout = Duration::from_secs(parse(&v, "PLUGIN_FETCH_TIMEOUT_SECS")?);
        }
        if let Some(v) = var("PLUGIN_DEFAULT_ACCESS") {
            c.default_access = Access::parse(&v).ok_or_else(|| {
                Error::internal(format!(
                    "PLUGIN_DEFAULT_ACCESS must be ssh or ssm, got {v:?}"
                ))
            })?;
        }
        if let Some(v) = var("PLUGIN_SSM_URL_TTL_SECS") {
            let secs: u64 = parse(&v, "PLUGIN_SSM_URL_TTL_SECS")?;
            if secs == 0 || Duration::from_secs(secs) > MAX_SSM_URL_TTL {
                return Err(Error::internal(
                    "PLUGIN_SSM_URL_TTL_SECS must be between 1 and 300",
                ));
            }
            c.ssm_url_ttl = Duration::from_secs(secs);
        }
        c.operation_queue_url = var("PLUGIN_OPERATION_QUEUE_URL");
        if let Some(v) = var("PLUGIN_READY_BUDGET_SECS") {
            c.ready_budget = Duration::from_secs(parse(&v, "PLUGIN_READY_BUDGET_SECS")?);
        }
        if let Some(v) = var("PLUGIN_EVENT_SOURCE") {
            c.event_source = v;
        }
        if let Some(v) = var("PLUGIN_ROLLOUT_CONCURRENCY") {
            c.rollout_concurrency = parse(&v, "PLUGIN_ROLLOUT_CONCURRENCY")?;
        }
        if let Some(v) = var("PLUGIN_ROLLOUT_PER_VPC") {
            c.rollout_per_vpc = parse(&v, "PLUGIN_ROLLOUT_PER_VPC")?;
        }
        if let Some(v) = var("PLUGIN_ROLLOUT_ERROR_THRESHOLD") {
            Threshold::parse(&v).map_err(|_| {
                Error::internal("PLUGIN_ROLLOUT_ERROR_THRESHOLD must be a count or a percentage")
            })?;
            c.rollout_error_threshold = v;
        }
        // The two sources must differ, or every tenant request would be
        // taken for the platform's (any org).
        if c.platform_event_source == c.event_source {
            return Err(Error::internal(
                "PLUGIN_PLATFORM_EVENT_SOURCE must differ from PLUGIN_EVENT_SOURCE",
            ));
        }
        if c.insecure_ignore_host_key {
            tracing::warn!(
                "PLUGIN_SSH_INSECURE_IGNORE_HOST_KEY is on: host keys are NOT verified. \
                 Local experiments only; never deploy this."
            );
        }
        Ok(c)
    }

    /// How many hosts may be worked on at once, given the temp space: each
    /// holds one downloaded archive (at most the size cap), beside one
    /// resolve (a checked tree and its archive, twice the cap). Never 0.
    pub fn hosts_at_once(&self, wanted: usize) -> usize {
        let Some(space) = self.temp_space else {
            return wanted.max(1);
        };
        let cap = self.max_tree_bytes.max(1);
        let fits = space.saturating_sub(2 * cap) / cap;
        wanted.min(fits as usize).max(1)
    }

    /// The profile for a host: its runtime's, with the instance's own
    /// config dir (tag) when it has one. A tag cannot aim the host script
    /// anywhere else: it must name a profile's dir or one under
    /// `config_dir_roots`, checked before the host is contacted.
    pub fn host_profile(&self, host: &Host) -> Result<RuntimeProfile> {
        let mut p = self.profile(&host.runtime);
        if let Some(dir) = &host.config_dir {
            if !self.config_dir_allowed(dir) {
                return Err(Error::host_failed(format!(
                    "the instance's {} tag names a directory outside the allowed config roots",
                    TAG_CONFIG_DIR
                ))
                .with_detail(format!(
                    "instance {}: config dir {dir:?}, roots {:?}",
                    host.instance_id, self.config_dir_roots
                )));
            }
            p.config_dir = dir.clone();
        }
        Ok(p)
    }

    /// A profile's own dir, or a plain dir under one of the roots.
    pub fn config_dir_allowed(&self, dir: &str) -> bool {
        if !plain_dir(dir) {
            return false;
        }
        let profile_dirs = self.profiles.values().map(|p| p.config_dir.clone()).chain(
            ["claude-code", "hermes", "default"]
                .iter()
                .map(|r| self.profile(r).config_dir),
        );
        let under = |root: &str| {
            dir.strip_prefix(root)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        profile_dirs.into_iter().any(|d| d == dir) || self.config_dir_roots.iter().any(|r| under(r))
    }

    /// The profile of a runtime: configuration first, then the built-ins.
    pub fn profile(&self, runtime: &str) -> RuntimeProfile {
        if let Some(p) = self.profiles.get(runtime) {
            return p.clone();
        }
        if let Some(p) = builtin_profile(runtime) {
            return p;
        }
        self.profiles
            .get("default")
            .cloned()
            .unwrap_or_else(|| RuntimeProfile {
                config_dir: "/opt/configs".into(),
                restart: "systemctl restart molecule-runtime.service".into(),
            })
    }
}

/// Where operators keep runtime config dirs unless told otherwise.
pub const DEFAULT_CONFIG_DIR_ROOTS: [&str; 4] = ["/configs", "/opt", "/home", "/srv"];

/// An absolute path of plain characters, normalised (no `.`, `..` or empty
/// component, no trailing `/`) and not `/` itself: what the host script
/// accepts as a config dir.
pub fn plain_dir(dir: &str) -> bool {
    let Some(rest) = dir.strip_prefix('/') else {
        return false;
    };
    dir.len() <= 512
        && !rest.is_empty()
        && rest
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && dir
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
}

/// Numeric `uid:gid`, neither of them 0, each at most 9 digits (so never
/// the 4294967295 that `setresgid` reads as "leave unchanged").
pub fn valid_owner(owner: &str) -> bool {
    let Some((u, g)) = owner.split_once(':') else {
        return false;
    };
    let id = |s: &str| {
        !s.is_empty()
            && s.len() <= 9
            && s.bytes().all(|b| b.is_ascii_digit())
            && s.parse::<u32>().is_ok_and(|n| n > 0)
    };
    id(u) && id(g)
}

fn builtin_profile(runtime: &str) -> Option<RuntimeProfile> {
    let (dir, unit) = match runtime {
        "claude-code" => ("/configs", "claude-code.service"),
        "hermes" => ("/home/ubuntu/.hermes", "hermes.service"),
        _ => return None,
    };
    Some(RuntimeProfile {
        config_dir: dir.into(),
        restart: format!("systemctl restart {unit}"),
    })
}

fn parse<T: std::str::FromStr>(v: &str, key: &str) -> Result<T> {
    v.trim()
        .parse()
        .map_err(|_| Error::internal(format!("{key} is not a valid number: {v:?}")))
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_temp_space_bounds_hosts_at_once() {
        let mut c = Config::new("b");
        assert_eq!(c.hosts_at_once(10), 10, "no grant known: as asked");
        c.temp_space = Some(2048 * 1024 * 1024);
        assert_eq!(c.hosts_at_once(10), 10);
        assert_eq!(c.hosts_at_once(50), 18, "(2048 - 2 x 100) / 100 MiB");
        c.temp_space = Some(512 * 1024 * 1024);
        assert_eq!(c.hosts_at_once(10), 3);
        c.temp_space = Some(100 * 1024 * 1024);
        assert_eq!(c.hosts_at_once(10), 1, "never 0");
    }

    use super::*;

    #[test]
    fn profiles_fall_back_to_builtins_then_default() {
        let mut c = Config::new("b");
        assert_eq!(c.profile("claude-code").config_dir, "/configs");
        assert_eq!(c.profile("hermes").config_dir, "/home/ubuntu/.hermes");
        assert_eq!(c.profile("langgraph").config_dir, "/opt/configs");
        c.profiles.insert(
            "default".into(),
            RuntimeProfile {
                config_dir: "/srv/cfg".into(),
                restart: "true".into(),
            },
        );
        assert_eq!(c.profile("langgraph").config_dir, "/srv/cfg");
        assert_eq!(c.profile("claude-code").config_dir, "/configs");
    }

    #[test]
    fn config_dir_tags_stay_inside_the_allowed_roots() {
        let mut c = Config::new("b");
        c.profiles.insert(
            "lab".into(),
            RuntimeProfile {
                config_dir: "/tmp/lab-cfg".into(),
                restart: "true".into(),
            },
        );
        for ok in [
            "/configs",
            "/home/ubuntu/.hermes",
            "/opt/configs",
            "/srv/agent/cfg",
            "/tmp/lab-cfg",
        ] {
            assert!(c.config_dir_allowed(ok), "{ok}");
        }
        for bad in [
            "/etc",
            "/",
            "/root",
            "/var/lib/plugin-delivery",
            "/configs/../etc",
            "/home//x",
            "/home/x/",
            "/home/./x",
            "/configsx",
            "/tmp/lab-cfg/sub",
            "/home/a b",
            "/home/$(x)",
            "relative",
        ] {
            assert!(!c.config_dir_allowed(bad), "{bad}");
        }
        assert!(valid_owner("1000:1000") && valid_owner("1:2"));
        for bad in [
            "0:0",
            "1000:0",
            "0:1000",
            "1000",
            "a:b",
            ":1",
            "1:",
            "1:2:3",
            "1000:4294967295",
        ] {
            assert!(!valid_owner(bad), "{bad}");
        }
    }
}
