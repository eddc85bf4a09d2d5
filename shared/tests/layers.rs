//! The architecture, checked: every `crate::` and `super::` path in `src/`
//! (and `lib.rs`'s re-exports) is resolved to the module file it names, and
//! the test fails when an import points up or across a layer (`allowed`:
//! entry → use cases → ports ← adapters, domain at the bottom, app on top)
//! or when two modules import each other, directly or around a loop. Test
//! modules (`#[cfg(test)] mod tests`) may wire anything and are left out.
//! It reads source text, not the compiler's view: paths through macros or
//! `use crate as x;` aliases are not seen.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// A module's layer: the first segment of its path.
fn layer(module: &str) -> &str {
    match module.split("::").next().unwrap_or_default() {
        "" => "crate root",
        top => top,
    }
}

/// Which layers each layer may import (its own included).
fn allowed(from: &str, to: &str) -> bool {
    let may: &[&str] = match layer(from) {
        "domain" => &["domain"],
        "ports" => &["ports", "domain"],
        "adapters" => &["adapters", "ports", "domain"],
        "usecases" => &["usecases", "ports", "domain"],
        "entry" => &["entry", "usecases", "ports", "domain"],
        _ => return true,
    };
    may.contains(&layer(to))
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

/// The code of a file without its test module (`#[cfg(test)] mod tests`).
fn production_code(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// `lib.rs`'s re-exports (`pub use app::App;`): name → the path it stands for.
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in lib.lines() {
        let Some(path) = line
            .trim()
            .strip_prefix("pub use ")
            .and_then(|l| l.strip_suffix(';'))
        else {
            continue;
        };
        match path.split_once("::{") {
            Some((head, items)) => {
                for item in items.trim_end_matches('}').split(',') {
                    out.insert(item.trim().to_string(), format!("{head}::{}", item.trim()));
                }
            }
            None => {
                let name = path.rsplit("::").next().unwrap_or_default();
                out.insert(name.to_string(), path.to_string());
            }
        }
    }
    out
}

/// Every path written after `crate::`, with `{a, b::c}` groups expanded.
fn crate_paths(code: &str) -> Vec<String> {
    paths_after(code, "crate::")
}

/// Every path written after `marker`, with `{a, b::c}` groups expanded.
fn paths_after(code: &str, marker: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(marker) {
        rest = &rest[i + marker.len()..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let head = rest[..end].trim_end_matches(':');
        if rest[end..].starts_with('{') && (head.is_empty() || rest[..end].ends_with("::")) {
            let close = rest[end..].find('}').map(|j| end + j).unwrap_or(rest.len());
            for item in rest[end + 1..close].split(',') {
                let item = item.trim().split(" as ").next().unwrap_or_default();
                let item = item.trim_end_matches("::{").trim();
                if !item.is_empty() && item != "self" {
                    out.push(if head.is_empty() {
                        item.to_string()
                    } else {
                        format!("{head}::{item}")
                    });
                }
            }
            if !head.is_empty() {
                out.push(head.to_string());
            }
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

/// A `tests.rs` declared as `#[cfg(test)] mod tests;` by its parent.
fn test_only(path: &Path) -> bool {
    let Some(dir) = path.parent() else {
        return false;
    };
    path.file_name().is_some_and(|n| n == "tests.rs")
        && std::fs::read_to_string(dir.join("mod.rs"))
            .is_ok_and(|m| m.contains("#[cfg(test)]\nmod tests;"))
}

/// The modules each module imports: `crate::` paths, `super::` paths and
/// `lib.rs`'s re-exports, resolved to module files.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut known = BTreeMap::new();
    modules(Path::new(SRC), "", &mut known);
    let lib = std::fs::read_to_string(Path::new(SRC).join("lib.rs")).unwrap();
    let re = reexports(&lib);
    let mut g = BTreeMap::new();
    for (module, path) in &known {
        if module.is_empty() || test_only(path) {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        let code = production_code(&text);
        let parent = module.rsplit_once("::").map(|(p, _)| p).unwrap_or("");
        let mut paths = crate_paths(code);
        paths.extend(paths_after(code, "super::").into_iter().map(|p| {
            if parent.is_empty() {
                p
            } else {
                format!("{parent}::{p}")
            }
        }));
        let deps: BTreeSet<String> = paths
            .into_iter()
            .map(|p| {
                let first = p.split("::").next().unwrap_or_default().to_string();
                match re.get(&first) {
                    Some(full) => p.replacen(&first, full, 1),
                    None => p,
                }
            })
            .filter_map(|p| resolve(&p, &known))
            .filter(|m| m != module && !m.is_empty())
            // A parent module's index (`mod.rs`) names its children.
            .filter(|m| !m.starts_with(&format!("{module}::")))
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
                wrong.push(format!("{from} imports {to}"));
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
