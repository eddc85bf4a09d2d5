//! Who is calling, and what they may do. A verified token's claims become a
//! `Caller` (org, optional workspace, scopes, platform); every route asks it
//! the same three questions: is the scope there (403), is the workspace or
//! org the caller's own (404, with the very body an unknown workspace gets,
//! so no answer tells one org anything about another's), and may it act on
//! the whole org (workspace tokens may not change org settings).
//!
//! A workspace's org is its instance's `molecule:org-id` tag. A workspace
//! with no org, or instances that disagree, belongs to nobody: refused for
//! every caller, the platform included (fail closed).

use serde::{Deserialize, Serialize};

use crate::domain::error::{Error, ErrorKind, Result};
use crate::domain::plugin::validate_workspace_id;

/// What a token may do. Granted one by one in the token's `scope` claim
/// (space-separated, as OAuth writes it): `admin` does not imply `write`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Read routes: listings, records, the catalog, the allowlist.
    Read,
    /// Install, uninstall, download (which fetches and stages).
    Write,
    /// The org allowlist.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Scope::Read => 1,
            Scope::Write => 2,
            Scope::Admin => 4,
        }
    }
}

/// The scope that makes a token the platform's own service principal:
/// it may act on any org (fleet rollouts, support). Only the platform's
/// issuer mints it, for its own services.
pub const PLATFORM_SCOPE: &str = "platform";

/// The claims we read from a verified token (`iss`, `aud`, `exp` are
/// checked by the verifier before these are looked at).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Claims {
    #[serde(default)]
    pub sub: Option<String>,
    /// The tenant. Required, except on a platform token.
    #[serde(default)]
    pub org_id: Option<String>,
    /// A workspace token may act on this workspace only.
    #[serde(default)]
    pub workspace_id: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
}

/// Serialized only into our own queue's jobs (never read from callers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub subject: String,
    /// Empty for a platform token without an org.
    pub org: String,
    pub workspace: Option<String>,
    scopes: u8,
    pub platform: bool,
}

/// 401: the one answer for a missing, expired, forged or foreign token.
pub fn unauthorized(detail: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Unauthorized,
        "a valid bearer token from the platform is required",
    )
    .with_detail(detail)
}

/// The 404 of a workspace the caller may not see: the same body whether it
/// does not exist, has no running instance, or is another org's.
pub fn unknown_workspace(workspace: &str) -> Error {
    Error::not_found(format!("workspace {workspace:?} was not found"))
}

/// The 404 of an org other than the caller's.
pub fn unknown_org(org: &str) -> Error {
    Error::not_found(format!("org {org:?} was not found"))
}

impl Caller {
    /// The caller a verified token describes; 401 when the claims do not
    /// name one (no org, or ids we could never match).
    pub fn from_claims(c: Claims) -> Result<Caller> {
        let mut scopes = 0;
        let mut platform = false;
        for s in c.scope.as_deref().unwrap_or("").split_whitespace() {
            match s {
                "read" => scopes |= Scope::Read.bit(),
                "write" => scopes |= Scope::Write.bit(),
                "admin" => scopes |= Scope::Admin.bit(),
                PLATFORM_SCOPE => platform = true,
                _ => {}
            }
        }
        let org = c.org_id.unwrap_or_default();
        if org.is_empty() && !platform {
            return Err(unauthorized("token has no org_id claim"));
        }
        if !org.is_empty() && validate_workspace_id(&org).is_err() {
            return Err(unauthorized(format!("token org_id {org:?} is not an id")));
        }
        let workspace = c.workspace_id.filter(|w| !w.is_empty());
        if let Some(ws) = &workspace {
            if validate_workspace_id(ws).is_err() {
                return Err(unauthorized(format!(
                    "token workspace_id {ws:?} is not an id"
                )));
            }
        }
        Ok(Caller {
            subject: c.sub.unwrap_or_default(),
            org,
            workspace,
            scopes,
            platform,
        })
    }

    /// The functions themselves, for work they start (EventBridge events,
    /// queued jobs whose caller was checked when they were queued).
    pub fn system() -> Caller {
        Caller {
            subject: "plugin-delivery".into(),
            org: String::new(),
            workspace: None,
            scopes: Scope::Read.bit() | Scope::Write.bit() | Scope::Admin.bit(),
            platform: true,
        }
    }

    pub fn has(&self, scope: Scope) -> bool {
        self.scopes & scope.bit() != 0
    }

    /// 403 unless the token carries `scope`.
    pub fn require(&self, scope: Scope) -> Result<()> {
        if self.has(scope) {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Forbidden,
                format!("this token lacks the {:?} scope", scope.as_str()),
            )
            .with_field("required_scope", serde_json::json!(scope.as_str())))
        }
    }

    /// Whether the caller may act on workspace `ws`, whose org is `org`
    /// (`None`: no instance, or no or conflicting org tags). 404 otherwise.
    pub fn check_workspace(&self, ws: &str, org: Option<&str>) -> Result<()> {
        let Some(org) = org else {
            return Err(unknown_workspace(ws).with_detail("no instance with a single org tag"));
        };
        if self.workspace.as_deref().is_some_and(|w| w != ws) {
            return Err(unknown_workspace(ws).with_detail(format!(
                "workspace token of {:?}",
                self.workspace.as_deref().unwrap_or_default()
            )));
        }
        if !self.platform && self.org != org {
            return Err(unknown_workspace(ws)
                .with_detail(format!("caller org {:?}, workspace org {org:?}", self.org)));
        }
        Ok(())
    }

    /// Whether the caller may see org `org`'s settings. 404 otherwise.
    pub fn check_org(&self, org: &str) -> Result<()> {
        if self.platform || self.org == org {
            Ok(())
        } else {
            Err(unknown_org(org).with_detail(format!("caller org {:?}", self.org)))
        }
    }

    /// 403 for a workspace token: it speaks for one workspace, not the org.
    pub fn require_org_wide(&self) -> Result<()> {
        match &self.workspace {
            None => Ok(()),
            Some(_) => Err(Error::new(
                ErrorKind::Forbidden,
                "a workspace token cannot change org settings",
            )),
        }
    }

    /// Whether something of org `org` is the caller's to see (records,
    /// rollout children).
    pub fn sees_org(&self, org: Option<&str>) -> bool {
        self.platform || org == Some(self.org.as_str())
    }
}

/// A workspace's org from the `molecule:org-id` tags of its instances (all
/// but terminated ones): `None` when there is no instance, when one has no
/// tag, or when they disagree. Never a guess.
pub fn workspace_org(tags: &[Option<String>]) -> Option<String> {
    let first = tags.first()?.clone()?;
    tags.iter()
        .all(|t| t.as_deref() == Some(first.as_str()))
        .then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(org: &str, ws: Option<&str>, scope: &str) -> Result<Caller> {
        Caller::from_claims(Claims {
            sub: Some("u".into()),
            org_id: Some(org.into()),
            workspace_id: ws.map(str::to_string),
            scope: Some(scope.into()),
        })
    }

    #[test]
    fn scopes_are_granted_one_by_one() {
        let c = caller("acme", None, "admin read").unwrap();
        assert!(c.has(Scope::Read) && c.has(Scope::Admin) && !c.has(Scope::Write));
        assert_eq!(c.require(Scope::Write).unwrap_err().status(), 403);
        assert!(!c.platform);
        let none = caller("acme", None, "").unwrap();
        assert_eq!(none.require(Scope::Read).unwrap_err().status(), 403);
    }

    #[test]
    fn claims_without_an_org_are_not_a_caller() {
        let c = Caller::from_claims(Claims {
            scope: Some("read write".into()),
            ..Default::default()
        });
        assert_eq!(c.unwrap_err().status(), 401);
        assert_eq!(caller("../x", None, "read").unwrap_err().status(), 401);
        assert_eq!(
            caller("acme", Some("a/b"), "read").unwrap_err().status(),
            401
        );
        let p = Caller::from_claims(Claims {
            scope: Some("platform read".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(p.platform && p.org.is_empty());
    }

    #[test]
    fn tenancy_answers_404_alike() {
        let a = caller("acme", None, "read").unwrap();
        a.check_workspace("ws1", Some("acme")).unwrap();
        let other = a.check_workspace("ws1", Some("globex")).unwrap_err();
        let unknown = a.check_workspace("ws1", None).unwrap_err();
        assert_eq!((other.status(), unknown.status()), (404, 404));
        assert_eq!(other.message, unknown.message);
        assert_eq!(other.message, unknown_workspace("ws1").message);
        let w = caller("acme", Some("ws1"), "read write").unwrap();
        w.check_workspace("ws1", Some("acme")).unwrap();
        let e = w.check_workspace("ws2", Some("acme")).unwrap_err();
        assert_eq!(e.message, unknown_workspace("ws2").message);
        assert_eq!(w.require_org_wide().unwrap_err().status(), 403);
        assert_eq!(a.check_org("globex").unwrap_err().status(), 404);
        a.check_org("acme").unwrap();
        // The platform sees every org, but never a workspace without one.
        let s = Caller::system();
        s.check_workspace("ws1", Some("globex")).unwrap();
        assert_eq!(s.check_workspace("ws1", None).unwrap_err().status(), 404);
    }

    #[test]
    fn org_of_a_workspace_is_never_guessed() {
        let t = |v: &[Option<&str>]| v.iter().map(|x| x.map(str::to_string)).collect::<Vec<_>>();
        assert_eq!(workspace_org(&t(&[])), None);
        assert_eq!(workspace_org(&t(&[None])), None);
        assert_eq!(workspace_org(&t(&[Some("a"), None])), None);
        assert_eq!(workspace_org(&t(&[Some("a"), Some("b")])), None);
        assert_eq!(workspace_org(&t(&[Some("a"), Some("a")])), Some("a".into()));
    }
}
