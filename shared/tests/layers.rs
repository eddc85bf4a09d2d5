//! The architecture, checked: every `crate::` path in `src/` is resolved to
//! the module file it names, and the test fails when an import points up a
//! layer (domain < ports < adapters | use cases < entry < app; adapters and
//! use cases never see each other) or when two modules import each other,
//! directly or around a loop. Test code (`tests.rs`, `#[cfg(test)]`
//! sections) may wire anything and is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// A module's place: its layer's rank, and the layer's name.
fn layer(module: &str) -> (u8, &'static str) {
    let top = module.split("::").next().unwrap_or_default();
    match top {
        "domain" => (0, "domain"),
        "ports" => (1, "ports"),
        "adapters" => (2, "adapters"),
        "usecases" => (2, "usecases"),
        "entry" => (3, "entry"),
        "app" => (4, "app"),
        _ => (5, "crate root"),
    }
}

fn allowed(from: &str, to: &str) -> bool {
    let ((rf, lf), (rt, lt)) = (layer(from), layer(to));
    rt < rf || (rt == rf && lf == lt)
}

/// Every `.rs` file under `dir` with its module path (`usecases::install`).
fn modules(dir: &Path, prefix: &str, out: &mut BTreeMap<String, PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let module = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}::{name}")
        };
        if path.is_dir() {
            modules(&path, &module, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let module = match name.as_str() {
                "mod" => prefix.to_string(),
                "lib" => String::new(),
                _ => module,
            };
            out.insert(module, path);
        }
    }
}

/// The code of a file without its test sections.
fn production_code(text: &str) -> &str {
    match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// Every path written after `crate::`, with `{a, b::c}` groups expanded.
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let head = rest[..end].trim_end_matches(':');
        if rest[end..].starts_with('{') && rest[..end].ends_with("::") {
            let close = rest[end..].find('}').map(|j| end + j).unwrap_or(rest.len());
            for item in rest[end + 1..close].split(',') {
                let item = item.trim().split(" as ").next().unwrap_or_default();
                if !item.is_empty() && item != "self" {
                    out.push(format!("{head}::{item}"));
                }
            }
            out.push(head.to_string());
        } else {
            out.push(head.to_string());
        }
    }
    out
}

/// The longest module that `path` starts with.
fn resolve(path: &str, known: &BTreeMap<String, PathBuf>) -> Option<String> {
    let segs: Vec<&str> = path.split("::").collect();
    (1..=segs.len())
        .rev()
        .map(|n| segs[..n].join("::"))
        .find(|m| known.contains_key(m))
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut known = BTreeMap::new();
    modules(Path::new(SRC), "", &mut known);
    let mut g = BTreeMap::new();
    for (module, path) in &known {
        if path.file_name().is_some_and(|n| n == "tests.rs") || module.is_empty() {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        let deps: BTreeSet<String> = crate_paths(production_code(&text))
            .iter()
            .filter_map(|p| resolve(p, &known))
            .filter(|m| m != module && !m.is_empty())
            // A parent module's index (`mod.rs`) names its children.
            .filter(|m| !module.is_empty() && !m.starts_with(&format!("{module}::")))
            .collect();
        g.insert(module.clone(), deps);
    }
    g
}

#[test]
fn imports_only_point_down() {
    let g = graph();
    assert!(g.len() > 20, "found only {} modules under {SRC}", g.len());
    let mut wrong = Vec::new();
    for (from, deps) in &g {
        for to in deps {
            if !allowed(from, to) {
                wrong.push(format!(
                    "{from} ({}) imports {to} ({})",
                    layer(from).1,
                    layer(to).1
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports pointing up or across:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let g = graph();
    // Depth-first search for a path back to where it started.
    fn back(
        g: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        seen: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> bool {
        for next in g.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if back(g, start, next, seen, path) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut loops = Vec::new();
    for start in g.keys() {
        let mut path = vec![start.clone()];
        if back(&g, start, start, &mut BTreeSet::new(), &mut path) {
            loops.push(path.join(" -> "));
        }
    }
    assert!(loops.is_empty(), "import loops:\n{}", loops.join("\n"));
}

#[test]
fn the_checker_sees_what_it_must() {
    let paths =
        crate_paths("use crate::domain::{error::Error, plugin as p};\nx = crate::ports::Deps;");
    assert_eq!(
        paths,
        [
            "domain::error::Error",
            "domain::plugin",
            "domain",
            "ports::Deps"
        ]
    );
    assert!(!allowed("domain::plugin", "ports"));
    assert!(!allowed("usecases::install", "adapters::s3"));
    assert!(!allowed("adapters::s3", "usecases::install"));
    assert!(allowed("usecases::install", "ports"));
    assert!(allowed("entry::api", "usecases::install"));
    assert!(!allowed("ports", "usecases::install"));
}
