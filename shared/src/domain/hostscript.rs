//! The host side of every operation is one POSIX sh script
//! (`shared/host/plugin-host.sh`), embedded here and run remotely as
//! `<prefix> sh -c 'eval "$1"' plugin-host '<script>' <op> <args>`. Sending
//! the script with each call means hosts need nothing pre-installed and never
//! run a stale copy; every transport runs the same file. The text travels as
//! an argument so the script can start itself again as the config dir's
//! owner for everything it does inside that dir (privilege separation).

use serde::Deserialize;

use crate::domain::config::RuntimeProfile;
use crate::domain::error::{Error, Result};

pub const SCRIPT: &str = include_str!("../../host/plugin-host.sh");
pub const RESULT_MARKER: &str = "@@plugin-delivery-result ";
/// How the script is started: its text is `$1`, then the operation.
pub const SCRIPT_LAUNCH: &str = "sh -c 'eval \"$1\"' plugin-host ";

/// The largest frame the host script takes.
pub const FRAME_MAX: u64 = 16 * 1024 * 1024;

/// An archive sent while it is built goes in frames: each is this line and
/// then `len` bytes of the archive (1 <= len <= `FRAME_MAX`).
pub fn frame_header(len: u64) -> String {
    format!("{len}\n")
}

/// The line after the last frame: the archive's digest. Without it, the
/// host publishes nothing.
pub fn frame_end(sha256: &str) -> String {
    format!("end {sha256}\n")
}

/// One invocation of the host script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCommand {
    pub args: Vec<String>,
}

impl HostCommand {
    /// Archive on stdin; the script verifies `digest` before touching anything.
    pub fn install(
        p: &RuntimeProfile,
        name: &str,
        digest: &str,
        owner: &str,
        lock_wait: u64,
    ) -> Self {
        HostCommand {
            args: vec![
                "install".into(),
                p.config_dir.clone(),
                name.into(),
                digest.into(),
                owner.into(),
                lock_wait.to_string(),
                p.restart.clone(),
            ],
        }
    }

    /// An install told the archive's size: the host picks the hash tool
    /// that is quicker for it (sha256sum starts in a third of OpenSSL's
    /// time; OpenSSL hashes a large archive five times as fast). Only a
    /// hint: the digest is checked the same either way.
    pub fn with_archive_bytes(mut self, bytes: u64) -> Self {
        if self.args.first().map(String::as_str) == Some("install") && self.args.len() == 7 {
            self.args.push(bytes.to_string());
        }
        self
    }

    /// The install command, naming its plugin on stdin instead of in its
    /// arguments: it can start while the plugin is still being resolved.
    /// `named_on_stdin` of the full command gives the same command and the
    /// line that names the plugin.
    pub fn install_named_on_stdin(p: &RuntimeProfile, owner: &str, lock_wait: u64) -> Self {
        Self::install(p, "-", "-", owner, lock_wait)
    }

    /// For an install naming its plugin in its arguments: the same install
    /// as `install_named_on_stdin` starts it, and stdin's first line for it
    /// (`NAME SHA256 [BYTES]`). `None` for any other command.
    pub fn named_on_stdin(&self) -> Option<(HostCommand, String)> {
        match self.args.as_slice() {
            [op, cfg, name, digest, owner, wait, restart, bytes @ ..]
                if op == "install" && name != "-" && bytes.len() <= 1 =>
            {
                let mut line = format!("{name} {digest}");
                if let Some(b) = bytes.first() {
                    line.push(' ');
                    line.push_str(b);
                }
                line.push('\n');
                let args = [op, cfg, "-", "-", owner, wait, restart];
                let cmd = HostCommand {
                    args: args.iter().map(|a| a.to_string()).collect(),
                };
                Some((cmd, line))
            }
            _ => None,
        }
    }

    /// For `install_named_on_stdin`: stdin's first line when the archive
    /// follows in frames while it is still being built (`frame_header`),
    /// its digest last. `about`, the size the archive is expected to have
    /// (0: not known), is a hint like `with_archive_bytes`'s.
    pub fn framed_line(&self, name: &str, about: u64) -> Option<String> {
        match self.args.as_slice() {
            [op, _cfg, n, d, _owner, _wait, _restart]
                if op == "install" && n == "-" && d == "-" =>
            {
                Some(match about {
                    0 => format!("{name} +\n"),
                    _ => format!("{name} + {about}\n"),
                })
            }
            _ => None,
        }
    }

    /// The install `install_named_on_stdin` starts, naming `name` and
    /// `digest` in its arguments instead (for a transport that takes the
    /// archive whole). `None` for any other command.
    pub fn naming(&self, name: &str, digest: &str) -> Option<HostCommand> {
        self.framed_line(name, 0)?;
        let mut args = self.args.clone();
        args[2] = name.to_string();
        args[3] = digest.to_string();
        Some(HostCommand { args })
    }

    pub fn uninstall(p: &RuntimeProfile, name: &str, owner: &str, lock_wait: u64) -> Self {
        HostCommand {
            args: vec![
                "uninstall".into(),
                p.config_dir.clone(),
                name.into(),
                owner.into(),
                lock_wait.to_string(),
                p.restart.clone(),
            ],
        }
    }

    /// Install without restarting: a batch (reinstall, repair) restarts the
    /// runtime once at the end with `restart`.
    pub fn install_deferred(
        p: &RuntimeProfile,
        name: &str,
        digest: &str,
        owner: &str,
        lock_wait: u64,
    ) -> Self {
        let quiet = RuntimeProfile {
            restart: String::new(),
            ..p.clone()
        };
        Self::install(&quiet, name, digest, owner, lock_wait)
    }

    pub fn restart(p: &RuntimeProfile, owner: &str, lock_wait: u64) -> Self {
        HostCommand {
            args: vec![
                "restart".into(),
                p.config_dir.clone(),
                owner.into(),
                lock_wait.to_string(),
                p.restart.clone(),
            ],
        }
    }

    pub fn inventory(p: &RuntimeProfile, owner: &str) -> Self {
        HostCommand {
            args: vec!["inventory".into(), p.config_dir.clone(), owner.into()],
        }
    }

    /// The remote command line, for a login shell to parse.
    pub fn render(&self, prefix: &str) -> String {
        self.render_with_env(prefix, &[])
    }

    /// As `render`, with variables set for the script only
    /// (`NAME='value' sh -c ...`).
    pub fn render_with_env(&self, prefix: &str, env: &[(&str, String)]) -> String {
        let mut cmd = String::with_capacity(SCRIPT.len() + 1024);
        if !prefix.trim().is_empty() {
            cmd.push_str(prefix.trim());
            cmd.push(' ');
        }
        for (k, v) in env {
            cmd.push_str(k);
            cmd.push('=');
            cmd.push_str(&shell_quote(v));
            cmd.push(' ');
        }
        cmd.push_str(SCRIPT_LAUNCH);
        cmd.push_str(&shell_quote(SCRIPT));
        for a in &self.args {
            cmd.push(' ');
            cmd.push_str(&shell_quote(a));
        }
        cmd
    }
}

impl HostCommand {
    /// Operation and plugin, for logs and command comments (no paths).
    pub fn summary(&self) -> String {
        match self.args.as_slice() {
            [op, _, name, ..] if op != "inventory" => format!("{op} {name}"),
            [op, ..] => op.clone(),
            [] => String::new(),
        }
    }
}

/// Single-quote for POSIX sh: nothing inside is special except `'` itself.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// What came back from the host, whatever the transport.
#[derive(Debug, Default, Clone)]
pub struct HostOutput {
    /// `None` when the session ended without an exit status (connection lost).
    pub exit_status: Option<u32>,
    /// Set when the script was killed by a signal (for example OOM).
    pub exit_signal: Option<String>,
    /// sshd refused to run the command.
    pub exec_refused: bool,
    pub stdout: String,
    pub stderr: String,
}

impl HostOutput {
    /// The end of what the script wrote to stderr (for operation records).
    pub fn stderr_tail(&self) -> Option<String> {
        let t = self.stderr.trim_end();
        (!t.is_empty()).then(|| tail(t, 2000).to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InventoryEntry {
    pub name: String,
    #[serde(default)]
    pub digest: String,
}

/// The `status` of the script's result line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostStatus {
    Installed,
    Unchanged,
    Uninstalled,
    Absent,
    Restarted,
    Inventory,
    Error,
}

/// The script's one-line, machine-readable result.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HostResult {
    pub status: HostStatus,
    #[serde(default)]
    pub plugin: Option<String>,
    #[serde(default)]
    pub digest: Option<String>,
    #[serde(default)]
    pub previous: Option<String>,
    /// What an install found at `plugins/NAME`: `none`, `link` (a tree of
    /// ours) or `legacy` (a directory of the earlier layout, or the user's).
    #[serde(default)]
    pub previous_kind: Option<String>,
    #[serde(default)]
    pub restarted: Option<bool>,
    /// A change is on disk that the runtime was not restarted for yet (an
    /// earlier run was cut off, or a batch defers its restart).
    #[serde(default)]
    pub pending_restart: Option<bool>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub plugins: Option<Vec<InventoryEntry>>,
}

/// Turns host output into a result or a public error. Only the last result
/// line counts: everything else on stdout is noise from tools we call.
pub fn interpret(out: &HostOutput) -> Result<HostResult> {
    let line = out
        .stdout
        .lines()
        .rev()
        .find_map(|l| l.trim_end().strip_prefix(RESULT_MARKER));
    let detail = || {
        format!(
            "exit={:?} stderr_tail={:?}",
            out.exit_status,
            tail(&out.stderr, 2000)
        )
    };
    let Some(line) = line else {
        let err = if out.exec_refused {
            Error::host_failed("the host refused to run the plugin command")
        } else if out.exit_signal.is_some() {
            Error::host_failed("the host command was killed before it finished")
        } else {
            match out.exit_status {
                None => {
                    Error::unavailable("the connection to the host was lost during the operation")
                }
                Some(code) => Error::host_failed(format!("the host command failed (exit {code})")),
            }
        };
        return Err(err.with_detail(format!("{} signal={:?}", detail(), out.exit_signal)));
    };
    let res: HostResult = serde_json::from_str(line)
        .map_err(|e| Error::host_failed("the host returned an unreadable result").with_detail(e))?;
    if res.status != HostStatus::Error {
        return Ok(res);
    }
    let code = res.code.clone().unwrap_or_default();
    let err = match code.as_str() {
        "busy" => Error::conflict(
            "another plugin operation on this workspace's host is still running; try again",
        ),
        "digest_mismatch" => {
            Error::host_failed("the plugin archive arrived incomplete or altered; nothing was changed")
        }
        "bad_archive" => Error::host_failed("the host could not unpack the plugin; nothing was changed"),
        "restart_failed" => Error::host_failed("the plugin was changed but the runtime restart failed"),
        "no_config_dir" => Error::host_failed(
            "the runtime's config directory does not exist on the host; check the instance's molecule:runtime tag",
        ),
        "unwire_failed" => {
            Error::host_failed("the host could not remove what the previous version had wired")
        }
        "bad_config_dir" => Error::host_failed(
            "the runtime's config directory on the host is not a plain directory owned by the workspace user; nothing was changed",
        ),
        "no_privilege_drop" => Error::host_failed(
            "the host cannot run steps as the workspace user (setpriv from util-linux is missing); nothing was changed",
        ),
        "migrate_failed" => Error::host_failed(
            "the host could not move its plugin bookkeeping to the current layout; nothing was changed",
        ),
        "no_frames" => Error::host_failed(
            "the host cannot take an archive while it is built (it lacks GNU coreutils); nothing was changed",
        ),
        "fetch_failed" => Error::host_failed(
            "the host could not download the plugin archive (its link may have expired); nothing was changed",
        ),
        "usage" | "internal" => Error::host_failed(format!("the host script failed ({code})")),
        // Host output never reaches a response: unknown codes stay in the log.
        _ => {
            return Err(Error::host_failed("the host script failed").with_detail(format!(
                "{} code={code:?} message={:?}",
                detail(),
                res.message
            )))
        }
    };
    // The script's own words, when they are one of its fixed, plain texts.
    let err = match res.message.as_deref().filter(|m| plain_message(m)) {
        Some(m) => err.with_field("host_message", serde_json::json!(m)),
        None => err,
    };
    Err(err
        .with_field("host_error", serde_json::json!(code))
        .with_detail(format!("{} message={:?}", detail(), res.message)))
}

/// Host script messages are short fixed sentences; anything else (a path,
/// a stray byte) keeps the message out of the response.
fn plain_message(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 160
        && !m.contains('/')
        && m.chars()
            .all(|c| c.is_ascii_alphanumeric() || " ,.'()-".contains(c))
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_a_shell() {
        let weird = "it's a \"test\" $HOME `x` \\ \n";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(weird)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), weird);
    }

    #[test]
    fn only_an_install_takes_the_archive_size() {
        let p = RuntimeProfile {
            config_dir: "/configs".into(),
            restart: "true".into(),
        };
        let install = HostCommand::install(&p, "a", &"0".repeat(64), "1000:1000", 5);
        let sized = install.clone().with_archive_bytes(123);
        assert_eq!(sized.args.len(), 8);
        assert_eq!(sized.args[..7], install.args[..]);
        assert_eq!(sized.args[7], "123");
        // Once only, and never on another operation.
        assert_eq!(sized.clone().with_archive_bytes(9).args, sized.args);
        let un = HostCommand::uninstall(&p, "a", "1000:1000", 5);
        assert_eq!(un.clone().with_archive_bytes(9).args, un.args);
    }

    #[test]
    fn an_install_names_its_plugin_on_stdin_with_the_same_arguments_otherwise() {
        let p = RuntimeProfile {
            config_dir: "/configs".into(),
            restart: "systemctl restart agent".into(),
        };
        let digest = "ab".repeat(32);
        let early = HostCommand::install_named_on_stdin(&p, "1000:1000", 5);
        for (cmd, line) in [
            (
                HostCommand::install(&p, "alpha", &digest, "1000:1000", 5),
                format!("alpha {digest}\n"),
            ),
            (
                HostCommand::install(&p, "alpha", &digest, "1000:1000", 5).with_archive_bytes(77),
                format!("alpha {digest} 77\n"),
            ),
        ] {
            assert_eq!(cmd.named_on_stdin(), Some((early.clone(), line)));
        }
        // A command of another profile, owner or wait is another command.
        let other = HostCommand::install(&p, "alpha", &digest, "1001:1001", 5);
        assert_ne!(other.named_on_stdin().unwrap().0, early);
        for cmd in [
            early.clone(),
            HostCommand::uninstall(&p, "alpha", "1000:1000", 5),
            HostCommand::inventory(&p, "1000:1000"),
        ] {
            assert_eq!(cmd.named_on_stdin(), None, "{cmd:?}");
        }
    }

    #[test]
    fn an_install_started_ahead_takes_an_archive_in_frames_or_names_it_whole() {
        let p = RuntimeProfile {
            config_dir: "/configs".into(),
            restart: "true".into(),
        };
        let digest = "cd".repeat(32);
        let early = HostCommand::install_named_on_stdin(&p, "1000:1000", 5);
        assert_eq!(early.framed_line("alpha", 0).as_deref(), Some("alpha +\n"));
        assert_eq!(
            early.framed_line("alpha", 104857600).as_deref(),
            Some("alpha + 104857600\n")
        );
        assert_eq!(
            early.naming("alpha", &digest),
            Some(HostCommand::install(&p, "alpha", &digest, "1000:1000", 5))
        );
        // Only the install started ahead: not one naming its plugin already.
        let named = HostCommand::install(&p, "alpha", &digest, "1000:1000", 5);
        for cmd in [
            named.clone(),
            named.with_archive_bytes(3),
            HostCommand::uninstall(&p, "alpha", "1000:1000", 5),
        ] {
            assert_eq!(cmd.framed_line("alpha", 7), None, "{cmd:?}");
            assert_eq!(cmd.naming("alpha", &digest), None, "{cmd:?}");
        }
        assert_eq!(frame_header(12), "12\n");
        assert_eq!(frame_end(&digest), format!("end {digest}\n"));
    }

    #[test]
    fn the_rendered_command_starts_the_script() {
        // The launch line hands the script its own text: an unknown operation
        // is answered by the script itself, not by the shell.
        let cmd = HostCommand {
            args: vec!["no-such-op".into()],
        };
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd.render(""))
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(out.status.code(), Some(64), "{stdout}");
        assert!(
            stdout.starts_with(RESULT_MARKER) && stdout.contains("unknown operation"),
            "{stdout}"
        );
    }

    #[test]
    fn results() {
        let ok = HostOutput {
            exit_status: Some(0),
            stdout: "noise\n@@plugin-delivery-result {\"status\":\"installed\",\"plugin\":\"a\",\"digest\":\"d\",\"restarted\":true}\n".into(),
            ..Default::default()
        };
        let r = interpret(&ok).unwrap();
        assert_eq!((r.status, r.restarted), (HostStatus::Installed, Some(true)));
        let busy = HostOutput {
            exit_status: Some(75),
            stdout: "@@plugin-delivery-result {\"status\":\"error\",\"code\":\"busy\"}".into(),
            stderr: "/configs/x".into(),
            ..Default::default()
        };
        let e = interpret(&busy).unwrap_err();
        assert_eq!(e.status(), 409);
        assert!(!e.message.contains("/configs"));
        let lost = HostOutput {
            exit_status: None,
            ..Default::default()
        };
        assert_eq!(interpret(&lost).unwrap_err().status(), 503);
        let sudo = HostOutput {
            exit_status: Some(1),
            stderr: "sudo: a password is required".into(),
            ..Default::default()
        };
        assert_eq!(interpret(&sudo).unwrap_err().status(), 502);
        let odd = HostOutput {
            exit_status: Some(1),
            stdout: "@@plugin-delivery-result {\"status\":\"error\",\"code\":\"/etc/x\"}".into(),
            ..Default::default()
        };
        let e = interpret(&odd).unwrap_err();
        assert!(!e.message.contains("/etc") && !e.fields.contains_key("host_error"));
        let killed = HostOutput {
            exit_signal: Some("KILL".into()),
            ..Default::default()
        };
        assert_eq!(interpret(&killed).unwrap_err().status(), 502);
    }
}
