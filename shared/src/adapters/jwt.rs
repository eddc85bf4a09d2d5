//! The authenticator port over platform-issued JWTs: RS256 only, signed by a
//! key of the configured JWKS (fetched from a URL or read from an SSM
//! parameter), with the configured issuer and audience and an unexpired
//! `exp`. API Gateway's JWT authorizer checks the same at the edge; this
//! is the same check inside the function, so the local stack (no
//! authorizer) runs it too. Crypto and claim checks are `jsonwebtoken`'s.
//!
//! Keys are cached for ten minutes; a token naming a key id we do not hold
//! refreshes them early. Loads, failed ones included, happen at most every
//! 30 s, so junk tokens cannot hammer the key source; while refreshes
//! fail, the keys held keep serving for an hour. No configuration, or no
//! keys at all, refuse every request (fail closed).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio::sync::{Mutex, RwLock};

use crate::adapters::aws::aws_error;
use crate::domain::caller::{unauthorized, Caller, Claims};
use crate::domain::config::{JwksFrom, TokenSettings};
use crate::domain::error::{Error, Result};
use crate::ports::Authenticator;

const KEYS_TTL: Duration = Duration::from_secs(600);
const MIN_REFRESH: Duration = Duration::from_secs(30);
/// How long keys already held keep serving while refreshes fail.
const STALE_GRACE: Duration = Duration::from_secs(3600);
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
        validation.validate_nbf = true;
        validation.leeway = 60;
        JwtVerifier {
            settings,
            validation,
            ssm,
            keys: RwLock::new(None),
            loading: Mutex::new(None),
        }
    }

    /// The key for `kid`, loading or refreshing the set when needed. At
    /// most one load per `MIN_REFRESH`, failed ones included; while a
    /// refresh fails, the keys already held serve for `STALE_GRACE`.
    async fn key(&self, kid: &str) -> Result<Arc<DecodingKey>> {
        if let Some(k) = self.held(kid, KEYS_TTL).await {
            return Ok(k);
        }
        let mut last = self.loading.lock().await;
        // Someone else may have loaded while we waited.
        if let Some(k) = self.held(kid, KEYS_TTL).await {
            return Ok(k);
        }
        if last.is_none_or(|t| t.elapsed() >= MIN_REFRESH) {
            *last = Some(Instant::now());
            match self.load().await {
                Ok(set) => {
                    *self.keys.write().await = Some(Keys {
                        loaded: Instant::now(),
                        by_kid: usable_keys(&set),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e.message, detail = ?e.detail, "JWKS refresh failed; keeping the keys held")
                }
            }
        }
        drop(last);
        if let Some(k) = self.held(kid, KEYS_TTL + STALE_GRACE).await {
            return Ok(k);
        }
        match &*self.keys.read().await {
            Some(keys) if keys.loaded.elapsed() < KEYS_TTL + STALE_GRACE => {
                Err(unauthorized(format!("unknown key id {kid:?}")))
            }
            _ => Err(Error::unavailable(
                "the keys to verify caller tokens cannot be loaded right now",
            )),
        }
    }

    /// The key for `kid` among keys loaded less than `max_age` ago.
    async fn held(&self, kid: &str, max_age: Duration) -> Option<Arc<DecodingKey>> {
        let keys = self.keys.read().await;
        let keys = keys.as_ref().filter(|k| k.loaded.elapsed() < max_age)?;
        keys.by_kid.get(kid).cloned()
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

/// RSA keys with a key id, for signatures (or unsaid), for RS256 (or
/// unsaid); others are not for us.
fn usable_keys(set: &JwkSet) -> HashMap<String, Arc<DecodingKey>> {
    set.keys
        .iter()
        .filter(|j| matches!(j.algorithm, AlgorithmParameters::RSA(_)))
        .filter(|j| {
            matches!(
                j.common.public_key_use,
                None | Some(PublicKeyUse::Signature)
            )
        })
        .filter(|j| matches!(j.common.key_algorithm, None | Some(KeyAlgorithm::RS256)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const JWKS: &str = include_str!("../../../tests/fixtures/jwt/jwks.json");
    const KEY: &[u8] = include_bytes!("../../../tests/fixtures/jwt/platform-test-key.pem");
    const ATTACKER: &[u8] = include_bytes!("../../../tests/fixtures/jwt/attacker-key.pem");

    fn verifier(jwks: &str) -> JwtVerifier {
        let ssm = aws_sdk_ssm::Client::from_conf(
            aws_sdk_ssm::Config::builder()
                .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
                .region(aws_sdk_ssm::config::Region::new("us-east-1"))
                .build(),
        );
        JwtVerifier::new(
            Some(TokenSettings {
                issuer: "https://platform.test/".into(),
                audience: "plugin-delivery".into(),
                keys: JwksFrom::Inline(jwks.into()),
            }),
            ssm,
        )
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn claims() -> serde_json::Value {
        json!({"iss": "https://platform.test/", "aud": "plugin-delivery", "sub": "u",
               "org_id": "acme", "scope": "read", "exp": now() + 600})
    }

    fn sign(c: &serde_json::Value, pem: &[u8], alg: Algorithm, kid: Option<&str>) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        let key = match alg {
            Algorithm::HS256 => EncodingKey::from_secret(JWKS.as_bytes()),
            _ => EncodingKey::from_rsa_pem(pem).unwrap(),
        };
        format!("Bearer {}", jsonwebtoken::encode(&h, c, &key).unwrap())
    }

    async fn status(v: &JwtVerifier, header: Option<&str>) -> u16 {
        match v.authenticate(header).await {
            Ok(_) => 200,
            Err(e) => e.status(),
        }
    }

    #[tokio::test]
    async fn only_an_rs256_token_of_the_issuer_for_us_passes() {
        let v = verifier(JWKS);
        let good = sign(&claims(), KEY, Algorithm::RS256, Some("test-2026"));
        let c = v.authenticate(Some(&good)).await.unwrap();
        assert_eq!((c.org.as_str(), c.platform), ("acme", false));
        let lower = good.replacen("Bearer", "bearer", 1);
        assert_eq!(status(&v, Some(&lower)).await, 200);
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut c = claims();
            f(&mut c);
            sign(&c, KEY, Algorithm::RS256, Some("test-2026"))
        };
        let refused = [
            with(&|c| c["exp"] = json!(now() - 120)),
            with(&|c| c["nbf"] = json!(now() + 600)),
            with(&|c| c["iss"] = json!("https://attacker.test/")),
            with(&|c| c["aud"] = json!("other")),
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            with(&|c| {
                c.as_object_mut().unwrap().remove("org_id");
            }),
            sign(&claims(), ATTACKER, Algorithm::RS256, Some("test-2026")),
            sign(&claims(), KEY, Algorithm::RS256, None),
            sign(&claims(), KEY, Algorithm::RS256, Some("other-kid")),
            // The public key set used as an HMAC secret: alg confusion.
            sign(&claims(), KEY, Algorithm::HS256, Some("test-2026")),
            "Bearer".into(),
            "Basic dXNlcjpwdw==".into(),
            format!("Bearer {}", "a".repeat(9000)),
            good.trim_start_matches("Bearer ").to_string(),
        ];
        for (i, h) in refused.iter().enumerate() {
            assert_eq!(status(&v, Some(h)).await, 401, "case {i}");
        }
        assert_eq!(status(&v, None).await, 401);
        // Still within the leeway: accepted.
        let late = with(&|c| c["exp"] = json!(now() - 30));
        assert_eq!(status(&v, Some(&late)).await, 200);
    }

    #[tokio::test]
    async fn keys_for_encryption_or_other_algorithms_verify_nothing() {
        let mut set: serde_json::Value = serde_json::from_str(JWKS).unwrap();
        set["keys"][0]["use"] = json!("enc");
        let v = verifier(&set.to_string());
        let good = sign(&claims(), KEY, Algorithm::RS256, Some("test-2026"));
        assert_eq!(status(&v, Some(&good)).await, 401);
        let mut set: serde_json::Value = serde_json::from_str(JWKS).unwrap();
        set["keys"][0]["alg"] = json!("RS512");
        assert_eq!(status(&verifier(&set.to_string()), Some(&good)).await, 401);
    }

    #[tokio::test]
    async fn no_settings_or_no_keys_refuse_everything() {
        let ssm = aws_sdk_ssm::Client::from_conf(
            aws_sdk_ssm::Config::builder()
                .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
                .region(aws_sdk_ssm::config::Region::new("us-east-1"))
                .build(),
        );
        let none = JwtVerifier::new(None, ssm);
        let good = sign(&claims(), KEY, Algorithm::RS256, Some("test-2026"));
        assert_eq!(status(&none, Some(&good)).await, 503);
        let broken = verifier("{not json");
        assert_eq!(status(&broken, Some(&good)).await, 503);
        // A second try within 30 s does not load again, and still refuses.
        assert_eq!(status(&broken, Some(&good)).await, 503);
    }
}
