//! The fetcher port over https (reqwest with rustls): GitHub's tarball
//! endpoint and pinned https URLs. Bytes are streamed, never buffered
//! whole; what comes back goes through `intake` before anything is staged.

use std::time::Duration;

use futures_util::TryStreamExt;
use tokio::sync::OnceCell;

use async_trait::async_trait;

use crate::domain::error::{Error, Result};
use crate::ports::{Body, Fetcher};

pub struct Remote {
    /// Built on the first remote fetch: loading the platform's trust store
    /// is cold-start work that registry installs and reads never need.
    client: OnceCell<reqwest::Client>,
    extra_roots: Vec<reqwest::Certificate>,
    fetch_timeout: Duration,
    github_api: String,
}

impl Remote {
    pub fn new(
        github_api: &str,
        extra_ca_pem: Option<&[u8]>,
        fetch_timeout: Duration,
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
        })
    }

    async fn client(&self) -> Result<&reqwest::Client> {
        self.client
            .get_or_try_init(|| async { self.build_client() })
            .await
    }

    fn build_client(&self) -> Result<reqwest::Client> {
        reqwest::Client::builder()
            // GitHub redirects the tarball request to codeload; never to
            // plain http, which carries no integrity.
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if attempt.url().scheme() != "https" {
                    attempt.error("redirect to a non-https URL")
                } else if attempt.previous().len() >= 5 {
                    attempt.error("too many redirects")
                } else {
                    attempt.follow()
                }
            }))
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
    let err = if e.is_timeout() {
        Error::deadline(format!("fetching {source} ran past its deadline"))
    } else {
        Error::host_failed(format!("fetching {source} failed"))
    };
    err.with_field("scheme", serde_json::json!(scheme))
        .with_field("source", serde_json::json!(source))
        .with_detail(format!("{e:?}"))
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
