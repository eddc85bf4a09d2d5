//! The authenticator port over platform-issued JWTs: RS256 only, signed by a
//! key of the configured JWKS (fetched from a URL or read from an SSM
//! parameter), with the configured issuer and audience and an unexpired
//! `exp`. API Gateway's JWT authorizer checks the same at the edge; this
//! is the same check inside the function, so the local stack (no
//! authorizer) runs it too. Crypto and claim checks are `jsonwebtoken`'s.
//!
//! Keys are cached for ten minutes; a token naming a key id we do not hold
//! refreshes them early (at most every 30 s), so a rotation is picked up
//! without letting junk tokens hammer the key source. No configuration, or
//! keys that cannot be loaded, refuse every request (fail closed).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio::sync::{Mutex, RwLock};

use crate::adapters::aws::aws_error;
use crate::domain::caller::{unauthorized, Caller, Claims};
use crate::domain::config::{JwksFrom, TokenSettings};
use crate::domain::error::{Error, Result};
use crate::ports::Authenticator;

const KEYS_TTL: Duration = Duration::from_secs(600);
const MIN_REFRESH: Duration = Duration::from_secs(30);
/// Tokens are small; anything longer is not one of ours.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

struct Keys {
    loaded: Instant,
    by_kid: HashMap<String, Arc<DecodingKey>>,
}

pub struct JwtVerifier {
    settings: Option<TokenSettings>,
    validation: Validation,
    ssm: aws_sdk_ssm::Client,
    keys: RwLock<Option<Keys>>,
    /// One key load at a time; holds when the last one started.
    loading: Mutex<Option<Instant>>,
}

impl JwtVerifier {
    pub fn new(settings: Option<TokenSettings>, ssm: aws_sdk_ssm::Client) -> Self {
        let mut validation = Validation::new(Algorithm::RS256);
        if let Some(s) = &settings {
            validation.set_issuer(&[&s.issuer]);
            validation.set_audience(&[&s.audience]);
        }
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = 60;
        JwtVerifier {
            settings,
            validation,
            ssm,
            keys: RwLock::new(None),
            loading: Mutex::new(None),
        }
    }

    /// The key for `kid`, loading or refreshing the set when needed.
    async fn key(&self, kid: &str) -> Result<Arc<DecodingKey>> {
        if let Some(keys) = &*self.keys.read().await {
            if keys.loaded.elapsed() < KEYS_TTL {
                if let Some(k) = keys.by_kid.get(kid) {
                    return Ok(k.clone());
                }
            }
        }
        let mut last = self.loading.lock().await;
        // Someone else may have loaded while we waited.
        if let Some(keys) = &*self.keys.read().await {
            let fresh = keys.loaded.elapsed() < KEYS_TTL;
            if fresh {
                if let Some(k) = keys.by_kid.get(kid) {
                    return Ok(k.clone());
                }
            }
            if fresh && last.is_some_and(|t| t.elapsed() < MIN_REFRESH) {
                return Err(unauthorized(format!("unknown key id {kid:?}")));
            }
        }
        *last = Some(Instant::now());
        let set = self.load().await?;
        let by_kid = usable_keys(&set);
        let found = by_kid.get(kid).cloned();
        *self.keys.write().await = Some(Keys {
            loaded: Instant::now(),
            by_kid,
        });
        found.ok_or_else(|| unauthorized(format!("unknown key id {kid:?}")))
    }

    async fn load(&self) -> Result<JwkSet> {
        let unavailable =
            || Error::unavailable("the keys to verify caller tokens cannot be loaded right now");
        let text = match self.settings.as_ref().map(|s| &s.keys) {
            None => return Err(not_configured()),
            Some(JwksFrom::Inline(json)) => json.clone(),
            Some(JwksFrom::Parameter(name)) => {
                let out = self
                    .ssm
                    .get_parameter()
                    .name(name)
                    .with_decryption(true)
                    .send()
                    .await
                    .map_err(|e| aws_error("SSM", "GetParameter (JWKS)", &e))
                    .map_err(|e| unavailable().with_detail(format!("{:?}", e.detail)))?;
                out.parameter()
                    .and_then(|p| p.value())
                    .unwrap_or_default()
                    .to_string()
            }
            Some(JwksFrom::Url(url)) => fetch_jwks(url)
                .await
                .map_err(|e| unavailable().with_detail(e))?,
        };
        serde_json::from_str(&text)
            .map_err(|e| unavailable().with_detail(format!("JWKS is not a key set: {e}")))
    }
}

fn not_configured() -> Error {
    Error::unavailable("caller verification is not configured, so every request is refused")
}

/// RSA signing keys with a key id; others are not for us.
fn usable_keys(set: &JwkSet) -> HashMap<String, Arc<DecodingKey>> {
    set.keys
        .iter()
        .filter(|j| matches!(j.algorithm, AlgorithmParameters::RSA(_)))
        .filter_map(|j| {
            let kid = j.common.key_id.clone()?;
            match DecodingKey::from_jwk(j) {
                Ok(k) => Some((kid, Arc::new(k))),
                Err(e) => {
                    tracing::warn!(kid, error = %e, "JWKS key skipped");
                    None
                }
            }
        })
        .collect()
}

async fn fetch_jwks(url: &str) -> std::result::Result<String, String> {
    let client = reqwest::Client::builder()
        .https_only(true)
        .timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let resp = client.get(url).send().await.map_err(|e| format!("{e:?}"))?;
    if !resp.status().is_success() {
        return Err(format!("JWKS URL answered {}", resp.status()));
    }
    resp.text().await.map_err(|e| format!("{e:?}"))
}

#[async_trait]
impl Authenticator for JwtVerifier {
    async fn authenticate(&self, authorization: Option<&str>) -> Result<Caller> {
        if self.settings.is_none() {
            return Err(not_configured());
        }
        let token = authorization
            .and_then(|h| {
                let (scheme, rest) = h.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("no bearer token"))?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(unauthorized("token too long"));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| unauthorized(format!("header: {e}")))?;
        if header.alg != Algorithm::RS256 {
            return Err(unauthorized(format!("algorithm {:?}", header.alg)));
        }
        let kid = header.kid.ok_or_else(|| unauthorized("no key id"))?;
        let key = self.key(&kid).await?;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.validation)
            .map_err(|e| unauthorized(format!("token refused: {e}")))?;
        Caller::from_claims(data.claims)
    }
}
