//! The plugin domain: names, manifests and what a workspace has installed.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::domain::error::{Error, Result};

/// `^[a-z0-9][a-z0-9._-]{0,127}$` and no `..`: the name becomes a directory
/// on the host and an S3 key segment, so nothing that could traverse passes.
pub fn validate_name(name: &str) -> Result<()> {
    let invalid = |why: &str| Error::bad_request(format!("invalid plugin name {name:?}: {why}"));
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.contains('/') || name.contains('\\') {
        return Err(invalid("it contains a path separator"));
    }
    if name.contains("..") {
        return Err(invalid("it contains '..'"));
    }
    let bytes = name.as_bytes();
    let ok_first = bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit();
    let ok_rest = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    if !ok_first || !ok_rest || name.len() > 128 {
        return Err(invalid("it must match ^[a-z0-9][a-z0-9._-]{0,127}$"));
    }
    Ok(())
}

/// Workspace ids end up in S3 keys and EC2 filters; keep them boring.
pub fn validate_workspace_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.contains("..")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::bad_request(format!("invalid workspace id {id:?}")))
    }
}

/// The fields of `plugin.yaml` the API reports. Parsing is lenient (a
/// numeric version, a missing list) because manifests are hand-written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: Option<String>,
    pub version: String,
    pub description: String,
    pub author: String,
    pub tags: Vec<String>,
    pub skills: Vec<String>,
    pub runtimes: Vec<String>,
}

impl Manifest {
    pub fn parse(yaml: &[u8]) -> Result<Manifest> {
        let doc: serde_yaml::Value = serde_yaml::from_slice(yaml)
            .map_err(|e| Error::unprocessable("plugin.yaml is not valid YAML").with_detail(e))?;
        if !(doc.is_mapping() || doc.is_null()) {
            return Err(Error::unprocessable("plugin.yaml must be a mapping"));
        }
        let scalar = |k: &str| match doc.get(k) {
            Some(serde_yaml::Value::String(s)) => s.clone(),
            Some(serde_yaml::Value::Number(n)) => n.to_string(),
            Some(serde_yaml::Value::Bool(b)) => b.to_string(),
            _ => String::new(),
        };
        let list = |k: &str| match doc.get(k) {
            Some(serde_yaml::Value::Sequence(items)) => items
                .iter()
                .filter_map(|v| match v {
                    serde_yaml::Value::String(s) => Some(s.clone()),
                    serde_yaml::Value::Number(n) => Some(n.to_string()),
                    // `skills:` entries are sometimes `{name: x, ...}` maps.
                    serde_yaml::Value::Mapping(_) => {
                        v.get("name").and_then(|n| n.as_str()).map(str::to_string)
                    }
                    _ => None,
                })
                .collect(),
            Some(serde_yaml::Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        };
        let name = scalar("name");
        Ok(Manifest {
            name: (!name.is_empty()).then_some(name),
            version: scalar("version"),
            description: scalar("description"),
            author: scalar("author"),
            tags: list("tags"),
            skills: list("skills"),
            runtimes: list("runtimes"),
        })
    }
}

/// `pluginInfo` as the canvas knows it: what `plugin.yaml` says, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub description: String,
    pub author: String,
    pub tags: Vec<String>,
    pub skills: Vec<String>,
    pub runtimes: Vec<String>,
}

impl PluginInfo {
    pub fn from_manifest(name: &str, m: Manifest) -> Self {
        PluginInfo {
            name: name.to_string(),
            version: m.version,
            description: m.description,
            author: m.author,
            tags: m.tags,
            skills: m.skills,
            runtimes: m.runtimes,
        }
    }
}

/// One entry of a workspace's desired state (flat in JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstalledPlugin {
    #[serde(flatten)]
    pub info: PluginInfo,
    pub digest: String,
    pub source: String,
    pub installed_at: String,
}

/// `workspaces/<id>/plugins.json`: what the workspace should have. Reinstalls
/// after an instance replacement are driven from this document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    #[serde(default)]
    pub plugins: BTreeMap<String, InstalledPlugin>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "hello-world", "x.y_z-1", "0abc", &"a".repeat(128)] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "A",
            "-x",
            ".x",
            "a/b",
            "a\\b",
            "a..b",
            "..",
            "é",
            "a b",
            &"a".repeat(129),
        ] {
            let e = validate_name(bad).unwrap_err();
            assert_eq!(e.status(), 400, "{bad:?}");
        }
    }

    #[test]
    fn manifest_is_lenient() {
        let m = Manifest::parse(
            b"name: demo\nversion: 1.2\ndescription: d\nauthor: me\ntags: [a, b]\nskills:\n  - one\n  - name: two\nruntimes: claude-code\n",
        )
        .unwrap();
        assert_eq!(m.name.as_deref(), Some("demo"));
        assert_eq!(m.version, "1.2");
        assert_eq!(m.tags, ["a", "b"]);
        assert_eq!(m.skills, ["one", "two"]);
        assert_eq!(m.runtimes, ["claude-code"]);
        assert_eq!(Manifest::parse(b"- x").unwrap_err().status(), 422);
        assert_eq!(Manifest::parse(b"a: [").unwrap_err().status(), 422);
    }
}
