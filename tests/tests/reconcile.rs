//! Reinstalls, rollouts and drift repair driven by EventBridge events,
//! through the reinstall function's handler (`events::handle`), on the local
//! stack with real sshd hosts (and SSM hosts), and the operation records
//! they leave, read back through the operations API.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use acceptance::*;
use plugin_delivery::domain::config::RuntimeProfile;
use serde_json::{json, Value};

fn files(name: &str, version: &str) -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "plugin.yaml".into(),
            format!("name: {name}\nversion: {version}\nskills: [{name}-skill]\n").into_bytes(),
        ),
        (
            format!("skills/{name}-skill/SKILL.md"),
            format!("# {name} {version}\n").into_bytes(),
        ),
        (
            "rules/rule.md".into(),
            format!("Rule of {name} {version}.\n").into_bytes(),
        ),
    ]
}

async fn publish(f: &Fixture, name: &str, version: &str) {
    let files = files(name, version);
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    f.publish(name, &refs).await;
}

/// A config for hosts that share this machine: each host's config dir
/// comes from its `molecule:config-dir` tag, and the fake runtime reads it
/// from `PLUGIN_CONFIG_DIR`.
fn fleet_config(f: &Fixture) -> plugin_delivery::Config {
    let mut c = f.config();
    c.profiles.insert(
        "claude-code".into(),
        RuntimeProfile {
            config_dir: f.config_dir.to_string_lossy().into_owned(),
            restart: format!("python3 {}", fake_runtime().display()),
        },
    );
    c.ready_budget = Duration::from_secs(20);
    c
}

/// Another workspace host beside the fixture's, with its own config dir.
struct Extra {
    workspace: String,
    host: Host,
    dir: PathBuf,
}

async fn extra_host(f: &Fixture, workspace: &str, access: Access, name: &str) -> Extra {
    let host = Host::start_with(&f.ec2, workspace, "claude-code", access).await;
    let dir = f.dir.path().join(name);
    agent_dir(&dir);
    set_tag(
        &f.ec2,
        &host.instance_id,
        "molecule:config-dir",
        dir.to_str().unwrap(),
    )
    .await;
    Extra {
        workspace: workspace.to_string(),
        host,
        dir,
    }
}

fn restarts_of(dir: &Path) -> usize {
    std::fs::read_to_string(format!("{}.restarts", dir.display()))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn instance_running(instance: &str) -> Value {
    json!({
        "version": "0",
        "id": "7bf73129-1428-4cd3-a780-95db273d1602",
        "detail-type": "EC2 Instance State-change Notification",
        "source": "aws.ec2",
        "account": "123456789012",
        "time": "2026-11-25T19:00:00Z",
        "region": "us-east-1",
        "resources": [format!("arn:aws:ec2:us-east-1:123456789012:instance/{instance}")],
        "detail": {"instance-id": instance, "state": "running"}
    })
}

/// A request from the tenant server for the test org (it must name one).
fn request(mut detail: Value) -> Value {
    if detail.get("org_id").is_none() {
        detail["org_id"] = json!(TEST_ORG);
    }
    json!({
        "version": "0",
        "id": "d1a2b3c4-0000-4000-8000-000000000001",
        "detail-type": "Plugin Reinstall Requested",
        "source": "molecule.plugin-delivery",
        "account": "123456789012",
        "time": "2026-11-25T19:00:00Z",
        "region": "us-east-1",
        "resources": [],
        "detail": detail
    })
}

/// A request from the platform itself: it may act across orgs.
fn platform_request(detail: Value) -> Value {
    let mut ev = request(detail);
    ev["detail"].as_object_mut().unwrap().remove("org_id");
    ev["source"] = json!("molecule.plugin-delivery.platform");
    ev
}

fn scheduled() -> Value {
    scheduled_event()
}

async fn handle(app: &plugin_delivery::App, ev: Value) -> Result<Value, String> {
    plugin_delivery::entry::events::handle(&app.deps, ev)
        .await
        .map_err(|e| e.message)
}

/// `GET /workspaces/{ws}/plugins/operations[?query]`.
async fn operations(app: &plugin_delivery::App, ws: &str, query: &str) -> (u16, Value) {
    api(
        app,
        get_req(
            "/workspaces/{id}/plugins/operations",
            &format!("/workspaces/{ws}/plugins/operations"),
            json!({"id": ws}),
            query,
        ),
    )
    .await
}

async fn operation(app: &plugin_delivery::App, ws: &str, id: &str) -> (u16, Value) {
    api(
        app,
        get_req(
            "/workspaces/{id}/plugins/operations/{op_id}",
            &format!("/workspaces/{ws}/plugins/operations/{id}"),
            json!({"id": ws, "op_id": id}),
            "",
        ),
    )
    .await
}

async fn terminate(f: &Fixture, instance: &str) {
    f.ec2
        .terminate_instances()
        .instance_ids(instance)
        .send()
        .await
        .unwrap();
}

async fn replaced_instance_gets_every_plugin_back(access: Access) {
    let f = Fixture::with(access).await;
    let app = f.app_with(fleet_config(&f));
    for (n, v) in [("alpha", "1.0.0"), ("beta", "2.1.0"), ("gamma", "0.3.0")] {
        publish(&f, n, v).await;
        let (s, b) = install(&app, &f.workspace, &format!(r#"{{"source":"{n}"}}"#)).await;
        assert_eq!(s, 200, "{b}");
    }
    let before: Vec<_> = ["alpha", "beta", "gamma"]
        .iter()
        .map(|n| tree(&f.plugin_dir(n)))
        .collect();

    // A workspace restart: the old instance goes, a new one with the same
    // workspace tag and an empty config dir comes up.
    terminate(&f, &f.host.instance_id).await;
    let new = extra_host(&f, &f.workspace, access, "new-host").await;
    let out = handle(&app, instance_running(&new.host.instance_id))
        .await
        .unwrap();
    assert_eq!(out["status"], "succeeded", "{out}");
    assert_eq!(out["trigger"], "instance-start");
    assert_eq!(out["result"]["installed"], 3, "{out}");
    for (i, n) in ["alpha", "beta", "gamma"].iter().enumerate() {
        assert_eq!(
            tree(&new.dir.join("plugins").join(n)),
            before[i],
            "{n} byte-identical"
        );
    }
    assert_eq!(restarts_of(&new.dir), 1, "one restart for the whole set");
    assert!(new.dir.join("skills/beta-skill/SKILL.md").exists(), "wired");

    // The same event again (a retry): everything unchanged, no restart.
    let out = handle(&app, instance_running(&new.host.instance_id))
        .await
        .unwrap();
    assert_eq!(out["result"]["unchanged"], 3, "{out}");
    assert_eq!(restarts_of(&new.dir), 1);

    // Readable through the API, newest first.
    let (s, b) = operations(&app, &f.workspace, "limit=2").await;
    assert_eq!(s, 200, "{b}");
    let ops = b["operations"].as_array().unwrap();
    assert_eq!(ops.len(), 2);
    assert_eq!(ops[0]["kind"], "reinstall");
    assert_eq!(ops[0]["result"]["unchanged"], 3);
    assert_eq!(ops[1]["result"]["installed"], 3);
    assert_eq!(ops[0]["transport"], access.as_str());
    let next = b["next"].as_str().expect("a next page");
    let (_, b2) = operations(&app, &f.workspace, &format!("next={next}")).await;
    let older = b2["operations"].as_array().unwrap();
    assert_eq!(older.len(), 3, "the three API installs");
    assert!(older
        .iter()
        .all(|o| o["kind"] == "install" && o["trigger"] == "api"));
    let id = ops[1]["id"].as_str().unwrap();
    let (s, one) = operation(&app, &f.workspace, id).await;
    assert_eq!((s, &one["id"]), (200, &json!(id)));
    assert_eq!(one["plugins"].as_array().unwrap().len(), 3);
    drop(new);
}

async fn an_instance_without_a_workspace_is_ignored() {
    let f = Fixture::new().await;
    let app = f.app_with(fleet_config(&f));
    let out = f
        .ec2
        .run_instances()
        .image_id("ami-12345678")
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    let id = out.instances()[0].instance_id().unwrap();
    let r = handle(&app, instance_running(id)).await.unwrap();
    assert_eq!(r["ignored"], "no workspace tag");
    let stopped = json!({"detail-type": "EC2 Instance State-change Notification", "source": "aws.ec2",
        "time": "2026-11-25T19:00:00Z", "resources": [], "detail": {"instance-id": id, "state": "stopping"}});
    assert!(handle(&app, stopped).await.unwrap()["ignored"]
        .as_str()
        .unwrap()
        .contains("stopping"));
}

fn sshd(args: &[&str]) {
    let out = Command::new("bash")
        .arg(repo_root().join("tests/stack/sshd-host.sh"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn a_host_not_ready_at_first_gets_its_plugins_within_the_budget() {
    let f = Fixture::new().await;
    let app = f.app_with(fleet_config(&f));
    publish(&f, "early", "1.0.0").await;
    assert_eq!(
        install(&app, &f.workspace, r#"{"source":"early"}"#).await.0,
        200
    );
    terminate(&f, &f.host.instance_id).await;
    let new = extra_host(&f, &f.workspace, Access::Ssh, "booting").await;
    // sshd is not up yet on the new host: it comes up 3 s after the event.
    let state = new.host.state_dir.to_str().unwrap().to_string();
    sshd(&["stop", &state]);
    let (ip, port, id) = (
        new.host.ip.clone(),
        new.host.port,
        new.host.instance_id.clone(),
    );
    let keys = stack().var("PLUGIN_STACK_KEYS_DIR").to_string();
    let boot = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        sshd(&["start", &state, &ip, &port.to_string(), &id, &keys]);
    });
    let t = Instant::now();
    let out = handle(&app, instance_running(&new.host.instance_id))
        .await
        .unwrap();
    boot.join().unwrap();
    assert!(t.elapsed() >= Duration::from_secs(3));
    assert_eq!(out["status"], "succeeded", "{out}");
    assert!(new.dir.join("plugins/early/plugin.yaml").exists());
    assert_eq!(restarts_of(&new.dir), 1);
}

async fn an_ssm_agent_registering_late_gets_its_plugins_within_the_budget() {
    let f = Fixture::with(Access::Ssm).await;
    let app = f.app_with(fleet_config(&f));
    publish(&f, "patient", "1.0.0").await;
    assert_eq!(
        install(&app, &f.workspace, r#"{"source":"patient"}"#)
            .await
            .0,
        200
    );
    terminate(&f, &f.host.instance_id).await;
    let new = extra_host(&f, &f.workspace, Access::Ssm, "hardened-boot").await;
    // The new host's SSM agent registers only 3 s after the event (agents
    // can take minutes on a real boot).
    let id = new.host.instance_id.clone();
    ssm_control("DELETE", &format!("agents/{id}"), None);
    let register = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        ssm_agent(&id, json!({"ping": "Online"}));
    });
    let t = Instant::now();
    let out = handle(&app, instance_running(&new.host.instance_id))
        .await
        .unwrap();
    register.join().unwrap();
    assert!(t.elapsed() >= Duration::from_secs(3));
    assert_eq!(out["status"], "succeeded", "{out}");
    assert_eq!(out["transport"], "ssm");
    assert!(new.dir.join("plugins/patient/plugin.yaml").exists());
    assert_eq!(restarts_of(&new.dir), 1);
}

async fn a_host_never_ready_fails_the_event_for_retry() {
    let f = Fixture::new().await;
    let mut cfg = fleet_config(&f);
    cfg.ready_budget = Duration::from_secs(3);
    let app = f.app_with(cfg);
    publish(&f, "late", "1.0.0").await;
    assert_eq!(
        install(&app, &f.workspace, r#"{"source":"late"}"#).await.0,
        200
    );
    terminate(&f, &f.host.instance_id).await;
    let new = extra_host(&f, &f.workspace, Access::Ssh, "dead").await;
    sshd(&["stop", new.host.state_dir.to_str().unwrap()]);
    let t = Instant::now();
    let err = handle(&app, instance_running(&new.host.instance_id))
        .await
        .unwrap_err();
    assert!(err.contains("not ready within 3 s"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(!new.dir.join("plugins").exists());
    // The failure is on record too.
    let (_, b) = operations(&app, &f.workspace, "limit=1").await;
    assert_eq!(b["operations"][0]["status"], "failed", "{b}");
    assert_eq!(b["operations"][0]["result"]["status"], 503);
}

/// The most spans open at once in a log of `s <time>` / `e <time>` lines.
fn max_overlap(log: &Path) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut ev: Vec<(f64, i32)> = text
        .lines()
        .filter_map(|l| {
            let (k, t) = l.split_once(' ')?;
            let t: f64 = t.trim().parse().ok()?;
            Some((t, if k == "s" { 1 } else { -1 }))
        })
        .collect();
    ev.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in ev {
        cur += d;
        max = max.max(cur);
    }
    max as usize
}

async fn a_rollout_to_20_workspaces_keeps_to_5_at_once() {
    let f = Fixture::new().await;
    let log = f.dir.path().join("spans.log");
    let mut cfg = fleet_config(&f);
    // Each host's install marks its restart span (0.3 s) in a shared log.
    cfg.profiles.get_mut("claude-code").unwrap().restart = format!(
        "echo \"s $(date +%s.%N)\" >> {0}; sleep 0.3; echo \"e $(date +%s.%N)\" >> {0}",
        log.display()
    );
    let app = f.app_with(cfg);
    publish(&f, "fleetwide", "2.0.0").await;
    let mut hosts = Vec::new();
    for i in 0..20 {
        let ws = format!("{}-r{i:02}", f.workspace);
        let h = extra_host(&f, &ws, Access::Ssh, &format!("r{i:02}")).await;
        f.desire(&ws, "fleetwide").await;
        hosts.push(h);
    }
    // One more workspace that wants the plugin but is stopped (no running
    // instance): deferred, its desired state updated for its next start.
    let stopped = format!("{}-stopped", f.workspace);
    f.desire(&stopped, "fleetwide").await;
    let app = std::sync::Arc::new(app);
    let run = {
        let app = app.clone();
        tokio::spawn(async move {
            // From the platform: a workspace that has no instance at all
            // cannot be placed in an org, so only a cross-org rollout
            // includes it.
            let ev =
                json!({"plugin": "fleetwide", "source": "local://fleetwide", "max_concurrency": 5});
            handle(&app, platform_request(ev)).await
        })
    };
    // Progress is on record while the rollout runs.
    let mut seen_running = None;
    while !run.is_finished() {
        for key in f.keys("rollouts/").await {
            if let Some(b) = f.get(&key).await {
                let rec: Value = serde_json::from_slice(&b).unwrap();
                if rec["status"] == "running" {
                    seen_running = Some(rec);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = run.await.unwrap().unwrap();
    let running = seen_running.expect("the parent record was readable while running");
    assert_eq!(running["progress"]["total"], 21, "{running}");
    assert_eq!(out["status"], "succeeded", "{out}");
    assert_eq!(out["progress"]["done"], 21, "{out}");
    assert_eq!(out["progress"]["deferred"], json!([stopped]), "{out}");
    let desired: Value = serde_json::from_slice(
        &f.get(&format!("workspaces/{stopped}/plugins.json"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(desired["plugins"]["fleetwide"]["version"], "2.0.0");
    let overlap = max_overlap(&log);
    assert!(overlap <= 5, "at most 5 hosts at once, measured {overlap}");
    assert!(overlap >= 2, "hosts did run in parallel ({overlap})");
    for h in &hosts {
        let skill = std::fs::read_to_string(
            h.dir
                .join("plugins/fleetwide/skills/fleetwide-skill/SKILL.md"),
        )
        .unwrap();
        assert_eq!(skill, "# fleetwide 2.0.0\n");
        let desired: Value = serde_json::from_slice(
            &f.get(&format!("workspaces/{}/plugins.json", h.workspace))
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(desired["plugins"]["fleetwide"]["version"], "2.0.0");
    }
    // Parent and children are on record; the parent is readable from a
    // workspace it touched.
    let parent = out["id"].as_str().unwrap();
    let (s, b) = operations(&app, &hosts[7].workspace, "").await;
    assert_eq!(s, 200);
    assert_eq!(b["operations"][0]["parent"], parent);
    let (s, p) = operation(&app, &hosts[7].workspace, parent).await;
    assert_eq!((s, &p["kind"]), (200, &json!("rollout")), "{p}");
    assert_eq!(p["progress"]["total"], 21);
}

async fn a_rollout_stops_at_the_error_threshold() {
    let f = Fixture::new().await;
    let mut cfg = fleet_config(&f);
    // Hosts of runtime "flaky" fail their restart: the install fails.
    cfg.profiles.insert(
        "flaky".into(),
        RuntimeProfile {
            config_dir: "/nonexistent".into(),
            restart: "exit 3".into(),
        },
    );
    let app = f.app_with(cfg);
    publish(&f, "risky", "2.0.0").await;
    let mut hosts = Vec::new();
    for i in 0..8 {
        // Sorted order: the three failing ones come first.
        let (ws, runtime) = if i < 3 {
            (format!("{}-a{i}", f.workspace), "flaky")
        } else {
            (format!("{}-b{i}", f.workspace), "claude-code")
        };
        let h = extra_host(&f, &ws, Access::Ssh, &format!("t{i}")).await;
        set_tag(&f.ec2, &h.host.instance_id, "molecule:runtime", runtime).await;
        f.desire(&ws, "risky").await;
        hosts.push(h);
    }
    let out = handle(
        &app,
        request(json!({"plugin": "risky", "source": "risky", "max_concurrency": 1, "error_threshold": 2})),
    )
    .await
    .unwrap();
    assert_eq!(out["status"], "failed", "{out}");
    assert_eq!(out["result"]["stopped_at_error_threshold"], true);
    let prog = &out["progress"];
    assert_eq!(prog["failed"], 3, "{out}");
    assert_eq!(prog["done"], 0);
    let not_started: Vec<String> = serde_json::from_value(prog["not_started"].clone()).unwrap();
    let expected: Vec<String> = hosts[3..].iter().map(|h| h.workspace.clone()).collect();
    assert_eq!(not_started, expected, "which hosts were not started");
    for h in &hosts[3..] {
        assert!(!h.dir.join("plugins").exists(), "{} untouched", h.workspace);
    }
    // Each failure has its own record with the error.
    let (_, b) = operations(&app, &hosts[0].workspace, "").await;
    assert_eq!(b["operations"][0]["status"], "failed");
    assert_eq!(b["operations"][0]["result"]["host_error"], "restart_failed");
}

/// The tenant server's requests act for one org: a rollout for acme leaves
/// a globex workspace that has the plugin untouched (host and desired
/// state), a reinstall request for a globex workspace in acme's name is
/// refused, and a request without an org is refused; the platform's
/// source reaches both orgs.
async fn tenant_requests_stay_in_their_org() {
    let f = Fixture::new().await;
    let app = f.app_with(fleet_config(&f));
    publish(&f, "scoped", "2.0.0").await;
    let ours = extra_host(&f, &format!("{}-acme", f.workspace), Access::Ssh, "acme").await;
    let theirs = extra_host(
        &f,
        &format!("{}-globex", f.workspace),
        Access::Ssh,
        "globex",
    )
    .await;
    set_tag(
        &f.ec2,
        &theirs.host.instance_id,
        "molecule:org-id",
        "globex",
    )
    .await;
    for h in [&ours, &theirs] {
        f.desire(&h.workspace, "scoped").await;
    }
    let desired = |ws: &str| {
        let f = &f;
        let key = format!("workspaces/{ws}/plugins.json");
        async move {
            let b = f.get(&key).await.unwrap();
            serde_json::from_slice::<Value>(&b).unwrap()["plugins"]["scoped"]["version"].clone()
        }
    };
    let rollout = json!({"plugin": "scoped", "source": "local://scoped"});
    let out = handle(&app, request(rollout.clone())).await.unwrap();
    assert_eq!(
        (out["status"].as_str(), out["org_id"].as_str()),
        (Some("succeeded"), Some(TEST_ORG)),
        "{out}"
    );
    assert_eq!(out["progress"]["total"], 1, "{out}");
    assert!(ours.dir.join("plugins/scoped").exists());
    assert!(
        !theirs.dir.join("plugins").exists(),
        "globex's host untouched"
    );
    assert_eq!(
        desired(&theirs.workspace).await,
        "0.9.0",
        "globex's desired state untouched"
    );
    assert_eq!(desired(&ours.workspace).await, "2.0.0");

    let e = handle(&app, request(json!({"workspace_id": theirs.workspace})))
        .await
        .unwrap_err();
    assert!(e.contains("was not found"), "{e}");
    let mut no_org = request(rollout.clone());
    no_org["detail"].as_object_mut().unwrap().remove("org_id");
    let e = handle(&app, no_org).await.unwrap_err();
    assert!(e.contains("org_id"), "{e}");
    assert!(!theirs.dir.join("plugins").exists());

    let out = handle(&app, platform_request(rollout)).await.unwrap();
    assert_eq!(out["progress"]["total"], 2, "{out}");
    assert!(
        theirs.dir.join("plugins/scoped").exists(),
        "the platform reaches every org"
    );
}

async fn drift_is_repaired_on_the_schedule_and_extras_reported(access: Access) {
    let f = Fixture::with(access).await;
    let mut cfg = fleet_config(&f);
    cfg.profiles.get_mut("claude-code").unwrap().restart = format!(
        "python3 {} {}",
        fake_runtime().display(),
        f.config_dir.display()
    );
    let app = f.app_with(cfg);
    for n in ["kept", "deleted", "tampered"] {
        publish(&f, n, "1.0.0").await;
        assert_eq!(
            install(&app, &f.workspace, &format!(r#"{{"source":"{n}"}}"#))
                .await
                .0,
            200
        );
    }
    let good = tree(&f.plugin_dir("tampered"));
    // By hand: one plugin dir deleted, another's file changed, and a
    // plugin nobody asked for.
    std::fs::remove_file(f.plugin_dir("deleted")).unwrap();
    std::fs::write(
        f.plugin_dir("tampered").join("rules/rule.md"),
        "Changed by hand.\n",
    )
    .unwrap();
    let extra = f.config_dir.join("plugins/stowaway");
    std::fs::create_dir_all(&extra).unwrap();
    std::fs::write(extra.join("plugin.yaml"), "name: stowaway\n").unwrap();
    f.give_to_agent();
    let restarts = f.restarts();

    let out = handle(&app, scheduled()).await.unwrap();
    let mine: Vec<&Value> = out["drift"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["workspace"] == f.workspace.as_str())
        .collect();
    assert_eq!(mine.len(), 1, "{out}");
    let found: Vec<(String, String)> = mine[0]["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["plugin"].as_str().unwrap().into(),
                p["result"].as_str().unwrap().into(),
            )
        })
        .collect();
    for want in [
        ("deleted", "missing"),
        ("tampered", "different"),
        ("stowaway", "extra"),
        ("deleted", "installed"),
        ("tampered", "installed"),
    ] {
        assert!(
            found.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} in {found:?}"
        );
    }
    assert!(!found.iter().any(|(p, _)| p == "kept"), "{found:?}");
    assert_eq!(tree(&f.plugin_dir("tampered")), good, "tampered repaired");
    assert!(
        f.plugin_dir("deleted").join("plugin.yaml").exists(),
        "deleted restored"
    );
    assert_eq!(
        std::fs::read_to_string(extra.join("plugin.yaml")).unwrap(),
        "name: stowaway\n"
    );
    assert_eq!(f.restarts(), restarts + 1, "one restart for the repair");

    // Nothing drifted any more: the next check changes nothing.
    let out = handle(&app, scheduled()).await.unwrap();
    let mine: Vec<&Value> = out["drift"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["workspace"] == f.workspace.as_str())
        .collect();
    let results: Vec<&str> = mine
        .iter()
        .flat_map(|d| d["plugins"].as_array().unwrap())
        .map(|p| p["result"].as_str().unwrap())
        .collect();
    assert_eq!(results, ["extra"], "only the extra is reported again");
    assert_eq!(f.restarts(), restarts + 1);
    let (_, b) = operations(&app, &f.workspace, "limit=1").await;
    assert_eq!(b["operations"][0]["kind"], "repair");
    assert_eq!(b["operations"][0]["trigger"], "schedule");
}

async fn a_reinstall_request_for_one_workspace() {
    let f = Fixture::new().await;
    let app = f.app_with(fleet_config(&f));
    publish(&f, "asked", "1.0.0").await;
    assert_eq!(
        install(&app, &f.workspace, r#"{"source":"asked"}"#).await.0,
        200
    );
    std::fs::remove_file(f.plugin_dir("asked")).unwrap();
    let out = handle(&app, request(json!({"workspace_id": f.workspace})))
        .await
        .unwrap();
    assert_eq!(out["trigger"], "request");
    assert_eq!(out["result"]["installed"], 1, "{out}");
    assert!(f.plugin_dir("asked").join("plugin.yaml").exists());
    // A request from another source is refused.
    let mut ev = request(json!({"workspace_id": f.workspace}));
    ev["source"] = json!("someone.else");
    assert!(handle(&app, ev).await.unwrap_err().contains("source"));
    // Bad ids and unknown op ids through the API.
    let (s, _) = operation(&app, &f.workspace, "op-../../x").await;
    assert_eq!(s, 404);
    let (s, _) = operations(&app, &f.workspace, "limit=0").await;
    assert_eq!(s, 400);
}

on_both_transports!(
    replaced_instance_gets_every_plugin_back,
    drift_is_repaired_on_the_schedule_and_extras_reported,
);

macro_rules! tests {
    ($($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                super::$name().await
            }
        )+
    };
}

mod single {
    tests!(
        an_instance_without_a_workspace_is_ignored,
        a_host_not_ready_at_first_gets_its_plugins_within_the_budget,
        an_ssm_agent_registering_late_gets_its_plugins_within_the_budget,
        a_host_never_ready_fails_the_event_for_retry,
        a_rollout_to_20_workspaces_keeps_to_5_at_once,
        a_rollout_stops_at_the_error_threshold,
        a_reinstall_request_for_one_workspace,
        tenant_requests_stay_in_their_org,
    );
}

/// An install that cannot finish within the API deadline (a slow runtime
/// restart) answers 202 with an operation id and goes on in the
/// background: the queued job finishes it and the record shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_install_goes_on_in_the_background() {
    let f = Fixture::new().await;
    let sqs = sqs().await;
    let queue = sqs
        .create_queue()
        .queue_name(unique("pd-ops"))
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_string();
    let mut cfg = fleet_config(&f);
    cfg.operation_queue_url = Some(queue.clone());
    // The API gives up after 4 s (2 s of it kept for the hand-off); the
    // runtime restart takes 5 s.
    cfg.operation_timeout = Duration::from_secs(4);
    cfg.profiles.get_mut("claude-code").unwrap().restart =
        format!("sleep 5 && python3 {}", fake_runtime().display());
    let mut app = f.app_with(cfg.clone());
    app.with_queue(sqs.clone());
    publish(&f, "slowpoke", "1.0.0").await;

    let t = Instant::now();
    let (s, b) = install(&app, &f.workspace, r#"{"source":"slowpoke"}"#).await;
    assert_eq!(s, 202, "{b}");
    assert!(t.elapsed() < Duration::from_secs(4), "answered in time");
    assert_eq!(b["status"], "running");
    let id = b["operation_id"].as_str().unwrap().to_string();
    let (s, rec) = operation(&app, &f.workspace, &id).await;
    assert_eq!((s, &rec["status"]), (200, &json!("running")), "{rec}");

    // The background worker (the reinstall function, no API deadline).
    let mut worker_cfg = cfg;
    worker_cfg.operation_timeout = Duration::from_secs(60);
    let worker = f.app_with(worker_cfg);
    assert_eq!(deliver_queue(&worker, &sqs, &queue).await, 1);

    let (s, rec) = operation(&app, &f.workspace, &id).await;
    assert_eq!(s, 200);
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert_eq!(rec["result"]["plugin"], "slowpoke");
    assert!(f.plugin_dir("slowpoke").join("plugin.yaml").exists());
    assert_eq!(f.desired().await["plugins"]["slowpoke"]["version"], "1.0.0");
    // The restart cut off at the API deadline was made up for: the runtime
    // wired the plugin.
    assert!(f.config_dir.join("skills/slowpoke-skill/SKILL.md").exists());
    assert!(f.restarts() >= 1);

    // Without a queue, the same slow install is a 504.
    let mut plain = f.config();
    plain.operation_timeout = Duration::from_secs(2);
    plain.profiles.get_mut("claude-code").unwrap().restart = "sleep 5".into();
    publish(&f, "slowpoke", "2.0.0").await;
    let (s, _) = install(&f.app_with(plain), &f.workspace, r#"{"source":"slowpoke"}"#).await;
    assert_eq!(s, 504);
}
