//! What the canvas reads: plugin info, runtime compatibility, the registry.

use std::sync::Arc;

use serde::Serialize;

use crate::error::Result;
use crate::plugin::{InstalledPlugin, Manifest, PluginInfo};
use crate::store::Registry;

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

/// Every published plugin, filtered by runtime when one is given. The
/// registry is a read model for the canvas: an unreadable registry or an
/// unreadable manifest shows as fewer entries, never as an error.
pub async fn registry(
    registry: &Arc<dyn Registry>,
    runtime: Option<&str>,
) -> Vec<WithSupport<PluginInfo>> {
    let names = match registry.names().await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e.message, detail = ?e.detail, "registry unreadable; answering []");
            return Vec::new();
        }
    };
    // Manifests are small and independent: fetch them concurrently.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, name) in names.into_iter().enumerate() {
        let registry = Arc::clone(registry);
        tasks.spawn(async move {
            let m: Result<Option<Vec<u8>>> = registry.manifest(&name).await;
            (i, name, m)
        });
    }
    let mut found = Vec::new();
    while let Some(Ok((i, name, m))) = tasks.join_next().await {
        let manifest = match m {
            Ok(Some(bytes)) => Manifest::parse(&bytes).unwrap_or_default(),
            Ok(None) => Manifest::default(),
            Err(e) => {
                tracing::warn!(plugin = %name, detail = ?e.detail, "manifest unreadable; skipped");
                continue;
            }
        };
        found.push((i, PluginInfo::from_manifest(&name, manifest)));
    }
    found.sort_by_key(|(i, _)| *i);
    found
        .into_iter()
        .map(|(_, p)| WithSupport {
            supported_on_runtime: runtime.map(|r| supports(&p.runtimes, r)),
            item: p,
        })
        .filter(|p| p.supported_on_runtime != Some(false))
        .collect()
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
