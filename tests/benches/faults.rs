//! The fault campaign, long: `cargo bench -p acceptance --bench faults`.
//! Figures, not pass/fail asserts: it prints each report and a summary, and
//! exits non-zero if any report found a broken property. README carries the
//! latest run. Needs the local stack (started like the tests start it).
//!
//! `PLUGIN_FAULT_OPS` (default 100): faulted upgrades per transport;
//! `PLUGIN_FAULT_ROUNDS` (default 5): rounds of 20 concurrent operations
//! under S3/EC2 faults; `PLUGIN_FAULT_KILLS` (default 20): function
//! processes killed; `PLUGIN_FAULT_SEED`: repeat a run.

use acceptance::faults::*;
use acceptance::Access;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let ops = env("PLUGIN_FAULT_OPS", 100) as usize;
    let rounds = env("PLUGIN_FAULT_ROUNDS", 5);
    let kills = env("PLUGIN_FAULT_KILLS", 20) as usize;
    let seed = env("PLUGIN_FAULT_SEED", rand::random());
    println!("fault campaign, PLUGIN_FAULT_SEED={seed}\n");
    let mut broken = 0;

    let mut summary = Vec::new();
    for access in [Access::Ssh, Access::Ssm] {
        let r = host_faults(access, ops, seed, 256 * 1024).await;
        println!("{r}\n");
        broken += usize::from(!r.clean());
        summary.push(format!(
            "| host faults, {} | {} upgrades | {} | half-installed {}, 200 without the new tree {}, leftovers {}, not converged {} |",
            r.access,
            r.operations,
            tally(&r.faults),
            r.half_installed,
            r.acknowledged_not_landed,
            r.leftovers,
            r.not_converged
        ));
    }
    let (mut injected, mut statuses, mut lost, mut unclean, mut diverged) =
        (Tally::new(), Tally::new(), 0, 0, 0);
    for round in 0..rounds {
        let r = store_faults(20, 0.3, seed.wrapping_add(round)).await;
        println!("round {round}: {r}\n");
        broken += usize::from(!r.clean());
        merge(&mut injected, &r.injected);
        merge(&mut statuses, &r.statuses);
        lost += r.lost_updates;
        unclean += r.unclean_errors;
        diverged += r.diverged_after_repair;
    }
    summary.push(format!(
        "| S3/EC2 500/503 at 30% | {} x 20 concurrent ops | {} | statuses {}; lost updates {lost}, unclean errors {unclean}, diverged after repair {diverged} |",
        rounds,
        tally(&injected),
        tally(&statuses)
    ));
    let r = process_faults(kills, seed).await;
    println!("{r}\n");
    broken += usize::from(!r.clean());
    summary.push(format!(
        "| function process SIGKILL | {} upgrades | {} | converged by {}; half-installed {}, leftovers {}, not converged {} |",
        r.operations,
        tally(&r.faults),
        tally(&r.converged_by),
        r.half_installed,
        r.leftovers,
        r.not_converged
    ));

    println!("| campaign | operations | faults | outcome |\n|---|---|---|---|");
    for line in summary {
        println!("{line}");
    }
    if broken > 0 {
        eprintln!("{broken} report(s) found a broken property");
        std::process::exit(1);
    }
}

fn merge(into: &mut Tally, from: &Tally) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

fn tally(t: &Tally) -> String {
    t.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}
