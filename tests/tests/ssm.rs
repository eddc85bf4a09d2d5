//! What only the SSM path has: an agent that is not online, a command that
//! times out, output the service truncates, a presigned URL that expired
//! before the host fetched it, and a fleet mixing SSH and SSM hosts. (The
//! shared suite in e2e.rs and failures.rs runs over SSM too.)

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use acceptance::*;
use plugin_delivery::domain::config::RuntimeProfile;
use serde_json::{json, Value};

fn plugin(name: &str, version: &str) -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "plugin.yaml".into(),
            format!("name: {name}\nversion: {version}\nskills: [{name}-skill]\n").into_bytes(),
        ),
        (
            format!("skills/{name}-skill/SKILL.md"),
            format!("# {name} {version}\n").into_bytes(),
        ),
    ]
}

async fn publish(f: &Fixture, name: &str, version: &str) {
    let files = plugin(name, version);
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    f.publish(name, &refs).await;
}

fn skill_text(f: &Fixture, name: &str) -> String {
    std::fs::read_to_string(
        f.plugin_dir(name)
            .join(format!("skills/{name}-skill/SKILL.md")),
    )
    .unwrap_or_default()
}

/// Leftovers of an interrupted operation in the host's staging area.
fn staging_leftovers(f: &Fixture) -> usize {
    std::fs::read_dir(f.config_dir.join(".plugin-delivery/staging"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn calls() -> Value {
    let (status, body) = ssm_control("GET", "calls", None);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The SendCommand requests the emulator received for `instance`.
fn commands_for(instance: &str) -> Vec<Value> {
    calls()["send_command"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| {
            c["instance_ids"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|i| i == instance))
        })
        .collect()
}

/// Holds the host lock the way a concurrent operation would.
struct LockHolder(Child);

impl LockHolder {
    fn take(f: &Fixture) -> LockHolder {
        // Root's lock for this config dir, where the host script keeps it.
        let lock = f.book().join("lock");
        std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
        // -o: the sleeping child does not inherit the lock, so killing
        // flock releases it.
        let child = Command::new("flock")
            .arg("-o")
            .arg(&lock)
            .args(["sleep", "60"])
            .spawn()
            .unwrap();
        // Wait until the lock is really held.
        for _ in 0..100 {
            let free = Command::new("flock")
                .args(["-n"])
                .arg(&lock)
                .arg("true")
                .status()
                .unwrap()
                .success();
            if !free {
                return LockHolder(child);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(LockHolder(child));
        panic!("could not take the host lock");
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_not_online_is_503_and_nothing_changes() {
    let f = Fixture::with(Access::Ssm).await;
    let app = f.app();
    publish(&f, "calm", "1.0.0").await;
    let (s, b) = install(&app, &f.workspace, r#"{"source":"calm"}"#).await;
    assert_eq!(s, 200, "{b}");
    let d1 = b["digest"].clone();
    publish(&f, "calm", "2.0.0").await;
    let sent = commands_for(&f.host.instance_id).len();
    let state = f.desired().await;

    for ping in ["ConnectionLost", "Inactive"] {
        ssm_agent(&f.host.instance_id, json!({ "ping": ping }));
        let (s, b) = install(&app, &f.workspace, r#"{"source":"calm"}"#).await;
        assert_eq!(s, 503, "{ping}: {b}");
        assert!(
            b["error"]
                .as_str()
                .unwrap()
                .contains("SSM agent not reachable"),
            "{b}"
        );
        let (s, b) = uninstall(&app, &f.workspace, "calm").await;
        assert_eq!(s, 503, "{ping}: {b}");
    }
    // Not a managed instance at all (agent never registered).
    ssm_control("DELETE", &format!("agents/{}", f.host.instance_id), None);
    let (s, b) = install(&app, &f.workspace, r#"{"source":"calm"}"#).await;
    assert_eq!(s, 503, "{b}");
    assert!(!b.to_string().contains(&f.host.instance_id), "{b}");

    assert_eq!(
        commands_for(&f.host.instance_id).len(),
        sent,
        "no command was sent to an agent that is not online"
    );
    assert_eq!(skill_text(&f, "calm"), "# calm 1.0.0\n");
    assert_eq!(f.restarts(), 1);
    assert_eq!(f.desired().await, state);
    assert_eq!(f.desired().await["plugins"]["calm"]["digest"], d1);

    // Back online: the same request goes through.
    ssm_agent(&f.host.instance_id, json!({ "ping": "Online" }));
    let (s, b) = install(&app, &f.workspace, r#"{"source":"calm"}"#).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("installed")), "{b}");
    assert_eq!(skill_text(&f, "calm"), "# calm 2.0.0\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_timeout_is_504_and_old_version_intact() {
    let f = Fixture::with(Access::Ssm).await;
    let app = f.app();
    publish(&f, "slowpoke", "1.0.0").await;
    assert_eq!(
        install(&app, &f.workspace, r#"{"source":"slowpoke"}"#)
            .await
            .0,
        200
    );
    publish(&f, "slowpoke", "2.0.0").await;

    // Another operation holds the host lock longer than the command may run:
    // the agent kills the script while it waits, as the service does.
    let holder = LockHolder::take(&f);
    ssm_agent(&f.host.instance_id, json!({ "execution_timeout_cap": 1 }));
    let t = Instant::now();
    let (s, b) = install(&app, &f.workspace, r#"{"source":"slowpoke"}"#).await;
    assert_eq!(s, 504, "{b}");
    assert!(b["error"].as_str().unwrap().contains("timed out"), "{b}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    drop(holder);
    ssm_agent(
        &f.host.instance_id,
        json!({ "execution_timeout_cap": null }),
    );

    assert_eq!(skill_text(&f, "slowpoke"), "# slowpoke 1.0.0\n");
    assert_eq!(f.restarts(), 1);
    assert_eq!(f.desired().await["plugins"]["slowpoke"]["version"], "1.0.0");

    // The next operation clears any leftovers and succeeds.
    let (s, b) = install(&app, &f.workspace, r#"{"source":"slowpoke"}"#).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("installed")), "{b}");
    assert_eq!(skill_text(&f, "slowpoke"), "# slowpoke 2.0.0\n");
    assert_eq!(staging_leftovers(&f), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_host_is_409_as_over_ssh() {
    let f = Fixture::with(Access::Ssm).await;
    publish(&f, "patient", "1.0.0").await;
    let mut cfg = f.config();
    cfg.lock_wait_secs = 1;
    let app = f.app_with(cfg);
    let holder = LockHolder::take(&f);
    let (s, b) = install(&app, &f.workspace, r#"{"source":"patient"}"#).await;
    assert_eq!(s, 409, "{b}");
    assert_eq!(b["host_error"], "busy");
    drop(holder);
    assert!(!f.plugin_dir("patient").exists());
    assert_eq!(f.desired().await, Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_beyond_what_ssm_keeps_still_yields_the_result() {
    let f = Fixture::with(Access::Ssm).await;
    publish(&f, "chatty", "1.0.0").await;
    let mut cfg = f.config();
    let p = cfg.profiles.get_mut("claude-code").unwrap();
    // A runtime restart that floods both streams far past 24,000 / 8,000
    // characters before doing its real work.
    p.restart = format!(
        "python3 -c 'import sys; sys.stdout.write(\"o\" * 100000 + \"\\n\"); sys.stderr.write(\"e\" * 50000 + \"\\n\")' && {}",
        p.restart
    );
    let app = f.app_with(cfg);
    let (s, b) = install(&app, &f.workspace, r#"{"source":"chatty"}"#).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("installed")), "{b}");
    assert_eq!(f.restarts(), 1);

    // The noise really happened: the agent's full output files hold it.
    let cmd = commands_for(&f.host.instance_id).pop().unwrap();
    let id = cmd["command_id"].as_str().expect("command id in calls");
    let (status, body) = ssm_control("GET", &format!("commands/{id}"), None);
    assert_eq!(status, 200, "{body}");
    let state: Value = serde_json::from_str(&body).unwrap();
    let text = state.to_string();
    let dir = text
        .split('"')
        .find(|s| s.ends_with("0.awsrunShellScript"))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| panic!("no output dir in {state}"));
    let out = std::fs::read_to_string(dir.join("stdout")).unwrap();
    let err = std::fs::read_to_string(dir.join("stderr")).unwrap();
    assert!(err.len() > 100_000, "stderr {} bytes", err.len());
    assert_eq!(out.lines().count(), 1, "stdout is the result line only");
    assert!(out.starts_with("@@plugin-delivery-result "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_expired_before_the_host_fetched_it() {
    let f = Fixture::with(Access::Ssm).await;
    publish(&f, "late", "1.0.0").await;
    let app = f.app();
    assert_eq!(
        install(&app, &f.workspace, r#"{"source":"late"}"#).await.0,
        200
    );
    publish(&f, "late", "2.0.0").await;

    // URLs valid 1 s, and an agent that picks the command up after 2.5 s.
    let mut cfg = f.config();
    cfg.ssm_url_ttl = Duration::from_secs(1);
    ssm_agent(&f.host.instance_id, json!({ "start_delay": 2.5 }));
    let (s, b) = install(&f.app_with(cfg), &f.workspace, r#"{"source":"late"}"#).await;
    ssm_agent(&f.host.instance_id, json!({ "start_delay": 0 }));
    assert_eq!(s, 502, "{b}");
    assert_eq!(b["host_error"], "fetch_failed");
    let msg = b["error"].as_str().unwrap();
    assert!(
        msg.contains("expired") && msg.contains("nothing was changed"),
        "{b}"
    );
    assert!(
        b["host_message"].as_str().unwrap().contains("expired"),
        "{b}"
    );
    assert!(
        !b.to_string().contains("X-Amz"),
        "no URL in the response: {b}"
    );

    assert_eq!(skill_text(&f, "late"), "# late 1.0.0\n");
    assert_eq!(f.restarts(), 1);
    assert_eq!(f.desired().await["plugins"]["late"]["version"], "1.0.0");
    assert_eq!(staging_leftovers(&f), 0);

    let cmd = commands_for(&f.host.instance_id).pop().unwrap();
    let text = cmd["parameters"]["commands"][0].as_str().unwrap();
    assert!(text.contains("X-Amz-Expires=1&"), "short-lived URL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_goes_into_the_command() {
    let f = Fixture::with(Access::Ssm).await;
    publish(&f, "quiet", "1.0.0").await;
    // Role-style credentials with recognisable parts: the secret key must
    // never reach the command SSM keeps for 30 days.
    const SECRET: &str = "SeCrEt-KeY-never-in-a-command";
    let sdk = sdk().await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "ASIAPLUGINDELIVERY",
                SECRET,
                Some("session-token-part".into()),
                None,
                "test",
            ))
            .build(),
    );
    let app = plugin_delivery::App::with_clients(
        f.config(),
        s3,
        f.ec2.clone(),
        f.eic.clone(),
        f.ssm.clone(),
    )
    .unwrap();
    let (s, b) = install(&app, &f.workspace, r#"{"source":"quiet"}"#).await;
    assert_eq!(s, 200, "{b}");
    let cmd = commands_for(&f.host.instance_id).pop().unwrap();
    let all = cmd.to_string();
    assert!(
        !all.contains(SECRET),
        "the secret key is not in the command"
    );
    let text = cmd["parameters"]["commands"][0].as_str().unwrap();
    // The one credential-shaped thing is the presigned URL: expiring within
    // 300 s, for a GET of this one staged archive.
    assert_eq!(text.matches("X-Amz-Signature=").count(), 1);
    assert!(text.contains("X-Amz-Expires=300&"));
    let digest = b["digest"].as_str().unwrap();
    assert!(text.contains(&format!("/staged/{digest}.tar.gz?")));
    assert!(cmd["comment"].as_str().unwrap().len() <= 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_cancels_the_command_and_changes_nothing() {
    let f = Fixture::with(Access::Ssm).await;
    publish(&f, "waiter", "1.0.0").await;
    let (s, _) = install(&f.app(), &f.workspace, r#"{"source":"waiter"}"#).await;
    assert_eq!(s, 200);
    publish(&f, "waiter", "2.0.0").await;

    // The script waits for the host lock longer than the API deadline.
    let holder = LockHolder::take(&f);
    let mut cfg = f.config();
    cfg.operation_timeout = Duration::from_secs(4);
    let t = Instant::now();
    let (s, b) = install(&f.app_with(cfg), &f.workspace, r#"{"source":"waiter"}"#).await;
    assert_eq!(s, 504, "{b}");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "answered before the deadline"
    );

    // The command was cancelled (the agent killed it), not left running.
    let cmd = commands_for(&f.host.instance_id).pop().unwrap();
    let id = cmd["command_id"].as_str().unwrap().to_string();
    let mut state = String::new();
    for _ in 0..50 {
        state = ssm_control("GET", &format!("commands/{id}"), None).1;
        if state.contains("\"Cancelled\"") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(state.contains("\"Cancelled\""), "{state}");
    drop(holder);

    assert_eq!(skill_text(&f, "waiter"), "# waiter 1.0.0\n");
    assert_eq!(f.restarts(), 1);
    assert_eq!(f.desired().await["plugins"]["waiter"]["version"], "1.0.0");
    let (s, b) = install(&f.app(), &f.workspace, r#"{"source":"waiter"}"#).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("installed")), "{b}");
    assert_eq!(staging_leftovers(&f), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mixed_fleet_lists_and_installs_alike() {
    // One app (one deployment) in front of an SSH host and an SSM host.
    let f = Fixture::with(Access::Ssh).await;
    let ssm_ws = unique("ws");
    let ssm_host = Host::start_with(&f.ec2, &ssm_ws, "hermes", Access::Ssm).await;
    let ssm_dir = f.dir.path().join("hermes");
    agent_dir(&ssm_dir);
    let mut cfg = f.config();
    cfg.profiles.insert(
        "hermes".into(),
        RuntimeProfile {
            config_dir: ssm_dir.to_string_lossy().into_owned(),
            restart: format!("python3 {} {}", fake_runtime().display(), ssm_dir.display()),
        },
    );
    let app = f.app_with(cfg);
    publish(&f, "shared", "1.0.0").await;

    let (s1, b1) = install(&app, &f.workspace, r#"{"source":"shared"}"#).await;
    let (s2, b2) = install(&app, &ssm_ws, r#"{"source":"shared"}"#).await;
    assert_eq!((s1, s2), (200, 200), "{b1} {b2}");
    assert_eq!(b1, b2, "same response over both transports");
    assert_eq!(
        tree(&f.plugin_dir("shared")),
        tree(&ssm_dir.join("plugins/shared")),
        "same bytes, modes and owners on both hosts"
    );
    assert_eq!(commands_for(&ssm_host.instance_id).len(), 1);

    let (_, l1) = list(&app, &f.workspace).await;
    let (_, l2) = list(&app, &ssm_ws).await;
    let strip = |mut v: Value| {
        for p in v.as_array_mut().unwrap() {
            p.as_object_mut().unwrap().remove("installed_at");
        }
        v
    };
    assert_eq!(strip(l1), strip(l2));

    let (_, u1) = uninstall(&app, &f.workspace, "shared").await;
    let (_, u2) = uninstall(&app, &ssm_ws, "shared").await;
    assert_eq!(u1, u2);
    assert!(!f.plugin_dir("shared").exists() && !ssm_dir.join("plugins/shared").exists());
    drop(ssm_host);
}
