//! The whole path on the local stack, over both transports: API event →
//! function code → S3 (moto) → EC2 lookup (moto) → SSH (key pushed through the
//! EIC emulator, real sshd host) or SSM Run Command (emulated agent, archive
//! fetched from a presigned moto URL) → host script → the runtime's wiring
//! (fake-runtime.py) → desired state.

use acceptance::*;
use serde_json::Value;

const SKILL_V1: &[u8] = b"# Greeter\nSay hello.\n";
const RULE_BLANKS: &[u8] = b"\n\nRule one.\n\nStill rule one, after a blank line.\n\n\nEnd.\n\n";

fn v1() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("plugin.yaml", b"name: hello\nversion: 1.0.0\ndescription: Says hello\nauthor: Molecule\ntags: [demo]\nskills: [greeter]\nruntimes: [claude-code]\n"),
        ("skills/greeter/SKILL.md", SKILL_V1),
        ("rules/style.md", RULE_BLANKS),
        ("GUIDE.md", b"Fragment text.\n"),
        ("README.md", b"Not wired.\n"),
        ("hooks/pre.sh", b"#!/bin/sh\necho pre\n"),
        ("commands/hi.md", b"Say hi\n"),
        ("settings-fragment.json", br#"{"hooks": {"PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "${CLAUDE_DIR}/hooks/pre.sh"}]}]}, "mcpServers": {"hello-mcp": {"command": "hello"}}}"#),
        ("adapters/claude_code.py", b"from x import Y as Adaptor\n"),
    ]
}

fn v2() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("plugin.yaml", b"name: hello\nversion: 2.0.0\ndescription: Says hello louder\nauthor: Molecule\ntags: [demo]\nskills: [shouter]\nruntimes: [claude-code]\n"),
        ("skills/shouter/SKILL.md", b"# Shouter\nSAY HELLO.\n"),
        ("rules/style.md", b"Rule two.\n"),
    ]
}

fn other() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("plugin.yaml", b"name: other\nversion: 0.1.0\nskills: [greeter]\n"),
        ("skills/greeter/SKILL.md", b"# Greeter (other)\n"),
        ("rules/other.md", b"Other rule.\n"),
        ("settings-fragment.json", br#"{"hooks": {"PreToolUse": [{"matcher": "Edit", "hooks": [{"type": "command", "command": "other"}]}]}}"#),
    ]
}

fn expected_tree(files: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>, u32)> {
    let mut v: Vec<_> = files
        .iter()
        .map(|(p, d)| {
            (
                p.to_string(),
                d.to_vec(),
                if d.starts_with(b"#!") { 0o755 } else { 0o644 },
            )
        })
        .collect();
    v.sort();
    v
}

fn host_tree(f: &Fixture, name: &str) -> Vec<(String, Vec<u8>, u32)> {
    tree(&f.plugin_dir(name))
        .into_iter()
        .map(|(p, (d, mode, uid, gid))| {
            assert_eq!((uid, gid), (1000, 1000), "{p} owner");
            (p, d, mode)
        })
        .collect()
}

async fn install_unchanged_upgrade_list_uninstall(access: Access) {
    let f = Fixture::with(access).await;
    let app = f.app();
    f.publish("hello", &v1()).await;
    f.publish("other", &other()).await;

    // A user's own memory text and settings that must survive everything.
    std::fs::create_dir_all(f.config_dir.join(".claude")).unwrap();
    let user_md = "# My notes\n\nKeep this.\n";
    std::fs::write(f.config_dir.join("CLAUDE.md"), user_md).unwrap();
    std::fs::write(
        f.config_dir.join(".claude/settings.json"),
        "{\n  \"permissions\": {\"allow\": [\"Bash\"]}\n}\n",
    )
    .unwrap();

    f.give_to_agent();

    // Install.
    let (s, b) = install(&app, &f.workspace, r#"{"source": "local://hello"}"#).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["status"], "installed");
    assert_eq!(b["plugin"], "hello");
    assert_eq!(b["source"], "local://hello");
    assert_eq!(b["version"], "1.0.0");
    let d1 = b["digest"].as_str().unwrap().to_string();
    assert_eq!(host_tree(&f, "hello"), expected_tree(&v1()));
    let staged = f
        .get(&format!("staged/{d1}.tar.gz"))
        .await
        .expect("staged archive");
    assert_eq!(sha256_hex(&staged), d1);
    assert_eq!(f.restarts(), 1);
    assert!(
        f.config_dir.join("skills/greeter/SKILL.md").exists(),
        "runtime wired the skill"
    );

    // Same again: unchanged, no restart, no new state write.
    let before = f.desired().await;
    let (s, b) = install(&app, &f.workspace, r#"{"source": "hello"}"#).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("unchanged")), "{b}");
    assert_eq!(b["digest"], d1.as_str());
    assert_eq!(f.restarts(), 1);
    assert_eq!(f.desired().await, before);

    // A second plugin that shares the skill name, with its own blocks.
    let (s, b) = install(&app, &f.workspace, r#"{"source": "other"}"#).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(f.restarts(), 2);
    let md_with_both = std::fs::read_to_string(f.config_dir.join("CLAUDE.md")).unwrap();
    assert!(md_with_both.contains("# Plugin: hello / rule: style.md"));
    assert!(md_with_both.contains("# Plugin: other / rule: other.md"));

    // Upgrade: new content, nothing of v1 left, v1's wiring gone.
    f.publish("hello", &v2()).await;
    let (s, b) = install(&app, &f.workspace, r#"{"source": "local://hello"}"#).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("installed")), "{b}");
    let d2 = b["digest"].as_str().unwrap().to_string();
    assert_ne!(d1, d2);
    assert_eq!(b["version"], "2.0.0");
    assert_eq!(host_tree(&f, "hello"), expected_tree(&v2()));
    assert_eq!(f.restarts(), 3);
    let md = std::fs::read_to_string(f.config_dir.join("CLAUDE.md")).unwrap();
    assert!(
        !md.contains("Still rule one"),
        "old rule block removed:\n{md}"
    );
    assert!(
        !md.contains("fragment: GUIDE.md"),
        "old fragment removed:\n{md}"
    );
    assert!(md.contains("Rule two."), "new rule wired:\n{md}");
    assert!(md.starts_with(user_md));
    assert!(!f.config_dir.join(".claude/hooks/pre.sh").exists());
    assert!(!f.config_dir.join(".claude/commands/hi.md").exists());
    assert!(f.config_dir.join("skills/shouter").exists());
    // `other` still ships greeter, so it stays.
    assert!(f.config_dir.join("skills/greeter").exists());
    // Only one version of the tree is kept on the host.
    let store: Vec<_> = std::fs::read_dir(f.config_dir.join(".plugin-delivery/store"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(store.len(), 2, "{store:?}");

    // List reads the desired state.
    let (s, b) = list(&app, &f.workspace).await;
    assert_eq!(s, 200, "{b}");
    let names: Vec<&str> = b
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hello", "other"]);
    let hello = &b[0];
    for k in [
        "name",
        "version",
        "description",
        "author",
        "tags",
        "skills",
        "runtimes",
        "digest",
        "installed_at",
    ] {
        assert!(hello.get(k).is_some(), "missing {k} in {hello}");
    }
    assert_eq!(hello["digest"], d2.as_str());
    assert_eq!(hello["skills"], serde_json::json!(["shouter"]));

    // Uninstall hello: everything it wired goes, other's and the user's stay.
    let settings_before =
        std::fs::read_to_string(f.config_dir.join(".claude/settings.json")).unwrap();
    assert!(settings_before.contains("\"Edit\""));
    let (s, b) = uninstall(&app, &f.workspace, "hello").await;
    assert_eq!((s, b["status"].as_str()), (200, Some("uninstalled")), "{b}");
    assert_eq!(b["plugin"], "hello");
    assert!(
        !f.plugin_dir("hello").exists()
            && std::fs::symlink_metadata(f.plugin_dir("hello")).is_err()
    );
    assert!(!f.config_dir.join("skills/shouter").exists());
    assert!(
        f.config_dir.join("skills/greeter").exists(),
        "other's skill kept"
    );
    let md = std::fs::read_to_string(f.config_dir.join("CLAUDE.md")).unwrap();
    assert_eq!(
        md,
        format!("{user_md}\n# Plugin: other / rule: other.md\n\nOther rule.")
    );
    let settings: Value = serde_json::from_str(
        &std::fs::read_to_string(f.config_dir.join(".claude/settings.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        settings["permissions"],
        serde_json::json!({"allow": ["Bash"]})
    );
    assert_eq!(settings["hooks"]["PreToolUse"].as_array().unwrap().len(), 1);
    assert_eq!(settings["hooks"]["PreToolUse"][0]["matcher"], "Edit");
    assert_eq!(f.restarts(), 4);
    let state = f.desired().await;
    assert!(state["plugins"].get("hello").is_none());
    assert!(state["plugins"].get("other").is_some());

    // Again: absent, no restart.
    let (s, b) = uninstall(&app, &f.workspace, "hello").await;
    assert_eq!((s, b["status"].as_str()), (200, Some("absent")), "{b}");
    assert_eq!(f.restarts(), 4);

    // Last plugin out: CLAUDE.md is the user's text again, byte for byte.
    let (s, _) = uninstall(&app, &f.workspace, "other").await;
    assert_eq!(s, 200);
    assert_eq!(
        std::fs::read_to_string(f.config_dir.join("CLAUDE.md")).unwrap(),
        user_md
    );
    assert!(!f.config_dir.join("skills/greeter").exists());
}

async fn ten_concurrent_installs_into_one_workspace(access: Access) {
    let f = Fixture::with(access).await;
    let names: Vec<String> = (0..10).map(|i| format!("conc-{i}")).collect();
    for n in &names {
        let yaml = format!("name: {n}\nversion: 1.0.{}\nskills: [{n}-skill]\n", n.len());
        let skill = format!("# {n}\n");
        f.publish(
            n,
            &[
                ("plugin.yaml", yaml.as_bytes()),
                (&format!("skills/{n}-skill/SKILL.md"), skill.as_bytes()),
            ],
        )
        .await;
    }
    let app = std::sync::Arc::new(f.app());
    let mut set = tokio::task::JoinSet::new();
    for n in names.clone() {
        let (app, ws) = (app.clone(), f.workspace.clone());
        set.spawn(async move {
            let body = format!(r#"{{"source": "local://{n}"}}"#);
            (n, install(&app, &ws, &body).await)
        });
    }
    while let Some(r) = set.join_next().await {
        let (n, (s, b)) = r.unwrap();
        assert_eq!(
            (s, b["status"].as_str()),
            (200, Some("installed")),
            "{n}: {b}"
        );
    }
    let state = f.desired().await;
    let mut in_state: Vec<String> = state["plugins"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    in_state.sort();
    assert_eq!(in_state, names, "no lost update in the desired state");
    for n in &names {
        let t = tree(&f.plugin_dir(n));
        assert_eq!(t.len(), 2, "{n} on the host: {t:?}");
        assert!(
            f.config_dir
                .join(format!("skills/{n}-skill/SKILL.md"))
                .exists(),
            "{n} wired"
        );
    }
    assert_eq!(f.restarts(), 10, "one restart per change");
}

async fn staged_archives_are_recalled_and_verified(access: Access) {
    let f = Fixture::with(access).await;
    let app = f.app();
    f.publish("hello", &v1()).await;
    let (s, b) = install(&app, &f.workspace, r#"{"source":"hello"}"#).await;
    assert_eq!(s, 200, "{b}");
    let digest = b["digest"].as_str().unwrap().to_string();
    let index = f.keys("staged/index/").await;
    assert_eq!(index.len(), 1, "one listing, one index entry");
    // S3 holds (and checked on upload) the archive's SHA-256.
    let head =
        f.s3.head_object()
            .bucket(&f.bucket)
            .key(format!("staged/{digest}.tar.gz"))
            .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
            .send()
            .await
            .unwrap();
    let raw = hex::decode(&digest).unwrap();
    assert_eq!(head.checksum_sha256(), Some(base64_encode(&raw).as_str()));

    // Tamper with the staged bytes: a new function instance (nothing kept
    // in its /tmp yet) recalls the archive, notices and rebuilds.
    let staged_key = format!("staged/{digest}.tar.gz");
    f.s3.put_object()
        .bucket(&f.bucket)
        .key(&staged_key)
        .body(b"not the archive".to_vec().into())
        .send()
        .await
        .unwrap();
    let (s, _) = uninstall(&app, &f.workspace, "hello").await;
    assert_eq!(s, 200);
    let app = f.app();
    let (s, b) = install(&app, &f.workspace, r#"{"source":"hello"}"#).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("installed")), "{b}");
    assert_eq!(b["digest"], digest.as_str());
    assert_eq!(host_tree(&f, "hello"), expected_tree(&v1()));
    let staged = f.get(&staged_key).await.expect("staged archive");
    assert_eq!(sha256_hex(&staged), digest, "the rebuild restaged it");

    // The warm instance keeps a copy of what it resolved: with the index
    // entry and the staged archive both swept away, it installs from its
    // copy (no rebuild: the index entry is not written again) and stages
    // the archive again for reinstalls and SSM hosts.
    for key in [staged_key.clone(), f.keys("staged/index/").await.remove(0)] {
        f.s3.delete_object()
            .bucket(&f.bucket)
            .key(key)
            .send()
            .await
            .unwrap();
    }
    let (s, _) = uninstall(&app, &f.workspace, "hello").await;
    assert_eq!(s, 200);
    let (s, b) = install(&app, &f.workspace, r#"{"source":"hello"}"#).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("installed")), "{b}");
    assert_eq!(b["digest"], digest.as_str());
    assert_eq!(host_tree(&f, "hello"), expected_tree(&v1()));
    let staged = f.get(&staged_key).await.expect("staged again");
    assert_eq!(sha256_hex(&staged), digest, "staged again from the copy");
    assert!(f.keys("staged/index/").await.is_empty(), "not rebuilt");

    // A pinned install from the recalled archive still checks plugin.yaml.
    let yaml = v1()[0].1;
    let body = format!(r#"{{"source":"hello","sha256":"{}"}}"#, sha256_hex(yaml));
    let (s, b) = install(&app, &f.workspace, &body).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("unchanged")), "{b}");
    let body = format!(r#"{{"source":"hello","sha256":"{}"}}"#, "1".repeat(64));
    assert_eq!(install(&app, &f.workspace, &body).await.0, 422);
}

async fn the_longest_name_installs_and_uninstalls(access: Access) {
    let f = Fixture::with(access).await;
    let app = f.app();
    // The longest valid name: 128 characters.
    let name = format!("l{}", "o".repeat(126)) + "g";
    assert_eq!(name.len(), 128);
    let yaml = format!("name: {name}\nversion: 1.0.0\n");
    f.publish(
        &name,
        &[("plugin.yaml", yaml.as_bytes()), ("rules/r.md", b"Rule.\n")],
    )
    .await;
    let body = format!(r#"{{"source": "{name}"}}"#);
    let (s, b) = install(&app, &f.workspace, &body).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("installed")), "{b}");
    assert_eq!(tree(&f.plugin_dir(&name)).len(), 2);
    let (s, b) = uninstall(&app, &f.workspace, &name).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("uninstalled")), "{b}");
    assert!(std::fs::symlink_metadata(f.plugin_dir(&name)).is_err());
}

on_both_transports!(
    install_unchanged_upgrade_list_uninstall,
    ten_concurrent_installs_into_one_workspace,
    staged_archives_are_recalled_and_verified,
    the_longest_name_installs_and_uninstalls,
);

/// Keys the EIC emulator holds for the fixture's host and login user: one
/// per new SSH connection.
fn pushed_keys(f: &Fixture) -> usize {
    let dir = std::path::Path::new(stack().var("PLUGIN_STACK_KEYS_DIR"))
        .join(&f.host.instance_id)
        .join(LOGIN_USER);
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

fn children(pid: u32) -> Vec<u32> {
    let out = std::process::Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The sshd processes serving open connections: children of the host's
/// listener, one per connection.
fn sessions_of(f: &Fixture) -> Vec<u32> {
    let pid = std::fs::read_to_string(f.host.state_dir.join("sshd.pid")).unwrap();
    children(pid.trim().parse().unwrap())
}

/// Every process of the open connections (sshd's privilege separation
/// splits each into several).
fn session_trees(f: &Fixture) -> Vec<u32> {
    let mut all = sessions_of(f);
    let mut i = 0;
    while i < all.len() {
        let more = children(all[i]);
        all.extend(more);
        i += 1;
    }
    all
}

fn signal(pids: &[u32], sig: &str) {
    for pid in pids {
        // (A process may have ended already.)
        let _ = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Operations one after another on one workspace use one connection (one
/// key push); another function instance (a cold start) makes its own; a
/// kept connection that died or hangs is replaced by a fresh one, and the
/// operation still lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operations_in_a_row_share_one_connection_and_a_dead_one_is_replaced() {
    let f = Fixture::new().await;
    f.publish("hello", &v1()).await;
    let app = f.app();
    assert_eq!(pushed_keys(&f), 0);
    let (s, b) = install(&app, &f.workspace, r#"{"source":"hello"}"#).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("installed")), "{b}");
    assert_eq!(pushed_keys(&f), 1);
    let (s, _) = uninstall(&app, &f.workspace, "hello").await;
    assert_eq!(s, 200);
    let (s, b) = install(&app, &f.workspace, r#"{"source":"hello"}"#).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("installed")), "{b}");
    assert_eq!(
        pushed_keys(&f),
        1,
        "the second and third operation reused the first connection"
    );
    assert_eq!(sessions_of(&f).len(), 1, "one connection open, kept");

    // An install started ahead of its plugin, on the kept connection, then
    // ended unsent (as for a plugin refused once fetched): the script ran
    // and waited, ends with nothing changed, and the connection stays kept.
    let deps = &app.deps;
    let host = deps.fleet.locate(&f.workspace).await.unwrap();
    let profile = deps.config.host_profile(&host).unwrap();
    let early = plugin_delivery::domain::hostscript::HostCommand::install_named_on_stdin(
        &profile,
        &deps.config.owner,
        deps.config.lock_wait_secs,
    );
    let before = tree(&f.plugin_dir("hello"));
    let opened = deps.transport.open(&host).await.unwrap();
    let started = deps.transport.start(opened, &host, &early).await.unwrap();
    let waiting = f.scripts_running(std::time::Duration::from_secs(5));
    assert!(!waiting.is_empty(), "the started script runs");
    deps.transport.close(started.unwrap(), &host).await;
    assert_eq!(
        f.scripts_left(std::time::Duration::from_secs(5)),
        Vec::<u32>::new()
    );
    assert_eq!(tree(&f.plugin_dir("hello")), before);
    assert!(!f.book().join("work").exists());
    assert_eq!(
        (pushed_keys(&f), sessions_of(&f).len()),
        (1, 1),
        "the connection was kept"
    );
    // A started install is only ever completed by the same install: any
    // other command is refused, and the started one ends unsent.
    let opened = deps.transport.open(&host).await.unwrap();
    let started = deps.transport.start(opened, &host, &early).await.unwrap();
    let other = plugin_delivery::domain::hostscript::HostCommand::uninstall(
        &profile,
        "hello",
        &deps.config.owner,
        deps.config.lock_wait_secs,
    );
    let refused = deps
        .transport
        .run_opened(started, &host, &other, None)
        .await;
    assert!(refused.is_err());
    assert_eq!(
        f.scripts_left(std::time::Duration::from_secs(5)),
        Vec::<u32>::new()
    );
    assert_eq!(tree(&f.plugin_dir("hello")), before);
    assert_eq!((pushed_keys(&f), sessions_of(&f).len()), (1, 1));

    // A cold start has nothing kept.
    let (s, b) = install(&f.app(), &f.workspace, r#"{"source":"hello"}"#).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("unchanged")), "{b}");
    assert_eq!(pushed_keys(&f), 2);

    // The kept connection's sshd is ended (a host reboot, a dropped flow):
    // the next operation connects again and lands.
    signal(&session_trees(&f), "-KILL");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (s, b) = uninstall(&app, &f.workspace, "hello").await;
    assert_eq!((s, b["status"].as_str()), (200, Some("uninstalled")), "{b}");
    assert_eq!(pushed_keys(&f), 3);
    assert!(!f.plugin_dir("hello").exists());

    // The kept connection hangs (its sshd stopped, the TCP flow open): the
    // operation waits a bounded time for it, then connects again.
    assert_eq!(sessions_of(&f).len(), 1);
    let stopped = session_trees(&f);
    signal(&stopped, "-STOP");
    let t = std::time::Instant::now();
    let (s, b) = install(&app, &f.workspace, r#"{"source":"hello"}"#).await;
    let took = t.elapsed();
    signal(&stopped, "-KILL");
    signal(&stopped, "-CONT");
    assert_eq!((s, b["status"].as_str()), (200, Some("installed")), "{b}");
    assert_eq!(pushed_keys(&f), 4);
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
    assert_eq!(tree(&f.plugin_dir("hello")).len(), v1().len());

    // Reuse off (PLUGIN_SSH_REUSE_SECS=0): every operation connects anew.
    let mut cfg = f.config();
    cfg.ssh_reuse = std::time::Duration::ZERO;
    let fresh = f.app_with(cfg);
    for _ in 0..2 {
        let (s, b) = install(&fresh, &f.workspace, r#"{"source":"hello"}"#).await;
        assert_eq!((s, b["status"].as_str()), (200, Some("unchanged")), "{b}");
    }
    assert_eq!(pushed_keys(&f), 6);
}

/// Standard base64 with padding (S3's checksum encoding).
fn base64_encode(b: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A registry plugin not built before goes to an SSH host while its archive
/// is built (in frames, its digest last): the host gets every byte, the
/// staged copy is the same archive, and the next install (a new function
/// instance, which recalls the staged archive) finds it already there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_plugin_goes_to_the_host_while_its_archive_is_built() {
    let f = Fixture::new().await;
    let blob = noise(9 * 1024 * 1024 + 123, 5);
    let files: Vec<(&str, &[u8])> = vec![
        ("data/weights.bin", &blob),
        ("plugin.yaml", b"name: hefty\nversion: 1.0.0\n"),
        ("skills/hefty/SKILL.md", b"# Hefty\n"),
    ];
    f.publish("hefty", &files).await;
    let app = f.app();
    let (s, b) = install(&app, &f.workspace, r#"{"source":"hefty"}"#).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("installed")), "{b}");
    let digest = b["digest"].as_str().unwrap().to_string();
    assert_eq!(host_tree(&f, "hefty"), expected_tree(&files));
    let staged = f
        .get(&format!("staged/{digest}.tar.gz"))
        .await
        .expect("staged archive");
    assert_eq!(sha256_hex(&staged), digest);
    assert!(staged.len() > 9 * 1024 * 1024, "three frames or more");
    assert_eq!(
        f.desired().await["plugins"]["hefty"]["digest"],
        digest.as_str()
    );
    assert_eq!(f.restarts(), 1);
    // The host said how it took the archive (the operation's record keeps
    // the end of its stderr).
    let ops = f
        .keys(&format!("workspaces/{}/operations/", f.workspace))
        .await;
    assert_eq!(ops.len(), 1, "{ops:?}");
    let rec: Value = serde_json::from_slice(&f.get(&ops[0]).await.unwrap()).unwrap();
    let said = rec["host_output"].as_str().unwrap_or_default();
    assert!(
        said.contains(&format!(
            "the archive came in frames, its digest {digest} last"
        )),
        "{rec}"
    );

    // A new instance recalls the staged archive: its digest is known
    // first, so the host finds it installed and intact.
    let (s, b) = install(&f.app(), &f.workspace, r#"{"source":"hefty"}"#).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("unchanged")), "{b}");
    assert_eq!(f.restarts(), 1);
}

/// The host's lock held by another operation for a while: an install sent
/// while its archive is built waits for it (the build waits for the host
/// meanwhile, its registry reads idle) and then completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_install_sent_while_it_is_built_waits_out_a_held_host_lock() {
    let f = Fixture::new().await;
    let app = f.app();
    f.publish("hello", &v1()).await;
    let (s, b) = install(&app, &f.workspace, r#"{"source":"hello"}"#).await;
    assert_eq!(s, 200, "{b}");
    let blob = noise(12 * 1024 * 1024, 9);
    let files: Vec<(&str, &[u8])> = vec![
        ("data/blob.bin", &blob),
        ("plugin.yaml", b"name: waiter\nversion: 1.0.0\n"),
    ];
    f.publish("waiter", &files).await;
    // Another operation's lock, for 8 s.
    let mut holder = std::process::Command::new("flock")
        .arg(f.book().join("lock"))
        .arg("-c")
        .arg("echo locked; exec sleep 8")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("flock (util-linux)");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "locked\n");
    let t = std::time::Instant::now();
    let (s, b) = install(&app, &f.workspace, r#"{"source":"waiter"}"#).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("installed")), "{b}");
    assert!(
        t.elapsed() > std::time::Duration::from_secs(6),
        "{:?}",
        t.elapsed()
    );
    assert!(holder.wait().unwrap().success());
    assert_eq!(host_tree(&f, "waiter"), expected_tree(&files));
    let digest = b["digest"].as_str().unwrap();
    let staged = f.get(&format!("staged/{digest}.tar.gz")).await.unwrap();
    assert_eq!(sha256_hex(&staged), digest);
}
