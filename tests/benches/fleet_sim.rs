//! Fleet simulation (figures, not assertions): the real rollout use case
//! over the in-memory adapters, with hosts that answer after a delay drawn
//! from the SSH install latency measured by the `delivery` bench (median
//! ~230 ms, uniform jitter of ±30 %, 5 % of answers twice as slow) and fail
//! 1 % of the time. It shows our own cost at fleet scale, which the
//! 100-sshd-host bench cannot (those hosts share 2 cores with everything).
//!
//! For each concurrency: wall time against the ideal (hosts x mean latency
//! / concurrency), the store requests the rollout made (what S3 would
//! bill), the process's CPU time per host, and its RSS before the rollout
//! (the simulated fleet's states and hosts, already in memory) and at its
//! peak (which adds what the rollout holds, and the records and host call
//! log the in-memory stores keep).
//!
//! Host latency is scaled by `PLUGIN_SIM_SCALE` (default 0.1, so 10,000
//! hosts at concurrency 10 take ~25 s instead of ~4 min); the ratio to the
//! ideal is independent of the scale except that our fixed cost per host
//! weighs 10x more, so the ratio shown is a conservative one.
//!
//! Run: `cargo bench -p acceptance --bench fleet_sim` (`-- 1000` for a
//! smaller fleet).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use acceptance::{process_cpu_secs, process_status_kib};
use plugin_delivery::adapters::clock::SystemClock;
use plugin_delivery::adapters::memory::{result_line, Memory};
use plugin_delivery::domain::config::Config;
use plugin_delivery::domain::plugin::{DesiredState, InstalledPlugin, Manifest, PluginInfo};
use plugin_delivery::domain::rollout::{
    RolloutLimits, RolloutRequest, Threshold, MAX_ROLLOUT_CONCURRENCY,
};
use plugin_delivery::usecases::rollout::rollout;

/// Median SSH install latency measured on the local stack (README).
const MEDIAN_MS: f64 = 230.0;

/// A small deterministic generator (xorshift), shared by the host tasks.
struct Rng(AtomicU64);

impl Rng {
    fn next(&self) -> f64 {
        let mut x = self.0.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One host answer's latency: ±30 % around the median, 5 % twice as slow.
fn latency(rng: &Rng, scale: f64) -> Duration {
    let mut ms = MEDIAN_MS * (0.7 + 0.6 * rng.next());
    if rng.next() < 0.05 {
        ms *= 2.0;
    }
    Duration::from_secs_f64(ms * scale / 1000.0)
}

/// The mean of `latency` (for the ideal): 1.05 x the median.
fn mean_latency(scale: f64) -> Duration {
    Duration::from_secs_f64(MEDIAN_MS * 1.05 * scale / 1000.0)
}

/// A `/proc/self/status` figure (`VmRSS:`, `VmHWM:`), in MiB.
fn status_mib(field: &str) -> f64 {
    process_status_kib("self", field).unwrap_or(0) as f64 / 1024.0
}

/// Peak RSS since the last reset, in MiB; resets it to the current RSS.
fn peak_rss_mib_and_reset() -> f64 {
    let peak = status_mib("VmHWM:");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    peak
}

async fn simulate(hosts: usize, concurrency: usize, scale: f64) {
    let m = Memory::default();
    m.store.publish(
        "fleet",
        &[
            ("plugin.yaml", b"name: fleet\nversion: 2.0.0\n".as_slice()),
            ("skills/fleet/SKILL.md", b"# Fleet\n".as_slice()),
        ],
    );
    let old = InstalledPlugin {
        info: PluginInfo::from_manifest("fleet", Manifest::default()),
        digest: "0".repeat(64),
        source: "local://fleet".into(),
        installed_at: "2026-01-01T00:00:00Z".into(),
    };
    for i in 0..hosts {
        let ws = format!("ws-{i:05}");
        // Ten VPCs: the per-VPC bound (20) is never the one that binds.
        m.fleet.add(&ws, &format!("vpc-{}", i % 10));
        let mut state = DesiredState::default();
        state.plugins.insert("fleet".into(), old.clone());
        m.store.set_state(&ws, state);
    }
    let rng = Arc::new(Rng(AtomicU64::new(0x9e37_79b9_7f4a_7c15)));
    let r = rng.clone();
    m.hosts
        .delay(Arc::new(SystemClock), move || latency(&r, scale));
    let r = rng.clone();
    m.hosts.script(move |_, cmd| {
        (cmd.args[0] == "install" && r.next() < 0.01).then(|| {
            Ok(result_line(
                r#"{"status":"error","code":"bad_archive","message":"x"}"#,
                65,
            ))
        })
    });
    let mut config = Config::new("bucket");
    config.rollout_concurrency = concurrency;
    let deps = m.deps_with_clock(config, Arc::new(SystemClock));
    let req = RolloutRequest {
        plugin: "fleet".into(),
        source: "local://fleet".into(),
        org_id: None,
        max_concurrency: Some(concurrency),
        error_threshold: None,
    };
    let limits = RolloutLimits {
        max_concurrency: concurrency,
        per_vpc: 20,
        // 1 % fail by design: let every host be tried.
        threshold: Threshold::Percent(5),
    };
    let requests0 = m.store.requests();
    peak_rss_mib_and_reset();
    // The simulated fleet's own data (states, hosts) is in memory already.
    let before = status_mib("VmRSS:");
    let cpu0 = process_cpu_secs("self");
    let t = Instant::now();
    let parent = rollout(&deps, &req, limits).await.expect("rollout");
    let wall = t.elapsed();
    let cpu = process_cpu_secs("self") - cpu0;
    let rss = peak_rss_mib_and_reset();
    let p = parent.progress.unwrap_or_default();
    let ideal = mean_latency(scale).as_secs_f64() * hosts as f64 / concurrency as f64;
    println!(
        "| {hosts} | {concurrency} | {:.2} s | {:.2} s | {:.3} | {} / {} / {} | {} ({:.2} per host) | {:.3} ms | {before:.1} → {:.1} MiB |",
        wall.as_secs_f64(),
        ideal,
        wall.as_secs_f64() / ideal,
        p.done,
        p.failed,
        p.not_started.len(),
        m.store.requests() - requests0,
        (m.store.requests() - requests0) as f64 / hosts as f64,
        1000.0 * cpu / hosts as f64,
        rss
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let hosts: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    let scale: f64 = std::env::var("PLUGIN_SIM_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.1);
    println!(
        "fleet simulation: {hosts} workspaces, host latency median {:.0} ms x {scale} (scaled), 1 % failures",
        MEDIAN_MS
    );
    println!("| hosts | concurrency | wall | ideal | wall/ideal | done / failed / not started | store requests | CPU per host | RSS before → peak |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let default = Config::new("bucket").rollout_concurrency;
    for c in [default, MAX_ROLLOUT_CONCURRENCY] {
        simulate(hosts, c, scale).await;
    }
}
