//! What must be refused, and what must be left untouched when it is.

use std::sync::Arc;
use std::time::Duration;

use acceptance::*;
use async_trait_free::NoPush;
use plugin_delivery::adapters::ec2::Ec2Fleet;
use plugin_delivery::adapters::ssh::{EicKeyPusher, KeyPusher, SshTransport};
use plugin_delivery::domain::hostscript::HostCommand;
use plugin_delivery::ports::{Fleet, HostTransport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn small_plugin(name: &str) -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "plugin.yaml".into(),
            format!("name: {name}\nversion: 1.0.0\n").into_bytes(),
        ),
        ("skills/s/SKILL.md".into(), b"# S\n".to_vec()),
    ]
}

async fn publish_owned(f: &Fixture, name: &str, files: &[(String, Vec<u8>)]) {
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    f.publish(name, &refs).await;
}

/// Everything in the bucket except the registry: what an operation wrote.
async fn written(f: &Fixture) -> Vec<String> {
    let mut keys = f.keys("").await;
    keys.retain(|k| !k.starts_with("registry/"));
    keys
}

async fn bad_input_is_rejected_before_anything_is_written(access: Access) {
    let f = Fixture::with(access).await;
    let app = f.app();
    publish_owned(&f, "ok", &small_plugin("ok")).await;
    let long = "a".repeat(129);
    for source in [
        "",
        "   ",
        "local://",
        "local://../etc",
        "a/b",
        "a\\b",
        "..",
        "UPPER",
        "-x",
        long.as_str(),
        "local://x/../y",
    ] {
        let body = serde_json::json!({ "source": source }).to_string();
        let (s, b) = install(&app, &f.workspace, &body).await;
        assert_eq!(s, 400, "{source:?}: {b}");
        assert!(b["error"].as_str().unwrap().len() > 5);
        assert!(b["request_id"].is_string());
    }
    let (s, b) = install(&app, &f.workspace, r#"{"source": "ftp://x"}"#).await;
    assert_eq!(s, 400);
    assert_eq!(
        b["available_schemes"],
        serde_json::json!(["github", "https", "local"])
    );
    for body in [
        "not json",
        "[1]",
        "{}",
        r#"{"source": 5}"#,
        r#"{"source":"ok","sha256":"zz"}"#,
    ] {
        let (s, b) = install(&app, &f.workspace, body).await;
        assert_eq!(s, 400, "{body}: {b}");
    }
    let big = format!(r#"{{"source": "ok", "pad": "{}"}}"#, "x".repeat(64 * 1024));
    assert_eq!(install(&app, &f.workspace, &big).await.0, 400);
    for name in ["..", "A", "a%2Fb"] {
        let (s, b) = uninstall(&app, &f.workspace, name).await;
        assert_eq!(s, 400, "{name}: {b}");
    }
    assert_eq!(written(&f).await, Vec::<String>::new());
    assert!(!f.touched(), "nothing reached the host");
}

async fn size_cap_is_inclusive_and_oversize_writes_nothing(access: Access) {
    let f = Fixture::with(access).await;
    let mut cfg = f.config();
    cfg.max_tree_bytes = 4096;
    let app = f.app_with(cfg);
    let yaml = b"name: capped\n".to_vec();
    let at_cap = vec![
        ("plugin.yaml".to_string(), yaml.clone()),
        ("data.bin".to_string(), vec![7u8; 4096 - yaml.len()]),
    ];
    let over = vec![
        ("plugin.yaml".to_string(), yaml.clone()),
        ("data.bin".to_string(), vec![7u8; 4097 - yaml.len()]),
    ];
    publish_owned(&f, "over", &over).await;
    let (s, b) = install(&app, &f.workspace, r#"{"source": "over"}"#).await;
    assert_eq!(s, 413, "{b}");
    assert_eq!(written(&f).await, Vec::<String>::new());
    assert!(!f.touched());
    // Over SSH the install's command was started beside the fetch, waiting
    // for the plugin's name: it ended without one, with no state of root's
    // made and no process left.
    assert!(!f.book().exists(), "root's state was made");
    assert_eq!(
        f.scripts_left(std::time::Duration::from_secs(5)),
        Vec::<u32>::new()
    );

    publish_owned(&f, "capped", &at_cap).await;
    let (s, b) = install(&app, &f.workspace, r#"{"source": "capped"}"#).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        std::fs::read(f.plugin_dir("capped").join("data.bin"))
            .unwrap()
            .len(),
        4096 - yaml.len()
    );
}

async fn sha256_pin_of_plugin_yaml(access: Access) {
    let f = Fixture::with(access).await;
    let app = f.app();
    let files = small_plugin("pinned");
    publish_owned(&f, "pinned", &files).await;
    let wrong = "0".repeat(64);
    let (s, b) = install(
        &app,
        &f.workspace,
        &format!(r#"{{"source":"pinned","sha256":"{wrong}"}}"#),
    )
    .await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(written(&f).await, Vec::<String>::new());
    assert!(!f.touched());

    let right = sha256_hex(&files[0].1).to_uppercase();
    let (s, b) = install(
        &app,
        &f.workspace,
        &format!(r#"{{"source":"pinned","sha256":"{right}"}}"#),
    )
    .await;
    assert_eq!((s, b["status"].as_str()), (200, Some("installed")), "{b}");
}

async fn unknown_workspace_plugin_and_ambiguous_host(access: Access) {
    let f = Fixture::with(access).await;
    let app = f.app();
    publish_owned(&f, "known", &small_plugin("known")).await;
    let (s, b) = install(&app, "ws-nobody", r#"{"source":"known"}"#).await;
    assert_eq!(s, 404, "{b}");
    let (s, _) = list(&app, "ws-nobody").await;
    assert_eq!(s, 404);
    let (s, b) = install(&app, &f.workspace, r#"{"source":"unknown"}"#).await;
    assert_eq!(s, 404, "{b}");
    assert!(b["error"].as_str().unwrap().contains("unknown"));
    // A workspace with a host but no plugins yet lists as empty.
    let (s, b) = list(&app, &f.workspace).await;
    assert_eq!((s, b), (200, serde_json::json!([])));

    // A second running instance with the same workspace tag: refuse to guess.
    let twin = Host::start_with(&f.ec2, &f.workspace, "claude-code", access).await;
    let (s, b) = install(&app, &f.workspace, r#"{"source":"known"}"#).await;
    assert_eq!(s, 409, "{b}");
    drop(twin);
    assert_eq!(written(&f).await, Vec::<String>::new());
}

mod async_trait_free {
    use super::*;
    /// A pusher that delivers nothing: the host must refuse our key.
    pub struct NoPush;
    #[async_trait::async_trait]
    impl KeyPusher for NoPush {
        async fn push(
            &self,
            _: &plugin_delivery::domain::host::Host,
            _: &str,
            _: &str,
        ) -> plugin_delivery::Result<()> {
            Ok(())
        }
    }
}

/// Pushes through the real emulator, then lets the 60 s window pass.
struct StalePush(EicKeyPusher);
#[async_trait::async_trait]
impl KeyPusher for StalePush {
    async fn push(
        &self,
        h: &plugin_delivery::domain::host::Host,
        u: &str,
        k: &str,
    ) -> plugin_delivery::Result<()> {
        self.0.push(h, u, k).await?;
        tokio::time::sleep(Duration::from_secs(61)).await;
        Ok(())
    }
}

fn transport(f: &Fixture, pusher: Arc<dyn KeyPusher>, user: &str) -> SshTransport {
    let fleet: Arc<dyn Fleet> = Arc::new(Ec2Fleet::new(
        f.ec2.clone(),
        22,
        Some("molecule:local-address".into()),
        Access::Ssh,
    ));
    SshTransport::new(
        pusher,
        fleet,
        user,
        "sudo -n",
        false,
        Duration::from_secs(5),
    )
}

async fn run_probe(
    f: &Fixture,
    t: &SshTransport,
) -> plugin_delivery::Result<plugin_delivery::domain::hostscript::HostOutput> {
    let fleet = Ec2Fleet::new(
        f.ec2.clone(),
        22,
        Some("molecule:local-address".into()),
        Access::Ssh,
    );
    let host = fleet.locate(&f.workspace).await.unwrap();
    let profile = f.config().profile("claude-code");
    t.run(&host, &HostCommand::inventory(&profile, "1000:1000"), None)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_not_pushed_or_expired_is_refused() {
    let f = Fixture::new().await;
    let ok = run_probe(
        &f,
        &transport(&f, Arc::new(EicKeyPusher::new(f.eic.clone())), LOGIN_USER),
    )
    .await
    .unwrap();
    assert_eq!(ok.exit_status, Some(0), "a pushed key works: {ok:?}");

    let e = run_probe(&f, &transport(&f, Arc::new(NoPush), LOGIN_USER))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 502, "{e}");
    assert!(e.message.contains("refused the key"), "{}", e.message);

    let stale = StalePush(EicKeyPusher::new(f.eic.clone()));
    let e = run_probe(&f, &transport(&f, Arc::new(stale), LOGIN_USER))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 502, "{e}");
    assert!(e.message.contains("refused the key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_os_user_gets_its_own_error() {
    let f = Fixture::new().await;
    publish_owned(&f, "u", &small_plugin("u")).await;
    let mut cfg = f.config();
    cfg.ssh_user = "ubuntu-missing".into();
    let (s, b) = install(&f.app_with(cfg), &f.workspace, r#"{"source":"u"}"#).await;
    assert_eq!(s, 502, "{b}");
    assert!(b["error"].as_str().unwrap().contains("OS user"), "{b}");
    assert!(!f.touched());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_key_mismatch_or_missing_is_refused() {
    let f = Fixture::new().await;
    publish_owned(&f, "hk", &small_plugin("hk")).await;
    let app = f.app();
    // Another host's key published for this instance.
    let other = Host::start(&f.ec2, &unique("ws-other"), "claude-code").await;
    set_tag(
        &f.ec2,
        &f.host.instance_id,
        "molecule:ssh-host-key",
        &other.host_key,
    )
    .await;
    let (s, b) = install(&app, &f.workspace, r#"{"source":"hk"}"#).await;
    assert_eq!(s, 502, "{b}");
    assert!(
        b["error"].as_str().unwrap().contains("does not match"),
        "{b}"
    );
    assert!(!f.touched());
    // No tag and no keys on the console: fail closed.
    f.ec2
        .delete_tags()
        .resources(&f.host.instance_id)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("molecule:ssh-host-key")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let (s, b) = install(&app, &f.workspace, r#"{"source":"hk"}"#).await;
    assert_eq!(s, 502, "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("no published SSH host key"),
        "{b}"
    );
    // Unless explicitly told to skip verification (local experiments only).
    let mut cfg = f.config();
    cfg.insecure_ignore_host_key = true;
    let (s, b) = install(&f.app_with(cfg), &f.workspace, r#"{"source":"hk"}"#).await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_host_is_503_and_throttling_is_retried() {
    let f = Fixture::new().await;
    publish_owned(&f, "t", &small_plugin("t")).await;
    let app = f.app();
    // Throttle the next 4 key pushes for this instance: the SDK's retries
    // plus ours must get through.
    let eic = stack().var("PLUGIN_STACK_EIC_URL").to_string();
    let body = format!(r#"{{"count": 4, "instance_id": "{}"}}"#, f.host.instance_id);
    post(&format!("{eic}/_emulator/throttle"), &body).await;
    let (s, b) = install(&app, &f.workspace, r#"{"source":"t"}"#).await;
    assert_eq!(s, 200, "{b}");

    // Point the instance at a port where nothing listens.
    set_tag(
        &f.ec2,
        &f.host.instance_id,
        "molecule:local-address",
        &format!("{}:1", f.host.ip),
    )
    .await;
    let (s, b) = uninstall(&app, &f.workspace, "t").await;
    assert_eq!(s, 503, "{b}");
    assert!(f.plugin_dir("t").exists(), "nothing changed");
    let body = b.to_string();
    assert!(
        !body.contains(&f.host.ip) && !body.contains("Connection refused"),
        "no internals: {body}"
    );
}

/// Minimal HTTP/1.1 POST to the emulator's control endpoint.
async fn post(url: &str, body: &str) {
    let rest = url.strip_prefix("http://").unwrap();
    let (hostport, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(hostport).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200"),
        "{resp}"
    );
}

/// Forwards to `target`, but cuts both directions after `limit` bytes from
/// the client: the connection dies mid-transfer.
async fn cutting_proxy(target: String, limit: usize) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let mut server = tokio::net::TcpStream::connect(&target).await.unwrap();
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = async {
                    let mut sent = 0;
                    let mut buf = vec![0u8; 16 * 1024];
                    while sent < limit {
                        let n = cr.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        let n = n.min(limit - sent);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        sent += n;
                    }
                };
                let down = tokio::io::copy(&mut sr, &mut cw);
                tokio::select! { _ = up => {}, _ = down => {} }
                // Dropping both sockets here resets the connection.
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_killed_mid_transfer_keeps_old_version() {
    let f = Fixture::new().await;
    let app = f.app();
    let v1 = small_plugin("big");
    publish_owned(&f, "big", &v1).await;
    let (s, b) = install(&app, &f.workspace, r#"{"source":"big"}"#).await;
    assert_eq!(s, 200, "{b}");
    let before = tree(&f.plugin_dir("big"));
    let restarts = f.restarts();

    // v2 is 8 MiB of incompressible bytes; the proxy cuts after 2 MiB.
    let mut noise = vec![0u8; 8 << 20];
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for chunk in noise.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let mut v2 = v1.clone();
    v2.push(("data/noise.bin".into(), noise));
    publish_owned(&f, "big", &v2).await;
    let proxy = cutting_proxy(format!("{}:{}", f.host.ip, f.host.port), 2 << 20).await;
    set_tag(
        &f.ec2,
        &f.host.instance_id,
        "molecule:local-address",
        &proxy,
    )
    .await;
    let (s, b) = install(&app, &f.workspace, r#"{"source":"big"}"#).await;
    assert!(s == 503 || s == 502, "{s} {b}");

    // The host script notices the cut and cleans up; give it a moment.
    let staging = f.config_dir.join(".plugin-delivery/staging");
    let mut left = Vec::new();
    for _ in 0..100 {
        left = std::fs::read_dir(&staging)
            .map(|d| d.count())
            .map(|n| vec![n])
            .unwrap_or_default();
        if left == [0] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, [0], "no staging leftovers");
    assert_eq!(tree(&f.plugin_dir("big")), before, "old version intact");
    assert_eq!(f.restarts(), restarts);
    let store = std::fs::read_dir(f.config_dir.join(".plugin-delivery/store"))
        .unwrap()
        .count();
    assert_eq!(store, 1);
}

async fn failed_restart_is_502_and_slow_host_is_504(access: Access) {
    let f = Fixture::with(access).await;
    publish_owned(&f, "r", &small_plugin("r")).await;
    let mut cfg = f.config();
    cfg.profiles.get_mut("claude-code").unwrap().restart = "exit 3".into();
    let (s, b) = install(&f.app_with(cfg), &f.workspace, r#"{"source":"r"}"#).await;
    assert_eq!(s, 502, "{b}");
    assert_eq!(b["host_error"], "restart_failed");
    assert!(b["error"].as_str().unwrap().contains("restart failed"));

    // A runtime restart that takes longer than the operation deadline.
    publish_owned(&f, "slow", &small_plugin("slow")).await;
    let mut cfg = f.config();
    cfg.operation_timeout = Duration::from_secs(2);
    cfg.profiles.get_mut("claude-code").unwrap().restart = "sleep 5".into();
    let t = std::time::Instant::now();
    let (s, b) = install(&f.app_with(cfg), &f.workspace, r#"{"source":"slow"}"#).await;
    assert_eq!(s, 504, "{b}");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "answered at the deadline"
    );
    assert!(b["error"].as_str().unwrap().contains("2 s"));
}

async fn manifest_json_digest_is_checked_before_anything_is_written(access: Access) {
    let f = Fixture::with(access).await;
    let app = f.app();
    let files = small_plugin("pinned-tree");
    // The tree digest: sorted `path NUL content` entries, manifest.json excluded.
    let mut entries: Vec<Vec<u8>> = files
        .iter()
        .map(|(p, d)| [p.as_bytes(), b"\0", d].concat())
        .collect();
    entries.sort();
    let digest = sha256_hex(&entries.concat());

    let mut bad = files.clone();
    bad.push((
        "manifest.json".into(),
        format!(r#"{{"sha256":"{}"}}"#, "a".repeat(64)).into_bytes(),
    ));
    publish_owned(&f, "pinned-tree", &bad).await;
    let (s, b) = install(&app, &f.workspace, r#"{"source":"pinned-tree"}"#).await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(written(&f).await, Vec::<String>::new());
    assert!(!f.touched());

    let mut good = files.clone();
    good.push((
        "manifest.json".into(),
        format!(r#"{{"sha256":"{}"}}"#, digest.to_uppercase()).into_bytes(),
    ));
    publish_owned(&f, "pinned-tree", &good).await;
    let (s, b) = install(&app, &f.workspace, r#"{"source":"pinned-tree"}"#).await;
    assert_eq!(s, 200, "{b}");
}

on_both_transports!(
    bad_input_is_rejected_before_anything_is_written,
    size_cap_is_inclusive_and_oversize_writes_nothing,
    sha256_pin_of_plugin_yaml,
    unknown_workspace_plugin_and_ambiguous_host,
    failed_restart_is_502_and_slow_host_is_504,
    manifest_json_digest_is_checked_before_anything_is_written,
);
