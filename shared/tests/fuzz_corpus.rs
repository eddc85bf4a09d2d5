//! The fuzz targets' properties (`fuzz/checks.rs`) on every test run: each
//! target gets its kept corpus (`fuzz/corpus/<target>`, seeds plus what the
//! fuzzers found) and then seeded random mutations of it. The long runs are
//! `cargo +nightly fuzz run <target>` (README, "Fuzzing").
//!
//! `PLUGIN_FUZZ_MUTATIONS` (default 2000 per target) and `PLUGIN_FUZZ_SEED`
//! (default: random, printed) size and repeat a run.

#[path = "../../fuzz/checks.rs"]
mod checks;

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 5, "{target}: the corpus is missing");
    inputs.into_iter().map(|(_, d)| d).collect()
}

/// A libFuzzer-like mutation: flip, insert, remove or overwrite bytes, or
/// splice in part of another input.
fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        let at = if out.is_empty() {
            0
        } else {
            rng.gen_range(0..out.len())
        };
        match rng.gen_range(0..5) {
            0 if !out.is_empty() => out[at] ^= 1 << rng.gen_range(0..8),
            1 => out.insert(at.min(out.len()), rng.gen()),
            2 if !out.is_empty() => {
                let end = (at + rng.gen_range(1..16)).min(out.len());
                out.drain(at..end);
            }
            3 if !out.is_empty() => {
                out[at] = [0, 0xff, b'/', b'.', b'\n', b'#', b'?'][rng.gen_range(0..7)]
            }
            _ if !other.is_empty() => {
                let from = rng.gen_range(0..other.len());
                let len = rng.gen_range(1..=64).min(other.len() - from);
                let at = at.min(out.len());
                out.splice(at..at, other[from..from + len].iter().copied());
            }
            _ => {}
        }
    }
    out
}

fn run(target: &str, check: fn(&[u8])) {
    let inputs = corpus(target);
    for input in &inputs {
        check(input);
    }
    let mutations: usize = std::env::var("PLUGIN_FUZZ_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let seed: u64 = std::env::var("PLUGIN_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!(
        "{target}: {} corpus inputs, {mutations} mutations, PLUGIN_FUZZ_SEED={seed}",
        inputs.len()
    );
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..mutations {
        let a = &inputs[rng.gen_range(0..inputs.len())];
        let b = &inputs[rng.gen_range(0..inputs.len())];
        let input = mutate(&mut rng, a, b);
        let caught = std::panic::catch_unwind(|| check(&input));
        if let Err(panic) = caught {
            panic!(
                "{target}: a property failed for input {:?} (seed {seed}): {:?}",
                input,
                panic.downcast_ref::<String>()
            );
        }
    }
}

#[test]
fn intake_holds_its_properties() {
    run("intake", checks::intake);
}

#[test]
fn source_holds_its_properties() {
    run("source", checks::source);
}

#[test]
fn host_result_holds_its_properties() {
    run("host_result", checks::host_result);
}
