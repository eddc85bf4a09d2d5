//! An org's plugin allowlist: which plugin names its workspaces may get,
//! each bound to the sources it may come from and, optionally, the one
//! archive digest it must have. Checked in two steps: the source before
//! anything is fetched (`admit_source`), then the name the archive gives
//! itself and its digest (`admit_archive`), so a fetched archive cannot
//! borrow an allowlisted name.
//!
//! Stored and accepted as `{"plugins": [entry, ...]}`. An entry is either
//! the old form, a bare name (`"hello-world"`: that plugin from the
//! registry, `local://hello-world`, only), or
//! `{"name": "tools", "sources": ["github://acme/"], "digest": "<sha256>"}`.
//! A source pattern is a whole source (`github://acme/tools#v1.2`) or a
//! prefix ending in `/` (`github://acme/`, `https://plugins.acme.example/`).
//! An empty list allows every plugin from every source.

use serde::{Deserialize, Serialize};

use crate::domain::error::{Error, ErrorKind, Result};
use crate::domain::plugin::validate_name;
use crate::domain::source::Source;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowEntry {
    pub name: String,
    pub sources: Vec<String>,
    /// SHA-256 of the canonical archive (the `digest` installs report).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowlist {
    #[serde(default)]
    pub plugins: Vec<AllowEntry>,
}

/// Both forms of an entry, as stored or sent.
#[derive(Deserialize)]
#[serde(untagged)]
enum EntryForm {
    Name(String),
    Full {
        name: String,
        #[serde(default)]
        sources: Option<Vec<String>>,
        #[serde(default)]
        digest: Option<String>,
    },
}

impl<'de> Deserialize<'de> for AllowEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(match EntryForm::deserialize(d)? {
            EntryForm::Name(name) => AllowEntry::registry(name),
            EntryForm::Full {
                name,
                sources,
                digest,
            } => AllowEntry {
                sources: sources.unwrap_or_else(|| vec![format!("local://{name}")]),
                name,
                digest,
            },
        })
    }
}

impl AllowEntry {
    /// The old form: the plugin of that name from the registry only.
    pub fn registry(name: String) -> AllowEntry {
        AllowEntry {
            sources: vec![format!("local://{name}")],
            name,
            digest: None,
        }
    }

    /// 400 unless every part is well formed. Sorted and deduplicated.
    pub fn validate(mut self) -> Result<AllowEntry> {
        validate_name(&self.name)?;
        if self.sources.is_empty() {
            return Err(Error::bad_request(format!(
                "allowlist entry {:?} has no sources",
                self.name
            )));
        }
        for s in &self.sources {
            validate_pattern(s, &self.name)?;
        }
        self.sources.sort();
        self.sources.dedup();
        if let Some(d) = &mut self.digest {
            let ok = d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit());
            if !ok {
                return Err(Error::bad_request(format!(
                    "allowlist entry {:?}: digest must be 64 hexadecimal characters",
                    self.name
                )));
            }
            *d = d.to_ascii_lowercase();
        }
        Ok(self)
    }

    fn admits(&self, canonical: &str) -> bool {
        self.sources.iter().any(|p| {
            if p.ends_with('/') {
                canonical.starts_with(p.as_str())
            } else {
                canonical == p
            }
        })
    }
}

/// A source pattern: a whole source, or a `github://owner/` or
/// `https://host/...` prefix ending in `/`.
fn validate_pattern(p: &str, name: &str) -> Result<()> {
    let error =
        |why: &str| Error::bad_request(format!("allowlist entry {name:?}: source {p:?} {why}"));
    let bad = |why: &str| Err(error(why));
    if p.ends_with('/') {
        if let Some(rest) = p.strip_prefix("github://") {
            let owner = rest.trim_end_matches('/');
            if owner.is_empty() || owner.contains('/') {
                return bad("must be github://<owner>/ when it is a prefix");
            }
            return Ok(());
        }
        if let Some(rest) = p.strip_prefix("https://") {
            let host = rest.split('/').next().unwrap_or("");
            if host.is_empty() || host.contains('@') {
                return bad("must name a host (https://<host>/...)");
            }
            return Ok(());
        }
        return bad("is a prefix of no source we fetch (github:// or https://)");
    }
    let source = Source::parse(p).map_err(|_| error("is not a valid source"))?;
    if source.canonical() != p {
        return Err(Error::bad_request(format!(
            "allowlist entry {name:?}: write source {p:?} as {:?}",
            source.canonical()
        )));
    }
    if let Some(known) = source.known_name() {
        if known != name {
            return bad("names another plugin");
        }
    }
    Ok(())
}

fn refused(message: String) -> Error {
    Error::new(ErrorKind::Forbidden, message)
}

impl Allowlist {
    /// Validated entries, sorted by name then sources, without duplicates.
    pub fn new(entries: Vec<AllowEntry>) -> Result<Allowlist> {
        let mut plugins = entries
            .into_iter()
            .map(AllowEntry::validate)
            .collect::<Result<Vec<_>>>()?;
        plugins.sort_by(|a, b| (&a.name, &a.sources).cmp(&(&b.name, &b.sources)));
        plugins.dedup();
        Ok(Allowlist { plugins })
    }

    pub fn allows_all(&self) -> bool {
        self.plugins.is_empty()
    }

    /// Step one, before anything is fetched: some entry admits `source`
    /// (and, when the source names its plugin, an entry of that name).
    pub fn admit_source(&self, source: &Source) -> Result<()> {
        if self.allows_all() {
            return Ok(());
        }
        let canonical = source.canonical();
        let mut admitting = self.plugins.iter().filter(|e| e.admits(&canonical));
        let found = match source.known_name() {
            Some(name) => admitting.any(|e| e.name == name),
            None => admitting.next().is_some(),
        };
        if found {
            Ok(())
        } else {
            Err(refused(format!(
                "the org allowlist admits no plugin from {}",
                source.redacted()
            )))
        }
    }

    /// Whether `admit_archive` admits `name` from `source` whatever its
    /// digest: an archive that passes can be sent on before its digest is
    /// known.
    pub fn admits_any_digest(&self, source: &Source, name: &str) -> bool {
        let canonical = source.canonical();
        self.allows_all()
            || self
                .plugins
                .iter()
                .any(|e| e.name == name && e.admits(&canonical) && e.digest.is_none())
    }

    /// Step two, once the archive is known: an entry admits this source
    /// under the name the archive gives itself, with its digest.
    pub fn admit_archive(&self, source: &Source, name: &str, digest: &str) -> Result<()> {
        if self.allows_all() {
            return Ok(());
        }
        let canonical = source.canonical();
        let named: Vec<&AllowEntry> = self
            .plugins
            .iter()
            .filter(|e| e.name == name && e.admits(&canonical))
            .collect();
        if named.is_empty() {
            return Err(refused(format!(
                "plugin {name:?} from {} is not in the org allowlist",
                source.redacted()
            )));
        }
        if named
            .iter()
            .any(|e| e.digest.as_deref().is_none_or(|d| d == digest))
        {
            Ok(())
        } else {
            Err(refused(format!(
                "plugin {name:?} does not have the digest the org allowlist pins"
            ))
            .with_field("actual_digest", serde_json::json!(digest)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(json: &str) -> Allowlist {
        let l: Allowlist = serde_json::from_str(json).unwrap();
        Allowlist::new(l.plugins).unwrap()
    }

    fn src(s: &str) -> Source {
        Source::parse(s).unwrap()
    }

    const PIN: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn the_old_form_means_the_registry_plugin_only() {
        let l = list(r#"{"plugins": ["hello-world"]}"#);
        l.admit_source(&src("local://hello-world")).unwrap();
        l.admit_archive(&src("local://hello-world"), "hello-world", "ab")
            .unwrap();
        // A fetched archive calling itself hello-world is not admitted.
        let gh = src("github://evil/x#main");
        assert_eq!(l.admit_source(&gh).unwrap_err().status(), 403);
        assert_eq!(
            l.admit_archive(&gh, "hello-world", "ab")
                .unwrap_err()
                .status(),
            403
        );
        assert_eq!(
            l.admit_source(&src("local://other")).unwrap_err().status(),
            403
        );
        let back = serde_json::to_value(&l).unwrap();
        assert_eq!(
            back,
            serde_json::json!({"plugins": [{"name": "hello-world", "sources": ["local://hello-world"]}]})
        );
    }

    #[test]
    fn prefixes_bind_names_and_digests() {
        let l = list(&format!(
            r#"{{"plugins": [{{"name": "tools", "sources": ["github://acme/"]}},
                {{"name": "pinned", "sources": ["https://plugins.acme.example/"], "digest": "{PIN}"}}]}}"#
        ));
        let acme = src("github://acme/tools#v1");
        l.admit_source(&acme).unwrap();
        l.admit_archive(&acme, "tools", "ab").unwrap();
        // Same prefix, another name: borrowing is refused after the fetch.
        assert_eq!(
            l.admit_archive(&acme, "pinned", PIN).unwrap_err().status(),
            403
        );
        // github://acmeevil/ is not under github://acme/.
        assert!(l.admit_source(&src("github://acmeevil/tools#v1")).is_err());
        let https = src(&format!(
            "https://plugins.acme.example/p.tgz#sha256={}",
            "1".repeat(64)
        ));
        l.admit_source(&https).unwrap();
        l.admit_archive(&https, "pinned", PIN).unwrap();
        let e = l.admit_archive(&https, "pinned", "ab").unwrap_err();
        assert_eq!(
            (e.status(), e.fields["actual_digest"].as_str()),
            (403, Some("ab"))
        );
        // Only an entry without a digest admits an archive before its
        // digest is known; an empty list admits everything.
        assert!(l.admits_any_digest(&acme, "tools"));
        assert!(!l.admits_any_digest(&https, "pinned"));
        assert!(!l.admits_any_digest(&acme, "pinned"));
        assert!(list(r#"{"plugins": []}"#).admits_any_digest(&https, "pinned"));
        assert!(l
            .admit_source(&src(&format!(
                "https://plugins.acme.example.evil.test/p.tgz#sha256={}",
                "1".repeat(64)
            )))
            .is_err());
    }

    #[test]
    fn entries_are_checked_when_written() {
        let bad = |json: &str| {
            let l: Allowlist = serde_json::from_str(json).unwrap();
            Allowlist::new(l.plugins).unwrap_err().status()
        };
        assert_eq!(bad(r#"{"plugins": [{"name": "x", "sources": []}]}"#), 400);
        assert_eq!(
            bad(r#"{"plugins": [{"name": "x", "sources": ["github://"]}]}"#),
            400
        );
        assert_eq!(
            bad(r#"{"plugins": [{"name": "x", "sources": ["github://a/b/"]}]}"#),
            400
        );
        assert_eq!(
            bad(r#"{"plugins": [{"name": "x", "sources": ["local://y"]}]}"#),
            400
        );
        assert_eq!(
            bad(r#"{"plugins": [{"name": "x", "sources": ["ftp://h/"]}]}"#),
            400
        );
        assert_eq!(
            bad(r#"{"plugins": [{"name": "x", "sources": ["https://u@h/"]}]}"#),
            400
        );
        assert_eq!(bad(r#"{"plugins": [{"name": "x", "digest": "abc"}]}"#), 400);
        assert_eq!(bad(r#"{"plugins": ["../x"]}"#), 400);
        assert!(Allowlist::default().allows_all());
    }
}
