//! The properties the fuzz targets hold the code to, one function per
//! target. libFuzzer calls them from `fuzz_targets/` with generated inputs;
//! `shared/tests/fuzz_corpus.rs` includes this file and calls them with the
//! kept corpus and a few thousand seeded mutations of it on every test run.
//! A property that does not hold panics, which both count as a failure.
//!
//! Only `plugin_delivery` (without its runtime layers), `serde_json` and std
//! may be used here: the file is compiled into both crates.

use std::io::Read;
use std::path::PathBuf;
use std::sync::OnceLock;

use plugin_delivery::domain::archive::manifest_in;
use plugin_delivery::domain::hostscript::{interpret, HostOutput, HostStatus};
use plugin_delivery::domain::intake::{ingest, IntakeLimits};
use plugin_delivery::domain::plugin::{validate_name, Manifest};
use plugin_delivery::domain::source::{derive_name, valid_ref, Source};
use plugin_delivery::Error;

/// A temp dir of our own, so that "nothing left behind" can be checked by
/// listing it. Set once, before the first intake.
fn private_temp_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("plugin-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz temp dir");
        std::env::set_var("TMPDIR", &dir);
        dir
    })
}

/// What a caller may read: no temp path of ours. Names the caller sent are
/// quoted back (an entry's name, in the `entry` field and the message, or
/// the tar reader's own words about an entry): those parts are the
/// caller's own input and are left out of the check.
fn public(e: &Error) {
    assert!(!e.message.is_empty());
    if e.message
        .starts_with("the archive is corrupt or truncated:")
    {
        return;
    }
    let tmp = private_temp_dir().to_string_lossy().into_owned();
    let mut message = e.message.clone();
    if let Some(entry) = e.fields.get("entry").and_then(|v| v.as_str()) {
        message = message.replace(&format!("{entry:?}"), "");
    }
    assert!(!message.contains(&tmp), "temp path in {:?}", e.message);
    let fields = serde_json::to_string(&e.fields).unwrap();
    assert!(!fields.contains(&tmp), "temp path in {fields}");
}

/// Archive intake. Byte 0 picks the mode (bit 0: strip GitHub's top-level
/// directory; bit 1: tight limits, to reach every limit's refusal); the rest
/// is the .tar.gz as a caller would send it.
///
/// - a refusal is the caller's fault (4xx), never a crash or a 5xx;
/// - an accepted archive re-packs to itself: the canonical form is a fixed
///   point, so every host gets the same bytes for the same tree, and it is
///   taken in on the one-copy (in-order) path; a first intake that spooled
///   (files out of order) must agree byte for byte with that path;
/// - `plugin.yaml` as intake saw it is the one in the archive;
/// - nothing is left in the temp dir, whichever way it ended.
pub fn intake(data: &[u8]) {
    let Some((&mode, gz)) = data.split_first() else {
        return;
    };
    let dir = private_temp_dir();
    let limits = if mode & 2 == 0 {
        IntakeLimits::default()
    } else {
        IntakeLimits {
            max_tree_bytes: 4096,
            max_entries: 16,
            max_path_bytes: 64,
            max_depth: 4,
        }
    };
    match ingest(gz, mode & 1 == 1, &limits) {
        Err(e) => {
            assert!(e.status() < 500, "intake failed with {e:?}");
            public(&e);
        }
        Ok(first) => {
            let mut bytes = Vec::new();
            std::fs::File::open(first.archive.path())
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .expect("read the canonical archive");
            assert_eq!(bytes.len() as u64, first.archive.size);
            // The canonical archive lists each file's parent directories,
            // which count as entries: the entry limit is not the point here.
            let again_limits = IntakeLimits {
                max_entries: IntakeLimits::default().max_entries,
                ..limits.clone()
            };
            let again = ingest(bytes.as_slice(), false, &again_limits)
                .unwrap_or_else(|e| panic!("the canonical archive is refused: {e:?}"));
            assert_eq!(
                again.archive.sha256, first.archive.sha256,
                "not a fixed point"
            );
            assert_eq!(again.spooled, 0, "a canonical archive takes one copy");
            assert!(again.skipped.is_empty(), "links in a canonical archive");
            let manifest = manifest_in(first.archive.path()).expect("manifest_in");
            assert_eq!(manifest, first.archive.manifest);
            if let Some(m) = &manifest {
                let _ = Manifest::parse(m);
                if let Ok((name, _)) = derive_name(Some(m), "fallback") {
                    validate_name(&name).expect("derived names are valid");
                }
            }
        }
    }
    let left: Vec<_> = std::fs::read_dir(dir)
        .expect("list the temp dir")
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "intake left {left:?}");
}

/// Source parsing: the string a caller puts in `{"source": ...}`.
///
/// - a refusal is a 400 (a missing or malformed https pin: 422);
/// - an accepted source prints (`canonical`) as something that parses back
///   to the same source;
/// - GitHub refs pass `valid_ref`, https URLs carry no userinfo;
/// - `redacted` (what records and errors show) never holds the query.
pub fn source(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    match Source::parse(&raw) {
        Err(e) => {
            // A source's message may quote the source: no temp-path check.
            assert!(matches!(e.status(), 400 | 422), "{e:?}");
            assert!(!e.message.is_empty());
        }
        Ok(src) => {
            let canonical = src.canonical();
            let back = Source::parse(&canonical)
                .unwrap_or_else(|e| panic!("{canonical:?} does not parse back: {e:?}"));
            assert_eq!(back.canonical(), canonical);
            assert_eq!(back.redacted(), src.redacted());
            if let Some(name) = src.known_name() {
                validate_name(name).expect("a local name is valid");
            }
            match &src {
                Source::GitHub {
                    reference: Some(r), ..
                } => assert!(valid_ref(r), "ref {r:?}"),
                Source::Https { url, sha256, .. } => {
                    let authority = url["https://".len()..].split(['/', '?', '#']).next();
                    assert!(
                        !authority.unwrap_or("").contains('@'),
                        "userinfo in {url:?}"
                    );
                    if let Some((base, _)) = url.split_once('?') {
                        assert_eq!(
                            src.redacted(),
                            format!("{base}?<redacted>#sha256={sha256}"),
                            "the query of {url:?} must not be shown"
                        );
                    }
                }
                _ => {}
            }
        }
    }
}

/// The host's answer, from either transport. Byte 0 sets how the session
/// ended (exit status, signal, refused exec); the rest is stdout, then
/// stderr after the first 0xff byte.
///
/// - any answer is a result or an error, never a crash;
/// - an error is 409, 502 or 503, and says nothing the host wrote except a
///   known error code and a short plain message: host output is untrusted.
pub fn host_result(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (stdout, stderr) = match rest.iter().position(|&b| b == 0xff) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let out = HostOutput {
        exit_status: match mode & 3 {
            0 => None,
            1 => Some(0),
            2 => Some(1),
            _ => Some(u32::from(mode >> 2)),
        },
        exit_signal: (mode & 4 == 4).then(|| "KILL".to_string()),
        exec_refused: mode & 8 == 8,
        stdout: String::from_utf8_lossy(stdout).into_owned(),
        stderr: String::from_utf8_lossy(stderr).into_owned(),
    };
    match interpret(&out) {
        Ok(res) => assert_ne!(res.status, HostStatus::Error),
        Err(e) => {
            assert!(matches!(e.status(), 409 | 502 | 503), "{e:?}");
            assert!(
                e.message.len() < 200
                    && !e.message.contains('/')
                    && e.message
                        .chars()
                        .all(|c| c.is_ascii() && !c.is_ascii_control()),
                "host text in the message: {:?}",
                e.message
            );
            for (key, value) in &e.fields {
                let text = value.as_str().expect("string fields");
                match key.as_str() {
                    "host_error" => assert!(
                        text.len() <= 32
                            && text.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                        "host_error {text:?}"
                    ),
                    "host_message" => assert!(
                        text.len() <= 160 && !text.contains('/'),
                        "host_message {text:?}"
                    ),
                    other => panic!("unexpected public field {other}"),
                }
            }
        }
    }
}
