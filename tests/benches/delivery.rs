//! Benchmarks on the local stack (figures for README, not assertions).
//!
//! 1. Install latency of a ~100 KB plugin through the whole path (registry
//!    → canonical archive → staged in S3 → EC2 lookup → EIC key push → SSH →
//!    host script), against the CLI design on the same host: `ssh-keygen`,
//!    `aws ec2-instance-connect send-ssh-public-key`, `ssh ... tar -xzf -`;
//!    and the same install to a hardened host through SSM Run Command (the
//!    emulated agent, which adds no delivery delay of its own).
//! 2. A 100 MiB plugin of incompressible files installed by the real
//!    `install` binary (release, served by `cargo lambda watch`): its peak
//!    RSS (VmHWM) and throughput, against `tar -xzf` of the same archive,
//!    and against the CLI design with it (the floor of any install over
//!    SSH here: OpenSSH and tar, with no S3 and no checks).
//!
//! 3. Fleet reinstall: one plugin rolled out to 100 workspaces on sshd hosts
//!    at concurrency 20 by the release `reinstall` function, against five
//!    single installs, and the function's peak RSS.
//!
//! 4. The function binaries (release, stripped): size of each, and cold
//!    start (exec until the first Runtime API poll) of each.
//!
//! Run: `cargo bench -p acceptance --bench delivery` (add `-- latency`,
//! `-- large`, `-- fleet` or `-- binaries` to run one part). The run ends
//! with one summary table of every part that ran (README keeps the latest).

// The install path's futures nest deeply; the layout query needs the room.
#![recursion_limit = "256"]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use acceptance::*;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// Numbers of the functions' timing events ("install timings", "ssh
/// timings"), one map per event, as the in-process installs log them.
type Events = Arc<Mutex<Vec<(String, BTreeMap<String, u64>)>>>;

struct Stages(Events);

#[derive(Default)]
struct Fields {
    message: String,
    numbers: BTreeMap<String, u64>,
}

impl tracing::field::Visit for Fields {
    fn record_u64(&mut self, f: &tracing::field::Field, v: u64) {
        self.numbers.insert(f.name().to_string(), v);
    }
    fn record_i64(&mut self, f: &tracing::field::Field, v: i64) {
        self.numbers.insert(f.name().to_string(), v.max(0) as u64);
    }
    fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
        if f.name() == "message" {
            self.message = v.to_string();
        }
    }
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        if f.name() == "message" {
            self.message = format!("{v:?}");
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Stages {
    fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut f = Fields::default();
        e.record(&mut f);
        if f.message.ends_with("timings") {
            self.0.lock().unwrap().push((f.message, f.numbers));
        }
    }
}

/// The collector, installed once (only the library's own events, debug
/// included: the SSH adapter's timings are debug).
fn stages() -> &'static Events {
    static EVENTS: OnceLock<Events> = OnceLock::new();
    EVENTS.get_or_init(|| {
        let events = Events::default();
        let only_ours = tracing_subscriber::filter::Targets::new()
            .with_target("plugin_delivery", tracing::Level::DEBUG);
        let subscriber =
            tracing_subscriber::registry().with(Stages(events.clone()).with_filter(only_ours));
        if tracing::subscriber::set_global_default(subscriber).is_err() {
            eprintln!("stage timings: a log subscriber is already set; no breakdown");
        }
        events
    })
}

/// Median of each number of the events named `message` since `from`.
fn stage_medians(from: usize, message: &str) -> BTreeMap<String, u64> {
    let events = stages().lock().unwrap();
    let mut all: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (m, nums) in events.iter().skip(from) {
        if m == message {
            for (k, v) in nums {
                all.entry(k.clone()).or_default().push(*v);
            }
        }
    }
    all.into_iter()
        .map(|(k, mut v)| {
            v.sort_unstable();
            (k, v[v.len() / 2])
        })
        .collect()
}

/// Rows of the closing summary table: what, ours, the reference, ratio.
fn summary() -> &'static Mutex<Vec<[String; 4]>> {
    static ROWS: OnceLock<Mutex<Vec<[String; 4]>>> = OnceLock::new();
    ROWS.get_or_init(Default::default)
}

fn summarize(what: &str, ours: String, reference: String, ratio: String) {
    summary()
        .lock()
        .unwrap()
        .push([what.to_string(), ours, reference, ratio]);
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn venv_bin(name: &str) -> String {
    format!("{}/bin/{name}", stack().var("PLUGIN_STACK_VENV"))
}

fn aws_cmd() -> Command {
    let mut c = Command::new(venv_bin("aws"));
    for (k, v) in &stack().vars {
        c.env(k, v);
    }
    c
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` timed installs (after 3 warm-up runs), each followed by an uninstall.
async fn timed_installs(app: &plugin_delivery::App, ws: &str, n: usize) -> Vec<Duration> {
    let mut times = Vec::new();
    for i in 0..(n + 3) {
        let t = Instant::now();
        let (s, b) = install(app, ws, r#"{"source":"bench"}"#).await;
        let d = t.elapsed();
        assert_eq!((s, b["status"].as_str()), (200, Some("installed")), "{b}");
        if i >= 3 {
            times.push(d);
        }
        let (s, _) = uninstall(app, ws, "bench").await;
        assert_eq!(s, 200);
    }
    times
}

async fn latency() {
    let f = Fixture::new().await;
    let mut cfg = f.config();
    // Both designs skip the runtime restart: it is the same on both sides
    // and not what is being compared.
    cfg.profiles.get_mut("claude-code").unwrap().restart = "true".into();
    // Every install on a new connection (key push, handshake, auth), as
    // the first operation on a workspace; and, as the functions run, with
    // the connection kept between operations in a row.
    let mut fresh_cfg = cfg.clone();
    fresh_cfg.ssh_reuse = Duration::ZERO;
    let app_fresh = f.app_with(fresh_cfg);
    let app = f.app_with(cfg);

    // ~100 KB: a manifest, a skill and 24 files of 4 KiB of hex text.
    let mut files: Vec<(String, Vec<u8>)> = vec![
        (
            "plugin.yaml".into(),
            b"name: bench\nversion: 1.0.0\nskills: [bench]\n".to_vec(),
        ),
        ("skills/bench/SKILL.md".into(), b"# Bench\n".to_vec()),
    ];
    for i in 0..24 {
        let text = hex::encode(noise(2048, i + 1)).into_bytes();
        files.push((format!("rules/r{i:02}.md"), text));
    }
    let size: usize = files.iter().map(|(_, d)| d.len()).sum();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    f.publish("bench", &refs).await;

    let n = 30;
    let from = stages().lock().unwrap().len();
    let ours_fresh = timed_installs(&app_fresh, &f.workspace, n).await;
    let fresh_install_stages = stage_medians(from, "install timings");
    let fresh_ssh_stages = stage_medians(from, "ssh timings");
    let from = stages().lock().unwrap().len();
    let ours = timed_installs(&app, &f.workspace, n).await;
    let install_stages = stage_medians(from, "install timings");
    let ssh_stages = stage_medians(from, "ssh timings");

    // The same plugin to a hardened host through SSM Run Command.
    let fs = Fixture::with(Access::Ssm).await;
    let mut cfg = fs.config();
    cfg.profiles.get_mut("claude-code").unwrap().restart = "true".into();
    let app_ssm = fs.app_with(cfg);
    fs.publish("bench", &refs).await;
    let ssm = timed_installs(&app_ssm, &fs.workspace, n).await;

    // The CLI design, same host, same archive bytes.
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("plugin.tar.gz");
    {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&archive).unwrap(),
            flate2::Compression::fast(),
        );
        let mut t = tar::Builder::new(gz);
        for (p, d) in &files {
            let mut h = tar::Header::new_gnu();
            h.set_size(d.len() as u64);
            h.set_mode(0o644);
            t.append_data(&mut h, p, d.as_slice()).unwrap();
        }
        t.into_inner().unwrap().finish().unwrap();
    }
    let dest = work.path().join("dest");
    let mut cli = Vec::new();
    for i in 0..(20 + 1) {
        let (took, _) = cli_install(&f, work.path(), &format!("k{i}"), &archive, &dest);
        if i >= 1 {
            cli.push(took);
        }
    }
    let (mo, mc) = (median(ours.clone()), median(cli.clone()));
    let mf = median(ours_fresh.clone());
    println!(
        "latency: plugin of {} files, {:.1} KB",
        files.len(),
        size as f64 / 1000.0
    );
    println!(
        "  plugin-delivery install, new connection each time: median {:.1} ms (min {:.1}, max {:.1}, n={})",
        ms(mf),
        ms(*ours_fresh.iter().min().unwrap()),
        ms(*ours_fresh.iter().max().unwrap()),
        ours_fresh.len()
    );
    println!(
        "  plugin-delivery install, connection kept from the operation before: median {:.1} ms (min {:.1}, max {:.1}, n={})",
        ms(mo),
        ms(*ours.iter().min().unwrap()),
        ms(*ours.iter().max().unwrap()),
        ours.len()
    );
    println!(
        "  plugin-delivery install over SSM (emulated agent, no delivery delay): median {:.1} ms (min {:.1}, max {:.1}, n={})",
        ms(median(ssm.clone())),
        ms(*ssm.iter().min().unwrap()),
        ms(*ssm.iter().max().unwrap()),
        ssm.len()
    );
    println!(
        "  CLI design (ssh-keygen + aws eic + ssh tar): median {:.1} ms (min {:.1}, max {:.1}, n={})",
        ms(mc),
        ms(*cli.iter().min().unwrap()),
        ms(*cli.iter().max().unwrap()),
        cli.len()
    );
    println!(
        "  ratio CLI / ours: {:.1}x with a new connection, {:.1}x with a kept one",
        mc.as_secs_f64() / mf.as_secs_f64(),
        mc.as_secs_f64() / mo.as_secs_f64()
    );
    // Where the time of our SSH installs goes (medians, ms; installs and
    // the uninstalls between them both log SSH timings).
    println!("  stages, new connection (median ms): install {fresh_install_stages:?}");
    println!("    ssh (from the key push): {fresh_ssh_stages:?}");
    println!("  stages, kept connection (median ms): install {install_stages:?}");
    println!("    ssh: {ssh_stages:?}");
    let cli_ms = format!("CLI design {:.1} ms", ms(mc));
    summarize(
        "100 KB install over SSH, new connection (median)",
        format!("{:.1} ms", ms(mf)),
        cli_ms.clone(),
        format!("{:.1}x faster", mc.as_secs_f64() / mf.as_secs_f64()),
    );
    summarize(
        "100 KB install over SSH, connection kept (median)",
        format!("{:.1} ms", ms(mo)),
        cli_ms.clone(),
        format!("{:.1}x faster", mc.as_secs_f64() / mo.as_secs_f64()),
    );
    let msm = median(ssm.clone());
    summarize(
        "100 KB install over SSM, emulated agent (median)",
        format!("{:.1} ms", ms(msm)),
        cli_ms,
        format!("{:.1}x faster", mc.as_secs_f64() / msm.as_secs_f64()),
    );
}

/// The first process whose executable path ends with `suffix`.
fn pid_of(suffix: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        exe.to_string_lossy().ends_with(suffix).then_some(pid)
    })
}

/// The first process with an argument ending with `suffix`.
fn pid_with_arg(suffix: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        cmdline
            .split(|b| *b == 0)
            .any(|a| a.ends_with(suffix.as_bytes()))
            .then_some(pid)
    })
}

/// VmHWM (peak RSS) of the first process whose executable path ends with
/// `suffix`, in KiB.
fn peak_rss_kib(suffix: &str) -> Option<(u32, u64)> {
    let pid = pid_of(suffix)?;
    Some((pid, process_status_kib(&pid.to_string(), "VmHWM:")?))
}

/// The log of the functions served on `port` (JSON lines).
fn watch_log(port: &str) -> std::path::PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"))
        .join(format!("bench-watch-{port}.log"))
}

/// The numbers of the last "install timings" line in the functions' log.
fn logged_install_timings(port: &str) -> String {
    logged_timings(
        port,
        "install timings",
        &[
            "framed",
            "resolve_ms",
            "stage_ms",
            "host_ms",
            "state_ms",
            "total_ms",
        ],
    )
}

/// The fields `keys` of the last log line of `message` on `port`'s watch.
fn logged_timings(port: &str, message: &str, keys: &[&str]) -> String {
    let text = std::fs::read_to_string(watch_log(port)).unwrap_or_default();
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == message)
        .map(|v| {
            let f = &v["fields"];
            keys.iter()
                .map(|k| format!("{k} {}", f[k]))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_else(|| "not logged".into())
}

/// The release functions served by `cargo lambda watch` on `port`, their
/// output in `watch_log(port)`.
fn serve_release(envfile: &std::path::Path, port: &str) -> Watch {
    let log = std::fs::File::create(watch_log(port)).unwrap();
    Command::new(venv_bin("cargo-lambda"))
        .args([
            "lambda",
            "watch",
            "--release",
            "--ignore-changes",
            "-A",
            "127.0.0.1",
            "-P",
            port,
            "--env-file",
        ])
        .arg(envfile)
        .current_dir(repo_root())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .map(|c| Watch(Some(c)))
        .expect("cargo lambda watch")
}

/// `cargo lambda watch`, stopped when dropped (a failed part must not leave
/// it serving its port to the next run).
struct Watch(Option<std::process::Child>);

impl Watch {
    /// SIGTERM (it stops its functions), then reaped; once only.
    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill")
                .arg(c.id().to_string())
                .stderr(Stdio::null())
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The env file of functions served by `cargo lambda watch` on the stack.
fn functions_env(path: &std::path::Path, bucket: &str, profiles: &serde_json::Value, extra: &str) {
    let mut env = String::new();
    for k in [
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_EC2_INSTANCE_CONNECT",
        "AWS_ENDPOINT_URL_SSM",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
    ] {
        env.push_str(&format!("{k}='{}'\n", stack().var(k)));
    }
    // Caller tokens are checked as deployed (the test issuer's keys, read
    // from Parameter Store); the bench's requests carry the owner's token.
    env.push_str(&format!(
        "PLUGIN_JWT_ISSUER='{TEST_ISSUER}'\nPLUGIN_JWT_AUDIENCE='{TEST_AUDIENCE}'\nPLUGIN_JWKS_PARAMETER='{JWKS_PARAMETER}'\n"
    ));
    env.push_str(&format!(
        "PLUGIN_BUCKET='{bucket}'\nPLUGIN_SSH_USER='{LOGIN_USER}'\nPLUGIN_SSH_ADDRESS_TAG='molecule:local-address'\nPLUGIN_RUNTIME_PROFILES='{profiles}'\nRUST_LOG='warn,plugin_delivery=info'\n{extra}"
    ));
    std::fs::write(path, env).unwrap();
}

/// One install the CLI design's way, timed: a new key (`ssh-keygen`), its
/// push (`aws ec2-instance-connect send-ssh-public-key`) and
/// `ssh ... sudo tar -xzf -` of `archive` into `dest` on the fixture's
/// host, with the cipher ours uses. Nothing is staged, checked or kept
/// apart from root. Also the time of the `ssh` alone (OpenSSH and tar,
/// without the CLI tools' starts).
fn cli_install(
    f: &Fixture,
    work: &std::path::Path,
    key: &str,
    archive: &std::path::Path,
    dest: &std::path::Path,
) -> (Duration, Duration) {
    let known_hosts = work.join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("[{}]:{} {}\n", f.host.ip, f.host.port, f.host.host_key),
    )
    .unwrap();
    let key = work.join(key);
    let t = Instant::now();
    push_new_key(f, &key);
    let remote = format!(
        "sudo -n sh -c 'mkdir -p {0} && tar -xzf - -C {0}'",
        dest.display()
    );
    let t_ssh = Instant::now();
    run(Command::new("ssh")
        .arg("-i")
        .arg(&key)
        .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
        // The cipher ours negotiates: OpenSSH's first choice would cost
        // sshd twice the CPU per byte.
        .args(["-o", "Ciphers=aes256-gcm@openssh.com"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-p",
            &f.host.port.to_string(),
            &format!("{LOGIN_USER}@{}", f.host.ip),
            &remote,
        ])
        .stdin(Stdio::from(std::fs::File::open(archive).unwrap())));
    (t.elapsed(), t_ssh.elapsed())
}

/// A new key at `key` (`ssh-keygen`), pushed for the fixture's host
/// (`aws ec2-instance-connect send-ssh-public-key`), as the CLI design does.
fn push_new_key(f: &Fixture, key: &std::path::Path) {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(key));
    run(aws_cmd().args([
        "ec2-instance-connect",
        "send-ssh-public-key",
        "--endpoint-url",
        stack().var("AWS_ENDPOINT_URL_EC2_INSTANCE_CONNECT"),
        "--instance-id",
        &f.host.instance_id,
        "--instance-os-user",
        LOGIN_USER,
        "--ssh-public-key",
        &format!("file://{}.pub", key.display()),
    ]));
}

async fn large() {
    let f = Fixture::new().await;
    // Ten files of incompressible bytes, just under the 100 MiB cap.
    let src = tempfile::tempdir().unwrap();
    let plugin = src.path().join("bench-large");
    std::fs::create_dir_all(plugin.join("data")).unwrap();
    std::fs::write(
        plugin.join("plugin.yaml"),
        "name: bench-large\nversion: 1.0.0\n",
    )
    .unwrap();
    for i in 0..10u64 {
        std::fs::write(
            plugin.join(format!("data/blob{i}.bin")),
            noise(10 * 1024 * 1024 - 1024, i + 7),
        )
        .unwrap();
    }
    run(aws_cmd()
        .args(["s3", "sync", "--only-show-errors"])
        .arg(&plugin)
        .arg(format!("s3://{}/registry/bench-large/", f.bucket)));

    // Serve the real release binaries, configured like the demo.
    let cfg = f.config();
    let profile = &cfg.profiles["claude-code"];
    let profiles =
        serde_json::json!({"claude-code": {"config_dir": profile.config_dir, "restart": "true"}});
    let envfile = src.path().join("functions.env");
    functions_env(
        &envfile,
        &f.bucket,
        &profiles,
        // (The SSH adapter's own timings too: when the host session was
        // ready and how long the install ran on it.)
        "PLUGIN_OPERATION_TIMEOUT_SECS='300'\nRUST_LOG='warn,plugin_delivery=info,plugin_delivery::adapters::ssh=debug'\n",
    );
    let port = "9123";
    let mut watch = serve_release(&envfile, port);
    let url = format!(
        "http://127.0.0.1:{port}/lambda-url/install/workspaces/{}/plugins",
        f.workspace
    );
    let post = |body: &str| {
        Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/stderr",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-H",
                &format!("authorization: Bearer {}", owner_token()),
            ])
            .args(["--data", body, &url])
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    };
    // Wait for the server (it may build the release binaries first).
    let start = Instant::now();
    while Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        assert!(
            start.elapsed() < Duration::from_secs(1200),
            "cargo lambda watch did not come up"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The watcher builds a function on its first invocation: warm it up with
    // a request that is rejected before any work, so only the install is timed.
    assert_eq!(post(r#"{"source":"../warm-up"}"#), "400");
    // The EIC emulator makes its EC2 client on its first key push (0.3 s
    // of Python on a freshly started stack); the service it stands in for
    // is always warm.
    push_new_key(&f, &src.path().join("warm-up-key"));
    // Who spends the machine's CPU during the install: moto (S3 reads of
    // the registry and the staging write), the function, and the rest
    // (sshd, the host script, the emulators).
    let moto = pid_with_arg("moto_server.py").map(|p| p.to_string());
    let function = pid_of("/release/install").map(|p| p.to_string());
    let cpu_of = |pid: &Option<String>| pid.as_deref().map_or(0.0, process_cpu_secs);
    settle();
    let (moto0, fn0, busy0) = (cpu_of(&moto), cpu_of(&function), cpu_busy_secs());
    let t = Instant::now();
    let code = post(r#"{"source":"bench-large"}"#);
    let took = t.elapsed();
    let (moto_cpu, fn_cpu, busy) = (
        cpu_of(&moto) - moto0,
        cpu_of(&function) - fn0,
        cpu_busy_secs() - busy0,
    );
    let rss = peak_rss_kib("/release/install");
    watch.stop();
    assert_eq!(code, "200", "install of the large plugin");
    let tree_bytes: u64 = tree(&f.plugin_dir("bench-large"))
        .values()
        .map(|v| v.0.len() as u64)
        .sum();

    // The same archive, extracted by tar locally.
    let digest = f.desired().await["plugins"]["bench-large"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let archive = src.path().join("a.tar.gz");
    run(aws_cmd()
        .args([
            "s3",
            "cp",
            "--only-show-errors",
            &format!("s3://{}/staged/{digest}.tar.gz", f.bucket),
        ])
        .arg(&archive));
    // The median of three runs, each into a new dir: one run swings with
    // what the page cache is still writing back from the install.
    let tar_runs: Vec<(Duration, f64)> = (0..3)
        .map(|i| {
            let dest = src.path().join(format!("x{i}"));
            std::fs::create_dir(&dest).unwrap();
            settled(|| {
                let t = Instant::now();
                run(Command::new("tar")
                    .arg("-xzf")
                    .arg(&archive)
                    .arg("-C")
                    .arg(&dest));
                t.elapsed()
            })
        })
        .collect();
    let tar_took = median(tar_runs.iter().map(|r| r.0).collect());
    let tar_cpu = tar_runs.iter().map(|r| r.1).sum::<f64>() / 3.0;
    // The floor of any install over SSH on this machine: the CLI design
    // with the same archive (a key push, OpenSSH and sudo tar, with nothing
    // read from or staged in S3, no digest check, no step as the owner),
    // and its ssh alone, without the CLI tools' starts.
    let cli_runs: Vec<((Duration, Duration), f64)> = (0..3)
        .map(|i| {
            let dest = src.path().join(format!("c{i}"));
            settled(|| cli_install(&f, src.path(), &format!("k{i}"), &archive, &dest))
        })
        .collect();
    let cli_took = median(cli_runs.iter().map(|r| r.0 .0).collect());
    let ssh_took = median(cli_runs.iter().map(|r| r.0 .1).collect());
    let cli_cpu = cli_runs.iter().map(|r| r.1).sum::<f64>() / 3.0;
    let cli_ratio = 100.0 * tar_took.as_secs_f64() / cli_took.as_secs_f64();
    let ssh_ratio = 100.0 * tar_took.as_secs_f64() / ssh_took.as_secs_f64();
    let mib = tree_bytes as f64 / (1024.0 * 1024.0);
    println!(
        "large: {mib:.1} MiB of incompressible files, archive {:.1} MiB",
        std::fs::metadata(&archive).unwrap().len() as f64 / 1048576.0
    );
    println!(
        "  install through the release function: {:.2} s ({:.1} MiB/s); peak RSS of the function process: {}",
        took.as_secs_f64(),
        mib / took.as_secs_f64(),
        rss.map(|(pid, k)| format!("{:.1} MiB (pid {pid})", k as f64 / 1024.0)).unwrap_or("not found".into())
    );
    println!(
        "  stages (the function's own log, ms): {}",
        logged_install_timings(port)
    );
    println!(
        "  its SSH session (ms): {}",
        logged_timings(
            port,
            "ssh timings",
            &["connect_ms", "auth_ms", "waited_ms", "run_ms", "total_ms"]
        )
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "  CPU during the install: machine busy {busy:.2} of {:.2} core-seconds; moto {moto_cpu:.2} s, the function {fn_cpu:.2} s, the rest (sshd, host script, emulators) {:.2} s",
        took.as_secs_f64() * cores as f64,
        busy - moto_cpu - fn_cpu
    );
    println!(
        "  tar -xzf of the same archive (median of 3): {:.2} s ({:.1} MiB/s), machine busy {tar_cpu:.2} core-seconds a run",
        tar_took.as_secs_f64(),
        mib / tar_took.as_secs_f64()
    );
    println!(
        "  CLI design with the same archive (key push, ssh, sudo tar -xzf; nothing from or to S3, no checks; median of 3): {:.2} s ({cli_ratio:.0}% of tar's speed), machine busy {cli_cpu:.2} core-seconds a run; its ssh alone {:.2} s ({ssh_ratio:.0}%)",
        cli_took.as_secs_f64(),
        ssh_took.as_secs_f64(),
    );
    summarize(
        &format!("{mib:.0} MiB install, release function (throughput)"),
        format!(
            "{:.2} s, peak RSS {}",
            took.as_secs_f64(),
            rss.map(|(_, k)| format!("{:.1} MiB", k as f64 / 1024.0))
                .unwrap_or("?".into())
        ),
        format!(
            "tar -xzf {:.2} s; CLI design {:.2} s ({cli_ratio:.0}% of tar's), its ssh + tar alone {:.2} s ({ssh_ratio:.0}%)",
            tar_took.as_secs_f64(),
            cli_took.as_secs_f64(),
            ssh_took.as_secs_f64(),
        ),
        format!(
            "{:.0}% of tar's speed",
            100.0 * tar_took.as_secs_f64() / took.as_secs_f64()
        ),
    );
}

const FUNCTIONS: [&str; 8] = [
    "install",
    "uninstall",
    "list",
    "catalog",
    "allowlist",
    "download",
    "operations",
    "reinstall",
];

/// Each release function binary: its size, and its cold start (exec until
/// its first `GET /runtime/invocation/next`, the median of 15 starts) with
/// a deployment's environment pointed at the stack. The binaries are built
/// first (8 thin-LTO links: half an hour on 2 cores) unless
/// PLUGIN_BENCH_PREBUILT is set, which measures the ones in the target dir
/// as they are (each line says how old its binary is).
async fn binaries() {
    if std::env::var_os("PLUGIN_BENCH_PREBUILT").is_none() {
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build
            .current_dir(repo_root())
            .args(["build", "-q", "--release"]);
        for f in FUNCTIONS {
            build.args(["-p", f]);
        }
        run(&mut build);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    let f = Fixture::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let env = acceptance::lambda::function_env(&f, tmp.path());
    println!("binaries: release, stripped");
    let (mut sizes, mut colds) = (Vec::new(), Vec::new());
    for name in FUNCTIONS {
        let path = target.join("release").join(name);
        let meta = std::fs::metadata(&path).unwrap();
        let size = meta.len();
        let age_min = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .map_or(0, |d| d.as_secs() / 60);
        let mut starts = Vec::new();
        for _ in 0..15 {
            starts.push(cold_start(&path, &env));
        }
        let cold = median(starts);
        println!(
            "  {name:<10} {:>6.2} MB  cold start {:.1} ms  (binary built {age_min} min ago)",
            size as f64 / 1e6,
            ms(cold)
        );
        sizes.push((size, name));
        colds.push(cold);
    }
    sizes.sort();
    let (min, max) = (sizes[0], sizes[sizes.len() - 1]);
    summarize(
        "function binaries (release, stripped)",
        format!(
            "{:.1} MB ({}) to {:.1} MB ({})",
            min.0 as f64 / 1e6,
            min.1,
            max.0 as f64 / 1e6,
            max.1
        ),
        "25 MB each before issue 13".into(),
        format!("largest {:.0}% of that", 100.0 * max.0 as f64 / 25e6),
    );
    colds.sort();
    summarize(
        "cold start, exec to first Runtime API poll (median per function)",
        format!(
            "{:.1} to {:.1} ms",
            ms(colds[0]),
            ms(colds[colds.len() - 1])
        ),
        "about 12 ms before issue 13".into(),
        String::new(),
    );
}

/// One start of `binary` until it asks the Runtime API for its first event.
fn cold_start(binary: &std::path::Path, env: &[(String, String)]) -> Duration {
    use std::io::Read;
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = api.local_addr().unwrap().to_string();
    let t = Instant::now();
    let mut child = acceptance::lambda::runtime_command(binary, &addr, env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the function");
    let (mut conn, _) = api.accept().unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "the function closed before asking for an event");
        head.extend_from_slice(&buf[..n]);
    }
    let took = t.elapsed();
    assert!(
        String::from_utf8_lossy(&head).contains("/runtime/invocation/next"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let _ = child.kill();
    let _ = child.wait();
    took
}

/// Writes back what earlier steps left dirty in the page cache, so a timed
/// run does not pay for the one before it.
fn settle() {
    run(&mut Command::new("sync"));
}

/// `settle`, then `step`, with the machine's busy CPU time from the start
/// of `step` to its end (its own writeback, done later, is not in it).
fn settled<T>(step: impl FnOnce() -> T) -> (T, f64) {
    settle();
    let busy0 = cpu_busy_secs();
    let out = step();
    (out, cpu_busy_secs() - busy0)
}

/// The machine's CPU time (in seconds of all cores) from /proc/stat, in
/// the columns given (0 user, 1 nice, 2 system, 5 irq, 6 softirq, 7 steal).
fn cpu_secs(columns: &[usize]) -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let ticks = columns.iter().filter_map(|&i| v.get(i)).sum::<u64>();
    ticks as f64 / 100.0
}

/// Busy CPU time of the whole machine so far (user+nice+system+irq+softirq
/// from /proc/stat), in seconds.
fn cpu_busy_secs() -> f64 {
    cpu_secs(&[0, 1, 2, 5, 6])
}

/// Runs one part and says how much of the machine's CPU time went to other
/// guests of the hypervisor meanwhile (steal).
async fn with_steal(part: &str, run: impl std::future::Future<Output = ()>) {
    // Every column of /proc/stat: all the CPUs the kernel counts, whatever
    // this process may use.
    let all = [0, 1, 2, 3, 4, 5, 6, 7];
    let (total0, steal0) = (cpu_secs(&all), cpu_secs(&[7]));
    run.await;
    let (total, steal) = (cpu_secs(&all) - total0, cpu_secs(&[7]) - steal0);
    println!(
        "  ({part}: steal {steal:.1} of {total:.0} core-seconds, {:.1}%)",
        100.0 * steal / total.max(0.01)
    );
}

/// Fleet reinstall: a rollout of one plugin to 100 workspaces (sshd hosts on
/// loopback) at concurrency 20 through the release `reinstall` function,
/// against five times a single install (20 hosts at a time = 5 waves), and
/// the function's peak memory.
async fn fleet() {
    let f = Fixture::new().await;
    let n = 100;
    let files: Vec<(String, Vec<u8>)> = vec![
        (
            "plugin.yaml".into(),
            b"name: bench-fleet\nversion: 2.0.0\nskills: [fleet]\n".to_vec(),
        ),
        ("skills/fleet/SKILL.md".into(), b"# Fleet\n".to_vec()),
        (
            "rules/r.md".into(),
            hex::encode(noise(4096, 3)).into_bytes(),
        ),
    ];
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    f.publish("bench-fleet", &refs).await;

    // The baseline: one install to one host, in-process (median of 5).
    let mut cfg = f.config();
    cfg.profiles.get_mut("claude-code").unwrap().restart = "true".into();
    let app = f.app_with(cfg);
    let mut singles = Vec::new();
    for i in 0..6 {
        let t = Instant::now();
        let (s, b) = install(&app, &f.workspace, r#"{"source":"bench-fleet"}"#).await;
        assert_eq!(s, 200, "{b}");
        if i > 0 {
            singles.push(t.elapsed());
        }
        assert_eq!(uninstall(&app, &f.workspace, "bench-fleet").await.0, 200);
    }
    let single = median(singles);

    // 100 more workspaces, each on its own sshd host with its own config
    // dir, each wanting the plugin.
    let t = Instant::now();
    let mut hosts = Vec::new();
    for i in 0..n {
        let ws = format!("{}-f{i:03}", f.workspace);
        let h = Host::start(&f.ec2, &ws, "claude-code").await;
        let dir = f.dir.path().join(format!("f{i:03}"));
        agent_dir(&dir);
        set_tag(
            &f.ec2,
            &h.instance_id,
            "molecule:config-dir",
            dir.to_str().unwrap(),
        )
        .await;
        f.desire(&ws, "bench-fleet").await;
        hosts.push((h, dir));
    }
    println!(
        "fleet: {n} sshd hosts up in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let cfg = f.config();
    let profiles = serde_json::json!({"claude-code": {"config_dir": cfg.profiles["claude-code"].config_dir, "restart": "true"}});
    let work = tempfile::tempdir().unwrap();
    let envfile = work.path().join("functions.env");
    functions_env(
        &envfile,
        &f.bucket,
        &profiles,
        &format!(
            "PLUGIN_ROLLOUT_CONCURRENCY='20'\nPLUGIN_CONFIG_DIR_ROOTS='{}'\n",
            f.dir.path().display()
        ),
    );
    let port = "9124";
    let mut watch = serve_release(&envfile, port);
    let invoke = |file: &std::path::Path| {
        Command::new(venv_bin("cargo-lambda"))
            .args([
                "lambda",
                "invoke",
                "-A",
                "127.0.0.1",
                "-P",
                port,
                "reinstall",
                "--data-file",
            ])
            .arg(file)
            .output()
            .expect("cargo lambda invoke")
    };
    let warm = work.path().join("warm.json");
    std::fs::write(&warm, r#"{"detail-type":"EC2 Instance State-change Notification","source":"aws.ec2","time":"2026-11-25T19:00:00Z","resources":[],"detail":{"instance-id":"i-0000000000000000f","state":"running"}}"#).unwrap();
    let start = Instant::now();
    loop {
        let out = invoke(&warm);
        if out.status.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1500),
            "reinstall function did not come up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    let ev = work.path().join("rollout.json");
    // A rollout acts for one org: the test hosts' own.
    let rollout = serde_json::json!({"detail-type": "Plugin Reinstall Requested", "source": "molecule.plugin-delivery", "time": "2026-11-25T19:00:00Z", "resources": [], "detail": {"plugin": "bench-fleet", "source": "local://bench-fleet", "max_concurrency": 20, "org_id": TEST_ORG}});
    std::fs::write(&ev, rollout.to_string()).unwrap();
    let function = pid_of("/release/reinstall");
    let own0 = function
        .map(|p| process_cpu_secs(&p.to_string()))
        .unwrap_or(0.0);
    let cpu0 = cpu_busy_secs();
    let t = Instant::now();
    let out = invoke(&ev);
    let took = t.elapsed();
    let cpu = cpu_busy_secs() - cpu0;
    let own = function
        .map(|p| process_cpu_secs(&p.to_string()))
        .unwrap_or(0.0)
        - own0;
    let rss = peak_rss_kib("/release/reinstall");
    watch.stop();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
    assert_eq!(
        v["progress"]["done"],
        n,
        "rollout: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (_, dir) in &hosts {
        assert!(dir.join("plugins/bench-fleet/plugin.yaml").exists());
    }
    println!(
        "  single install (in-process, median of 5): {:.1} ms",
        ms(single)
    );
    summarize(
        &format!("fleet reinstall of {n} workspaces at concurrency 20"),
        format!("{:.2} s", took.as_secs_f64()),
        format!("five single installs {:.2} s", 5.0 * single.as_secs_f64()),
        format!(
            "{:.2}x (target <= 1.5x)",
            took.as_secs_f64() / (5.0 * single.as_secs_f64())
        ),
    );
    println!(
        "  fleet reinstall of {n} workspaces at concurrency 20 (release function): {:.2} s = {:.2}x five single installs (target <= 1.5x)",
        took.as_secs_f64(),
        took.as_secs_f64() / (5.0 * single.as_secs_f64())
    );
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "  machine CPU busy during the rollout: {cpu:.2} of {:.2} core-seconds ({:.0}%; {cores} cores shared by the function, moto, the emulators and all {n} sshd hosts)",
        took.as_secs_f64() * cores as f64,
        100.0 * cpu / (took.as_secs_f64() * cores as f64)
    );
    println!(
        "  the reinstall function's own CPU time: {own:.2} s = {:.1} ms per host (pid {})",
        1000.0 * own / n as f64,
        function
            .map(|p| p.to_string())
            .unwrap_or("not found".into())
    );
    println!(
        "  peak RSS of the reinstall function process: {}",
        rss.map(|(pid, k)| format!("{:.1} MiB (pid {pid})", k as f64 / 1024.0))
            .unwrap_or("not found".into())
    );
}

/// What checking the caller's token adds to a request: the verifier of a
/// function as deployed (JWKS from Parameter Store, RS256, iss/aud/exp),
/// first call (keys loaded) and then warm, over 2,000 calls.
async fn auth() {
    let f = Fixture::new().await;
    let app = f.app();
    let header = format!("Bearer {}", owner_token());
    let t = std::time::Instant::now();
    app.deps.auth.authenticate(Some(&header)).await.unwrap();
    let first = t.elapsed();
    let mut times = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let t = std::time::Instant::now();
        let c = app.deps.auth.authenticate(Some(&header)).await.unwrap();
        times.push(t.elapsed());
        assert_eq!(c.org, TEST_ORG);
    }
    times.sort();
    let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
    println!(
        "token verification: first call (JWKS from SSM) {:.2} ms; then median {:.1} us, p99 {:.1} us, max {:.1} us over {} calls",
        first.as_secs_f64() * 1e3,
        us(times[times.len() / 2]),
        us(times[times.len() * 99 / 100]),
        us(*times.last().unwrap()),
        times.len()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // PLUGIN_BENCH_LOG=debug shows the per-stage timings of each install
    // (instead of collecting them for the stage breakdown).
    if let Ok(level) = std::env::var("PLUGIN_BENCH_LOG") {
        std::env::set_var("RUST_LOG", format!("plugin_delivery={level}"));
        plugin_delivery::app::init_logging();
    }
    let _ = stages();
    let args: Vec<String> = std::env::args().collect();
    let parts = ["latency", "auth", "large", "fleet", "binaries"];
    let want = |part: &str| {
        !args.iter().any(|a| parts.contains(&a.as_str())) || args.iter().any(|a| a == part)
    };
    // This machine is a VM: the time its hypervisor gives to others
    // (steal) moves every figure between runs, so each part reports it.
    if want("latency") {
        with_steal("latency", latency()).await;
    }
    if want("latency") || want("auth") {
        auth().await;
    }
    if want("large") {
        with_steal("large", large()).await;
    }
    if want("fleet") {
        with_steal("fleet", fleet()).await;
    }
    if want("binaries") {
        with_steal("binaries", binaries()).await;
    }
    let rows = summary().lock().unwrap();
    if !rows.is_empty() {
        println!("\nsummary (this run)\n");
        println!("| Measure | Ours | Against | Ratio |");
        println!("|---|---|---|---|");
        for [what, ours, against, ratio] in rows.iter() {
            println!("| {what} | {ours} | {against} | {ratio} |");
        }
    }
}
