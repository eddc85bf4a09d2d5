//! The fetcher port over https (reqwest with rustls): GitHub's tarball
//! endpoint and pinned https URLs. Bytes are streamed, never buffered
//! whole; what comes back goes through `intake` before anything is staged.
//!
//! Every hop passes `domain::netguard`: the URL's host (and an address
//! literal) before the request and at each redirect, and every address a
//! name resolves to in our own resolver, which hands reqwest only the
//! addresses that passed, so the connection goes where the check looked.
//! A refusal is a 403 naming the rule; the target is never contacted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use tokio::sync::OnceCell;

use async_trait::async_trait;

use crate::domain::error::{Error, Result};
use crate::domain::netguard::{refused, FetchPolicy};
use crate::ports::{Body, Fetcher};

/// A hop the guard refused: the host and the rule.
#[derive(Debug)]
struct Refused {
    host: String,
    rule: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.host, self.rule)
    }
}

impl std::error::Error for Refused {}

/// Resolves names and keeps only the addresses the policy allows.
struct GuardedResolver {
    policy: Arc<FetchPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut why = String::from("the name does not resolve");
            let mut ok = Vec::new();
            for a in found {
                match policy.check_ip(a.ip()) {
                    Ok(()) => ok.push(a),
                    Err(rule) => why = rule,
                }
            }
            if ok.is_empty() {
                return Err(Box::new(Refused { host, rule: why }) as _);
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The guard's refusal somewhere in a reqwest error's causes.
fn refusal(e: &reqwest::Error) -> Option<Error> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<Refused>() {
            return Some(refused(&r.host, &r.rule));
        }
        cause = c.source();
    }
    None
}

pub struct Remote {
    /// Built on the first remote fetch: loading the platform's trust store
    /// is cold-start work that registry installs and reads never need.
    client: OnceCell<reqwest::Client>,
    extra_roots: Vec<reqwest::Certificate>,
    fetch_timeout: Duration,
    github_api: String,
    policy: Arc<FetchPolicy>,
}

impl Remote {
    pub fn new(
        github_api: &str,
        extra_ca_pem: Option<&[u8]>,
        fetch_timeout: Duration,
        policy: FetchPolicy,
    ) -> Result<Self> {
        // Parsed now, so a bad setting fails the cold start, not a fetch.
        let extra_roots = match extra_ca_pem {
            Some(pem) => reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::internal(format!("PLUGIN_EXTRA_CA_CERTS: {e}")))?,
            None => Vec::new(),
        };
        Ok(Remote {
            client: OnceCell::new(),
            extra_roots,
            fetch_timeout,
            github_api: github_api.trim_end_matches('/').to_string(),
            policy: Arc::new(policy),
        })
    }

    /// The guard on a URL's host, before any request to it.
    fn check_url(&self, url: &str) -> Result<()> {
        let host = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        self.policy
            .check_host(&host)
            .map_err(|rule| refused(&host, &rule))
    }

    async fn client(&self) -> Result<&reqwest::Client> {
        self.client
            .get_or_try_init(|| async { self.build_client() })
            .await
    }

    fn build_client(&self) -> Result<reqwest::Client> {
        let policy = self.policy.clone();
        reqwest::Client::builder()
            // GitHub redirects the tarball request to codeload; never to
            // plain http, which carries no integrity, and every hop passes
            // the guard (names again when they are resolved).
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                let host = attempt.url().host_str().unwrap_or_default().to_string();
                if attempt.url().scheme() != "https" {
                    attempt.error("redirect to a non-https URL")
                } else if attempt.previous().len() >= 5 {
                    attempt.error("too many redirects")
                } else if let Err(rule) = policy.check_host(&host) {
                    attempt.error(Refused { host, rule })
                } else {
                    attempt.follow()
                }
            }))
            .dns_resolver(GuardedResolver {
                policy: self.policy.clone(),
            })
            .https_only(true)
            .connect_timeout(Duration::from_secs(10))
            .timeout(self.fetch_timeout)
            .user_agent("plugin-delivery")
            .tls_certs_merge(self.extra_roots.clone())
            .build()
            .map_err(|e| Error::internal(format!("http client: {e}")))
    }
}

#[async_trait]
impl Fetcher for Remote {
    /// `GET {api}/repos/{owner}/{repo}/tarball/{ref}`, redirect followed.
    async fn github_tarball(
        &self,
        owner: &str,
        repo: &str,
        reference: &str,
        token: Option<&str>,
        source: &str,
    ) -> Result<Body> {
        let url = format!(
            "{}/repos/{owner}/{repo}/tarball/{}",
            self.github_api,
            encode_path(reference)
        );
        self.check_url(&url)?;
        let mut req = self
            .client()
            .await?
            .get(&url)
            .header("accept", "application/vnd.github+json");
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| fetch_error("github", source, e))?;
        match resp.status().as_u16() {
            200 => Ok(body(resp)),
            // GitHub answers 404 for a missing repository, a missing ref and
            // a private repository without a token alike.
            404 => Err(Error::not_found(format!(
                "repository or ref not found for {source} (private repositories need a token)"
            ))),
            code => Err(Error::host_failed(format!(
                "fetching {source} failed (github answered {code})"
            ))
            .with_field("scheme", serde_json::json!("github"))),
        }
    }

    async fn https(&self, url: &str, source: &str) -> Result<Body> {
        self.check_url(url)?;
        let resp = self
            .client()
            .await?
            .get(url)
            .send()
            .await
            .map_err(|e| fetch_error("https", source, e))?;
        match resp.status().as_u16() {
            200 => Ok(body(resp)),
            404 => Err(Error::not_found(format!("{source} was not found"))),
            code => Err(
                Error::host_failed(format!("fetching {source} failed (status {code})"))
                    .with_field("scheme", serde_json::json!("https")),
            ),
        }
    }
}

fn body(resp: reqwest::Response) -> Body {
    let stream = resp.bytes_stream().map_err(std::io::Error::other);
    Box::new(tokio_util::io::StreamReader::new(stream))
}

/// 504 past the fetch deadline, 502 otherwise; upstream text only in the log.
fn fetch_error(scheme: &str, source: &str, e: reqwest::Error) -> Error {
    if let Some(r) = refusal(&e) {
        return r.with_field("source", serde_json::json!(source));
    }
    let err = if e.is_timeout() {
        Error::deadline(format!("fetching {source} ran past its deadline"))
    } else {
        Error::host_failed(format!("fetching {source} failed"))
    };
    err.with_field("scheme", serde_json::json!(scheme))
        .with_field("source", serde_json::json!(source))
        // Without the URL: a signed URL's query string is a credential.
        .with_detail(format!("{:?}", e.without_url()))
}

/// Refs may contain `/` (branches like `release/v1`); keep them, escape the rest.
fn encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
