//! What the canvas reads: plugin info and runtime compatibility.

use serde::Serialize;

use crate::domain::plugin::InstalledPlugin;

/// Anything shown to the canvas, plus whether it runs on a given runtime.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WithSupport<T> {
    #[serde(flatten)]
    pub item: T,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supported_on_runtime: Option<bool>,
}

/// Runtime names are written both ways (`claude-code`, `claude_code`).
fn normalise(runtime: &str) -> String {
    runtime.trim().to_ascii_lowercase().replace('_', "-")
}

/// A plugin supports a runtime when it lists none (runs anywhere) or lists it.
pub fn supports(runtimes: &[String], runtime: &str) -> bool {
    let want = normalise(runtime);
    runtimes.is_empty() || runtimes.iter().any(|r| normalise(r) == want)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Compatibility {
    pub target_runtime: String,
    pub compatible: Vec<String>,
    pub incompatible: Vec<String>,
    pub all_compatible: bool,
}

pub fn compatibility<'a>(
    installed: impl IntoIterator<Item = &'a InstalledPlugin>,
    runtime: &str,
) -> Compatibility {
    let (mut compatible, mut incompatible) = (Vec::new(), Vec::new());
    for p in installed {
        if supports(&p.info.runtimes, runtime) {
            compatible.push(p.info.name.clone());
        } else {
            incompatible.push(p.info.name.clone());
        }
    }
    Compatibility {
        target_runtime: runtime.to_string(),
        all_compatible: incompatible.is_empty(),
        compatible,
        incompatible,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_support() {
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(supports(&[], "anything"));
        assert!(supports(&v(&["claude_code"]), "claude-code"));
        assert!(supports(&v(&["Claude-Code", "hermes"]), "claude_code"));
        assert!(!supports(&v(&["hermes"]), "claude-code"));
    }
}
