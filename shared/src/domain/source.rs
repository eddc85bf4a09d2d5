//! Plugin sources: what the caller asked for (`local://` from the S3
//! registry, a pinned `github://owner/repo#ref`, a pinned
//! `https://...#sha256=<hex>`), parsed and checked, and what resolving one
//! yields. Fetching is a use case (`usecases::resolve`); this is the pure part.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::domain::archive::ArchiveFile;
use crate::domain::error::{Error, Result};
use crate::domain::intake::Skipped;
use crate::domain::plugin::{validate_name, Manifest};

/// Registered schemes, sorted.
pub const SCHEMES: &[&str] = &["github", "https", "local"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A plugin published under `registry/<name>/` in the bucket.
    Local { name: String },
    /// A GitHub repository at a tag, branch or commit (`None`: unpinned).
    GitHub {
        owner: String,
        repo: String,
        reference: Option<String>,
    },
    /// An archive at an https URL, pinned by its SHA-256.
    Https {
        url: String,
        sha256: String,
        stem: String,
    },
}

/// `[A-Za-z0-9][A-Za-z0-9_.-]{0,99}`: GitHub owner and repository names.
fn github_segment(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 100
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A git ref name as `git check-ref-format` allows it (and no option-like
/// `-` first). Dot segments in particular never reach the URL: a ref like
/// `../../other/repo` would otherwise name another repository's path.
pub fn valid_ref(r: &str) -> bool {
    let bad_char = |c: char| {
        c.is_control() || c.is_whitespace() || matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\')
    };
    !r.is_empty()
        && r.len() <= 255
        && r != "@"
        && !r.starts_with('-')
        && !r.ends_with('.')
        && !r.contains("..")
        && !r.contains("@{")
        && !r.chars().any(bad_char)
        && r.split('/')
            .all(|seg| !seg.is_empty() && !seg.starts_with('.') && !seg.ends_with(".lock"))
}

fn parse_github(spec: &str) -> Result<Source> {
    let (path, reference) = match spec.split_once('#') {
        Some((p, r)) => (p, Some(r)),
        None => (spec, None),
    };
    let invalid = || Error::bad_request("invalid plugin source");
    let (owner, repo) = path.split_once('/').ok_or_else(invalid)?;
    if !github_segment(owner) || !github_segment(repo) {
        return Err(invalid());
    }
    if let Some(r) = reference {
        if !valid_ref(r) {
            return Err(invalid());
        }
    }
    Ok(Source::GitHub {
        owner: owner.to_string(),
        repo: repo.to_string(),
        reference: reference.map(str::to_string),
    })
}

fn parse_https(raw: &str) -> Result<Source> {
    let (url, fragment) = match raw.split_once('#') {
        Some((u, f)) => (u, Some(f)),
        None => (raw, None),
    };
    let Some(hex) = fragment.and_then(|f| f.strip_prefix("sha256=")) else {
        return Err(Error::unprocessable(
            "https sources must pin the archive: append #sha256=<hex of the archive>",
        ));
    };
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::unprocessable(
            "the #sha256= pin must be 64 hexadecimal characters",
        ));
    }
    let parsed = url::Url::parse(url).map_err(|_| Error::bad_request("invalid plugin source"))?;
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(Error::bad_request("invalid plugin source"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(Error::bad_request(
            "https sources must not carry credentials in the URL",
        ));
    }
    // What is fetched is exactly what was written (and what an allowlist
    // prefix is compared with): no dot segments, encoded dots, backslashes
    // or case games that the URL parser would resolve differently.
    if parsed.as_str() != url {
        return Err(Error::bad_request(format!(
            "write the source URL in its normal form: {}",
            parsed.as_str()
        )));
    }
    let file = parsed
        .path_segments()
        .and_then(|mut s| s.next_back())
        .unwrap_or_default();
    let stem = [".tar.gz", ".tgz", ".gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
        .unwrap_or(file)
        .to_string();
    Ok(Source::Https {
        url: url.to_string(),
        sha256: hex.to_ascii_lowercase(),
        stem,
    })
}

impl Source {
    /// `local://<name>` or a bare `<name>`.
    pub fn parse(raw: &str) -> Result<Source> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(Error::bad_request("source must not be empty"));
        }
        let (scheme, spec) = match raw.split_once("://") {
            Some((s, rest)) => (s, rest),
            None => ("local", raw),
        };
        // RFC 3986 scheme syntax; anything else is not a source at all.
        let mut chars = scheme.chars();
        let scheme_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-'));
        if !scheme_ok || spec.is_empty() {
            return Err(Error::bad_request("invalid plugin source"));
        }
        match scheme {
            "local" => {
                validate_name(spec)?;
                Ok(Source::Local {
                    name: spec.to_string(),
                })
            }
            "github" => parse_github(spec),
            "https" => parse_https(raw),
            "http" => Err(Error::bad_request(
                "plain http:// sources are refused; use https:// with a #sha256= pin",
            )
            .with_field("available_schemes", serde_json::json!(SCHEMES))),
            other => Err(
                Error::bad_request(format!("unsupported plugin source scheme {other:?}"))
                    .with_field("available_schemes", serde_json::json!(SCHEMES)),
            ),
        }
    }

    /// The plugin's name on the host when the source alone decides it
    /// (the registry name); other sources name it from what they fetch.
    pub fn known_name(&self) -> Option<&str> {
        match self {
            Source::Local { name } => Some(name),
            _ => None,
        }
    }

    pub fn scheme(&self) -> &'static str {
        match self {
            Source::Local { .. } => "local",
            Source::GitHub { .. } => "github",
            Source::Https { .. } => "https",
        }
    }

    pub fn stem(&self) -> &str {
        match self {
            Source::Https { stem, .. } => stem,
            _ => "",
        }
    }

    /// The source as records, logs and errors show it: an https URL's
    /// query string (a signed URL's credentials) left out.
    pub fn redacted(&self) -> String {
        match self {
            Source::Https { url, sha256, .. } => match url.split_once('?') {
                Some((base, _)) => format!("{base}?<redacted>#sha256={sha256}"),
                None => self.canonical(),
            },
            _ => self.canonical(),
        }
    }

    pub fn canonical(&self) -> String {
        match self {
            Source::Local { name } => format!("local://{name}"),
            Source::GitHub {
                owner,
                repo,
                reference: Some(r),
            } => format!("github://{owner}/{repo}#{r}"),
            Source::GitHub {
                owner,
                repo,
                reference: None,
            } => format!("github://{owner}/{repo}"),
            Source::Https { url, sha256, .. } => format!("{url}#sha256={sha256}"),
        }
    }
}

/// The name on the host for a fetched plugin: `plugin.yaml`'s `name` when
/// it is a valid plugin name, else the repository name or file stem.
pub fn derive_name(manifest: Option<&[u8]>, fallback: &str) -> Result<(String, NameFrom)> {
    let declared = manifest
        .and_then(|m| Manifest::parse(m).ok())
        .and_then(|m| m.name);
    if let Some(n) = declared.filter(|n| validate_name(n).is_ok()) {
        return Ok((n, NameFrom::PluginYaml));
    }
    let lowered = fallback.to_ascii_lowercase();
    validate_name(&lowered).map_err(|_| {
        Error::unprocessable(format!(
            "cannot derive a plugin name: plugin.yaml has no valid name and {fallback:?} is not one"
        ))
    })?;
    Ok((lowered, NameFrom::Source))
}

/// What decided a plugin's name on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum NameFrom {
    /// The registry folder it is published under.
    #[serde(rename = "registry")]
    Registry,
    /// The `name` in its `plugin.yaml`.
    #[serde(rename = "plugin.yaml")]
    PluginYaml,
    /// The repository name or the archive's file name.
    #[serde(rename = "source")]
    Source,
}

/// One file of a plugin in the registry.
#[derive(Debug, Clone)]
pub struct RegistryFile {
    /// Path inside the plugin (`skills/x/SKILL.md`).
    pub path: String,
    pub key: String,
    pub size: u64,
    /// ETag and last-modified time: together they change whenever the
    /// object's bytes or metadata do.
    pub version: String,
}

/// A plugin's canonical archive on local disk.
#[derive(Debug)]
pub struct Resolved {
    pub archive: ArchiveFile,
    /// Set when a registry archive was built: record it under this
    /// fingerprint once it is staged.
    pub fingerprint: Option<String>,
    /// Recalled from the staged archives (already in S3).
    pub recalled: bool,
    /// The plugin's name on the host, and what decided it.
    pub name: String,
    pub name_from: NameFrom,
    /// Symlinks and hardlinks that were dropped.
    pub skipped: Vec<Skipped>,
}

/// Identifies a registry listing: paths, sizes and object versions, plus
/// the archive format, so any change to the source or to the way archives
/// are built yields a new fingerprint.
pub fn fingerprint(files: &[RegistryFile]) -> String {
    let mut h = Sha256::new();
    h.update(b"plugin-delivery canonical archive v1\n");
    for f in files {
        h.update(f.path.as_bytes());
        h.update(format!("\0{}\0{}\n", f.size, f.version).as_bytes());
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            Source::parse(" hello ").unwrap(),
            Source::Local {
                name: "hello".into()
            }
        );
        assert_eq!(
            Source::parse("local://x-1").unwrap().canonical(),
            "local://x-1"
        );
        assert_eq!(Source::parse("").unwrap_err().status(), 400);
        for bad in ["local://", "1x://a", "a b://c", "://x"] {
            let e = Source::parse(bad).unwrap_err();
            assert_eq!(
                (e.status(), e.message.as_str()),
                (400, "invalid plugin source"),
                "{bad}"
            );
        }
        assert_eq!(Source::parse("local://../etc").unwrap_err().status(), 400);
        let e = Source::parse("ftp://x").unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.fields.contains_key("available_schemes"));
    }

    #[test]
    fn query_strings_never_reach_records_or_errors() {
        let pin = "b".repeat(64);
        let signed = Source::parse(&format!(
            "https://bucket.example/p.tgz?X-Amz-Signature=secret&X-Amz-Credential=AKIA#sha256={pin}"
        ))
        .unwrap();
        assert_eq!(
            signed.redacted(),
            format!("https://bucket.example/p.tgz?<redacted>#sha256={pin}")
        );
        assert!(
            signed.canonical().contains("secret"),
            "kept where the fetch needs it"
        );
        let plain = Source::parse("github://acme/tools#v1").unwrap();
        assert_eq!(plain.redacted(), plain.canonical());
    }

    #[test]
    fn refs_follow_git_rules_and_urls_their_normal_form() {
        for ok in [
            "v1.0.0",
            "release/v1",
            "main",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            assert!(valid_ref(ok), "{ok}");
        }
        for bad in [
            "../../../evil/payload/tarball/main",
            "a/../b",
            "a..b",
            ".hidden",
            "a/.b",
            "x.lock",
            "a//b",
            "/a",
            "a/",
            "a.",
            "@",
            "a@{1}",
            "a b",
            "a~1",
            "a^",
            "a:b",
            "a?",
            "a*",
            "a[",
            "a\\b",
            "-x",
        ] {
            assert!(!valid_ref(bad), "{bad}");
            assert_eq!(
                Source::parse(&format!("github://acme/tools#{bad}"))
                    .unwrap_err()
                    .status(),
                400,
                "{bad}"
            );
        }
        let pin = "a".repeat(64);
        Source::parse(&format!("https://plugins.acme.example/p.tgz#sha256={pin}")).unwrap();
        for bad in [
            "https://plugins.acme.example/acme/../evil/p.tgz",
            "https://plugins.acme.example/acme/%2e%2e/evil/p.tgz",
            "https://plugins.acme.example/acme\\..\\evil/p.tgz",
            "https://PLUGINS.acme.example/p.tgz",
            "https://plugins.acme.example:443/p.tgz",
            "https://user:pw@plugins.acme.example/p.tgz",
        ] {
            let e = Source::parse(&format!("{bad}#sha256={pin}")).unwrap_err();
            assert_eq!(e.status(), 400, "{bad}");
        }
    }
}
