//! The fault campaign (issue 12, item 5): many operations, each with a fault
//! injected at a random moment, and after every one the checks an operator
//! relies on: no half-installed tree, the old version intact while the new
//! one is not complete, nothing left in staging, and a retry that converges.
//!
//! `tests/tests/faults.rs` runs a short campaign in every test run;
//! `cargo bench -p acceptance --bench faults` runs the long one and prints
//! the figures README carries. Both call these functions, so the short run
//! checks exactly what the long one measures.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::*;

/// Counts by name, printed sorted.
pub type Tally = BTreeMap<String, usize>;

fn count(t: &mut Tally, key: impl Into<String>) {
    *t.entry(key.into()).or_default() += 1;
}

/// A TCP proxy to `target` that counts the bytes the client sends and, when
/// `cut_after` is set, resets both directions once that many have passed:
/// the connection dies at that byte offset of the upload.
pub struct Proxy {
    pub addr: String,
    pub sent: Arc<AtomicUsize>,
}

pub async fn proxy(target: String, cut_after: Option<usize>) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let sent = Arc::new(AtomicUsize::new(0));
    let total = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let target = target.clone();
            let total = total.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let limit = cut_after.unwrap_or(usize::MAX);
                let up = async {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let done = total.load(Ordering::SeqCst);
                        if done >= limit {
                            break;
                        }
                        let n = cr.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        let n = n.min(limit - done);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        total.fetch_add(n, Ordering::SeqCst);
                    }
                };
                let down = tokio::io::copy(&mut sr, &mut cw);
                tokio::select! { _ = up => {}, _ = down => {} }
                // Dropping both sockets here resets the connection.
            });
        }
    });
    Proxy { addr, sent }
}

/// Processes on this machine working on `config_dir` (the host script, its
/// owner steps, the restart command): every one carries the path among its
/// arguments, on both transports.
pub fn host_processes(config_dir: &Path) -> Vec<u32> {
    let needle = config_dir.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Waits until nothing works on `config_dir` any more (a script cut off
/// from its connection may still be finishing). False after `limit`.
pub async fn quiet(config_dir: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if host_processes(config_dir).is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// How long the host side of `op` runs: from the first moment a process
/// works on `config_dir` to the last (polled every 2 ms).
async fn host_span<F: std::future::Future>(config_dir: &Path, op: F) -> (F::Output, Duration) {
    let done = std::sync::atomic::AtomicBool::new(false);
    let watch = async {
        let (mut first, mut last) = (None, None);
        loop {
            let running = !host_processes(config_dir).is_empty();
            if running {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
            } else if done.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        match (first, last) {
            (Some(f), Some(l)) => l - f,
            _ => Duration::from_millis(50),
        }
    };
    let op = async {
        let out = op.await;
        done.store(true, Ordering::SeqCst);
        out
    };
    tokio::join!(op, watch)
}

/// A plugin of two versions that differ in every file, with a payload big
/// enough that an upload spans many packets: a random byte offset then
/// falls anywhere from the SSH handshake to the archive's last block.
pub fn flaky_version(v: u8, payload: usize) -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "plugin.yaml".into(),
            format!("name: flaky\nversion: {v}.0.0\nskills: [flaky-{v}]\n").into_bytes(),
        ),
        (
            format!("skills/flaky-{v}/SKILL.md"),
            format!("# Flaky {v}\n").into_bytes(),
        ),
        ("rules/flaky.md".into(), format!("rule {v}\n").into_bytes()),
        ("data/payload.bin".into(), noise(payload, 0xF00D + v as u64)),
    ]
}

async fn publish_version(f: &Fixture, files: &[(String, Vec<u8>)]) {
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    f.publish("flaky", &refs).await;
}

/// What `host_faults` saw.
#[derive(Debug, Default)]
pub struct HostReport {
    pub access: String,
    pub operations: usize,
    /// Faults by kind: `cut` (connection reset at a byte offset), `kill`
    /// (SIGKILL to one of the host's processes, at a random moment of the
    /// time the host side of a clean install takes, and a fifth more),
    /// `missed` (the kill came after the host side ended: nothing left).
    pub faults: Tally,
    /// Status of each faulted operation.
    pub statuses: Tally,
    /// After the faulted operation: `old` (previous version intact) or
    /// `new` (the new version complete).
    pub trees: Tally,
    /// Trees that were neither version: must be 0.
    pub half_installed: usize,
    /// A 200 whose tree was not the new version: must be 0.
    pub acknowledged_not_landed: usize,
    /// Staging entries, extra store trees or processes left once the retry
    /// converged: must be 0.
    pub leftovers: usize,
    /// Operations whose retries never converged: must be 0.
    pub not_converged: usize,
    /// Retries each operation needed before it converged (1 = the first).
    pub retries: Tally,
    pub problems: Vec<String>,
    pub wall: Duration,
}

impl HostReport {
    pub fn clean(&self) -> bool {
        self.half_installed == 0
            && self.acknowledged_not_landed == 0
            && self.leftovers == 0
            && self.not_converged == 0
    }
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Upgrades and downgrades one plugin `ops` times on a host reached through
/// `access`, each time with one fault: over SSH, half the operations have
/// their connection reset at a random byte offset of the upload and half
/// get a SIGKILL to one random process of the host's side at a random
/// moment; over SSM (no connection of ours to cut) every operation gets the
/// SIGKILL. Then it checks the tree, retries until the install succeeds and
/// checks that nothing was left behind.
pub async fn host_faults(access: Access, ops: usize, seed: u64, payload: usize) -> HostReport {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let f = Fixture::with(access).await;
    let app = f.app();
    let body = r#"{"source":"flaky"}"#;
    let versions = [flaky_version(1, payload / 4), flaky_version(2, payload)];
    let real = format!("{}:{}", f.host.ip, f.host.port);

    // Learn each version's tree, how many bytes its install sends, and how
    // long it takes, from one clean install each.
    let mut trees = Vec::new();
    let mut upload = Vec::new();
    let mut took = Vec::new();
    for v in &versions {
        publish_version(&f, v).await;
        let counter = if access == Access::Ssh {
            let p = proxy(real.clone(), None).await;
            set_tag(
                &f.ec2,
                &f.host.instance_id,
                "molecule:local-address",
                &p.addr,
            )
            .await;
            Some(p)
        } else {
            None
        };
        let ((s, b), span) = host_span(&f.config_dir, install(&app, &f.workspace, body)).await;
        took.push(span);
        assert_eq!(s, 200, "clean install: {b}");
        upload.push(counter.map_or(0, |p| p.sent.load(Ordering::SeqCst)));
        trees.push(tree(&f.plugin_dir("flaky")));
    }
    assert_ne!(trees[0], trees[1]);
    if access == Access::Ssh {
        set_tag(&f.ec2, &f.host.instance_id, "molecule:local-address", &real).await;
    }

    let mut report = HostReport {
        access: format!("{access:?}").to_lowercase(),
        operations: ops,
        ..Default::default()
    };
    let staging = f.config_dir.join(".plugin-delivery/staging");
    let store = f.config_dir.join(".plugin-delivery/store");
    let mut current = 1; // versions[1] is installed
    for op in 0..ops {
        let next = 1 - current;
        publish_version(&f, &versions[next]).await;
        let cut = access == Access::Ssh && rng.gen_bool(0.5);
        let (status, fault) = if cut {
            let offset = rng.gen_range(0..upload[next].max(1));
            let p = proxy(real.clone(), Some(offset)).await;
            set_tag(
                &f.ec2,
                &f.host.instance_id,
                "molecule:local-address",
                &p.addr,
            )
            .await;
            let (s, _) = install(&app, &f.workspace, body).await;
            set_tag(&f.ec2, &f.host.instance_id, "molecule:local-address", &real).await;
            (s, "cut")
        } else {
            // Once the host side has started, anywhere in the time a clean
            // one takes, and a little after.
            let window = took[next].as_micros() as u64 * 6 / 5 + 1;
            let delay = Duration::from_micros(rng.gen_range(0..window));
            let pick: u64 = rng.gen();
            let config_dir = f.config_dir.clone();
            let killer = async move {
                let start = Instant::now();
                while host_processes(&config_dir).is_empty() {
                    if start.elapsed() > Duration::from_secs(10) {
                        return (false, None);
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                // Watched while waiting: a host side that ends first says
                // how long it really ran.
                let seen = Instant::now();
                while seen.elapsed() < delay {
                    if host_processes(&config_dir).is_empty() {
                        return (false, Some(seen.elapsed()));
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let pids = host_processes(&config_dir);
                if pids.is_empty() {
                    return (false, Some(seen.elapsed()));
                }
                let victim = pids[(pick % pids.len() as u64) as usize];
                // Gone between the scan and the kill: a miss, not a fault.
                let hit = std::process::Command::new("kill")
                    .args(["-KILL", &victim.to_string()])
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                (hit, None)
            };
            let ((s, _), (hit, ran)) = tokio::join!(install(&app, &f.workspace, body), killer);
            // The clean install's span was measured under another load: a
            // host side seen ending sooner sets the window from now on.
            if let Some(ran) = ran.filter(|r| *r < took[next]) {
                took[next] = ran;
            }
            (s, if hit { "kill" } else { "missed" })
        };
        count(&mut report.faults, fault);
        count(&mut report.statuses, status.to_string());
        if !quiet(&f.config_dir, Duration::from_secs(60)).await {
            report
                .problems
                .push(format!("op {op}: host processes still running after 60 s"));
        }
        let now = tree(&f.plugin_dir("flaky"));
        if now == trees[current] {
            count(&mut report.trees, "old");
            if status == 200 {
                report.acknowledged_not_landed += 1;
                report
                    .problems
                    .push(format!("op {op}: 200 but the old tree ({fault})"));
            }
        } else if now == trees[next] {
            count(&mut report.trees, "new");
        } else {
            report.half_installed += 1;
            report.problems.push(format!(
                "op {op}: half-installed tree after {fault}: {:?}",
                now.keys().collect::<Vec<_>>()
            ));
        }

        // Retry until it converges (a 409 while a cut-off script finishes).
        let mut tries = 0;
        let mut converged = false;
        while tries < 10 {
            tries += 1;
            let (s, b) = install(&app, &f.workspace, body).await;
            if s == 200 {
                converged = tree(&f.plugin_dir("flaky")) == trees[next];
                if !converged {
                    report
                        .problems
                        .push(format!("op {op}: retry 200 but not the new tree: {b}"));
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        count(&mut report.retries, tries.to_string());
        if !converged {
            report.not_converged += 1;
        }
        let left = entries(&staging);
        let trees_kept = entries(&store);
        let running = host_processes(&f.config_dir);
        if !left.is_empty() || trees_kept.len() != 1 || !running.is_empty() {
            report.leftovers += 1;
            report.problems.push(format!(
                "op {op}: staging {left:?}, store {trees_kept:?}, processes {running:?}"
            ));
        }
        current = next;
    }
    report.wall = started.elapsed();
    report
}

impl std::fmt::Display for HostReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} host faults: {} operations in {:.1} s",
            self.access,
            self.operations,
            self.wall.as_secs_f64()
        )?;
        writeln!(f, "  faults injected: {:?}", self.faults)?;
        writeln!(
            f,
            "  statuses of the faulted operations: {:?}",
            self.statuses
        )?;
        writeln!(f, "  tree after the fault: {:?}", self.trees)?;
        writeln!(f, "  retries until converged: {:?}", self.retries)?;
        write!(
            f,
            "  half-installed {}, 200 without the new tree {}, leftovers {}, not converged {}",
            self.half_installed, self.acknowledged_not_landed, self.leftovers, self.not_converged
        )?;
        for p in &self.problems {
            write!(f, "\n  ! {p}")?;
        }
        Ok(())
    }
}

// ------------------------------------------------------ S3 and EC2 faults

/// What `store_faults` saw.
#[derive(Debug, Default)]
pub struct StoreReport {
    pub operations: usize,
    pub rate: f64,
    /// What moto's fault injector answered instead of moto, by service,
    /// status and code, and how many requests of the key it let through.
    pub injected: Tally,
    pub passed: usize,
    pub statuses: Tally,
    /// A 200 whose change is not in the desired state: must be 0.
    pub lost_updates: usize,
    /// An error other than a 503 with a clean body: must be 0.
    pub unclean_errors: usize,
    /// Host and desired state differ after the scheduled repair: must be 0.
    pub diverged_after_repair: usize,
    /// Plugins left on the host as extras by an install whose 503 said so:
    /// its state write failed, and so did reading the state again to undo
    /// it. By design the repair reports such an extra and leaves it alone.
    pub told_extras: Vec<String>,
    pub problems: Vec<String>,
    pub wall: Duration,
}

impl StoreReport {
    pub fn clean(&self) -> bool {
        self.lost_updates == 0 && self.unclean_errors == 0 && self.diverged_after_repair == 0
    }
}

impl std::fmt::Display for StoreReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "S3/EC2 faults: {} concurrent operations on one workspace, fault rate {:.2}, {:.1} s",
            self.operations,
            self.rate,
            self.wall.as_secs_f64()
        )?;
        writeln!(
            f,
            "  injected: {:?} (requests let through: {})",
            self.injected, self.passed
        )?;
        writeln!(f, "  statuses: {:?}", self.statuses)?;
        write!(
            f,
            "  lost desired-state updates {}, errors other than a clean 503 {}, diverged after repair {}, extras the caller was told of {:?}",
            self.lost_updates, self.unclean_errors, self.diverged_after_repair, self.told_extras
        )?;
        for p in &self.problems {
            write!(f, "\n  ! {p}")?;
        }
        Ok(())
    }
}

/// Words of AWS's error texts that must never reach a caller.
const AWS_WORDS: [&str; 6] = [
    "SlowDown",
    "InternalError",
    "RequestLimitExceeded",
    "service error",
    "dispatch",
    "Please reduce",
];

/// `operations` installs and uninstalls at once on one workspace (a third
/// of them uninstalls of plugins installed beforehand) while moto answers
/// `rate` of the function's S3 and EC2 requests with 500/503 errors. Then
/// the faults stop, and the checks: every 200's change is in the desired
/// state and on the host, every error is a 503 with a clean body, and the
/// scheduled repair makes host and desired state agree.
pub async fn store_faults(operations: usize, rate: f64, seed: u64) -> StoreReport {
    let started = Instant::now();
    let f = Fixture::new().await;
    let names: Vec<String> = (0..operations).map(|i| format!("busy-{i:02}")).collect();
    for n in &names {
        let yaml = format!("name: {n}\nversion: 1.0.0\nskills: [{n}]\n");
        let skill = format!("# {n}\n");
        f.publish(
            n,
            &[
                ("plugin.yaml", yaml.as_bytes()),
                (&format!("skills/{n}/SKILL.md"), skill.as_bytes()),
            ],
        )
        .await;
    }
    let removed = operations / 3;
    let clean_app = f.app();
    for n in &names[..removed] {
        let (s, b) = install(&clean_app, &f.workspace, &json!({"source": n}).to_string()).await;
        assert_eq!(s, 200, "setup install of {n}: {b}");
    }

    let key = unique("faulty");
    let (s3, ec2, eic, ssm) = clients_as(&key).await;
    let app =
        Arc::new(plugin_delivery::App::with_clients(f.config(), s3, ec2, eic, ssm).expect("app"));
    let plan = json!({"access_key": key, "services": ["s3", "ec2"], "rate": rate, "seed": seed});
    let url = format!("{}/_stack/faults", stack().var("PLUGIN_STACK_MOTO_URL"));
    let (s, b) = control("POST", &url, Some(&plan));
    assert_eq!(s, 200, "fault injector: {b}");
    let mut tasks = tokio::task::JoinSet::new();
    for (i, n) in names.iter().enumerate() {
        let (app, ws, n) = (app.clone(), f.workspace.clone(), n.clone());
        tasks.spawn(async move {
            let (s, b) = if i < removed {
                uninstall(&app, &ws, &n).await
            } else {
                install(&app, &ws, &json!({"source": n}).to_string()).await
            };
            (i, n, s, b)
        });
    }
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.push(r.expect("operation task"));
    }
    let (_, b) = control("DELETE", &url, None);
    let seen: Value = serde_json::from_str(&b).expect("fault report");

    let mut report = StoreReport {
        operations,
        rate,
        passed: seen["passed"].as_u64().unwrap_or(0) as usize,
        ..Default::default()
    };
    if let Some(m) = seen["injected"].as_object() {
        for (k, v) in m {
            report
                .injected
                .insert(k.clone(), v.as_u64().unwrap_or(0) as usize);
        }
    }
    let desired = f.desired().await;
    results.sort_by_key(|r| r.0);
    for (i, n, s, b) in &results {
        count(&mut report.statuses, s.to_string());
        let uninstalling = *i < removed;
        let wanted = &desired["plugins"][n.as_str()];
        let on_host = f.plugin_dir(n).exists();
        match *s {
            200 if uninstalling => {
                if !wanted.is_null() || on_host {
                    report.lost_updates += 1;
                    report.problems.push(format!(
                        "uninstall {n}: 200 but desired {} / on host {on_host}",
                        !wanted.is_null()
                    ));
                }
            }
            200 => {
                if wanted["digest"] != b["digest"] || !on_host {
                    report.lost_updates += 1;
                    report.problems.push(format!(
                        "install {n}: 200 but desired {wanted} / on host {on_host}"
                    ));
                }
            }
            _ => {
                let text = b.to_string();
                if *s != 503
                    || !b["error"].is_string()
                    || AWS_WORDS.iter().any(|w| text.contains(w))
                {
                    report.unclean_errors += 1;
                    report.problems.push(format!("{n}: {s} {b}"));
                }
            }
        }
    }

    // The hourly repair, faults over: host and desired state must agree.
    if let Err(e) = plugin_delivery::entry::events::handle(&clean_app.deps, scheduled_event()).await
    {
        report.problems.push(format!("repair: {}", e.message));
    }
    let desired = f.desired().await;
    let mut want: Vec<String> = desired["plugins"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let mut have = entries(&f.config_dir.join("plugins"));
    // An install whose 503 said the plugin stays on the host (state write
    // and the undo's read of the state both failed) left an extra, which
    // the repair reports and leaves alone; any other difference is drift.
    report.told_extras = results
        .iter()
        .filter(|(i, n, s, b)| {
            *i >= removed
                && *s != 200
                && b["error"].as_str().is_some_and(|m| {
                    m.contains("the plugin is on the host but not in the workspace's plugin list")
                })
                && !want.contains(n)
        })
        .map(|r| r.1.clone())
        .collect();
    have.retain(|n| !report.told_extras.contains(n));
    want.sort();
    have.sort();
    if want != have {
        report.diverged_after_repair += 1;
        report
            .problems
            .push(format!("after repair: desired {want:?}, host {have:?}"));
    }
    report.wall = started.elapsed();
    report
}

// ------------------------------------------------ the function process killed

/// What `process_faults` saw.
#[derive(Debug, Default)]
pub struct ProcessReport {
    pub operations: usize,
    /// `kill` (the process died mid-invocation) or `missed` (it had already
    /// answered).
    pub faults: Tally,
    /// After the kill: `old` or `new` tree on the host.
    pub trees: Tally,
    /// How each killed operation was brought to a known state: by `next
    /// operation` (a fresh process installing again) or by `repair` (the
    /// reinstall function's scheduled run, converging on the desired state).
    pub converged_by: Tally,
    pub half_installed: usize,
    pub not_converged: usize,
    /// Staging entries or store trees on the host, or temp files of the
    /// function, left once converged: must be 0.
    pub leftovers: usize,
    pub problems: Vec<String>,
    pub wall: Duration,
}

impl ProcessReport {
    pub fn clean(&self) -> bool {
        self.half_installed == 0 && self.not_converged == 0 && self.leftovers == 0
    }
}

impl std::fmt::Display for ProcessReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "function process killed: {} operations in {:.1} s",
            self.operations,
            self.wall.as_secs_f64()
        )?;
        writeln!(f, "  faults: {:?}", self.faults)?;
        writeln!(f, "  tree after the kill: {:?}", self.trees)?;
        writeln!(f, "  converged by: {:?}", self.converged_by)?;
        write!(
            f,
            "  half-installed {}, not converged {}, leftovers {}",
            self.half_installed, self.not_converged, self.leftovers
        )?;
        for p in &self.problems {
            write!(f, "\n  ! {p}")?;
        }
        Ok(())
    }
}

fn install_event(ws: &str) -> Value {
    lambda::api_event(
        "POST",
        "/workspaces/{id}/plugins",
        &format!("/workspaces/{ws}/plugins"),
        ws,
        Some(r#"{"source":"flaky"}"#),
    )
}

/// Status and body of an API response the function reported.
fn api_outcome(out: Option<Result<Value, Value>>) -> (u16, Value) {
    match out {
        Some(Ok(resp)) => {
            let status = resp["statusCode"].as_u64().unwrap_or(0) as u16;
            let body = resp["body"]
                .as_str()
                .and_then(|b| serde_json::from_str(b).ok())
                .unwrap_or(Value::Null);
            (status, body)
        }
        Some(Err(e)) => (0, e),
        None => (0, Value::Null),
    }
}

/// Runs the real `install` binary under our Runtime API and SIGKILLs it at a
/// random moment of `operations` upgrades. After each kill, every other time
/// a fresh process (a cold start, as Lambda's next invocation) installs
/// again; the other times the real `reinstall` binary's scheduled repair
/// runs. Either must bring host and desired state together, with nothing
/// left on the host or in the functions' temp dir.
pub async fn process_faults(operations: usize, seed: u64) -> ProcessReport {
    use lambda::{function_binary, function_env, Function, RuntimeApi};
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let f = Fixture::new().await;
    let tmp = tempfile::Builder::new()
        .prefix("pd-lambda-tmp-")
        .tempdir()
        .unwrap();
    let logs = tempfile::Builder::new()
        .prefix("pd-lambda-log-")
        .tempdir()
        .unwrap();
    let log = logs.path().join("functions.log");
    let env = function_env(&f, tmp.path());
    let (install_bin, reinstall_bin) = (function_binary("install"), function_binary("reinstall"));
    let api = RuntimeApi::start().await;
    let events = RuntimeApi::start().await;
    let limit = Duration::from_secs(120);
    let versions = [flaky_version(1, 1 << 20), flaky_version(2, 4 << 20)];

    let mut func = Function::start(&install_bin, &api, &env, &log);
    let (mut trees, mut digests, mut took) = (Vec::new(), Vec::new(), Vec::new());
    for v in &versions {
        publish_version(&f, v).await;
        let t = Instant::now();
        let id = api.invoke(install_event(&f.workspace));
        let (s, b) = api_outcome(api.outcome(&id, limit).await);
        assert_eq!(s, 200, "clean install through the function process: {b}");
        took.push(t.elapsed());
        digests.push(b["digest"].as_str().unwrap().to_string());
        trees.push(tree(&f.plugin_dir("flaky")));
    }

    let mut report = ProcessReport {
        operations,
        ..Default::default()
    };
    let staging = f.config_dir.join(".plugin-delivery/staging");
    let store = f.config_dir.join(".plugin-delivery/store");
    let mut current = 1;
    for op in 0..operations {
        let next = 1 - current;
        publish_version(&f, &versions[next]).await;
        let id = api.invoke(install_event(&f.workspace));
        let window = took[next].as_millis() as u64 * 6 / 5 + 1;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..window))).await;
        let answered = api.outcome(&id, Duration::ZERO).await.is_some();
        func.kill();
        api.forget_waiters();
        count(&mut report.faults, if answered { "missed" } else { "kill" });
        if !quiet(&f.config_dir, Duration::from_secs(60)).await {
            report
                .problems
                .push(format!("op {op}: host processes still running after 60 s"));
        }
        let now = tree(&f.plugin_dir("flaky"));
        if now == trees[current] {
            count(&mut report.trees, "old");
        } else if now == trees[next] {
            count(&mut report.trees, "new");
        } else {
            report.half_installed += 1;
            report
                .problems
                .push(format!("op {op}: half-installed tree after the kill"));
        }

        if op % 2 == 0 {
            count(&mut report.converged_by, "next operation");
            func = Function::start(&install_bin, &api, &env, &log);
            let mut ok = false;
            for _ in 0..10 {
                let id = api.invoke(install_event(&f.workspace));
                let (s, b) = api_outcome(api.outcome(&id, limit).await);
                if s == 200 {
                    ok = tree(&f.plugin_dir("flaky")) == trees[next];
                    break;
                }
                report.problems.push(format!("op {op}: retry {s} {b}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if !ok {
                report.not_converged += 1;
            }
            current = next;
        } else {
            count(&mut report.converged_by, "repair");
            let mut repair = Function::start(&reinstall_bin, &events, &env, &log);
            let id = events.invoke(scheduled_event());
            if let Some(Err(e)) | Some(Ok(e @ Value::Null)) = events.outcome(&id, limit).await {
                report.problems.push(format!("op {op}: repair failed: {e}"));
            }
            repair.kill();
            events.forget_waiters();
            let desired = f.desired().await;
            let want = desired["plugins"]["flaky"]["digest"].as_str().unwrap_or("");
            match digests.iter().position(|d| d == want) {
                Some(v) if tree(&f.plugin_dir("flaky")) == trees[v] => current = v,
                _ => {
                    report.not_converged += 1;
                    report.problems.push(format!(
                        "op {op}: after repair desired {want:?} is not on the host"
                    ));
                }
            }
            func = Function::start(&install_bin, &api, &env, &log);
        }
        let left = entries(&staging);
        let kept = entries(&store);
        // The copies a warm function keeps of what it resolved are not
        // leftovers (a cold start removes those of a killed process).
        let temp: Vec<String> = entries(tmp.path())
            .into_iter()
            .filter(|e| !e.starts_with(plugin_delivery::domain::recent::KEPT_PREFIX))
            .collect();
        if !left.is_empty() || kept.len() != 1 || !temp.is_empty() {
            report.leftovers += 1;
            report.problems.push(format!(
                "op {op}: staging {left:?}, store {kept:?}, function temp {temp:?}"
            ));
        }
    }
    drop(func);
    report.wall = started.elapsed();
    report
}
