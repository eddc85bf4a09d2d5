//! Test support: the local stack (moto, the EC2 Instance Connect and SSM
//! emulators, real sshd hosts on 127.0.0.x, hardened hosts reached only
//! through the SSM emulator's agent) and fixtures over it.
//!
//! The stack is brought up once per test binary with `tests/stack/stack.sh
//! up` (idempotent: a healthy running stack is reused). Clients get their
//! endpoints explicitly from the stack's env file, so a test can never reach
//! real AWS even if the shell has no endpoint variables.

pub mod faults;
pub mod lambda;

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use aws_config::BehaviorVersion;
use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use lambda_http::{Body, Request};
use plugin_delivery::domain::config::{JwksFrom, RuntimeProfile, TokenSettings};
pub use plugin_delivery::domain::host::Access;
use plugin_delivery::{App, Config};
use serde_json::{json, Value};

/// The hosts' login user, created by `tests/stack/stack.sh install`.
pub const LOGIN_USER: &str = "pd-login";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn fake_runtime() -> PathBuf {
    repo_root().join("tests/stack/fake-runtime.py")
}

/// What `stack.sh up` wrote to its env file.
pub struct Stack {
    pub vars: BTreeMap<String, String>,
}

impl Stack {
    pub fn var(&self, k: &str) -> &str {
        self.vars
            .get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("stack env lacks {k}"))
    }
}

pub fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let root = repo_root();
        let state = std::env::var("PLUGIN_STACK_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join(".stack"));
        let status = Command::new("bash")
            .arg(root.join("tests/stack/stack.sh"))
            .arg("up")
            .arg(&state)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run tests/stack/stack.sh up");
        assert!(
            status.success(),
            "tests/stack/stack.sh up failed (run tests/stack/stack.sh install first?)"
        );
        let text = std::fs::read_to_string(state.join("env")).expect("stack env file");
        let mut vars = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("export ") else {
                continue;
            };
            let Some((k, v)) = rest.split_once('=') else {
                continue;
            };
            let v = v.trim_matches('\'').to_string();
            vars.insert(k.to_string(), v);
        }
        for k in [
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_EC2_INSTANCE_CONNECT",
            "AWS_ENDPOINT_URL_SSM",
        ] {
            let url = vars.get(k).expect(k);
            assert!(url.starts_with("http://127."), "{k}={url} is not loopback");
        }
        Stack { vars }
    })
}

pub async fn sdk() -> aws_config::SdkConfig {
    sdk_as("test").await
}

/// `sdk` with its own access key: moto takes any key (all are one account),
/// and the fault injector picks its victims by key.
pub async fn sdk_as(access_key: &str) -> aws_config::SdkConfig {
    let s = stack();
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(s.var("AWS_ENDPOINT_URL"))
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            access_key, "test", None, None, "stack",
        ))
        .load()
        .await
}

pub async fn clients() -> (
    aws_sdk_s3::Client,
    aws_sdk_ec2::Client,
    aws_sdk_ec2instanceconnect::Client,
    aws_sdk_ssm::Client,
) {
    clients_as("test").await
}

/// `clients` signing with `access_key` (see `sdk_as`).
pub async fn clients_as(
    access_key: &str,
) -> (
    aws_sdk_s3::Client,
    aws_sdk_ec2::Client,
    aws_sdk_ec2instanceconnect::Client,
    aws_sdk_ssm::Client,
) {
    let sdk = sdk_as(access_key).await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build(),
    );
    let eic = aws_sdk_ec2instanceconnect::Client::from_conf(
        aws_sdk_ec2instanceconnect::config::Builder::from(&sdk)
            .endpoint_url(stack().var("AWS_ENDPOINT_URL_EC2_INSTANCE_CONNECT"))
            .build(),
    );
    // Run Command goes to the SSM emulator, which hands everything else
    // (Parameter Store) on to moto.
    let ssm = aws_sdk_ssm::Client::from_conf(
        aws_sdk_ssm::config::Builder::from(&sdk)
            .endpoint_url(stack().var("AWS_ENDPOINT_URL_SSM"))
            .build(),
    );
    (s3, aws_sdk_ec2::Client::new(&sdk), eic, ssm)
}

/// A blocking HTTP/1.1 request to an emulator's control endpoint
/// (`/_emulator/...`): status and body. Blocking so `Drop` can use it.
pub fn control(method: &str, url: &str, body: Option<&serde_json::Value>) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http url");
    let (hostport, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = std::net::TcpStream::connect(hostport).expect("connect to emulator");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The SSM emulator's control endpoint `path` (`agents`, `calls`, ...).
pub fn ssm_control(method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, String) {
    let base = stack().var("AWS_ENDPOINT_URL_SSM").trim_end_matches('/');
    control(method, &format!("{base}/_emulator/{path}"), body)
}

/// Sets the emulated SSM agent of `instance` (`ping`, `execution_timeout_cap`,
/// `start_delay`).
pub fn ssm_agent(instance: &str, settings: serde_json::Value) {
    let mut body = settings;
    body["instance_id"] = serde_json::json!(instance);
    let (status, text) = ssm_control("POST", "agents", Some(&body));
    assert_eq!(status, 200, "ssm agent update: {text}");
}

/// Unique loopback addresses per test host within one test binary; the base
/// differs per binary so binaries never share an address.
pub fn next_ip() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let base: u32 = std::env::var("PLUGIN_TEST_IP_BASE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            // Spread binaries over 127.20.0.0/14 by a hash of the binary name.
            let exe = std::env::current_exe().unwrap();
            let name = exe.file_name().unwrap().to_string_lossy().to_string();
            let h = name
                .bytes()
                .fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32));
            (h % 64) * 256
        });
    // 250 usable last octets per third octet; never .0 or .255.
    let v = base + n;
    format!(
        "127.{}.{}.{}",
        20 + (v / 250 / 256) % 4,
        (v / 250) % 256,
        v % 250 + 1
    )
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// A workspace host plus its EC2 instance in moto: a real sshd host, or a
/// hardened one (no sshd, `molecule:access=ssm`) whose SSM agent is the
/// emulator's, running commands on this machine as root as the agent does.
pub struct Host {
    pub instance_id: String,
    pub access: Access,
    /// Empty for SSM hosts.
    pub ip: String,
    pub port: u16,
    pub host_key: String,
    pub state_dir: PathBuf,
}

impl Host {
    pub async fn start(ec2: &aws_sdk_ec2::Client, workspace: &str, runtime: &str) -> Host {
        Host::start_with(ec2, workspace, runtime, Access::Ssh).await
    }

    pub async fn start_with(
        ec2: &aws_sdk_ec2::Client,
        workspace: &str,
        runtime: &str,
        access: Access,
    ) -> Host {
        if access == Access::Ssm {
            return Host::start_ssm(ec2, workspace, runtime).await;
        }
        let ip = next_ip();
        let port = 2222;
        let out = ec2
            .run_instances()
            .image_id("ami-12345678")
            .min_count(1)
            .max_count(1)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(
                        Tag::builder()
                            .key("molecule:workspace-id")
                            .value(workspace)
                            .build(),
                    )
                    .tags(
                        Tag::builder()
                            .key("molecule:runtime")
                            .value(runtime)
                            .build(),
                    )
                    .tags(
                        Tag::builder()
                            .key("molecule:local-address")
                            .value(format!("{ip}:{port}"))
                            .build(),
                    )
                    .tags(
                        Tag::builder()
                            .key("molecule:org-id")
                            .value(TEST_ORG)
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .expect("run_instances");
        let instance_id = out.instances()[0].instance_id().unwrap().to_string();
        let state_dir = PathBuf::from(stack().var("PLUGIN_STACK_HOSTS_DIR")).join(&instance_id);
        let started = Command::new("bash")
            .arg(repo_root().join("tests/stack/sshd-host.sh"))
            .args([
                "start",
                state_dir.to_str().unwrap(),
                &ip,
                &port.to_string(),
                &instance_id,
            ])
            .arg(stack().var("PLUGIN_STACK_KEYS_DIR"))
            .output()
            .expect("sshd-host.sh start");
        assert!(
            started.status.success(),
            "sshd-host.sh start: {}",
            String::from_utf8_lossy(&started.stderr)
        );
        let host_key = String::from_utf8(started.stdout)
            .unwrap()
            .trim()
            .to_string();
        set_tag(ec2, &instance_id, "molecule:ssh-host-key", &host_key).await;
        Host {
            instance_id,
            access,
            ip,
            port,
            host_key,
            state_dir,
        }
    }

    async fn start_ssm(ec2: &aws_sdk_ec2::Client, workspace: &str, runtime: &str) -> Host {
        let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
        let out = ec2
            .run_instances()
            .image_id("ami-12345678")
            .min_count(1)
            .max_count(1)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(tag("molecule:workspace-id", workspace))
                    .tags(tag("molecule:runtime", runtime))
                    .tags(tag("molecule:access", "ssm"))
                    .tags(tag("molecule:org-id", TEST_ORG))
                    .build(),
            )
            .send()
            .await
            .expect("run_instances");
        let instance_id = out.instances()[0].instance_id().unwrap().to_string();
        ssm_agent(&instance_id, serde_json::json!({"ping": "Online"}));
        Host {
            instance_id,
            access: Access::Ssm,
            ip: String::new(),
            port: 0,
            host_key: String::new(),
            state_dir: PathBuf::new(),
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if self.access == Access::Ssm {
            let _ = ssm_control("DELETE", &format!("agents/{}", self.instance_id), None);
            return;
        }
        let _ = Command::new("bash")
            .arg(repo_root().join("tests/stack/sshd-host.sh"))
            .args(["stop", self.state_dir.to_str().unwrap()])
            .output();
    }
}

pub async fn set_tag(ec2: &aws_sdk_ec2::Client, instance: &str, key: &str, value: &str) {
    ec2.create_tags()
        .resources(instance)
        .tags(Tag::builder().key(key).value(value).build())
        .send()
        .await
        .expect("create_tags");
}

/// One workspace on one host, with its own bucket and config dir.
pub struct Fixture {
    pub s3: aws_sdk_s3::Client,
    pub ec2: aws_sdk_ec2::Client,
    pub eic: aws_sdk_ec2instanceconnect::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub bucket: String,
    pub workspace: String,
    pub host: Host,
    pub dir: tempfile::TempDir,
    pub config_dir: PathBuf,
}

impl Fixture {
    pub async fn new() -> Fixture {
        Fixture::with(Access::Ssh).await
    }

    /// A workspace whose host is reached through `access`.
    pub async fn with(access: Access) -> Fixture {
        let (s3, ec2, eic, ssm) = clients().await;
        publish_jwks(&ssm).await;
        let bucket = unique("pd-test");
        s3.create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .expect("create bucket");
        let workspace = unique("ws");
        let host = Host::start_with(&ec2, &workspace, "claude-code", access).await;
        let dir = tempfile::Builder::new()
            .prefix("pd-host-")
            .tempdir()
            .unwrap();
        // The runtime (uid 1000) must be able to traverse to its config dir.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // The runtime's config dir exists on a real host before we arrive,
        // and belongs to the agent user.
        let config_dir = dir.path().join("configs");
        agent_dir(&config_dir);
        Fixture {
            s3,
            ec2,
            eic,
            ssm,
            bucket,
            workspace,
            host,
            dir,
            config_dir,
        }
    }

    pub fn config(&self) -> Config {
        let mut c = Config::new(&self.bucket);
        // Caller tokens are checked against the test issuer's keys, read
        // from Parameter Store as a deployment reads them.
        // The explicit test-only allowance: the tests' own servers listen
        // on loopback, which the fetch guard refuses to everyone else.
        c.fetch_policy.test_allowed_addresses = vec![std::net::Ipv4Addr::LOCALHOST.into()];
        c.tokens = Some(TokenSettings {
            issuer: TEST_ISSUER.into(),
            audience: TEST_AUDIENCE.into(),
            keys: JwksFrom::Parameter(JWKS_PARAMETER.into()),
        });
        // The production shape: a normal login user (created by
        // `stack.sh install`) and the script run through `sudo -n`.
        c.ssh_user = LOGIN_USER.into();
        c.command_prefix = "sudo -n".into();
        c.address_tag = Some("molecule:local-address".into());
        // Config dirs named by tags live in this fixture's temp dir.
        c.config_dir_roots = vec![self.dir.path().to_string_lossy().into_owned()];
        c.profiles.insert(
            "claude-code".into(),
            RuntimeProfile {
                config_dir: self.config_dir.to_string_lossy().into_owned(),
                restart: format!(
                    "python3 {} {}",
                    fake_runtime().display(),
                    self.config_dir.display()
                ),
            },
        );
        c
    }

    pub fn app(&self) -> App {
        self.app_with(self.config())
    }

    pub fn app_with(&self, config: Config) -> App {
        App::with_clients(
            config,
            self.s3.clone(),
            self.ec2.clone(),
            self.eic.clone(),
            self.ssm.clone(),
        )
        .expect("app")
    }

    /// Root's own state for this config dir on the host.
    pub fn book(&self) -> PathBuf {
        book_of(&self.config_dir)
    }

    /// Files the test set up in the config dir as root are the agent's.
    pub fn give_to_agent(&self) {
        give_to_agent(&self.config_dir);
    }

    pub fn plugin_dir(&self, name: &str) -> PathBuf {
        self.config_dir.join("plugins").join(name)
    }

    /// Host script processes (root's or its steps') running for this
    /// host's config dir, waited for up to `wait` to end.
    pub fn scripts_left(&self, wait: std::time::Duration) -> Vec<u32> {
        self.scripts_until(wait, true)
    }

    /// Host script processes running for this host's config dir, waited
    /// for up to `wait` to appear.
    pub fn scripts_running(&self, wait: std::time::Duration) -> Vec<u32> {
        self.scripts_until(wait, false)
    }

    fn scripts_until(&self, wait: std::time::Duration, gone: bool) -> Vec<u32> {
        let cfg = self.config_dir.to_string_lossy().into_owned();
        let until = std::time::Instant::now() + wait;
        loop {
            let left: Vec<u32> = std::fs::read_dir("/proc")
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                        .filter(|pid| {
                            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                                return false;
                            };
                            let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
                            args.contains(&b"plugin-host".as_slice())
                                && args.contains(&cfg.as_bytes())
                        })
                        .collect()
                })
                .unwrap_or_default();
            if left.is_empty() == gone || std::time::Instant::now() >= until {
                return left;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Whether any operation reached the host's config dir.
    pub fn touched(&self) -> bool {
        std::fs::read_dir(&self.config_dir)
            .map(|d| d.count() > 0)
            .unwrap_or(true)
    }

    pub fn restarts(&self) -> usize {
        let p = format!("{}.restarts", self.config_dir.display());
        std::fs::read_to_string(p)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// Publishes a plugin tree to `registry/<name>/` (replacing what was there).
    pub async fn publish(&self, name: &str, files: &[(&str, &[u8])]) {
        let prefix = format!("registry/{name}/");
        for key in self.keys(&prefix).await {
            self.s3
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .unwrap();
        }
        for (path, data) in files {
            self.s3
                .put_object()
                .bucket(&self.bucket)
                .key(format!("{prefix}{path}"))
                .body(data.to_vec().into())
                .send()
                .await
                .unwrap();
        }
    }

    /// The staged archives' keys (`staged/<sha256>.tar.gz`), without the
    /// source index beside them.
    pub async fn staged_archives(&self) -> Vec<String> {
        let mut keys = self.keys("staged/").await;
        keys.retain(|k| k.ends_with(".tar.gz"));
        keys
    }

    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self
            .s3
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .send()
            .await
            .unwrap();
        out.contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect()
    }

    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let out = self
            .s3
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .ok()?;
        Some(out.body.collect().await.unwrap().into_bytes().to_vec())
    }

    /// Writes a desired state for `ws` naming `plugin` at an older version
    /// (a workspace that had it: a rollout target).
    pub async fn desire(&self, ws: &str, plugin: &str) {
        let doc = json!({"plugins": {plugin: {
            "name": plugin, "version": "0.9.0", "description": "", "author": "", "tags": [],
            "skills": [], "runtimes": [], "digest": "0".repeat(64),
            "source": format!("local://{plugin}"), "installed_at": "2026-11-01T00:00:00Z"}}});
        self.s3
            .put_object()
            .bucket(&self.bucket)
            .key(format!("workspaces/{ws}/plugins.json"))
            .body(doc.to_string().into_bytes().into())
            .send()
            .await
            .unwrap();
    }

    pub async fn desired(&self) -> Value {
        match self
            .get(&format!("workspaces/{}/plugins.json", self.workspace))
            .await
        {
            Some(b) => serde_json::from_slice(&b).unwrap(),
            None => Value::Null,
        }
    }
}

// ---- callers

/// The org every test host belongs to (its `molecule:org-id` tag) and the
/// test issuer's token settings.
pub const TEST_ORG: &str = "acme";
pub const TEST_ISSUER: &str = "https://platform.test/";
pub const TEST_AUDIENCE: &str = "plugin-delivery";
pub const JWKS_PARAMETER: &str = "/plugin-delivery-test/jwks";

/// Puts the test issuer's public keys where the functions read them.
pub async fn publish_jwks(ssm: &aws_sdk_ssm::Client) {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async {
        let jwks =
            std::fs::read_to_string(repo_root().join("tests/fixtures/jwt/jwks.json")).unwrap();
        ssm.put_parameter()
            .name(JWKS_PARAMETER)
            .value(jwks)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .overwrite(true)
            .send()
            .await
            .expect("put the JWKS parameter");
    })
    .await;
}

fn signing_key(file: &str) -> jsonwebtoken::EncodingKey {
    let pem = std::fs::read(repo_root().join("tests/fixtures/jwt").join(file)).unwrap();
    jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap()
}

/// A token with these claims, signed RS256 by the test issuer's key (or
/// by `key_file`, an attacker's).
pub fn sign_token(claims: &Value, key_file: &str) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("test-2026".into());
    jsonwebtoken::encode(&header, claims, &signing_key(key_file)).unwrap()
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Standard claims, valid for an hour, for `org` (and `workspace`) with
/// `scope`.
pub fn claims(org: &str, workspace: Option<&str>, scope: &str) -> Value {
    let mut c = json!({
        "iss": TEST_ISSUER, "aud": TEST_AUDIENCE, "sub": format!("user@{org}"),
        "org_id": org, "scope": scope,
        "iat": now_secs(), "exp": now_secs() + 3600,
    });
    if let Some(ws) = workspace {
        c["workspace_id"] = json!(ws);
    }
    c
}

/// A valid token of the issuer.
pub fn token(org: &str, workspace: Option<&str>, scope: &str) -> String {
    sign_token(&claims(org, workspace, scope), "platform-test-key.pem")
}

/// An admin of the test org: every request of the suite carries it unless
/// a test says otherwise.
pub fn owner_token() -> &'static str {
    static T: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    T.get_or_init(|| token(TEST_ORG, None, "read write admin"))
}

/// `req` sent with `token` instead (`None`: with no Authorization header).
pub fn as_caller(mut req: Request, token: Option<&str>) -> Request {
    let h = req.headers_mut();
    h.remove("authorization");
    if let Some(t) = token {
        h.insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

/// An API Gateway HTTP API (v2) event, as API Gateway would send it.
pub fn event(method: &str, route: &str, path: &str, params: Value, body: Option<&str>) -> Request {
    event_with_query(method, route, path, params, body, "")
}

pub fn event_with_query(
    method: &str,
    route: &str,
    path: &str,
    params: Value,
    body: Option<&str>,
    query: &str,
) -> Request {
    let qs: serde_json::Map<String, Value> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), Value::String(percent_decoded(v))))
        .collect();
    let ev = json!({
        "queryStringParameters": qs,
        "version": "2.0",
        "routeKey": format!("{method} {route}"),
        "rawPath": path,
        "rawQueryString": query,
        "headers": {"content-type": "application/json", "authorization": format!("Bearer {}", owner_token())},
        "requestContext": {
            "accountId": "123456789012", "apiId": "test", "domainName": "test.local",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1", "userAgent": "test"},
            "requestId": unique("req"), "routeKey": format!("{method} {route}"), "stage": "$default",
            "time": "25/Nov/2026:16:00:00 +0000", "timeEpoch": 1_795_622_400_000u64
        },
        "pathParameters": params,
        "body": body,
        "isBase64Encoded": false
    });
    lambda_http::request::from_str(&ev.to_string()).expect("valid v2 event")
}

/// What API Gateway makes of a percent-encoded query value.
fn percent_decoded(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A read request with an optional query string (`runtime=x`).
pub fn get_req(route: &str, path: &str, params: Value, query: &str) -> Request {
    event_with_query("GET", route, path, params, None, query)
}

pub async fn catalog(
    app: &App,
    route: &str,
    path: &str,
    params: Value,
    query: &str,
) -> (u16, Value) {
    api(app, get_req(route, path, params, query)).await
}

pub fn allowlist_req(method: &str, org: &str, body: Option<&str>) -> Request {
    event(
        method,
        "/orgs/{id}/plugins/allowlist",
        &format!("/orgs/{org}/plugins/allowlist"),
        json!({ "id": org }),
        body,
    )
}

pub async fn allowlist(app: &App, method: &str, org: &str, body: Option<&str>) -> (u16, Value) {
    api(app, allowlist_req(method, org, body)).await
}

pub fn install_req(ws: &str, body: &str) -> Request {
    event(
        "POST",
        "/workspaces/{id}/plugins",
        &format!("/workspaces/{ws}/plugins"),
        json!({"id": ws}),
        Some(body),
    )
}

pub fn uninstall_req(ws: &str, name: &str) -> Request {
    event(
        "DELETE",
        "/workspaces/{id}/plugins/{name}",
        &format!("/workspaces/{ws}/plugins/{name}"),
        json!({"id": ws, "name": name}),
        None,
    )
}

pub fn download_req(ws: &str, name: &str, source: &str) -> Request {
    event_with_query(
        "GET",
        "/workspaces/{id}/plugins/{name}/download",
        &format!("/workspaces/{ws}/plugins/{name}/download"),
        json!({"id": ws, "name": name}),
        None,
        &format!("source={source}"),
    )
}

pub fn list_req(ws: &str) -> Request {
    event(
        "GET",
        "/workspaces/{id}/plugins",
        &format!("/workspaces/{ws}/plugins"),
        json!({"id": ws}),
        None,
    )
}

/// Status and JSON body of a response.
pub fn parts(resp: lambda_http::Response<Body>) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body = match resp.body() {
        Body::Text(t) => serde_json::from_str(t).unwrap_or(Value::String(t.clone())),
        Body::Binary(b) => serde_json::from_slice(b).unwrap_or(Value::Null),
        _ => Value::Null,
    };
    (status, body)
}

pub async fn install(app: &App, ws: &str, body: &str) -> (u16, Value) {
    api(app, install_req(ws, body)).await
}

pub async fn uninstall(app: &App, ws: &str, name: &str) -> (u16, Value) {
    api(app, uninstall_req(ws, name)).await
}

pub async fn list(app: &App, ws: &str) -> (u16, Value) {
    api(app, list_req(ws)).await
}

// ---- the API contract (openapi.yaml)

/// The request's route key (`POST /workspaces/{id}/plugins`), as API
/// Gateway sets it.
pub fn route_key(req: &Request) -> String {
    use lambda_http::request::RequestContext;
    use lambda_http::RequestExt;
    match req.request_context_ref() {
        Some(RequestContext::ApiGatewayV2(c)) => c.route_key.clone().unwrap_or_default(),
        _ => String::new(),
    }
}

/// Sends `req` to the function API Gateway routes it to (by its route
/// key), and checks the response against openapi.yaml before handing it
/// back: every response the suite receives is one the document allows.
pub async fn send(app: &App, req: Request) -> lambda_http::Response<Body> {
    let key = route_key(&req);
    let (resp, checked) = send_unchecked(app, req).await;
    if let Err(e) = checked {
        panic!("{key}: the response breaks openapi.yaml: {e}");
    }
    resp
}

/// `send`, handing back whether the response keeps to the document
/// instead of failing on it (the API fuzz counts).
pub async fn send_unchecked(
    app: &App,
    req: Request,
) -> (lambda_http::Response<Body>, Result<(), String>) {
    use plugin_delivery::entry::api;
    let key = route_key(&req);
    let deps = &app.deps;
    let resp = match key.as_str() {
        "POST /workspaces/{id}/plugins" => api::install(deps, req).await,
        "GET /workspaces/{id}/plugins" => api::list(deps, req).await,
        "DELETE /workspaces/{id}/plugins/{name}" => api::uninstall(deps, req).await,
        "GET /workspaces/{id}/plugins/{name}/download" => api::download(deps, req).await,
        "GET /plugins"
        | "GET /plugins/sources"
        | "GET /workspaces/{id}/plugins/available"
        | "GET /workspaces/{id}/plugins/compatibility" => api::catalog(deps, req).await,
        "GET /orgs/{id}/plugins/allowlist" | "PUT /orgs/{id}/plugins/allowlist" => {
            api::allowlist(deps, req).await
        }
        "GET /workspaces/{id}/plugins/operations"
        | "GET /workspaces/{id}/plugins/operations/{op_id}" => api::operations(deps, req).await,
        other => panic!("no function serves route {other:?}"),
    };
    let checked = check_response(&key, &resp);
    (resp, checked)
}

/// `send`, as status and JSON body.
pub async fn api(app: &App, req: Request) -> (u16, Value) {
    parts(send(app, req).await)
}

/// openapi.yaml as JSON.
pub fn openapi() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let text = std::fs::read_to_string(repo_root().join("openapi.yaml")).unwrap();
        serde_yaml::from_str(&text).expect("openapi.yaml parses")
    })
}

/// A JSON pointer token, escaped for use inside a `$ref` fragment.
fn pointer_token(t: &str) -> String {
    t.replace('~', "~0")
        .replace('/', "~1")
        .replace('{', "%7B")
        .replace('}', "%7D")
}

/// Whether `resp` is a response the document gives route `key` (`METHOD
/// /path`): a documented status, its required headers, and a body valid
/// against its schema (none where it has no content).
pub fn check_response(key: &str, resp: &lambda_http::Response<Body>) -> Result<(), String> {
    let doc = openapi();
    let (method, path) = key.split_once(' ').ok_or("no route key")?;
    let method = method.to_ascii_lowercase();
    let status = resp.status().as_u16().to_string();
    let op = &doc["paths"][path][&method];
    if op.is_null() {
        return Err(format!("{key} is not in the document"));
    }
    let mut response = &op["responses"][&status];
    let mut at = format!(
        "#/paths/{}/{method}/responses/{status}",
        pointer_token(path)
    );
    if response.is_null() {
        return Err(format!("status {status} is not documented"));
    }
    if let Some(r) = response["$ref"].as_str() {
        at = r.replace("{", "%7B").replace("}", "%7D");
        let name = r.rsplit('/').next().unwrap();
        response = &doc["components"]["responses"][name];
    }
    if let Some(headers) = response["headers"].as_object() {
        for (name, h) in headers {
            if h["required"] == true && !resp.headers().contains_key(name.as_str()) {
                return Err(format!("required header {name} is missing"));
            }
        }
    }
    let body = match resp.body() {
        Body::Text(t) => t.as_bytes().to_vec(),
        Body::Binary(b) => b.clone(),
        _ => Vec::new(),
    };
    let Some(_) = response["content"]["application/json"]["schema"].as_object() else {
        return if body.is_empty() {
            Ok(())
        } else {
            Err(format!("status {status} has no body in the document"))
        };
    };
    if resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        != Some("application/json")
    {
        return Err("content-type is not application/json".into());
    }
    let instance: Value =
        serde_json::from_slice(&body).map_err(|e| format!("body is not JSON: {e}"))?;
    let mut root = doc.clone();
    root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
    root["$ref"] = json!(format!("{at}/content/application~1json/schema"));
    let validator = jsonschema::draft202012::new(&root).map_err(|e| format!("schema: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(&instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{} in {instance}", errors.join("; ")))
    }
}

/// Every regular file under `dir` (following the top-level symlink):
/// relative path → (bytes, mode & 0o7777, uid, gid).
pub fn tree(dir: &Path) -> BTreeMap<String, (Vec<u8>, u32, u32, u32)> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (Vec<u8>, u32, u32, u32)>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd {
            let e = e.unwrap();
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(
                    rel,
                    (
                        std::fs::read(&p).unwrap(),
                        md.mode() & 0o7777,
                        md.uid(),
                        md.gid(),
                    ),
                );
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// `len` incompressible bytes (xorshift), the same for the same seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut x = seed | 1;
    for c in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    out
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// Runs each `async fn name(access: Access)` listed as two tests,
/// `ssh::name` and `ssm::name`: one acceptance suite for both transports.
#[macro_export]
macro_rules! on_both_transports {
    ($($name:ident),+ $(,)?) => {
        mod ssh {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::Access::Ssh).await
                }
            )+
        }
        mod ssm {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::Access::Ssm).await
                }
            )+
        }
    };
}

/// Lambda's SQS event source as the service runs it: receive what is
/// visible on the queue, invoke the function with `{"Records": [...]}` one
/// message at a time (batch size 1, as in template.yaml), and delete a
/// message only when the invocation succeeded (otherwise it becomes visible
/// again for a retry). Returns how many invocations succeeded.
pub async fn deliver_queue(app: &App, sqs: &aws_sdk_sqs::Client, queue_url: &str) -> usize {
    let mut ok = 0;
    loop {
        let out = sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(1)
            .wait_time_seconds(0)
            .send()
            .await
            .expect("receive_message");
        let Some(m) = out.messages().first() else {
            return ok;
        };
        let event = json!({"Records": [{
            "messageId": m.message_id(),
            "receiptHandle": m.receipt_handle(),
            "body": m.body(),
            "attributes": {},
            "messageAttributes": {},
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:operations",
            "awsRegion": "us-east-1"
        }]});
        if plugin_delivery::entry::events::handle(&app.deps, event)
            .await
            .is_ok()
        {
            sqs.delete_message()
                .queue_url(queue_url)
                .receipt_handle(m.receipt_handle().unwrap_or_default())
                .send()
                .await
                .expect("delete_message");
            ok += 1;
        } else {
            return ok;
        }
    }
}

/// An SQS client on the local stack (moto).
pub async fn sqs() -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(&sdk().await)
}

/// The hourly EventBridge "Scheduled Event" that starts drift repair.
pub fn scheduled_event() -> Value {
    json!({
        "version": "0",
        "id": "5e0b1d2c-0000-4000-8000-000000000002",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": "2026-11-25T20:00:00Z",
        "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:123456789012:rule/plugin-delivery-drift"],
        "detail": {}
    })
}

/// A tool a test runs: when it is missing, say which and how to get it,
/// rather than fail later on a side effect.
pub fn need(path: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: tests/stack/stack.sh install installs every tool the tests use"
    );
}

/// The host script's state for this fixture's config dirs (root's, outside
/// them) goes with the fixture, as the dirs themselves do.
impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.book());
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(book_of(&e.path()));
            }
        }
    }
}

// ------------------------------------------------------------ the agent user

/// The agent user: owner of every config dir, an AI agent running arbitrary
/// code on the host.
pub const AGENT_UID: u32 = 1000;

/// Where the host script keeps root's state for `config_dir` on the hosts
/// of this machine (`/var/lib/plugin-delivery/<the path, "/" as "%">`).
pub fn book_of(config_dir: &Path) -> PathBuf {
    Path::new("/var/lib/plugin-delivery").join(book_key(config_dir))
}

/// The name of root's state dir for a config dir: its path without the
/// leading "/", each further "/" written "%".
pub fn book_key(config_dir: &Path) -> String {
    let path = config_dir.to_str().unwrap();
    path.strip_prefix('/').unwrap_or(path).replace('/', "%")
}

/// Creates `dir` (and parents) as a config dir: owned by the agent user.
pub fn agent_dir(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::os::unix::fs::chown(dir, Some(AGENT_UID), Some(AGENT_UID)).unwrap();
}

/// Hands everything under `root` to the agent user, as if it had made it.
pub fn give_to_agent(root: &Path) {
    let out = std::process::Command::new("chown")
        .args(["-R", "-h", "1000:1000"])
        .arg(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chown -R {}: {}",
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `sh -c script` as the agent user (uid and gid 1000, no supplementary
/// groups) in `dir`: a real unprivileged process, not yet started.
pub fn agent_command(dir: &Path, script: &str) -> Command {
    need("/usr/bin/setpriv");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=1000",
        "--regid=1000",
        "--clear-groups",
        "--",
        "sh",
        "-c",
        script,
    ])
    .current_dir(dir);
    cmd
}

/// Runs `script` as the agent user in `dir` (see `agent_command`).
pub fn as_agent(dir: &Path, script: &str) -> std::process::Output {
    agent_command(dir, script).output().unwrap()
}

/// Reads `path` in a loop on a thread until `stop` is called, which
/// panics if any read failed and returns how many succeeded: proof that a
/// file stayed readable throughout what ran in between.
pub struct KeepReading {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl KeepReading {
    pub fn start(path: PathBuf) -> KeepReading {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut reads = 0u64;
            while !flag.load(Ordering::Relaxed) {
                std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("{} unreadable: {e}", path.display()));
                reads += 1;
            }
            reads
        });
        KeepReading { stop, thread }
    }

    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let reads = self.thread.join().expect("the file stayed readable");
        assert!(reads > 0);
        reads
    }
}

/// Entries under `root` (links not followed) owned by root, relative.
pub fn root_owned(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            let Ok(md) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if md.uid() == 0 || md.gid() == 0 {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
            if md.is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

/// A tree of root-owned files outside every config dir, for planted links
/// to aim at: a file only root may read, a file anyone may read, a directory
/// with a file, an empty directory, all root's, plus a dir named like the
/// paths the script creates. Any change to it (content, mode, owner, a file
/// added or removed) fails `assert_unchanged`.
pub struct Canary {
    dir: tempfile::TempDir,
    before: BTreeMap<String, (String, u32, u32, u32, Vec<u8>)>,
}

impl Canary {
    pub fn new() -> Canary {
        let dir = tempfile::Builder::new()
            .prefix("pd-canary-")
            .tempdir()
            .unwrap();
        let root = dir.path();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = |rel: &str, body: &str, mode: u32| {
            std::fs::write(root.join(rel), body).unwrap();
            std::fs::set_permissions(root.join(rel), std::fs::Permissions::from_mode(mode))
                .unwrap();
        };
        file("ld.so.preload", "", 0o644);
        file("shadow", "root:secret\n", 0o600);
        std::fs::create_dir(root.join("etc")).unwrap();
        file("etc/passwd", "root:x:0:0\n", 0o644);
        std::fs::create_dir(root.join("empty")).unwrap();
        std::fs::create_dir(root.join("plugins")).unwrap();
        file("plugins/keep.md", "keep\n", 0o644);
        let before = Self::scan(root);
        Canary { dir, before }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Each entry: kind, mode, uid, gid, content (file) or target (link).
    fn scan(root: &Path) -> BTreeMap<String, (String, u32, u32, u32, Vec<u8>)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = e.path();
                let md = std::fs::symlink_metadata(&path).unwrap();
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                let (kind, body) = if md.file_type().is_symlink() {
                    (
                        "link",
                        std::fs::read_link(&path)
                            .unwrap()
                            .into_os_string()
                            .into_vec(),
                    )
                } else if md.is_dir() {
                    stack.push(path.clone());
                    ("dir", Vec::new())
                } else {
                    ("file", std::fs::read(&path).unwrap())
                };
                out.insert(rel, (kind.to_string(), md.mode(), md.uid(), md.gid(), body));
            }
        }
        let md = std::fs::symlink_metadata(root).unwrap();
        out.insert(
            ".".into(),
            ("dir".into(), md.mode(), md.uid(), md.gid(), Vec::new()),
        );
        out
    }

    pub fn assert_unchanged(&self, what: &str) {
        let now = Self::scan(self.dir.path());
        assert_eq!(
            now, self.before,
            "the canary outside the config dir changed: {what}"
        );
    }
}

impl Default for Canary {
    fn default() -> Self {
        Self::new()
    }
}

/// Every path under a config dir that the host script, or the runtime's
/// unwiring it does, touches for plugin `name`: a link planted at any of
/// them must not lead root anywhere. `{store}` is the store dir of `name`
/// at digest `sha`.
pub fn planted_paths(name: &str, sha: &str, skill: &str) -> Vec<String> {
    let mut v: Vec<String> = [
        ".plugin-delivery",
        ".plugin-delivery/lock",
        ".plugin-delivery/restart-pending",
        ".plugin-delivery/sums",
        ".plugin-delivery/staging",
        ".plugin-delivery/store",
        ".plugin-delivery/aside",
        "plugins",
        "skills",
        ".claude",
        ".claude/hooks",
        ".claude/commands",
        ".claude/settings.json",
        "CLAUDE.md",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!(".plugin-delivery/sums/{name}@{sha}"));
    v.push(format!(".plugin-delivery/aside/{name}"));
    v.push(format!(".plugin-delivery/store/{name}@{sha}"));
    v.push(format!("plugins/{name}"));
    v.push(format!("skills/{skill}"));
    v
}

/// As the agent: replace `rel` in `cfg` (whatever is there) with a symlink
/// to `target`, creating its parent dirs.
pub fn plant_link(cfg: &Path, rel: &str, target: &Path) {
    let script = format!(
        "mkdir -p \"$(dirname '{rel}')\" && rm -rf '{rel}' && ln -s '{}' '{rel}'",
        target.display()
    );
    let out = as_agent(cfg, &script);
    assert!(
        out.status.success(),
        "planting {rel}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A uid-1000 process that, until dropped, keeps swapping each of `dirs`
/// (relative to `cfg`) for a symlink to `target` and back, as fast as a
/// shell loop can: a race against every check-then-act of the host script.
pub struct Racer {
    child: std::process::Child,
    cfg: PathBuf,
    dirs: Vec<String>,
}

impl Racer {
    pub fn start(cfg: &Path, dirs: &[&str], target: &Path) -> Racer {
        let list = dirs.join(" ");
        let script = format!(
            "while :; do for d in {list}; do \
               if [ -d \"$d\" ] && [ ! -L \"$d\" ] && mv \"$d\" \"$d.racer\" 2>/dev/null; then \
                 ln -s '{t}' \"$d\" 2>/dev/null; rm -f \"$d\"; mv \"$d.racer\" \"$d\" 2>/dev/null; \
               fi; \
             done; done",
            t = target.display()
        );
        // Its own process group, so that stopping it stops the `mv` or
        // `ln` it may be in the middle of too.
        let child = agent_command(cfg, &script)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .expect("setpriv (util-linux) is needed");
        Racer {
            child,
            cfg: cfg.to_path_buf(),
            dirs: dirs.iter().map(|d| d.to_string()).collect(),
        }
    }
}

impl Drop for Racer {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Put back a dir the loop was killed in the middle of swapping.
        for d in &self.dirs {
            let real = self.cfg.join(format!("{d}.racer"));
            let path = self.cfg.join(d);
            if real.exists() {
                if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
                    let _ = std::fs::remove_file(&path);
                }
                let _ = std::fs::rename(&real, &path);
            }
        }
    }
}

/// A process's own user + system CPU time (`pid` a number or `self`), in
/// seconds: fields 14 and 15 of `/proc/<pid>/stat` (proc(5)), in clock
/// ticks of 1/100 s.
pub fn process_cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

/// A figure of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`).
pub fn process_status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---- the fetch server (tests/stack/source_server.py)

/// A stand-in for GitHub and https archive hosts on loopback, with its
/// own test CA.
pub struct SourceServer {
    child: std::process::Child,
    pub root: tempfile::TempDir,
    pub tls: PathBuf,
    pub port: u16,
    pub plain_port: u16,
}

impl SourceServer {
    pub fn start() -> SourceServer {
        let root = tempfile::tempdir().unwrap();
        let tls = root.path().join("tls");
        let made = Command::new("bash")
            .arg(repo_root().join("tests/stack/make-test-ca.sh"))
            .arg(&tls)
            .status()
            .unwrap();
        assert!(made.success(), "make-test-ca.sh");
        let child = Command::new("python3")
            .arg(repo_root().join("tests/stack/source_server.py"))
            .args(["--port", "0", "--plain-port", "0", "--root"])
            .arg(root.path())
            .arg("--tls-dir")
            .arg(&tls)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("source_server.py");
        let ports = root.path().join("ports.json");
        for _ in 0..100 {
            if let Ok(text) = std::fs::read_to_string(&ports) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    let port = v["port"].as_u64().or_else(|| v["https"].as_u64()).unwrap() as u16;
                    let plain_port = v["plain_port"]
                        .as_u64()
                        .or_else(|| v["http"].as_u64())
                        .unwrap_or(0) as u16;
                    return SourceServer {
                        child,
                        root,
                        tls,
                        port,
                        plain_port,
                    };
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        panic!("source_server.py did not write {}", ports.display());
    }

    /// Requests it served, its own `/_server/` ones left out.
    pub fn requests(&self) -> usize {
        let out = Command::new("curl")
            .args([
                "-sf",
                &format!("http://127.0.0.1:{}/_server/requests", self.plain_port),
            ])
            .output()
            .expect("curl");
        let v: Value = serde_json::from_slice(&out.stdout).expect("request log");
        v["requests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| !r.to_string().contains("/_server/"))
            .count()
    }

    pub fn base(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn repo_ref(&self, owner: &str, repo: &str, reference: &str, files: &[(&str, &[u8])]) {
        let dir = self
            .root
            .path()
            .join("github")
            .join(owner)
            .join(repo)
            .join("refs")
            .join(reference);
        write_tree(&dir, files);
    }

    pub fn file(&self, path: &str, bytes: &[u8]) {
        let p = self.root.path().join("files").join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

impl Drop for SourceServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write_tree(dir: &Path, files: &[(&str, &[u8])]) {
    for (p, d) in files {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, d).unwrap();
    }
}
