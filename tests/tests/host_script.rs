//! Tests of the host script (`shared/host/plugin-host.sh`) as the hosts run
//! it: the system `sh` (dash on Debian) started the way the transports start
//! it, as root, on a real temp config dir owned by the workspace user (uid
//! 1000), with `tests/stack/fake-runtime.py` (which drops to that user, as
//! the real runtime runs as it) as the restart command. Every test has its
//! own temp dir and root state dir, so they run in parallel. After every run
//! in a config dir, no file in it may belong to root.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flate2::{write::GzEncoder, Compression};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use acceptance::{
    as_agent, book_key, give_to_agent, need, plant_link, planted_paths, root_owned, Canary,
    KeepReading, Racer,
};

/// Tests run as root; the plugin files must end up owned by the workspace user.
const OWNER: &str = "1000:1000";
const MARKER: &str = "@@plugin-delivery-result ";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/host/plugin-host.sh")
}

fn runtime() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("stack/fake-runtime.py")
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The agent user that owns the config dir.
const AGENT: u32 = 1000;

// ------------------------------------------------------------ plugin trees

#[derive(Debug, PartialEq)]
enum Node {
    Dir(u32),
    File(u32, Vec<u8>),
}

/// Relative path -> node for everything under `root` (followed if a link).
/// Sorted, so a dir always precedes its contents.
fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let md = fs::symlink_metadata(&path).unwrap();
            let mode = md.permissions().mode() & 0o7777;
            if md.is_dir() {
                out.insert(rel, Node::Dir(mode));
                walk(root, &path, out);
            } else if md.is_file() {
                out.insert(rel, Node::File(mode, fs::read(&path).unwrap()));
            } else {
                panic!("unexpected entry {rel}");
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

struct Archive {
    bytes: Vec<u8>,
    sha: String,
}

impl Archive {
    fn new(bytes: Vec<u8>) -> Self {
        Archive {
            sha: sha256(&bytes),
            bytes,
        }
    }
}

/// Canonical archive: relative entries, dirs and regular files, sorted.
fn pack(root: &Path) -> Archive {
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    for (rel, node) in snapshot(root) {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match node {
            Node::Dir(mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(mode);
                h.set_size(0);
                b.append_data(&mut h, format!("{rel}/"), std::io::empty())
                    .unwrap();
            }
            Node::File(mode, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, rel, data.as_slice()).unwrap();
            }
        }
    }
    Archive::new(b.into_inner().unwrap().finish().unwrap())
}

/// A plugin source tree: `*.sh` files 0755, other files and dirs 0644/0755.
struct Plugin {
    dir: TempDir,
    archive: Archive,
}

fn plugin(files: &[(&str, &str)]) -> Plugin {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for (rel, content) in files {
        let path = dir.path().join(rel);
        let mut parent = path.parent().unwrap();
        fs::create_dir_all(parent).unwrap();
        while parent != dir.path() {
            fs::set_permissions(parent, fs::Permissions::from_mode(0o755)).unwrap();
            parent = parent.parent().unwrap();
        }
        fs::write(&path, content).unwrap();
        let mode = if rel.ends_with(".sh") { 0o755 } else { 0o644 };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    }
    let archive = pack(dir.path());
    Plugin { dir, archive }
}

// ------------------------------------------------------------ the host

#[derive(Debug)]
struct Run {
    code: i32,
    result: Value,
    stderr: String,
}

/// Runs the script; asserts stdout is exactly one result line and parses it.
fn run_script(args: &[&str], stdin: Option<&[u8]>, path_env: Option<&Path>) -> Run {
    run_script_env(args, stdin, path_env, &[])
}

fn run_script_env(
    args: &[&str],
    stdin: Option<&[u8]>,
    path_env: Option<&Path>,
    env: &[(&str, &str)],
) -> Run {
    // The config dir (when the arguments name one of a test Host's): its
    // contents are the agent's before the run, and no file in it may be
    // root's after it.
    let cfg = args
        .get(1)
        .map(Path::new)
        .filter(|p| p.is_absolute() && p.ends_with("cfg") && p.is_dir());
    if let Some(cfg) = cfg {
        give_to_agent(cfg);
    }
    let run = launch(args, stdin, path_env, env);
    if let Some(cfg) = cfg {
        assert_eq!(
            root_owned(cfg),
            Vec::<String>::new(),
            "root-owned files after {args:?}"
        );
    }
    run
}

/// The script as the transports start it (`sh -c 'eval "$1"' plugin-host
/// TEXT OP ARGS`), with root's state under the config dir's temp dir,
/// stdout and stderr piped.
fn script_command(args: &[&str], env: &[(&str, &str)], path_env: Option<&Path>) -> Command {
    script_command_in("sh", args, env, path_env)
}

/// `script_command` with another shell for root's part (bash is /bin/sh
/// on some hosts).
fn script_command_in(
    shell: &str,
    args: &[&str],
    env: &[(&str, &str)],
    path_env: Option<&Path>,
) -> Command {
    let text = fs::read_to_string(script()).unwrap();
    let mut cmd = Command::new(shell);
    cmd.envs(env.iter().copied());
    if let Some(state) = args.get(1).map(Path::new).and_then(Path::parent) {
        if state.is_absolute() {
            cmd.env("PLUGIN_STATE_ROOT", state.join("state"));
        }
    }
    if let Some(p) = path_env {
        cmd.env("PATH", p);
    }
    cmd.args(["-c", "eval \"$1\"", "plugin-host"])
        .arg(text)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs the script as the transports do (`sh -c 'eval "$1"' plugin-host
/// TEXT OP ARGS`), with root's state under the config dir's temp dir.
fn launch(
    args: &[&str],
    stdin: Option<&[u8]>,
    path_env: Option<&Path>,
    env: &[(&str, &str)],
) -> Run {
    let mut cmd = script_command(args, env, path_env);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().expect("run sh");
    let writer = stdin.map(|bytes| {
        let mut pipe = child.stdin.take().unwrap();
        let bytes = bytes.to_vec();
        // The script may rightly stop reading early: ignore a broken pipe.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&bytes);
        })
    });
    let out = child.wait_with_output().unwrap();
    if let Some(w) = writer {
        w.join().unwrap();
    }
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "stdout must be one result line: {stdout:?}\nstderr: {stderr}"
    );
    let json = lines[0]
        .strip_prefix(MARKER)
        .unwrap_or_else(|| panic!("no result marker: {stdout:?}\nstderr: {stderr}"));
    let result: Value = serde_json::from_str(json).expect("result is JSON");
    Run {
        code: out.status.code().expect("exit code"),
        result,
        stderr,
    }
}

impl Run {
    fn assert_ok(&self, status: &str) -> &Self {
        assert_eq!(
            (self.code, self.result["status"].as_str()),
            (0, Some(status)),
            "{self:#?}"
        );
        self
    }

    fn assert_error(&self, code: &str, exit: i32) -> &Self {
        assert_eq!(self.code, exit, "{self:#?}");
        assert_eq!(self.result["status"], "error", "{self:#?}");
        assert_eq!(self.result["code"], code, "{self:#?}");
        let message = self.result["message"].as_str().unwrap();
        assert!(!message.is_empty() && !message.contains('/'), "{message:?}");
        self
    }
}

struct Host {
    _tmp: TempDir,
    cfg: PathBuf,
}

impl Host {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        // The agent user must be able to reach its config dir.
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = tmp.path().join("cfg");
        fs::create_dir(&cfg).unwrap();
        std::os::unix::fs::chown(&cfg, Some(AGENT), Some(AGENT)).unwrap();
        Host { _tmp: tmp, cfg }
    }

    /// Root's own state for this config dir (the script's "book").
    fn book(&self) -> PathBuf {
        self.cfg
            .parent()
            .unwrap()
            .join("state")
            .join(book_key(&self.cfg))
    }

    fn cfg(&self) -> &str {
        self.cfg.to_str().unwrap()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.cfg.join(rel)
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap()
    }

    fn settings(&self) -> Value {
        let text = self.read(".claude/settings.json");
        assert!(text.ends_with("}\n"), "{text:?}");
        serde_json::from_str(&text).unwrap()
    }

    fn restart_cmd(&self) -> String {
        format!("python3 '{}' '{}'", runtime().display(), self.cfg.display())
    }

    /// The script's arguments for installing `p` as alpha here, then `extra`.
    fn alpha_args(&self, p: &Plugin, extra: &[&str]) -> Vec<String> {
        let head = ["install", self.cfg(), "alpha", &p.archive.sha, OWNER, "5"];
        let mut args: Vec<String> = head.iter().map(|a| a.to_string()).collect();
        args.push(self.restart_cmd());
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    }

    /// Runs the fake runtime the way the restart command does (on files the
    /// test set up for the agent).
    fn restart(&self) {
        give_to_agent(&self.cfg);
        let st = Command::new("sh")
            .arg("-c")
            .arg(self.restart_cmd())
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn restarts(&self) -> usize {
        fs::read_to_string(format!("{}.restarts", self.cfg())).map_or(0, |s| s.lines().count())
    }

    fn install_raw(&self, name: &str, sha: &str, bytes: &[u8], restart: &str) -> Run {
        run_script(
            &["install", self.cfg(), name, sha, OWNER, "5", restart],
            Some(bytes),
            None,
        )
    }

    fn install(&self, name: &str, p: &Plugin) -> Run {
        self.install_raw(name, &p.archive.sha, &p.archive.bytes, &self.restart_cmd())
    }

    fn uninstall(&self, name: &str) -> Run {
        run_script(
            &[
                "uninstall",
                self.cfg(),
                name,
                OWNER,
                "5",
                &self.restart_cmd(),
            ],
            None,
            None,
        )
    }

    fn inventory(&self) -> Value {
        let r = run_script(&["inventory", self.cfg(), OWNER], None, None);
        r.assert_ok("inventory");
        r.result["plugins"].clone()
    }

    fn link_target(&self, name: &str) -> String {
        let t = fs::read_link(self.path(&format!("plugins/{name}"))).unwrap();
        t.to_str().unwrap().to_string()
    }

    fn listing(&self, rel: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.path(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn assert_installed(&self, name: &str, p: &Plugin) {
        assert_eq!(
            self.link_target(name),
            format!("../.plugin-delivery/store/{name}@{}", p.archive.sha)
        );
        assert_eq!(
            snapshot(&self.path(&format!("plugins/{name}"))),
            snapshot(p.dir.path())
        );
    }

    /// Installed at this digest, in whichever of its two store dirs.
    fn assert_installed_at(&self, name: &str, p: &Plugin) {
        let target = self.link_target(name);
        let want = format!("../.plugin-delivery/store/{name}@{}", p.archive.sha);
        assert!(target == want || target == format!("{want}-r"), "{target}");
        assert_eq!(
            snapshot(&self.path(&format!("plugins/{name}"))),
            snapshot(p.dir.path())
        );
    }

    fn assert_no_leftovers(&self) {
        assert_eq!(
            self.listing(".plugin-delivery/staging"),
            Vec::<String>::new()
        );
    }
}

// ------------------------------------------------------------ fixtures

const USER_MEMORY: &str = "# My notes\n\nKeep this line.\n";

fn alpha_v1() -> Plugin {
    plugin(&[
        (
            "plugin.yaml",
            "name: alpha\nversion: 1\nskills:\n  - alpha-skill\n",
        ),
        ("README.md", "# Alpha\n\nNot wired.\n"),
        ("GUIDE.md", "\n  Use alpha wisely.\n\n"),
        ("rules/empty.md", ""),
        ("rules/style.md", "Line one\n\nLine two\n\n\nLine three\n"),
        ("skills/alpha-skill/SKILL.md", "alpha skill\n"),
        ("skills/alpha-skill/scripts/run.sh", "#!/bin/sh\necho run\n"),
        ("hooks/alpha-hook.sh", "#!/bin/sh\necho alpha\n"),
        ("commands/alpha-cmd.md", "Do alpha things.\n"),
        (
            "settings-fragment.json",
            r#"{
  "hooks": {
    "PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "${CLAUDE_DIR}/hooks/alpha-hook.sh"}]}],
    "SessionStart": [{"hooks": [{"type": "command", "command": "${CLAUDE_DIR}/hooks/alpha-hook.sh start"}]}]
  },
  "mcpServers": {"shared-srv": {"command": "shared"}, "alpha-srv": {"command": "alpha"}}
}"#,
        ),
    ])
}

/// Exactly what the runtime appends for `alpha_v1` (after a "\n").
const ALPHA_V1_CHUNK: &str = "# Plugin: alpha / rule: empty.md\n\n\
    \n\n# Plugin: alpha / rule: style.md\n\nLine one\n\nLine two\n\n\nLine three\
    \n\n# Plugin: alpha / fragment: GUIDE.md\n\nUse alpha wisely.";

fn alpha_v2() -> Plugin {
    plugin(&[
        ("plugin.yaml", "name: alpha\nversion: 2\n"),
        ("rules/new.md", "New rule.\n"),
        ("skills/new-skill/SKILL.md", "new skill\n"),
        ("hooks/alpha-hook.sh", "#!/bin/sh\necho alpha v2\n"),
    ])
}

const ALPHA_V2_CHUNK: &str = "# Plugin: alpha / rule: new.md\n\nNew rule.";

fn beta() -> Plugin {
    plugin(&[
        ("plugin.yaml", "name: beta\n"),
        ("rules/b.md", "Beta rule.\n"),
        ("skills/beta-skill/SKILL.md", "beta skill\n"),
        ("hooks/beta-hook.sh", "#!/bin/sh\necho beta\n"),
        ("commands/beta-cmd.md", "Do beta things.\n"),
        (
            "settings-fragment.json",
            r#"{
  "hooks": {"PreToolUse": [{"matcher": "Edit", "hooks": [{"type": "command", "command": "${CLAUDE_DIR}/hooks/beta-hook.sh"}]}]},
  "mcpServers": {"shared-srv": {"command": "shared"}}
}"#,
        ),
    ])
}

const BETA_CHUNK: &str = "# Plugin: beta / rule: b.md\n\nBeta rule.";

fn user_settings() -> Value {
    json!({
        "permissions": {"allow": ["Bash(ls)"]},
        "hooks": {
            "PreToolUse": [{"matcher": "Read", "hooks": [{"type": "command", "command": "/usr/local/bin/audit"}]}],
            "Stop": [{"hooks": [{"type": "command", "command": "notify"}]}]
        },
        "model": "opus"
    })
}

fn write_user_files(h: &Host) {
    fs::write(h.path("CLAUDE.md"), USER_MEMORY).unwrap();
    fs::create_dir_all(h.path(".claude")).unwrap();
    fs::write(
        h.path(".claude/settings.json"),
        serde_json::to_string_pretty(&user_settings()).unwrap(),
    )
    .unwrap();
}

fn hook_group(matcher: Option<&str>, command: String) -> Value {
    let mut g = json!({"hooks": [{"type": "command", "command": command}]});
    if let Some(m) = matcher {
        g["matcher"] = json!(m);
    }
    g
}

// ------------------------------------------------------------ tests

#[test]
fn fresh_install_places_the_exact_tree_owned_by_the_user() {
    let h = Host::new();
    let p = alpha_v1();
    let r = h.install("alpha", &p);
    r.assert_ok("installed");
    assert_eq!(
        r.result,
        json!({"status": "installed", "plugin": "alpha", "digest": p.archive.sha, "previous": "", "previous_kind": "none", "restarted": true, "pending_restart": false})
    );
    // Same bytes, same modes (0644 files, 0755 dirs and scripts).
    h.assert_installed("alpha", &p);
    let snap = snapshot(&h.path("plugins/alpha"));
    assert_eq!(
        snap["hooks/alpha-hook.sh"],
        Node::File(0o755, b"#!/bin/sh\necho alpha\n".to_vec())
    );
    assert!(matches!(snap["rules/style.md"], Node::File(0o644, _)));
    assert_eq!(snap["skills"], Node::Dir(0o755));
    // Owned by the user: the link, the store dir and everything in it.
    let link = fs::symlink_metadata(h.path("plugins/alpha")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!((link.uid(), link.gid()), (1000, 1000));
    let store = h.path(&format!(".plugin-delivery/store/alpha@{}", p.archive.sha));
    for path in std::iter::once(store.clone()).chain(snapshot(&store).keys().map(|k| store.join(k)))
    {
        let md = fs::symlink_metadata(&path).unwrap();
        assert_eq!((md.uid(), md.gid()), (1000, 1000), "{}", path.display());
    }
    let mode = |rel: &str| fs::metadata(h.path(rel)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(".plugin-delivery"), 0o755);
    assert_eq!(mode(".plugin-delivery/staging"), 0o700);
    assert_eq!(mode(".plugin-delivery/store"), 0o755);
    h.assert_no_leftovers();
    // Restarted once, and the runtime wired it.
    assert_eq!(h.restarts(), 1);
    assert_eq!(h.read("CLAUDE.md"), format!("\n{ALPHA_V1_CHUNK}"));
    assert_eq!(h.read("skills/alpha-skill/SKILL.md"), "alpha skill\n");
    assert_eq!(mode(".claude/hooks/alpha-hook.sh"), 0o755);
    let claude = h.path(".claude");
    assert_eq!(
        h.settings()["hooks"]["PreToolUse"][0],
        hook_group(
            Some("Bash"),
            format!("{}/hooks/alpha-hook.sh", claude.display())
        )
    );
}

#[test]
fn same_install_again_is_unchanged_without_reading_stdin_or_restarting() {
    let h = Host::new();
    let p = alpha_v1();
    h.install("alpha", &p).assert_ok("installed");
    // No stdin at all: reading it would fail the digest check.
    let args = h.alpha_args(&p, &[]);
    let r = run_script(&strs(&args), None, None);
    r.assert_ok("unchanged");
    assert_eq!(
        r.result,
        json!({"status": "unchanged", "plugin": "alpha", "digest": p.archive.sha, "previous": p.archive.sha, "previous_kind": "link", "restarted": false, "pending_restart": false})
    );
    assert_eq!(h.restarts(), 1);
    h.assert_installed("alpha", &p);
    h.assert_no_leftovers();
}

#[test]
fn upgrade_replaces_the_tree_and_rewires_the_new_version() {
    let h = Host::new();
    write_user_files(&h);
    let (v1, v2, b) = (alpha_v1(), alpha_v2(), beta());
    h.install("alpha", &v1).assert_ok("installed");
    h.install("beta", &b).assert_ok("installed");
    assert_eq!(
        h.read("CLAUDE.md"),
        format!("{USER_MEMORY}\n{ALPHA_V1_CHUNK}\n{BETA_CHUNK}")
    );
    assert!(h.path("skills/alpha-skill").is_dir());

    let r = h.install("alpha", &v2);
    r.assert_ok("installed");
    assert_eq!(
        (&r.result["previous"], &r.result["digest"]),
        (&json!(v1.archive.sha), &json!(v2.archive.sha))
    );
    // Only v2's files, and only v2's store dir.
    h.assert_installed("alpha", &v2);
    let mut stores = vec![
        format!("alpha@{}", v2.archive.sha),
        format!("beta@{}", b.archive.sha),
    ];
    stores.sort();
    assert_eq!(h.listing(".plugin-delivery/store"), stores);
    h.assert_no_leftovers();
    // v1's wiring is gone, v2's is wired after beta's, beta's and the user's kept.
    assert_eq!(
        h.read("CLAUDE.md"),
        format!("{USER_MEMORY}\n{BETA_CHUNK}\n{ALPHA_V2_CHUNK}")
    );
    assert!(!h.path("skills/alpha-skill").exists());
    assert_eq!(h.read("skills/new-skill/SKILL.md"), "new skill\n");
    assert_eq!(h.read("skills/beta-skill/SKILL.md"), "beta skill\n");
    assert_eq!(
        h.read(".claude/hooks/alpha-hook.sh"),
        "#!/bin/sh\necho alpha v2\n"
    );
    assert!(!h.path(".claude/commands/alpha-cmd.md").exists());
    let claude = h.path(".claude");
    let mut want = user_settings();
    want["hooks"]["PreToolUse"]
        .as_array_mut()
        .unwrap()
        .push(hook_group(
            Some("Edit"),
            format!("{}/hooks/beta-hook.sh", claude.display()),
        ));
    want["mcpServers"] = json!({"shared-srv": {"command": "shared"}});
    assert_eq!(h.settings(), want);
    assert_eq!(h.restarts(), 3);
}

#[test]
fn upgrade_of_a_legacy_directory_replaces_it_with_a_link() {
    let h = Host::new();
    fs::write(h.path("CLAUDE.md"), USER_MEMORY).unwrap();
    let legacy = h.path("plugins/alpha");
    fs::create_dir_all(legacy.join("rules")).unwrap();
    fs::create_dir_all(legacy.join("skills/legacy-skill")).unwrap();
    fs::write(legacy.join("rules/old.md"), "Old rule.\n").unwrap();
    fs::write(legacy.join("skills/legacy-skill/SKILL.md"), "legacy\n").unwrap();
    h.restart();
    assert_eq!(
        h.read("CLAUDE.md"),
        format!("{USER_MEMORY}\n# Plugin: alpha / rule: old.md\n\nOld rule.")
    );
    assert_eq!(h.inventory(), json!([{"name": "alpha", "digest": ""}]));

    let v2 = alpha_v2();
    let r = h.install("alpha", &v2);
    r.assert_ok("installed");
    assert_eq!(r.result["previous"], "");
    h.assert_installed("alpha", &v2);
    assert_eq!(
        h.read("CLAUDE.md"),
        format!("{USER_MEMORY}\n{ALPHA_V2_CHUNK}")
    );
    assert!(!h.path("skills/legacy-skill").exists());
    assert!(h.path("skills/new-skill").is_dir());
    h.assert_no_leftovers();
}

#[test]
fn uninstall_removes_exactly_what_the_plugin_wired() {
    let h = Host::new();
    write_user_files(&h);
    let (a, b) = (alpha_v1(), beta());
    h.install("alpha", &a).assert_ok("installed");
    h.install("beta", &b).assert_ok("installed");
    let claude = h.path(".claude");
    let hooks_dir = claude.join("hooks");
    let alpha_pre = hook_group(
        Some("Bash"),
        format!("{}/alpha-hook.sh", hooks_dir.display()),
    );
    let alpha_start = hook_group(None, format!("{}/alpha-hook.sh start", hooks_dir.display()));
    let beta_pre = hook_group(
        Some("Edit"),
        format!("{}/beta-hook.sh", hooks_dir.display()),
    );
    let user_pre = user_settings()["hooks"]["PreToolUse"][0].clone();
    // Both wired; the first plugin's mcpServers won the setdefault.
    assert_eq!(
        h.read("CLAUDE.md"),
        format!("{USER_MEMORY}\n{ALPHA_V1_CHUNK}\n{BETA_CHUNK}")
    );
    let mut want = user_settings();
    want["hooks"]["PreToolUse"] = json!([user_pre, alpha_pre, beta_pre]);
    want["hooks"]["SessionStart"] = json!([alpha_start]);
    want["mcpServers"] =
        json!({"shared-srv": {"command": "shared"}, "alpha-srv": {"command": "alpha"}});
    assert_eq!(h.settings(), want);
    for f in [
        "hooks/alpha-hook.sh",
        "hooks/beta-hook.sh",
        "commands/alpha-cmd.md",
        "commands/beta-cmd.md",
    ] {
        assert!(claude.join(f).is_file(), "{f}");
    }
    let memory_mode = 0o640;
    fs::set_permissions(h.path("CLAUDE.md"), fs::Permissions::from_mode(memory_mode)).unwrap();
    std::os::unix::fs::chown(h.path("CLAUDE.md"), Some(1000), Some(1000)).unwrap();

    let r = h.uninstall("alpha");
    r.assert_ok("uninstalled");
    assert_eq!(
        r.result,
        json!({"status": "uninstalled", "plugin": "alpha", "digest": "", "previous": a.archive.sha, "previous_kind": "link", "restarted": true, "pending_restart": false})
    );
    assert_eq!(h.restarts(), 3);
    assert!(fs::symlink_metadata(h.path("plugins/alpha")).is_err());
    assert_eq!(
        h.listing(".plugin-delivery/store"),
        vec![format!("beta@{}", b.archive.sha)]
    );
    h.assert_no_leftovers();
    // Memory: alpha's blocks (blank lines inside, an empty rule) gone, the rest byte-identical.
    assert_eq!(h.read("CLAUDE.md"), format!("{USER_MEMORY}\n{BETA_CHUNK}"));
    let md = fs::metadata(h.path("CLAUDE.md")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.permissions().mode() & 0o7777),
        (1000, 1000, memory_mode)
    );
    assert_eq!(h.listing("skills"), vec!["beta-skill"]);
    assert_eq!(h.listing(".claude/hooks"), vec!["beta-hook.sh"]);
    assert_eq!(h.listing(".claude/commands"), vec!["beta-cmd.md"]);
    // Settings: alpha's groups and own server gone; the shared server stays
    // while beta declares it; the user's entries stay.
    let mut want = user_settings();
    want["hooks"]["PreToolUse"] = json!([user_pre, beta_pre]);
    want["mcpServers"] = json!({"shared-srv": {"command": "shared"}});
    assert_eq!(h.settings(), want);

    h.uninstall("beta").assert_ok("uninstalled");
    assert_eq!(h.read("CLAUDE.md"), USER_MEMORY);
    assert_eq!(h.settings(), user_settings());
    assert_eq!(h.listing("skills"), Vec::<String>::new());
    assert_eq!(h.listing(".claude/hooks"), Vec::<String>::new());
    assert_eq!(h.listing("plugins"), Vec::<String>::new());
    assert_eq!(h.listing(".plugin-delivery/store"), Vec::<String>::new());
    assert_eq!(h.inventory(), json!([]));
}

#[test]
fn memory_blocks_are_removed_one_by_one_when_the_chunk_was_split() {
    let h = Host::new();
    let p = plugin(&[
        ("plugin.yaml", "name: alpha\n"),
        ("rules/a.md", "Rule A.\n\nSecond paragraph.\n"),
        ("NOTES.md", "Notes.\n"),
    ]);
    // No restart: this test writes CLAUDE.md itself, to see unwire alone.
    h.install_raw("alpha", &p.archive.sha, &p.archive.bytes, "")
        .assert_ok("installed");
    let a1 = "# Plugin: alpha / rule: a.md\n\nRule A.\n\nSecond paragraph.";
    let a2 = "# Plugin: alpha / fragment: NOTES.md\n\nNotes.";
    let other = "# Plugin: beta / rule: b.md\n\nBeta.";
    // Not exact blocks of alpha: not at a line start, or running on.
    let near_misses = format!("quote: {a2}\n{a1} and more\n");
    let uninstall = |memory: &str| {
        fs::write(h.path("CLAUDE.md"), memory).unwrap();
        run_script(&["uninstall", h.cfg(), "alpha", OWNER, "5", ""], None, None)
            .assert_ok("uninstalled");
        let left = h.read("CLAUDE.md");
        h.install_raw("alpha", &p.archive.sha, &p.archive.bytes, "")
            .assert_ok("installed");
        left
    };
    assert_eq!(
        uninstall(&format!(
            "{USER_MEMORY}\n{a1}\n{other}\n{a2}\n{near_misses}"
        )),
        format!("{USER_MEMORY}\n{other}\n{near_misses}")
    );
    assert_eq!(
        uninstall(&format!("{a1}\n\n{a2}\n{USER_MEMORY}")),
        USER_MEMORY
    );
    assert_eq!(
        uninstall(&format!("{USER_MEMORY}\n{a2}\n{other}")),
        format!("{USER_MEMORY}\n{other}")
    );
    assert_eq!(uninstall(&near_misses), near_misses);
}

#[test]
fn settings_removal_takes_one_group_and_only_unshared_servers() {
    let h = Host::new();
    let (a, b) = (alpha_v1(), beta());
    // No restart: this test writes settings.json itself, to see unwire alone.
    h.install_raw("alpha", &a.archive.sha, &a.archive.bytes, "")
        .assert_ok("installed");
    h.install_raw("beta", &b.archive.sha, &b.archive.bytes, "")
        .assert_ok("installed");
    let hooks_dir = h.path(".claude/hooks");
    let alpha_pre = hook_group(
        Some("Bash"),
        format!("{}/alpha-hook.sh", hooks_dir.display()),
    );
    let alpha_start = hook_group(None, format!("{}/alpha-hook.sh start", hooks_dir.display()));
    let beta_pre = hook_group(
        Some("Edit"),
        format!("{}/beta-hook.sh", hooks_dir.display()),
    );
    let user_pre = user_settings()["hooks"]["PreToolUse"][0].clone();
    let srv = |c: &str| json!({"command": c});
    let write = |v: &Value| {
        fs::create_dir_all(h.path(".claude")).unwrap();
        fs::write(h.path(".claude/settings.json"), v.to_string()).unwrap();
    };
    let uninstall = |name: &str| {
        run_script(&["uninstall", h.cfg(), name, OWNER, "5", ""], None, None)
            .assert_ok("uninstalled");
    };
    write(&json!({
        "hooks": {"PreToolUse": [alpha_pre, user_pre, alpha_pre], "SessionStart": [alpha_start], "Stop": []},
        "mcpServers": {"alpha-srv": srv("alpha"), "shared-srv": srv("shared"), "user-srv": srv("user")}
    }));
    uninstall("alpha");
    // One equal group goes (the last: the runtime appends); an event list is
    // dropped only when this removal emptied it; beta still declares shared-srv.
    assert_eq!(
        h.settings(),
        json!({
            "hooks": {"PreToolUse": [alpha_pre, user_pre], "Stop": []},
            "mcpServers": {"shared-srv": srv("shared"), "user-srv": srv("user")}
        })
    );
    assert!(h
        .read(".claude/settings.json")
        .starts_with("{\n  \"hooks\": {\n    \"PreToolUse\": [\n"));

    write(
        &json!({"hooks": {"PreToolUse": [beta_pre]}, "mcpServers": {"shared-srv": srv("shared")}, "env": {}}),
    );
    uninstall("beta");
    assert_eq!(h.settings(), json!({"env": {}}));

    // Nothing of the plugin in it: not rewritten, not even reformatted.
    h.install_raw("beta", &b.archive.sha, &b.archive.bytes, "")
        .assert_ok("installed");
    let compact = r#"{"hooks":{"PreToolUse":[]},"mcpServers":{"other":{}}}"#;
    fs::write(h.path(".claude/settings.json"), compact).unwrap();
    uninstall("beta");
    assert_eq!(h.read(".claude/settings.json"), compact);
}

#[test]
fn files_shipped_or_listed_by_another_plugin_stay() {
    let h = Host::new();
    let a = plugin(&[
        (
            "plugin.yaml",
            "name: alpha\nskills:\n  - 'yaml-only'  # wired by an older runtime\n  - common\n",
        ),
        ("skills/common/SKILL.md", "common from alpha\n"),
        ("skills/listed/SKILL.md", "listed\n"),
        ("hooks/common.sh", "#!/bin/sh\n"),
    ]);
    let b = plugin(&[
        ("plugin.yaml", "name: beta\n"),
        ("skills/common/SKILL.md", "common from beta\n"),
        ("hooks/common.sh", "#!/bin/sh\n"),
    ]);
    let c = plugin(&[("plugin.yaml", "name: gamma\nskills: [\"listed\", other]\n")]);
    h.install("alpha", &a).assert_ok("installed");
    h.install("beta", &b).assert_ok("installed");
    h.install("gamma", &c).assert_ok("installed");
    fs::create_dir_all(h.path("skills/yaml-only")).unwrap();
    fs::create_dir_all(h.path("skills/user-skill")).unwrap();
    assert_eq!(
        h.listing("skills"),
        vec!["common", "listed", "user-skill", "yaml-only"]
    );

    h.uninstall("alpha").assert_ok("uninstalled");
    // beta ships common, gamma lists listed; yaml-only was alpha's alone.
    assert_eq!(h.listing("skills"), vec!["common", "listed", "user-skill"]);
    assert_eq!(h.read("skills/common/SKILL.md"), "common from alpha\n");
    assert!(h.path(".claude/hooks/common.sh").is_file());

    h.uninstall("beta").assert_ok("uninstalled");
    assert_eq!(h.listing("skills"), vec!["listed", "user-skill"]);
    assert!(!h.path(".claude/hooks/common.sh").exists());
}

#[test]
fn uninstall_of_a_missing_plugin_is_absent_without_restart() {
    let h = Host::new();
    let r = h.uninstall("ghost");
    r.assert_ok("absent");
    assert_eq!(r.result["restarted"], false);
    h.install("alpha", &alpha_v1()).assert_ok("installed");
    let r = h.uninstall("ghost");
    r.assert_ok("absent");
    assert_eq!(
        r.result,
        json!({"status": "absent", "plugin": "ghost", "digest": "", "previous": "", "previous_kind": "", "restarted": false, "pending_restart": false})
    );
    assert_eq!(h.restarts(), 1);
}

/// Everything a failed install must leave exactly as it was.
fn assert_untouched(h: &Host, p: &Plugin, memory: &str) {
    h.assert_installed("alpha", p);
    assert_eq!(
        h.listing(".plugin-delivery/store"),
        vec![format!("alpha@{}", p.archive.sha)]
    );
    h.assert_no_leftovers();
    assert_eq!(h.read("CLAUDE.md"), memory);
    assert!(h.path("skills/alpha-skill").is_dir());
    assert_eq!(h.restarts(), 1);
}

#[test]
fn wrong_digest_is_rejected_and_the_old_version_stays() {
    let h = Host::new();
    let v1 = alpha_v1();
    h.install("alpha", &v1).assert_ok("installed");
    let memory = h.read("CLAUDE.md");
    let v2 = alpha_v2();
    let wrong = sha256(b"some other archive");
    h.install_raw("alpha", &wrong, &v2.archive.bytes, &h.restart_cmd())
        .assert_error("digest_mismatch", 65);
    assert_untouched(&h, &v1, &memory);
}

#[test]
fn truncated_archive_fails_and_the_old_version_stays() {
    let h = Host::new();
    let v1 = alpha_v1();
    h.install("alpha", &v1).assert_ok("installed");
    let memory = h.read("CLAUDE.md");
    let v2 = alpha_v2();
    let cut = &v2.archive.bytes[..v2.archive.bytes.len() / 2];
    let r = h.install_raw("alpha", &v2.archive.sha, cut, &h.restart_cmd());
    r.assert_error("digest_mismatch", 65);
    assert_eq!(r.result["plugin"], "alpha");
    assert_untouched(&h, &v1, &memory);
}

#[test]
fn corrupt_or_foreign_archives_are_bad_archives() {
    let h = Host::new();
    let garbage = b"\x1f\x8b\x08\x00 this is not a gzip stream".to_vec();
    h.install_raw("alpha", &sha256(&garbage), &garbage, &h.restart_cmd())
        .assert_error("bad_archive", 66);
    // A well-formed archive with a symlink is not a plugin tree either, even
    // beside a plugin.yaml (the one walk that hashes the files refuses it).
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    let mut hd = tar::Header::new_gnu();
    hd.set_size(13);
    hd.set_mode(0o644);
    b.append_data(&mut hd, "plugin.yaml", &b"name: alpha\n\n"[..])
        .unwrap();
    let mut hd = tar::Header::new_gnu();
    hd.set_entry_type(tar::EntryType::Symlink);
    hd.set_size(0);
    hd.set_mode(0o777);
    b.append_link(&mut hd, "escape", "/etc").unwrap();
    let linky = b.into_inner().unwrap().finish().unwrap();
    let r = h.install_raw("alpha", &sha256(&linky), &linky, &h.restart_cmd());
    r.assert_error("bad_archive", 66);
    // (plugin.yaml is there: the entry kind is the only thing wrong.)
    assert_eq!(r.result["message"], "archive could not be extracted");
    assert!(fs::symlink_metadata(h.path("plugins/alpha")).is_err());
    assert_eq!(h.listing(".plugin-delivery/store"), Vec::<String>::new());
    h.assert_no_leftovers();
    assert_eq!(h.restarts(), 0);
}

#[test]
fn a_held_lock_makes_mutations_busy() {
    let h = Host::new();
    let lock = h.book().join("lock");
    fs::create_dir_all(lock.parent().unwrap()).unwrap();
    // The holder keeps the lock until its stdin closes.
    let mut holder = Command::new("flock")
        .arg(&lock)
        .arg("-c")
        .arg("echo locked; exec cat >/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("flock (util-linux) is needed");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "locked\n");

    let p = alpha_v1();
    let started = Instant::now();
    let r = run_script(
        &[
            "install",
            h.cfg(),
            "alpha",
            &p.archive.sha,
            OWNER,
            "1",
            &h.restart_cmd(),
        ],
        Some(&p.archive.bytes),
        None,
    );
    r.assert_error("busy", 75);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited {:?}",
        started.elapsed()
    );
    run_script(
        &["uninstall", h.cfg(), "alpha", OWNER, "1", &h.restart_cmd()],
        None,
        None,
    )
    .assert_error("busy", 75);
    assert!(fs::symlink_metadata(h.path("plugins/alpha")).is_err());
    assert_eq!(h.restarts(), 0);

    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    h.install("alpha", &p).assert_ok("installed");
}

#[test]
fn bad_arguments_are_usage_errors() {
    let h = Host::new();
    let cfg = h.cfg();
    let sha = sha256(b"x");
    let long = "a".repeat(129);
    let upper = sha.to_uppercase();
    let install = |cfg: &str, name: &str, sha: &str, owner: &str, wait: &str| {
        vec![
            "install".to_string(),
            cfg.into(),
            name.into(),
            sha.into(),
            owner.into(),
            wait.into(),
            "true".into(),
        ]
    };
    let mut cases: Vec<Vec<String>> = vec![
        vec![],
        vec!["frobnicate".into(), cfg.into()],
        vec!["inventory".into()],
        vec!["inventory".into(), cfg.into()],
        vec!["inventory".into(), "relative/cfg".into(), OWNER.into()],
        vec!["inventory".into(), cfg.into(), OWNER.into(), "extra".into()],
        vec!["restart".into(), cfg.into(), OWNER.into(), "5".into()],
        vec!["owner-probe".into(), cfg.into(), "alpha".into()],
        install("/", "alpha", &sha, OWNER, "5"),
        install("/etc/../tmp", "alpha", &sha, OWNER, "5"),
        install(&format!("{cfg}/"), "alpha", &sha, OWNER, "5"),
        install(&format!("{cfg}/./x"), "alpha", &sha, OWNER, "5"),
        install("/tmp/a b", "alpha", &sha, OWNER, "5"),
        vec![
            "uninstall".into(),
            cfg.into(),
            "alpha".into(),
            OWNER.into(),
            "5".into(),
        ],
        vec![
            "uninstall".into(),
            cfg.into(),
            "../alpha".into(),
            OWNER.into(),
            "5".into(),
            "true".into(),
        ],
        install(cfg, "alpha", &sha, OWNER, "5")[..6].to_vec(),
        install("relative/cfg", "alpha", &sha, OWNER, "5"),
        install(cfg, "alpha", &upper, OWNER, "5"),
        install(cfg, "alpha", &sha[1..], OWNER, "5"),
        install(cfg, "alpha", &sha, OWNER, "-1"),
        install(cfg, "alpha", &sha, OWNER, "1.5"),
        install(cfg, "alpha", &sha, OWNER, ""),
    ];
    for name in [
        "",
        "Alpha",
        "../x",
        "a..b",
        ".hidden",
        "-dash",
        "a/b",
        "a b",
        "a\"b",
        long.as_str(),
    ] {
        cases.push(install(cfg, name, &sha, OWNER, "5"));
    }
    for owner in [
        "root",
        "0:0",
        "1000:0",
        "0:1000",
        "00:1000",
        "1000",
        "1000:",
        ":1000",
        "1000:1000:1",
        "1000:4294967295",
        "user:group",
    ] {
        cases.push(install(cfg, "alpha", &sha, owner, "5"));
    }
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = run_script(&args, Some(b""), None);
        r.assert_error("usage", 64);
        // An unvalidated name is never echoed back.
        if args.get(2).is_some_and(|n| *n != "alpha") {
            assert_eq!(r.result["plugin"], "", "{args:?}");
        }
    }
    assert_eq!(
        h.listing(""),
        Vec::<String>::new(),
        "nothing may be created"
    );
    // The longest valid name is accepted.
    let name = "a".repeat(128);
    let p = alpha_v2();
    h.install(&name, &p).assert_ok("installed");
}

#[test]
fn inventory_lists_names_and_digests() {
    let h = Host::new();
    assert_eq!(h.inventory(), json!([]));
    let (a, b) = (alpha_v1(), beta());
    h.install("alpha", &a).assert_ok("installed");
    h.install("beta", &b).assert_ok("installed");
    fs::create_dir_all(h.path("plugins/legacy-one/rules")).unwrap();
    fs::create_dir_all(h.path("plugins/.hidden")).unwrap();
    fs::write(h.path("plugins/notes.txt"), "not a plugin").unwrap();
    symlink(
        format!("../.plugin-delivery/store/broken@{}", sha256(b"gone")),
        h.path("plugins/broken"),
    )
    .unwrap();
    assert_eq!(
        h.inventory(),
        json!([
            {"name": "alpha", "digest": a.archive.sha},
            {"name": "beta", "digest": b.archive.sha},
            {"name": "broken", "digest": ""},
            {"name": "legacy-one", "digest": ""}
        ])
    );
    // A runtime writing into its plugin (a __pycache__) is not drift; a
    // file changed by hand is: reported without a digest, reinstalled by the
    // next install of the same digest.
    fs::create_dir_all(h.path("plugins/alpha/__pycache__")).unwrap();
    fs::write(h.path("plugins/alpha/__pycache__/x.pyc"), "bytecode").unwrap();
    assert_eq!(
        h.inventory()[0],
        json!({"name": "alpha", "digest": a.archive.sha})
    );
    h.install("alpha", &a).assert_ok("unchanged");
    let first = snapshot(&h.path("plugins/beta"))
        .into_iter()
        .find_map(|(rel, n)| matches!(n, Node::File(..)).then_some(rel))
        .unwrap();
    fs::write(h.path("plugins/beta").join(&first), "changed by hand").unwrap();
    assert_eq!(h.inventory()[1], json!({"name": "beta", "digest": ""}));
    h.install("beta", &b).assert_ok("installed");
    assert_eq!(
        h.inventory()[1],
        json!({"name": "beta", "digest": b.archive.sha})
    );
}

#[test]
fn a_failing_restart_is_reported_after_the_install() {
    let h = Host::new();
    let p = alpha_v2();
    // The noise must not reach stdout (run_script checks the single line).
    let r = h.install_raw(
        "alpha",
        &p.archive.sha,
        &p.archive.bytes,
        "echo noise; exit 3",
    );
    r.assert_error("restart_failed", 70);
    assert!(r.stderr.contains("noise"), "{r:#?}");
    h.assert_installed("alpha", &p);
    h.assert_no_leftovers();
}

#[test]
fn a_daemon_started_by_the_restart_does_not_keep_the_lock() {
    let h = Host::new();
    let p = alpha_v2();
    let daemon = "sleep 5 </dev/null >/dev/null 2>&1 &";
    h.install_raw("alpha", &p.archive.sha, &p.archive.bytes, daemon)
        .assert_ok("installed");
    // LOCK_WAIT 0: the lock must be free the moment the install has returned.
    run_script(&["uninstall", h.cfg(), "alpha", OWNER, "0", ""], None, None)
        .assert_ok("uninstalled");
}

#[test]
fn an_empty_restart_command_skips_the_restart() {
    let h = Host::new();
    let p = alpha_v2();
    let r = h.install_raw("alpha", &p.archive.sha, &p.archive.bytes, "");
    r.assert_ok("installed");
    assert_eq!(r.result["restarted"], false);
    h.assert_installed("alpha", &p);
    assert_eq!(h.restarts(), 0);
}

#[test]
fn unwire_without_python_fails_and_keeps_the_plugin() {
    let h = Host::new();
    let p = alpha_v1();
    h.install("alpha", &p).assert_ok("installed");
    // A PATH with every system tool except python.
    let bin = tempfile::tempdir().unwrap();
    for e in fs::read_dir("/usr/bin").unwrap() {
        let name = e.unwrap().file_name();
        if !name.to_string_lossy().starts_with("python") {
            symlink(Path::new("/usr/bin").join(&name), bin.path().join(&name)).unwrap();
        }
    }
    let r = run_script(
        &["uninstall", h.cfg(), "alpha", OWNER, "5", "true"],
        None,
        Some(bin.path()),
    );
    r.assert_error("unwire_failed", 71);
    h.assert_installed("alpha", &p);
    assert!(h.path("skills/alpha-skill").is_dir());
    h.assert_no_leftovers();
}

#[test]
fn the_script_passes_shellcheck() {
    let out = match Command::new("shellcheck")
        .args(["-s", "sh"])
        .arg(script())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!(
                "shellcheck is not installed: run `apt-get install -y shellcheck` (CI installs it)"
            )
        }
        Err(e) => panic!("cannot run shellcheck: {e}"),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

// ------------------------------------------------------------ URL download (SSM path)

/// A one-shot-per-request HTTP server on loopback answering every request
/// with `status` and `body`; returns its base URL and the request lines seen.
fn http_server(
    status: u16,
    body: Vec<u8>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            log.lock().unwrap().push(line.trim().to_string());
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
            }
            let head = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&body);
        }
    });
    (url, seen)
}

impl Host {
    /// Install with the archive downloaded from `url`, as over SSM.
    fn install_from(&self, name: &str, sha: &str, url: &str, path_env: Option<&Path>) -> Run {
        run_script_env(
            &[
                "install",
                self.cfg(),
                name,
                sha,
                OWNER,
                "5",
                &self.restart_cmd(),
            ],
            None,
            path_env,
            &[("PLUGIN_ARCHIVE_URL", url)],
        )
    }
}

/// A PATH for downloading with `tool`: `curl` is the system's; `wget` is
/// every tool but curl (GNU wget); `busybox` has BusyBox's wget applet as the
/// only downloader (minimal hardened images).
fn path_for(tool: &str) -> Option<TempDir> {
    if tool == "curl" {
        need("/usr/bin/curl");
        return None;
    }
    need("/usr/bin/wget");
    let bin = tempfile::tempdir().unwrap();
    for e in fs::read_dir("/usr/bin").unwrap() {
        let name = e.unwrap().file_name();
        let skip = name == "curl" || (tool == "busybox" && name == "wget");
        if !skip {
            symlink(Path::new("/usr/bin").join(&name), bin.path().join(&name)).unwrap();
        }
    }
    if tool == "busybox" {
        need("/usr/bin/busybox");
        symlink("/usr/bin/busybox", bin.path().join("wget")).unwrap();
    }
    Some(bin)
}

const DOWNLOADERS: [&str; 3] = ["curl", "wget", "busybox"];

#[test]
fn install_downloads_the_archive_from_a_url() {
    for tool in DOWNLOADERS {
        let h = Host::new();
        let p = alpha_v1();
        let (url, seen) = http_server(200, p.archive.bytes.clone());
        let url = format!(
            "{url}/staged/{}.tar.gz?X-Amz-Expires=300&X-Amz-Signature=abc",
            p.archive.sha
        );
        let bin = path_for(tool);
        let path = bin.as_ref().map(|b| b.path());
        let r = h.install_from("alpha", &p.archive.sha, &url, path);
        r.assert_ok("installed");
        h.assert_installed("alpha", &p);
        assert_eq!(h.restarts(), 1, "{tool}");
        // The query string (the signature) reached the server intact.
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{tool}: {seen:?}");
        assert!(seen[0].contains("X-Amz-Signature=abc"), "{seen:?}");

        // Unchanged: the archive is not even downloaded.
        h.install_from("alpha", &p.archive.sha, &url, path)
            .assert_ok("unchanged");
        assert_eq!(h.restarts(), 1);
        h.assert_no_leftovers();
    }
}

#[test]
fn a_refused_or_unreachable_url_changes_nothing() {
    for tool in DOWNLOADERS {
        let h = Host::new();
        let v1 = alpha_v1();
        h.install("alpha", &v1).assert_ok("installed");
        let v2 = alpha_v2();
        let bin = path_for(tool);
        let path = bin.as_ref().map(|b| b.path());

        // An expired presigned URL: S3 answers 403.
        let (url, _) = http_server(403, b"<Error><Code>AccessDenied</Code></Error>".to_vec());
        let r = h.install_from("alpha", &v2.archive.sha, &format!("{url}/x"), path);
        r.assert_error("fetch_failed", 74);
        if tool != "busybox" {
            assert!(
                r.result["message"].as_str().unwrap().contains("expired"),
                "{r:?}"
            );
        }
        // Nobody listening.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = format!("http://{}/x", closed.local_addr().unwrap());
        drop(closed);
        h.install_from("alpha", &v2.archive.sha, &dead, path)
            .assert_error("fetch_failed", 74);
        // Served, but not the archive we asked for.
        let (url, _) = http_server(200, b"something else".to_vec());
        h.install_from("alpha", &v2.archive.sha, &format!("{url}/x"), path)
            .assert_error("digest_mismatch", 65);

        // A "URL" that could smuggle options into curl's config syntax.
        h.install_from(
            "alpha",
            &v2.archive.sha,
            &format!("{url}/x\"\noutput = \"/tmp/x"),
            path,
        )
        .assert_error("usage", 64);

        h.assert_installed("alpha", &v1);
        assert_eq!(h.restarts(), 1, "{tool}");
        h.assert_no_leftovers();
    }
}

#[test]
fn a_legacy_dir_left_aside_by_a_killed_run_is_recovered() {
    // A run killed (SIGKILL: SSM stops commands that way) between moving a
    // legacy plugin dir aside and swapping in the link: the next operation
    // puts it back. One whose link did land is just removed.
    let h = Host::new();
    let p = alpha_v1();
    h.install("alpha", &p).assert_ok("installed");
    let aside = h.path(".plugin-delivery/aside");
    fs::create_dir_all(aside.join("beta/skills/b")).unwrap();
    fs::write(aside.join("beta/skills/b/SKILL.md"), "# legacy beta\n").unwrap();
    fs::create_dir_all(aside.join("alpha")).unwrap();
    fs::write(aside.join("alpha/old.txt"), "old").unwrap();

    h.install("alpha", &p).assert_ok("unchanged");
    assert_eq!(h.read("plugins/beta/skills/b/SKILL.md"), "# legacy beta\n");
    assert!(fs::symlink_metadata(h.path("plugins/beta"))
        .unwrap()
        .is_dir());
    assert_eq!(h.listing(".plugin-delivery/aside"), Vec::<String>::new());
    h.assert_installed("alpha", &p);
}

#[test]
fn a_step_left_blocked_by_a_killed_run_is_ended_and_holds_no_lock() {
    // A root script killed between starting its install step and opening
    // the step's channels leaves the step blocked opening a FIFO forever
    // (found by the fault campaign). The step must not hold the host lock,
    // and the next operation ends it.
    let h = Host::new();
    let p = alpha_v1();
    h.install("alpha", &p).assert_ok("installed");
    let work = h.book().join("work");
    fs::create_dir_all(&work).unwrap();
    let fifo = work.join("verdict");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    // Blocked in open(2) of the FIFO for writing, as the orphaned step is;
    // once that returns it holds the FIFO, as the step holds its channels.
    let mut orphan = Command::new("sh")
        .arg("-c")
        .arg("exec 3>\"$0\"; exec sleep 1000")
        .arg(&fifo)
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(orphan.try_wait().unwrap().is_none(), "blocked");
    let r = h.install("alpha", &alpha_v2());
    r.assert_ok("installed");
    let ended = (0..50).find_map(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        orphan.try_wait().unwrap()
    });
    let status = ended.expect("the leftover step was ended");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "SIGKILL");
    assert!(
        r.stderr
            .contains("ending steps left by a run that was killed"),
        "{}",
        r.stderr
    );
    // A run that left nothing behind kills nothing.
    let mut bystander = Command::new("sleep").arg("30").spawn().unwrap();
    h.install("alpha", &p).assert_ok("installed");
    assert!(bystander.try_wait().unwrap().is_none());
    bystander.kill().unwrap();
}

#[test]
fn a_restart_that_did_not_happen_is_made_up_for() {
    let h = Host::new();
    let p = alpha_v1();
    // The change lands but its restart fails (or is cut off).
    h.install_raw("alpha", &p.archive.sha, &p.archive.bytes, "exit 3")
        .assert_error("restart_failed", 70);
    assert_eq!(h.restarts(), 0);
    // A batch install without a restart says one is owed.
    let q = alpha_v2();
    let r = h.install_raw("beta", &q.archive.sha, &q.archive.bytes, "");
    r.assert_ok("installed");
    assert_eq!(r.result["pending_restart"], true);
    // The same install again is unchanged, but restarts the runtime now.
    let r = h.install("alpha", &p);
    r.assert_ok("unchanged");
    assert_eq!(
        (
            r.result["restarted"].clone(),
            r.result["pending_restart"].clone()
        ),
        (json!(true), json!(false))
    );
    assert_eq!(h.restarts(), 1);
    // And only once.
    h.install("alpha", &p).assert_ok("unchanged");
    assert_eq!(h.restarts(), 1);
}

#[test]
fn an_uninstall_of_an_absent_plugin_still_makes_up_a_missed_restart() {
    let h = Host::new();
    let p = alpha_v1();
    h.install_raw("alpha", &p.archive.sha, &p.archive.bytes, "exit 3")
        .assert_error("restart_failed", 70);
    let r = h.uninstall("ghost");
    r.assert_ok("absent");
    assert_eq!(r.result["restarted"], true);
    assert_eq!(r.result["pending_restart"], false);
    assert_eq!(h.restarts(), 1);
}

// ------------------------------------------------- the agent as an attacker
//
// The config dir belongs to the agent user (uid 1000), an AI agent running
// arbitrary code. Whatever it plants there, the script (run as root) must
// change nothing outside the config dir and leave no root-owned file in it.

impl Host {
    fn restart_op(&self) -> Run {
        run_script(
            &["restart", self.cfg(), OWNER, "5", &self.restart_cmd()],
            None,
            None,
        )
    }

    /// Every operation once, in the order a workspace sees them: upgrade,
    /// inventory (repair's look), uninstall, install again, restart. Results
    /// may be errors; each must be one clean result line, and after each the
    /// canary is unchanged (run_script checks for root-owned files).
    fn every_operation(&self, canary: &Canary, what: &str) {
        let (v1, v2) = (alpha_v1(), alpha_v2());
        let runs = [
            ("upgrade", self.install("alpha", &v2)),
            (
                "inventory",
                run_script(&["inventory", self.cfg(), OWNER], None, None),
            ),
            ("uninstall", self.uninstall("alpha")),
            ("install", self.install("alpha", &v1)),
            ("restart", self.restart_op()),
        ];
        for (op, run) in runs {
            assert!(run.result["status"].is_string(), "{what}: {op}: {run:#?}");
            canary.assert_unchanged(&format!("{what}: {op}"));
        }
    }
}

#[test]
fn links_planted_at_every_path_lead_nowhere() {
    let canary = Canary::new();
    let sha = alpha_v1().archive.sha;
    for rel in planted_paths("alpha", &sha, "alpha-skill") {
        for target in [canary.path("etc"), canary.path("ld.so.preload")] {
            let h = Host::new();
            write_user_files(&h);
            h.install("alpha", &alpha_v1()).assert_ok("installed");
            plant_link(&h.cfg, &rel, &target);
            h.every_operation(&canary, &format!("{rel} -> {}", target.display()));
        }
    }
}

#[test]
fn a_symlinked_skills_dir_with_a_skill_named_passwd_deletes_nothing() {
    // The uninstall's unwire step removes skills/<s> for every skill the
    // plugin names; with skills/ pointing at /etc and `skills: [passwd]`
    // that was `rm -rf /etc/passwd` as root.
    let canary = Canary::new();
    let h = Host::new();
    let p = plugin(&[
        ("plugin.yaml", "name: evil\nskills: [passwd]\n"),
        ("skills/passwd/SKILL.md", "x\n"),
    ]);
    h.install("evil", &p).assert_ok("installed");
    plant_link(&h.cfg, "skills", &canary.path("etc"));
    let r = h.uninstall("evil");
    assert!(r.result["status"].is_string(), "{r:#?}");
    canary.assert_unchanged("uninstall through a symlinked skills dir");
    assert_eq!(
        fs::read_to_string(canary.path("etc/passwd")).unwrap(),
        "root:x:0:0\n"
    );
}

#[test]
fn a_racing_agent_swapping_dirs_for_links_changes_nothing_outside() {
    let canary = Canary::new();
    let h = Host::new();
    write_user_files(&h);
    give_to_agent(&h.cfg);
    let (v1, v2) = (alpha_v1(), alpha_v2());
    h.install("alpha", &v1).assert_ok("installed");
    let racer = Racer::start(
        &h.cfg,
        &[
            "plugins",
            "skills",
            ".claude",
            ".claude/hooks",
            ".plugin-delivery",
            ".plugin-delivery/store",
            ".plugin-delivery/staging",
        ],
        &canary.path("etc"),
    );
    let args = |op: &str, p: &Plugin| -> Vec<String> {
        match op {
            "install" => vec![
                "install".into(),
                h.cfg().into(),
                "alpha".into(),
                p.archive.sha.clone(),
                OWNER.into(),
                "5".into(),
                h.restart_cmd(),
            ],
            "uninstall" => vec![
                "uninstall".into(),
                h.cfg().into(),
                "alpha".into(),
                OWNER.into(),
                "5".into(),
                h.restart_cmd(),
            ],
            _ => vec!["inventory".into(), h.cfg().into(), OWNER.into()],
        }
    };
    let mut statuses = BTreeMap::new();
    for round in 0..12 {
        for (op, p) in [
            ("install", &v2),
            ("inventory", &v2),
            ("install", &v1),
            ("uninstall", &v1),
        ] {
            let a = args(op, p);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let stdin = (op == "install").then_some(p.archive.bytes.as_slice());
            // No give_to_agent here: the racer owns the tree while it runs.
            let run = launch(&a, stdin, None, &[]);
            *statuses
                .entry(format!(
                    "{op}:{}",
                    run.result["status"].as_str().unwrap_or("?")
                ))
                .or_insert(0) += 1;
            canary.assert_unchanged(&format!("round {round}: {op}"));
        }
    }
    drop(racer);
    assert_eq!(root_owned(&h.cfg), Vec::<String>::new());
    canary.assert_unchanged("after the race");
    // The race really reached the script: some operations saw it.
    eprintln!("statuses under the race: {statuses:?}");
    // And the host still works once the agent stops. Which version the
    // race left depends on which operations it broke: v2 may already be
    // there (then "unchanged").
    let r = h.install("alpha", &v2);
    let status = r.result["status"].as_str().unwrap_or("?").to_string();
    assert!(
        r.code == 0 && (status == "installed" || status == "unchanged"),
        "{r:?}"
    );
    h.assert_installed_at("alpha", &v2);
}

#[test]
fn owner_steps_refuse_to_run_as_root() {
    let h = Host::new();
    let sha = alpha_v1().archive.sha;
    for args in [
        vec!["owner-install", h.cfg(), "alpha", &sha, ""],
        vec!["owner-remove", h.cfg(), "alpha"],
        vec!["owner-list", h.cfg(), ""],
    ] {
        let r = launch(&args, None, None, &[]);
        r.assert_error("internal", 1);
        assert!(
            r.result["message"].as_str().unwrap().contains("root"),
            "{r:#?}"
        );
    }
    assert_eq!(h.listing(""), Vec::<String>::new());
}

#[test]
fn a_config_dir_that_is_a_link_or_not_the_agents_is_refused() {
    let canary = Canary::new();
    let p = alpha_v1();
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // The agent's real dir, reached through a link.
    let real = tmp.path().join("real");
    fs::create_dir(&real).unwrap();
    std::os::unix::fs::chown(&real, Some(AGENT), Some(AGENT)).unwrap();
    symlink(&real, tmp.path().join("cfg-link")).unwrap();
    // A dir under a symlinked parent.
    symlink(tmp.path(), tmp.path().join("parent-link")).unwrap();
    // Root's own dir (what a tag naming /etc would be).
    let roots = tmp.path().join("roots");
    fs::create_dir(&roots).unwrap();
    // A file, not a dir.
    fs::write(tmp.path().join("file"), "x").unwrap();
    // And a link to the canary.
    symlink(canary.path("etc"), tmp.path().join("to-canary")).unwrap();
    for cfg in ["cfg-link", "parent-link/real", "roots", "file", "to-canary"] {
        let cfg = tmp.path().join(cfg);
        let cfg = cfg.to_str().unwrap();
        for args in [
            vec!["install", cfg, "alpha", &p.archive.sha, OWNER, "5", "true"],
            vec!["uninstall", cfg, "alpha", OWNER, "5", "true"],
            vec!["inventory", cfg, OWNER],
            vec!["restart", cfg, OWNER, "5", "true"],
        ] {
            let r = launch(&args, Some(&p.archive.bytes), None, &[]);
            r.assert_error("bad_config_dir", 77);
        }
    }
    // Nothing was created anywhere: not in the dirs, not in root's state.
    assert_eq!(fs::read_dir(&real).unwrap().count(), 0);
    assert_eq!(fs::read_dir(&roots).unwrap().count(), 0);
    assert!(!tmp.path().join("state").exists());
    canary.assert_unchanged("bad config dirs");
}

/// `args` as the `&str`s the runners take.
fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A PATH with every tool of /usr/bin except those named.
fn path_without(tools: &[&str]) -> TempDir {
    let bin = tempfile::tempdir().unwrap();
    fs::set_permissions(bin.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for e in fs::read_dir("/usr/bin").unwrap() {
        let name = e.unwrap().file_name();
        if !tools.iter().any(|t| name == *t) {
            symlink(Path::new("/usr/bin").join(&name), bin.path().join(&name)).unwrap();
        }
    }
    bin
}

/// A PATH like `path_without(&[tool])`, whose `tool` appends its
/// arguments to `log` and then runs /usr/bin's.
fn path_logging(tool: &str, log: &Path) -> TempDir {
    let bin = path_without(&[tool]);
    let shim = bin.path().join(tool);
    fs::write(
        &shim,
        format!(
            "#!/bin/sh\necho \"$@\" >>'{}'\nexec /usr/bin/{tool} \"$@\"\n",
            log.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&shim, fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// How many of the calls `path_logging("python3", log)` logged were the
/// install step's inflate, and the log.
fn python_inflates(log: &Path) -> (usize, String) {
    let called = fs::read_to_string(log).unwrap_or_default();
    let inflates = called
        .lines()
        .filter(|l| l.contains("decompressobj"))
        .count();
    (inflates, called)
}

/// Installs `alpha` with `bin` as the script's whole PATH.
fn install_with_path(h: &Host, p: &Plugin, bin: &Path) -> Run {
    let args = h.alpha_args(p, &[]);
    run_script_env(&strs(&args), Some(&p.archive.bytes), Some(bin), &[])
}

/// Each installed tree's sums, as root keeps them.
fn sums_of(h: &Host, p: &Plugin) -> String {
    fs::read_to_string(h.book().join(format!("sums/alpha@{}", p.archive.sha))).unwrap()
}

/// Files over 1 MiB are hashed by OpenSSL where the host has it (lines
/// with sha256sum's binary-mode mark), the rest by sha256sum (text-mode
/// lines), which starts faster; a host without OpenSSL hashes everything
/// with sha256sum. Either way every file is listed, and an edit made after
/// the install is found by the next inventory.
#[test]
fn the_file_sums_come_from_openssl_or_sha256sum_and_catch_an_edit_either_way() {
    let big = "x".repeat(1_100_000);
    for without in [&[][..], &["openssl"][..]] {
        let h = Host::new();
        let p = plugin(&[
            ("plugin.yaml", "name: alpha\nversion: 1.0.0\n"),
            ("GUIDE.md", "Use alpha.\n"),
            ("data/big.txt", &big),
        ]);
        let bin = path_without(without);
        install_with_path(&h, &p, bin.path()).assert_ok("installed");
        h.assert_installed_at("alpha", &p);
        let sums = sums_of(&h, &p);
        let mark = |l: &str| l.as_bytes()[64..66].to_vec();
        let mut lines: Vec<(String, Vec<u8>)> = sums
            .lines()
            .map(|l| (l[66..].to_string(), mark(l)))
            .collect();
        lines.sort();
        let big_mark = if without.is_empty() { b" *" } else { b"  " };
        assert_eq!(
            lines,
            vec![
                ("./GUIDE.md".to_string(), b"  ".to_vec()),
                ("./data/big.txt".to_string(), big_mark.to_vec()),
                ("./plugin.yaml".to_string(), b"  ".to_vec()),
            ],
            "{without:?}: {sums}"
        );
        assert_eq!(h.inventory()[0]["digest"], p.archive.sha.as_str());
        let out = as_agent(&h.cfg, "echo edited >> plugins/alpha/data/big.txt");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(h.inventory()[0]["digest"], "", "{without:?}");
    }
}

/// The optional size argument only picks root's hash tool: sha256sum for
/// an archive under 1,000,000 bytes (it starts faster), OpenSSL for a
/// larger one (it hashes faster). A size that is not a number is refused
/// before anything is touched.
#[test]
fn the_archive_size_picks_roots_hash_tool_and_must_be_a_number() {
    let calls = tempfile::tempdir().unwrap();
    let log = calls.path().join("openssl-calls");
    for (size, openssl_calls) in [("57000", 0), ("5000000", 1)] {
        let h = Host::new();
        let p = alpha_v1();
        let bin = path_logging("openssl", &log);
        let _ = fs::remove_file(&log);
        let args = h.alpha_args(&p, &[size]);
        run_script_env(&strs(&args), Some(&p.archive.bytes), Some(bin.path()), &[])
            .assert_ok("installed");
        h.assert_installed_at("alpha", &p);
        // The plugin's files are all small: the owner step starts no OpenSSL.
        let called = fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(called.lines().count(), openssl_calls, "{size}: {called:?}");
    }
    let h = Host::new();
    let p = alpha_v1();
    for size in ["", "12ab", "-1", "1234567890123456"] {
        let args = h.alpha_args(&p, &[size]);
        run_script_env(&strs(&args), Some(&p.archive.bytes), None, &[]).assert_error("usage", 64);
    }
    assert_eq!(h.listing(""), Vec::<String>::new());
}

/// The size also picks how the install step inflates the archive:
/// Python's zlib from 1 MiB on, when the host has python3 (it inflates
/// stored blocks ten times as fast as gzip, and starts in 10 ms), else gzip
/// through tar. Either way a stream that is not one whole gzip member is a
/// bad_archive with nothing published, even when the tar inside it is whole
/// (the gzip trailer cut off, or bytes after it), which tar alone would not
/// notice behind Python.
#[test]
fn the_archive_size_picks_the_inflater_and_either_refuses_a_stream_not_whole() {
    let calls = tempfile::tempdir().unwrap();
    // The step runs as the agent: its shim must be able to log.
    fs::set_permissions(calls.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let log = calls.path().join("python-calls");
    let bin = path_logging("python3", &log);
    let args_for = |h: &Host, sha: &str, size: &str| -> Vec<String> {
        let mut a: Vec<String> = ["install", h.cfg(), "alpha", sha, OWNER, "5"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        a.push(h.restart_cmd());
        a.push(size.to_string());
        a
    };
    // A file over 1 MiB (hashed by OpenSSL after gzip), one empty, and one
    // whose name takes a GNU long-name entry.
    let big = "y".repeat(1_100_000);
    let long = format!("rules/{}.md", "n".repeat(120));
    let sized = plugin(&[
        ("plugin.yaml", "name: alpha\nversion: 0.9.0\n"),
        ("data/big.txt", &big),
        ("data/empty", ""),
        (&long, "A rule.\n"),
    ]);
    for (size, by_python) in [("57000", false), ("5000000", true)] {
        let h = Host::new();
        let _ = fs::remove_file(&log);
        let args = args_for(&h, &sized.archive.sha, size);
        run_script_env(
            &strs(&args),
            Some(&sized.archive.bytes),
            Some(bin.path()),
            &[],
        )
        .assert_ok("installed");
        h.assert_installed_at("alpha", &sized);
        let (inflates, called) = python_inflates(&log);
        assert_eq!(inflates, usize::from(by_python), "{size}: {called:?}");
        // Python hashed the files as they passed (sha256sum's text-mode
        // lines for all); after gzip the step hashed them (OpenSSL's
        // binary-mode mark for the big one). Either way, each file's
        // real sum.
        let mut lines: Vec<String> = sums_of(&h, &sized).lines().map(String::from).collect();
        let line = |path: &str, mark: &str| {
            let bytes = fs::read(h.path(&format!("plugins/alpha/{path}"))).unwrap();
            format!("{}{mark}./{path}", sha256(&bytes))
        };
        let mut want = vec![
            line("data/big.txt", if by_python { "  " } else { " *" }),
            line("data/empty", "  "),
            line("plugin.yaml", "  "),
            line(&long, "  "),
        ];
        want.sort_by(|a, b| a[66..].cmp(&b[66..]));
        lines.sort_by(|a, b| a[66..].cmp(&b[66..]));
        assert_eq!(lines, want, "{size}");
        assert_eq!(h.inventory()[0]["digest"], sized.archive.sha.as_str());

        let h = Host::new();
        let v1 = alpha_v1();
        let args = args_for(&h, &v1.archive.sha, size);
        run_script_env(&strs(&args), Some(&v1.archive.bytes), Some(bin.path()), &[])
            .assert_ok("installed");
        h.assert_installed_at("alpha", &v1);

        let memory = h.read("CLAUDE.md");
        let whole = alpha_v2().archive.bytes;
        let cut = whole[..whole.len() - 8].to_vec();
        let trailed = [&whole[..], b"junk"].concat();
        for bad in [cut, trailed] {
            let _ = fs::remove_file(&log);
            let args = args_for(&h, &sha256(&bad), size);
            let r = run_script_env(&strs(&args), Some(&bad), Some(bin.path()), &[]);
            r.assert_error("bad_archive", 66);
            assert_eq!(r.result["message"], "archive could not be extracted");
            let (inflates, called) = python_inflates(&log);
            assert_eq!(inflates, usize::from(by_python), "{size}: {called:?}");
        }
        assert_untouched(&h, &v1, &memory);

        // In frames, the size the caller expects comes after the "+".
        let _ = fs::remove_file(&log);
        let v2 = alpha_v2();
        let mut input = format!("alpha + {size}\n").into_bytes();
        input.extend_from_slice(&framed("alpha", &v2.archive, 1000, Some(&v2.archive.sha))[8..]);
        let args = named_on_stdin_args(&h);
        run_script_env(&strs(&args), Some(&input), Some(bin.path()), &[]).assert_ok("installed");
        h.assert_installed_at("alpha", &v2);
        let (inflates, called) = python_inflates(&log);
        assert_eq!(
            inflates,
            usize::from(by_python),
            "framed {size}: {called:?}"
        );
    }
    // tar stops at the archive's end: padding after it that Python could
    // no longer hand on (more than a pipe holds) is no reason to refuse a
    // whole stream, as it is none after gzip.
    for size in ["57000", "5000000"] {
        let h = Host::new();
        let mut b = tar::Builder::new(Vec::new());
        let mut hd = tar::Header::new_gnu();
        hd.set_size(12);
        hd.set_mode(0o644);
        b.append_data(&mut hd, "plugin.yaml", &b"name: alpha\n"[..])
            .unwrap();
        let mut tar_bytes = b.into_inner().unwrap();
        tar_bytes.resize(tar_bytes.len() + 2 * 1024 * 1024, 0);
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        std::io::Write::write_all(&mut gz, &tar_bytes).unwrap();
        let padded = Archive::new(gz.finish().unwrap());
        let args = args_for(&h, &padded.sha, size);
        run_script_env(&strs(&args), Some(&padded.bytes), Some(bin.path()), &[])
            .assert_ok("installed");
        assert_eq!(h.read("plugins/alpha/plugin.yaml"), "name: alpha\n");
        assert_eq!(h.inventory()[0]["digest"], padded.sha.as_str(), "{size}");
    }

    // Python's sums stand only when they name the very files tar made:
    // here a file and then a dir of the same name (tar keeps the dir).
    let h = Host::new();
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    for (path, data) in [
        ("plugin.yaml", &b"name: alpha\n"[..]),
        ("x", &b"gone\n"[..]),
    ] {
        let mut hd = tar::Header::new_gnu();
        hd.set_size(data.len() as u64);
        hd.set_mode(0o644);
        b.append_data(&mut hd, path, data).unwrap();
    }
    let mut hd = tar::Header::new_gnu();
    hd.set_entry_type(tar::EntryType::Directory);
    hd.set_size(0);
    hd.set_mode(0o755);
    b.append_data(&mut hd, "x/", std::io::empty()).unwrap();
    let shadowed = Archive::new(b.into_inner().unwrap().finish().unwrap());
    let args = args_for(&h, &shadowed.sha, "5000000");
    run_script_env(&strs(&args), Some(&shadowed.bytes), Some(bin.path()), &[])
        .assert_ok("installed");
    assert!(h.path("plugins/alpha/x").is_dir());
    let sums = fs::read_to_string(h.book().join(format!("sums/alpha@{}", shadowed.sha))).unwrap();
    assert_eq!(
        sums,
        format!("{}  ./plugin.yaml\n", sha256(b"name: alpha\n"))
    );
    assert_eq!(h.inventory()[0]["digest"], shadowed.sha.as_str());

    // No python3 on the host: gzip, whatever the size (the fake runtime's
    // restart finds its Python by its full path).
    let h = Host::new();
    let v1 = alpha_v1();
    let bare = path_without(&["python3"]);
    let mut args = args_for(&h, &v1.archive.sha, "5000000");
    args[6] = h.restart_cmd().replacen("python3", "/usr/bin/python3", 1);
    run_script_env(
        &strs(&args),
        Some(&v1.archive.bytes),
        Some(bare.path()),
        &[],
    )
    .assert_ok("installed");
    h.assert_installed_at("alpha", &v1);
}

#[test]
fn without_setpriv_the_script_refuses_and_changes_nothing() {
    let h = Host::new();
    let p = alpha_v1();
    let bin = path_without(&["setpriv"]);
    let r = install_with_path(&h, &p, bin.path());
    r.assert_error("no_privilege_drop", 72);
    assert_eq!(h.listing(""), Vec::<String>::new());
    assert_eq!(h.restarts(), 0);
}

/// Root hashes the archive as it arrives and copies it to the install
/// step, which extracts meanwhile. A copy that root cannot vouch for (here
/// a `tee` that passes every byte to both, the hash and the step, but
/// fails) is never published, however right the digest and however whole
/// the tree the step extracted.
#[test]
fn an_archive_root_did_not_pass_on_cleanly_is_never_published() {
    let h = Host::new();
    let p = alpha_v1();
    let bin = path_without(&["tee"]);
    fs::write(
        bin.path().join("tee"),
        "#!/bin/sh\n/usr/bin/tee \"$@\"\nexit 1\n",
    )
    .unwrap();
    fs::set_permissions(bin.path().join("tee"), fs::Permissions::from_mode(0o755)).unwrap();
    let r = install_with_path(&h, &p, bin.path());
    r.assert_error("internal", 1);
    assert_eq!(r.result["message"], "cannot read the archive");
    assert!(fs::symlink_metadata(h.path("plugins/alpha")).is_err());
    assert_eq!(h.restarts(), 0);
    h.assert_no_leftovers();
}

#[test]
fn a_host_of_the_earlier_layout_migrates_without_a_gap() {
    // Built the way the earlier script left a host: root-owned
    // .plugin-delivery with root's lock, sums and restart marker, a store
    // dir of root's holding the agent's tree, and root's leftovers in staging.
    let h = Host::new();
    let p = alpha_v1();
    h.install("alpha", &p).assert_ok("installed");
    let book = h.book();
    let state = h.path(".plugin-delivery");
    let sums_name = format!("alpha@{}", p.archive.sha);
    fs::create_dir(state.join("sums")).unwrap();
    fs::copy(
        book.join("sums").join(&sums_name),
        state.join("sums").join(&sums_name),
    )
    .unwrap();
    fs::write(state.join("lock"), "").unwrap();
    fs::write(state.join("restart-pending"), "").unwrap();
    fs::create_dir_all(state.join("staging/install.AbC123/tree")).unwrap();
    fs::write(state.join("staging/install.AbC123/archive"), "partial").unwrap();
    fs::remove_dir_all(&book).unwrap();
    for d in [
        "",
        "/store",
        "/staging",
        "/staging/install.AbC123",
        "/staging/install.AbC123/tree",
        "/sums",
    ] {
        std::os::unix::fs::chown(format!("{}{d}", state.display()), Some(0), Some(0)).unwrap();
    }
    for f in ["lock", "restart-pending", "staging/install.AbC123/archive"] {
        std::os::unix::fs::chown(state.join(f), Some(0), Some(0)).unwrap();
    }
    std::os::unix::fs::chown(state.join("sums").join(&sums_name), Some(0), Some(0)).unwrap();
    // The file the runtime reads must be there at every moment.
    let reader = KeepReading::start(h.path("plugins/alpha/plugin.yaml"));
    // Not run_script: the earlier layout is root's on purpose.
    let args = h.alpha_args(&p, &[]);
    let r = launch(&strs(&args), None, None, &[]);
    reader.stop();
    // Unchanged, and the restart the earlier layout owed was made up for.
    r.assert_ok("unchanged");
    assert_eq!(r.result["restarted"], true);
    assert_eq!(h.restarts(), 2);
    assert_eq!(root_owned(&h.cfg), Vec::<String>::new());
    assert_eq!(h.listing(".plugin-delivery"), ["staging", "store"]);
    assert_eq!(h.listing(".plugin-delivery/staging"), Vec::<String>::new());
    assert!(book.join("sums").join(&sums_name).is_file());
    h.assert_installed("alpha", &p);
    // The sums came along: a change on the host is still found.
    fs::write(h.path("plugins/alpha/GUIDE.md"), "changed").unwrap();
    assert_eq!(h.inventory()[0]["digest"], "");
}

#[test]
fn the_agents_edit_to_its_plugin_is_repaired_as_the_agent() {
    // The drift repair path needs no API call: the agent edits its plugin,
    // inventory reports drift, an install runs. Planting a link inside the
    // store tree gets it nothing either.
    let canary = Canary::new();
    let h = Host::new();
    let p = alpha_v1();
    h.install("alpha", &p).assert_ok("installed");
    let out = as_agent(
        &h.cfg,
        &format!(
            "rm -f plugins/alpha/GUIDE.md && ln -s '{}' plugins/alpha/GUIDE.md && rm -rf plugins/alpha/skills && ln -s '{}' plugins/alpha/skills",
            canary.path("shadow").display(),
            canary.path("etc").display()
        ),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(h.inventory()[0]["digest"], "");
    h.install("alpha", &p).assert_ok("installed");
    h.assert_installed_at("alpha", &p);
    h.uninstall("alpha").assert_ok("uninstalled");
    canary.assert_unchanged("repair of an edited plugin");
}

#[test]
fn a_tree_the_agent_made_is_never_taken_for_ours() {
    // The agent builds a store dir and link of the expected name and digest
    // itself (the digest is visible in the process table): root has no sums
    // for it, so it is not "unchanged" and not reported at that digest.
    let h = Host::new();
    let p = alpha_v1();
    let dir = format!(".plugin-delivery/store/alpha@{}", p.archive.sha);
    let out = as_agent(
        &h.cfg,
        &format!(
            "mkdir -p plugins '{dir}' && echo evil > '{dir}/hook.sh' && ln -s '../{dir}' plugins/alpha"
        ),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(h.inventory(), json!([{"name": "alpha", "digest": ""}]));
    h.install("alpha", &p).assert_ok("installed");
    h.assert_installed_at("alpha", &p);
    assert!(!h.path("plugins/alpha/hook.sh").exists());

    // A link that only starts like ours is not ours either.
    let out = as_agent(
        &h.cfg,
        &format!(
            "mkdir -p evil && ln -sfn '../.plugin-delivery/store/alpha@/../../evil/x@{}' plugins/alpha",
            p.archive.sha
        ),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(h.inventory(), json!([{"name": "alpha", "digest": ""}]));
    h.install("alpha", &p).assert_ok("installed");
    h.assert_installed_at("alpha", &p);
}

#[test]
fn repairing_a_damaged_tree_of_the_same_digest_never_removes_the_live_one() {
    let h = Host::new();
    let p = alpha_v1();
    h.install("alpha", &p).assert_ok("installed");
    fs::write(h.path("plugins/alpha/GUIDE.md"), "damaged").unwrap();
    // plugins/alpha/plugin.yaml must be readable at every moment.
    let reader = KeepReading::start(h.path("plugins/alpha/plugin.yaml"));
    for _ in 0..3 {
        fs::write(h.path("plugins/alpha/GUIDE.md"), "damaged").unwrap();
        h.install("alpha", &p).assert_ok("installed");
        h.assert_installed_at("alpha", &p);
        assert_eq!(h.listing(".plugin-delivery/store").len(), 1);
    }
    reader.stop();
    h.install("alpha", &p).assert_ok("unchanged");
    assert_eq!(h.inventory()[0]["digest"], p.archive.sha.as_str());
}

#[test]
fn the_restart_never_sees_the_archive_url() {
    let h = Host::new();
    let p = alpha_v1();
    let (url, _) = http_server(200, p.archive.bytes.clone());
    let env_out = h.cfg.parent().unwrap().join("restart.env");
    let restart = format!("env > '{}'", env_out.display());
    for _ in 0..2 {
        // Installed, then unchanged with a restart still owed.
        let r = run_script_env(
            &[
                "install",
                h.cfg(),
                "alpha",
                &p.archive.sha,
                OWNER,
                "5",
                &restart,
            ],
            None,
            None,
            &[(
                "PLUGIN_ARCHIVE_URL",
                &format!("{url}/x?X-Amz-Signature=s3cret"),
            )],
        );
        assert!(r.result["status"].is_string(), "{r:#?}");
        let env = fs::read_to_string(&env_out).unwrap();
        assert!(!env.contains("s3cret"), "{env}");
        fs::remove_file(&env_out).unwrap();
        fs::write(h.book().join("restart-pending"), "").unwrap();
    }
}

/// Starts the script as `launch` does but returns the child, stdin open.
fn spawn_script(
    args: &[&str],
    env: &[(&str, &str)],
    path_env: Option<&Path>,
) -> std::process::Child {
    script_command(args, env, path_env)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The single result line of a finished child.
fn result_of(child: std::process::Child) -> (i32, Value) {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "one result line: {stdout:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_str(lines[0].strip_prefix(MARKER).unwrap()).unwrap();
    (out.status.code().unwrap(), v)
}

#[test]
fn an_install_step_gone_while_root_reads_the_archive_still_gets_a_result() {
    // The step waits for root's word while root reads stdin; it is killed
    // meanwhile (here by its time limit). Root must still answer, and
    // nothing may change.
    let h = Host::new();
    let p = alpha_v1();
    let args = h.alpha_args(&p, &[]);
    let mut child = spawn_script(&strs(&args), &[("PLUGIN_STEP_MAX_SECS", "1")], None);
    let mut stdin = child.stdin.take().unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let _ = stdin.write_all(&p.archive.bytes);
    drop(stdin);
    let (code, r) = result_of(child);
    assert_eq!((code, r["code"].as_str()), (1, Some("internal")), "{r}");
    assert!(fs::symlink_metadata(h.path("plugins/alpha")).is_err());
    assert!(!h.book().join("restart-pending").exists());
    assert_eq!(h.restarts(), 0);
}

/// Pids of the processes that have `file` open.
fn holders_of(file: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten()
                    .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t == file))
            })
        })
        .collect();
    pids.sort();
    pids
}

/// While an install waits for its archive, only root itself holds the host
/// lock: not the shell that started the install step, not the step, not
/// root's copy and hash of the archive. Any of them, left blocked by a
/// root killed outright, would keep every later operation busy.
#[test]
fn while_an_install_waits_for_its_archive_only_root_holds_the_lock() {
    let h = Host::new();
    let p = alpha_v1();
    let args = h.alpha_args(&p, &[]);
    let mut child = spawn_script(&strs(&args), &[], None);
    let lock = h.book().join("lock");
    // Root is reading stdin by then, the step waiting for its feed.
    std::thread::sleep(Duration::from_millis(1500));
    let holders = holders_of(&lock);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&p.archive.bytes).unwrap();
    drop(stdin);
    let root = child.id();
    let (code, r) = result_of(child);
    assert_eq!((code, r["status"].as_str()), (0, Some("installed")), "{r}");
    assert_eq!(holders, vec![root], "only root (pid {root}) holds the lock");
}

#[test]
fn a_signal_during_a_step_still_gives_one_result_and_keeps_the_owed_restart() {
    // python3 (the unwire step) made slow; root is told to stop while the
    // step runs: one result line still reaches the caller, and as the step
    // had started changing the config dir, the pending restart stays.
    let h = Host::new();
    let p = alpha_v1();
    h.install_raw("alpha", &p.archive.sha, &p.archive.bytes, "")
        .assert_ok("installed");
    fs::remove_file(h.book().join("restart-pending")).unwrap();
    let bin = tempfile::tempdir().unwrap();
    fs::set_permissions(bin.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let slow = bin.path().join("python3");
    fs::write(&slow, "#!/bin/sh\nsleep 2\nexec /usr/bin/python3 \"$@\"\n").unwrap();
    fs::set_permissions(&slow, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.path().display());
    let child = spawn_script(
        &["uninstall", h.cfg(), "alpha", OWNER, "5", ""],
        &[],
        Some(Path::new(&path)),
    );
    std::thread::sleep(Duration::from_millis(800));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let (code, r) = result_of(child);
    assert_eq!((code, r["code"].as_str()), (1, Some("internal")), "{r}");
    assert!(h.book().join("restart-pending").exists());
}

#[test]
fn a_bad_step_time_limit_is_a_usage_error_with_a_result() {
    let h = Host::new();
    let child = spawn_script(
        &["uninstall", h.cfg(), "alpha", OWNER, "5", ""],
        &[("PLUGIN_STEP_MAX_SECS", "abc")],
        None,
    );
    let (code, r) = result_of(child);
    assert_eq!((code, r["code"].as_str()), (64, Some("usage")), "{r}");
}

#[test]
fn an_archive_without_plugin_yaml_is_a_bad_archive() {
    let h = Host::new();
    let p = plugin(&[("rules/x.md", "x\n")]);
    h.install("nameless", &p).assert_error("bad_archive", 66);
    assert!(fs::symlink_metadata(h.path("plugins/nameless")).is_err());
}

/// The install arguments naming the plugin on stdin ("-" for NAME and
/// SHA256), as the SSH transport starts an install ahead of its plugin.
fn named_on_stdin_args(h: &Host) -> Vec<String> {
    let head = ["install", h.cfg(), "-", "-", OWNER, "5"];
    let mut args: Vec<String> = head.iter().map(|a| a.to_string()).collect();
    args.push(h.restart_cmd());
    args
}

#[test]
fn an_install_named_on_stdin_writes_nothing_before_the_name_comes() {
    let h = Host::new();
    let p = alpha_v1();
    let args = named_on_stdin_args(&h);
    let mut child = spawn_script(&strs(&args), &[], None);
    std::thread::sleep(Duration::from_millis(800));
    // Started and waiting: no state of root's, no lock, nothing in the
    // config dir yet.
    let state = h.book();
    assert!(!state.parent().unwrap().exists(), "root's state was made");
    assert_eq!(h.listing(""), Vec::<String>::new());
    let mut stdin = child.stdin.take().unwrap();
    let line = format!("alpha {} {}\n", p.archive.sha, p.archive.bytes.len());
    stdin.write_all(line.as_bytes()).unwrap();
    stdin.write_all(&p.archive.bytes).unwrap();
    drop(stdin);
    let (code, r) = result_of(child);
    assert_eq!(
        (code, &r),
        (
            0,
            &json!({"status": "installed", "plugin": "alpha", "digest": p.archive.sha, "previous": "", "previous_kind": "none", "restarted": true, "pending_restart": false})
        )
    );
    h.assert_installed("alpha", &p);
    assert_eq!(h.restarts(), 1);
    h.assert_no_leftovers();

    // The same plugin named again: unchanged, with nothing read after the
    // line (no archive sent at all).
    let line = format!("alpha {}\n", p.archive.sha);
    run_script(&strs(&args), Some(line.as_bytes()), None).assert_ok("unchanged");
    // A new version named on stdin replaces it.
    let v2 = alpha_v2();
    let mut input = format!("alpha {}\n", v2.archive.sha).into_bytes();
    input.extend_from_slice(&v2.archive.bytes);
    run_script(&strs(&args), Some(&input), None).assert_ok("installed");
    h.assert_installed("alpha", &v2);
    // Its digest is checked as ever: v1's bytes under v2's name are refused.
    let v3 = beta();
    let mut input = format!("alpha {}\n", v3.archive.sha).into_bytes();
    input.extend_from_slice(&v2.archive.bytes);
    run_script(&strs(&args), Some(&input), None).assert_error("digest_mismatch", 65);
    h.assert_installed("alpha", &v2);
    assert_eq!(h.restarts(), 2);

    // bash as root's shell, stdin a pipe and then a regular file (which
    // bash reads in blocks, seeking back after the line): the same install.
    let mut input = format!("alpha {} {}\n", p.archive.sha, p.archive.bytes.len()).into_bytes();
    input.extend_from_slice(&p.archive.bytes);
    let file = h.cfg.parent().unwrap().join("named-input");
    fs::write(&file, &input).unwrap();
    for from_file in [false, true] {
        h.uninstall("alpha").assert_ok("uninstalled");
        let mut cmd = script_command_in("bash", &strs(&args), &[], None);
        let child = if from_file {
            cmd.stdin(fs::File::open(&file).unwrap()).spawn().unwrap()
        } else {
            let mut child = cmd.stdin(Stdio::piped()).spawn().unwrap();
            child.stdin.take().unwrap().write_all(&input).unwrap();
            child
        };
        let (code, r) = result_of(child);
        assert_eq!((code, r["status"].as_str()), (0, Some("installed")), "{r}");
        h.assert_installed("alpha", &p);
    }
}

#[test]
fn an_install_named_on_stdin_without_a_whole_good_line_is_a_usage_error() {
    let h = Host::new();
    let p = alpha_v1();
    let args = named_on_stdin_args(&h);
    let sha = &p.archive.sha;
    let bad: Vec<Vec<u8>> = vec![
        // The caller gave up: stdin closed before a line.
        Vec::new(),
        format!("alpha {sha}").into_bytes(),
        b"alpha\n".to_vec(),
        format!("alpha {sha} 12 13\n").into_bytes(),
        format!("alpha {sha} 12ab\n").into_bytes(),
        format!("../alpha {sha}\n").into_bytes(),
        format!("alpha {}\n", &sha[1..]).into_bytes(),
        format!("alpha\t{sha}\n").into_bytes(),
    ];
    for input in bad {
        let mut all = input.clone();
        all.extend_from_slice(&p.archive.bytes);
        // Stdin ending where the line does, and the archive after it.
        for stdin in [&input, &all] {
            let r = run_script(&strs(&args), Some(stdin), None);
            r.assert_error("usage", 64);
        }
    }
    // A caller that never sends the line (its connection held open) is
    // not waited for past the step time limit.
    let mut child = spawn_script(&strs(&args), &[("PLUGIN_STEP_MAX_SECS", "1")], None);
    let held = child.stdin.take().unwrap();
    let t = std::time::Instant::now();
    let (code, r) = result_of(child);
    assert_eq!((code, r["code"].as_str()), (64, Some("usage")), "{r}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    drop(held);
    // The size goes in the line, not after the "-" arguments.
    let mut sized = args.clone();
    sized.push("57000".into());
    let mut input = format!("alpha {sha}\n").into_bytes();
    input.extend_from_slice(&p.archive.bytes);
    run_script(&strs(&sized), Some(&input), None).assert_error("usage", 64);
    // Nothing was written: no state of root's, nothing in the config dir.
    assert!(!h.book().parent().unwrap().exists());
    assert_eq!(h.listing(""), Vec::<String>::new());
}

/// What an install whose archive is still being built sends after the
/// "-" arguments: the line naming `name` with "+", the archive in frames of
/// at most `frame` bytes, and `end` (the archive's own digest unless the
/// test says otherwise; `None`, no end line).
fn framed(name: &str, a: &Archive, frame: usize, end: Option<&str>) -> Vec<u8> {
    let mut out = format!("{name} +\n").into_bytes();
    for chunk in a.bytes.chunks(frame) {
        out.extend_from_slice(format!("{}\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
    }
    if let Some(sha) = end {
        out.extend_from_slice(format!("end {sha}\n").as_bytes());
    }
    out
}

#[test]
fn an_archive_in_frames_is_published_once_the_digest_after_it_matches() {
    let h = Host::new();
    let args = named_on_stdin_args(&h);
    let v1 = alpha_v1();
    // Frames of 256 bytes: several, the last one short.
    assert!(v1.archive.bytes.len() > 600, "{}", v1.archive.bytes.len());
    assert_ne!(v1.archive.bytes.len() % 256, 0);
    let r = run_script(
        &strs(&args),
        Some(&framed("alpha", &v1.archive, 256, Some(&v1.archive.sha))),
        None,
    );
    assert_eq!(
        r.result,
        json!({"status": "installed", "plugin": "alpha", "digest": v1.archive.sha, "previous": "", "previous_kind": "none", "restarted": true, "pending_restart": false})
    );
    h.assert_installed("alpha", &v1);
    assert_eq!(h.restarts(), 1);
    h.assert_no_leftovers();
    // Root keeps the new tree's sums under the digest it learnt last.
    assert!(h
        .book()
        .join(format!("sums/alpha@{}", v1.archive.sha))
        .is_file());

    // The digest already live, its tree intact: known only after the
    // frames, and then nothing is replaced, nor the runtime restarted.
    let again = framed("alpha", &v1.archive, 4096, Some(&v1.archive.sha));
    let r = run_script(&strs(&args), Some(&again), None);
    assert_eq!(
        r.result,
        json!({"status": "unchanged", "plugin": "alpha", "digest": v1.archive.sha, "previous": v1.archive.sha, "previous_kind": "link", "restarted": false, "pending_restart": false})
    );
    h.assert_installed_at("alpha", &v1);
    assert_eq!(
        h.listing(".plugin-delivery/store"),
        vec![format!("alpha@{}", v1.archive.sha)]
    );
    assert_eq!(h.restarts(), 1);
    h.assert_no_leftovers();

    // The same frames once the agent has edited the live tree: a repair,
    // the tree replaced (beside the live one) and the runtime restarted.
    let out = as_agent(&h.cfg, "echo edited >> plugins/alpha/plugin.yaml");
    assert!(out.status.success(), "{out:?}");
    let r = run_script(&strs(&args), Some(&again), None);
    r.assert_ok("installed");
    assert_eq!(r.result["previous"], v1.archive.sha.as_str());
    h.assert_installed_at("alpha", &v1);
    assert_eq!(h.restarts(), 2);
    h.assert_no_leftovers();

    // One frame for the whole of an upgrade.
    let v2 = alpha_v2();
    let whole = v2.archive.bytes.len();
    run_script(
        &strs(&args),
        Some(&framed("alpha", &v2.archive, whole, Some(&v2.archive.sha))),
        None,
    )
    .assert_ok("installed");
    h.assert_installed("alpha", &v2);
    assert_eq!(h.restarts(), 3);
    let memory = h.read("CLAUDE.md");
    let settings = h.settings();

    // Nothing is published without the digest after the frames, nor with
    // a digest they do not have; frames cut short or malformed end the same
    // way (or as a bad archive, when the step saw it break first).
    let v3 = beta();
    let other = v3.archive.sha.clone();
    let mut cut_mid_frame = framed("alpha", &v1.archive, 1000, Some(&v1.archive.sha));
    cut_mid_frame.truncate(v1.archive.bytes.len() / 2);
    let mut bad_headers = Vec::new();
    for header in ["0", "16777217", "123456789", "-5", "12a", " 12", ""] {
        let mut input = format!("alpha +\n{header}\n").into_bytes();
        input.extend_from_slice(&v1.archive.bytes);
        input.extend_from_slice(format!("end {}\n", v1.archive.sha).as_bytes());
        bad_headers.push((header.to_string(), input));
    }
    let mut longer = framed("alpha", &v1.archive, 1000, None);
    longer.extend_from_slice(b"xyz");
    longer.extend_from_slice(format!("end {}\n", v1.archive.sha).as_bytes());
    let cases: Vec<(String, Vec<u8>)> = [
        (
            "no end line".to_string(),
            framed("alpha", &v1.archive, 1000, None),
        ),
        (
            "another digest".to_string(),
            framed("alpha", &v1.archive, 1000, Some(&other)),
        ),
        (
            "a short digest".to_string(),
            framed("alpha", &v1.archive, 1000, Some(&v1.archive.sha[1..])),
        ),
        ("cut mid-frame".to_string(), cut_mid_frame),
        ("bytes beyond a frame".to_string(), longer),
    ]
    .into_iter()
    .chain(bad_headers)
    .collect();
    for (what, input) in cases {
        let r = run_script(&strs(&args), Some(&input), None);
        let code = r.result["code"].as_str().unwrap_or("").to_string();
        assert!(
            (code == "digest_mismatch" && r.code == 65) || (code == "bad_archive" && r.code == 66),
            "{what}: {} {}",
            r.code,
            r.result
        );
        h.assert_installed("alpha", &v2);
        assert_eq!(h.read("CLAUDE.md"), memory, "{what}");
        assert_eq!(h.settings(), settings, "{what}");
        assert_eq!(h.restarts(), 3, "{what}");
        h.assert_no_leftovers();
        assert!(!h.book().join("restart-pending").exists(), "{what}");
    }

    // The size after "+" is a number, and a framed archive never comes
    // from a URL.
    let mut sized = b"alpha + 12ab\n".to_vec();
    sized.extend_from_slice(&framed("alpha", &v1.archive, 1000, Some(&v1.archive.sha))[8..]);
    run_script(&strs(&args), Some(&sized), None).assert_error("usage", 64);
    let input = framed("alpha", &v1.archive, 1000, Some(&v1.archive.sha));
    run_script_env(
        &strs(&args),
        Some(&input),
        None,
        &[("PLUGIN_ARCHIVE_URL", "http://127.0.0.1:9/a.tar.gz")],
    )
    .assert_error("usage", 64);
    h.assert_installed("alpha", &v2);
    assert_eq!(h.restarts(), 3);
}

#[test]
fn a_host_without_gnu_head_or_timeout_refuses_frames_before_it_touches_anything() {
    need("/usr/bin/busybox");
    let h = Host::new();
    let args = named_on_stdin_args(&h);
    let v1 = alpha_v1();
    let input = framed("alpha", &v1.archive, 256, Some(&v1.archive.sha));
    // BusyBox's head reads ahead of the frame it cuts; its timeout ends
    // only its own child.
    for tool in ["head", "timeout"] {
        let bin = path_without(&[tool]);
        symlink("/usr/bin/busybox", bin.path().join(tool)).unwrap();
        let r = run_script(&strs(&args), Some(&input), Some(bin.path()));
        r.assert_error("no_frames", 78);
        assert!(
            !h.book().parent().unwrap().exists(),
            "{tool}: root's state was made"
        );
        assert_eq!(h.listing(""), Vec::<String>::new(), "{tool}");
        // The same archive whole, named with its digest: installed there.
        let mut whole = format!("alpha {}\n", v1.archive.sha).into_bytes();
        whole.extend_from_slice(&v1.archive.bytes);
        run_script(&strs(&args), Some(&whole), Some(bin.path())).assert_ok("installed");
        h.assert_installed("alpha", &v1);
        h.uninstall("alpha").assert_ok("uninstalled");
        fs::remove_dir_all(h.book().parent().unwrap()).unwrap();
        for e in fs::read_dir(&h.cfg).unwrap() {
            let e = e.unwrap().path();
            if e.is_dir() && !e.is_symlink() {
                fs::remove_dir_all(e).unwrap();
            } else {
                fs::remove_file(e).unwrap();
            }
        }
    }
}

/// The walk the suite checks owners with finds root's entries at any depth
/// and never reports what a link leads to.
#[test]
fn the_owner_check_finds_roots_files_and_follows_no_link() {
    let h = Host::new();
    fs::create_dir_all(h.path("a/b")).unwrap();
    fs::write(h.path("a/b/mine"), "x").unwrap();
    give_to_agent(&h.cfg);
    fs::write(h.path("a/b/roots"), "x").unwrap();
    let canary = Canary::new();
    std::os::unix::fs::symlink(canary.path("etc"), h.path("a/link")).unwrap();
    std::os::unix::fs::lchown(h.path("a/link"), Some(AGENT), Some(AGENT)).unwrap();
    assert_eq!(root_owned(&h.cfg), vec!["a/b/roots".to_string()]);
}
