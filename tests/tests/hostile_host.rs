//! The workspace host as hostile territory, over both transports: the agent
//! user (uid 1000) owns the config dir and runs arbitrary code, so it plants
//! links at every path the host script touches and races it by swapping
//! directories for links while installs, upgrades, uninstalls and the
//! scheduled repair run through the real functions, sshd (through `sudo -n`)
//! and the SSM agent emulator (as root). A canary tree of root's files outside
//! the config dir must stay exactly as it was, and no file in the config dir
//! may end up root's.

use acceptance::*;
use serde_json::{json, Value};

fn files(version: &str) -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "plugin.yaml".into(),
            format!("name: prey\nversion: {version}\nskills: [prey-skill]\n").into_bytes(),
        ),
        (
            "skills/prey-skill/SKILL.md".into(),
            format!("# prey {version}\n").into_bytes(),
        ),
        ("rules/rule.md".into(), format!("Rule {version}.\n").into_bytes()),
        ("hooks/h.sh".into(), b"#!/bin/sh\necho h\n".to_vec()),
        ("commands/c.md".into(), b"Do it.\n".to_vec()),
        (
            "settings-fragment.json".into(),
            br#"{"hooks": {"PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "${CLAUDE_DIR}/hooks/h.sh"}]}]}}"#.to_vec(),
        ),
    ]
}

async fn publish(f: &Fixture, version: &str) {
    let files = files(version);
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    f.publish("prey", &refs).await;
}

/// Install, upgrade (a new version published), list, repair, uninstall,
/// checking the canary and the config dir's owners after each. Statuses
/// may be errors (the agent broke its own dir); none may be a 500.
async fn every_operation(f: &Fixture, app: &plugin_delivery::App, canary: &Canary, what: &str) {
    let check = |op: &str, status: u16, body: &Value| {
        assert!(status != 500, "{what}: {op}: {status} {body}");
        canary.assert_unchanged(&format!("{what}: {op}"));
        assert_eq!(
            root_owned(&f.config_dir),
            Vec::<String>::new(),
            "{what}: {op}"
        );
    };
    publish(f, "2.0.0").await;
    let (s, b) = install(app, &f.workspace, r#"{"source":"prey"}"#).await;
    check("upgrade", s, &b);
    let (s, b) = list(app, &f.workspace).await;
    check("list", s, &b);
    let out = plugin_delivery::entry::events::handle(&app.deps, scheduled_event()).await;
    check(
        "repair",
        if out.is_ok() { 200 } else { 502 },
        &json!(format!("{out:?}")),
    );
    let (s, b) = uninstall(app, &f.workspace, "prey").await;
    check("uninstall", s, &b);
    publish(f, "1.0.0").await;
    let (s, b) = install(app, &f.workspace, r#"{"source":"prey"}"#).await;
    check("install", s, &b);
}

async fn planted_links_lead_nowhere(access: Access) {
    let canary = Canary::new();
    let sha = "0".repeat(64);
    for rel in planted_paths("prey", &sha, "prey-skill") {
        let f = Fixture::with(access).await;
        let app = f.app();
        publish(&f, "1.0.0").await;
        let (s, b) = install(&app, &f.workspace, r#"{"source":"prey"}"#).await;
        assert_eq!(s, 200, "{b}");
        let digest = b["digest"].as_str().unwrap();
        // The real digest where the path names one.
        let rel = rel.replace(&sha, digest);
        let target = if rel.ends_with(".md") || rel.ends_with(".json") || rel.contains('@') {
            canary.path("ld.so.preload")
        } else {
            canary.path("etc")
        };
        plant_link(&f.config_dir, &rel, &target);
        every_operation(&f, &app, &canary, &format!("{access:?}: {rel}")).await;
    }
}

async fn a_racing_agent_changes_nothing_outside(access: Access) {
    let canary = Canary::new();
    let f = Fixture::with(access).await;
    let app = f.app();
    publish(&f, "1.0.0").await;
    let (s, b) = install(&app, &f.workspace, r#"{"source":"prey"}"#).await;
    assert_eq!(s, 200, "{b}");
    let racer = Racer::start(
        &f.config_dir,
        &[
            "plugins",
            "skills",
            ".claude",
            ".plugin-delivery",
            ".plugin-delivery/store",
            ".plugin-delivery/staging",
        ],
        &canary.path("etc"),
    );
    for round in 0..4 {
        every_operation(
            &f,
            &app,
            &canary,
            &format!("{access:?}: race round {round}"),
        )
        .await;
    }
    drop(racer);
    assert_eq!(root_owned(&f.config_dir), Vec::<String>::new());
    canary.assert_unchanged("after the race");
    // Once the agent stops, the workspace works again.
    let (s, b) = install(&app, &f.workspace, r#"{"source":"prey"}"#).await;
    assert_eq!(s, 200, "{b}");
}

async fn a_config_dir_tag_outside_the_roots_is_refused_before_the_host(access: Access) {
    let f = Fixture::with(access).await;
    let app = f.app();
    publish(&f, "1.0.0").await;
    for dir in ["/etc", "/root/.ssh", "/var/lib/plugin-delivery"] {
        set_tag(&f.ec2, &f.host.instance_id, "molecule:config-dir", dir).await;
        let (s, b) = install(&app, &f.workspace, r#"{"source":"prey"}"#).await;
        assert_eq!(s, 502, "{dir}: {b}");
        assert!(
            b["error"]
                .as_str()
                .unwrap_or_default()
                .contains("molecule:config-dir"),
            "{b}"
        );
        assert!(
            !b.to_string().contains(dir),
            "the path stays in the log: {b}"
        );
    }
    assert!(!std::path::Path::new("/etc/plugins").exists());
    assert!(!f.touched());
}

async fn a_config_dir_not_owned_by_the_agent_is_502_and_unchanged(access: Access) {
    let f = Fixture::with(access).await;
    let app = f.app();
    publish(&f, "1.0.0").await;
    std::os::unix::fs::chown(&f.config_dir, Some(0), Some(0)).unwrap();
    let (s, b) = install(&app, &f.workspace, r#"{"source":"prey"}"#).await;
    assert_eq!(s, 502, "{b}");
    assert_eq!(b["host_error"], "bad_config_dir", "{b}");
    assert!(!f.touched());
}

macro_rules! both_transports {
    ($($f:ident),* $(,)?) => {
        mod over_ssh {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $f() {
                    super::$f(acceptance::Access::Ssh).await;
                }
            )*
        }
        mod over_ssm {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $f() {
                    super::$f(acceptance::Access::Ssm).await;
                }
            )*
        }
    };
}

both_transports!(
    planted_links_lead_nowhere,
    a_racing_agent_changes_nothing_outside,
    a_config_dir_tag_outside_the_roots_is_refused_before_the_host,
    a_config_dir_not_owned_by_the_agent_is_502_and_unchanged,
);
