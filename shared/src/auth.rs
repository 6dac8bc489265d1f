//! Supabase access-token verification, local and without a network call per request.
//!
//! Accepts HS256 tokens signed with the project's legacy JWT secret (`SUPABASE_JWT_SECRET`) and
//! ES256/RS256 tokens signed with the project's asymmetric keys, published as a JWKS at
//! `{SUPABASE_URL}/auth/v1/.well-known/jwks.json`. The JWKS is fetched once per cold start and
//! again when a token names an unknown `kid`, at most once per refetch floor. Checks `exp`, `nbf`,
//! `iat`, `aud` (`authenticated`), `iss` (when the project URL is known) and `sub` (a user uuid).
//! The time claims allow 30 s of clock skew, as PostgREST (Supabase's data API) does: a token
//! expired or issued more than 30 s ago / ahead is refused there too.
//!
//! Verification uses ring, already linked for TLS, rather than a JWT crate that would bring a
//! second crypto implementation (see docs/decisions.md). An HS256 token is only ever checked
//! against the configured secret, never against a public key, so algorithm confusion is
//! impossible; `alg: none` and every other algorithm are refused.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;
use sha2::Sha256;

use crate::config::Secret;
use crate::error::ApiError;

/// Longest token accepted (Supabase tokens are ~1 KB).
const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Clock skew tolerated on `exp`, `nbf` and `iat`: PostgREST's 30 s.
pub const LEEWAY_S: i64 = 30;
/// The audience of Supabase user sessions.
pub const AUDIENCE: &str = "authenticated";

/// A verified user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: uuid::Uuid,
    pub email: Option<String>,
    pub is_anonymous: bool,
}

/// Why a token was refused. Every variant is a 401.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("an Authorization: Bearer token is required")]
    MissingToken,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's algorithm is not accepted")]
    UnsupportedAlgorithm,
    #[error("the token was signed with an unknown key")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    InvalidSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued in the future")]
    IssuedInFuture,
    #[error("the token is not for this audience")]
    InvalidAudience,
    #[error("the token was issued by another project")]
    InvalidIssuer,
    #[error("the token does not name a user")]
    InvalidSubject,
}

impl AuthError {
    /// The stable error code.
    pub fn code(self) -> &'static str {
        match self {
            AuthError::MissingToken => "missing_token",
            AuthError::Malformed => "invalid_token",
            AuthError::UnsupportedAlgorithm => "unsupported_token_algorithm",
            AuthError::UnknownKey => "unknown_signing_key",
            AuthError::InvalidSignature => "invalid_token_signature",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::IssuedInFuture => "token_issued_in_future",
            AuthError::InvalidAudience => "invalid_token_audience",
            AuthError::InvalidIssuer => "invalid_token_issuer",
            AuthError::InvalidSubject => "invalid_token_subject",
        }
    }

    /// The 401 answer.
    pub fn to_api_error(self) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, self.code(), self.to_string())
    }
}

/// How tokens are verified.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// Legacy HS256 secret (`SUPABASE_JWT_SECRET`).
    pub hs256_secret: Option<Secret>,
    /// `SUPABASE_URL`: enables JWKS (ES256/RS256) and the issuer check.
    pub supabase_url: Option<String>,
    /// Minimum time between two JWKS fetches.
    pub jwks_refetch_floor: Duration,
}

/// A public key from the JWKS.
#[derive(Clone, Debug)]
enum PublicKey {
    Es256(Vec<u8>),
    Rs256 { n: Vec<u8>, e: Vec<u8> },
}

#[derive(Default)]
struct JwksState {
    keys: HashMap<String, PublicKey>,
    fetched_at: Option<Instant>,
}

/// Verifies access tokens. Build once per cold start; share across requests.
pub struct Verifier {
    config: AuthConfig,
    issuer: Option<String>,
    jwks_url: Option<String>,
    http: Option<reqwest::Client>,
    state: RwLock<JwksState>,
    refetch: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.issuer)
            .field("hs256", &self.config.hs256_secret.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    exp: Option<i64>,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    is_anonymous: Option<bool>,
}

#[derive(Deserialize)]
struct Jwks {
    #[serde(default)]
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
}

fn b64(input: &str) -> Result<Vec<u8>, AuthError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(input.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed)
}

impl Verifier {
    /// A verifier for `config`. JWKS keys are fetched on first need (or by [`Verifier::prefetch`]).
    pub fn new(config: AuthConfig) -> Self {
        let base = config
            .supabase_url
            .as_deref()
            .map(|u| u.trim_end_matches('/').to_owned());
        let http = base.as_ref().and_then(|_| {
            crate::http_client::build(Duration::from_secs(2), Duration::from_secs(4)).ok()
        });
        Self {
            issuer: base.as_ref().map(|b| format!("{b}/auth/v1")),
            jwks_url: base
                .as_ref()
                .map(|b| format!("{b}/auth/v1/.well-known/jwks.json")),
            http,
            config,
            state: RwLock::new(JwksState::default()),
            refetch: tokio::sync::Mutex::new(()),
        }
    }

    /// Fetches the JWKS now (call during cold start); failures are logged and retried on demand.
    pub async fn prefetch(&self) {
        if self.jwks_url.is_some() {
            let _guard = self.refetch.lock().await;
            self.fetch_jwks().await;
        }
    }

    /// Verifies the request's `Authorization: Bearer` token.
    pub async fn verify_request(&self, headers: &HeaderMap, now: i64) -> Result<User, AuthError> {
        let token = bearer_token(headers).ok_or(AuthError::MissingToken)?;
        self.verify(token, now).await
    }

    /// Verifies a token at time `now` (unix seconds).
    pub async fn verify(&self, token: &str, now: i64) -> Result<User, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let header: Header = serde_json::from_slice(&b64(h)?).map_err(|_| AuthError::Malformed)?;
        let signature = b64(s)?;
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];

        match header.alg.as_str() {
            "HS256" => {
                let secret = self
                    .config
                    .hs256_secret
                    .as_ref()
                    .ok_or(AuthError::UnsupportedAlgorithm)?;
                let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
                    .map_err(|_| AuthError::InvalidSignature)?;
                mac.update(signed);
                mac.verify_slice(&signature)
                    .map_err(|_| AuthError::InvalidSignature)?;
            }
            "ES256" | "RS256" => {
                let kid = header.kid.as_deref().ok_or(AuthError::UnknownKey)?;
                let key = self.key(kid).await?;
                let ok = match (&key, header.alg.as_str()) {
                    (PublicKey::Es256(point), "ES256") => {
                        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                            .verify(signed, &signature)
                            .is_ok()
                    }
                    (PublicKey::Rs256 { n, e }, "RS256") => RsaPublicKeyComponents { n, e }
                        .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, &signature)
                        .is_ok(),
                    // The key exists but is of another type than the token claims.
                    _ => return Err(AuthError::InvalidSignature),
                };
                if !ok {
                    return Err(AuthError::InvalidSignature);
                }
            }
            _ => return Err(AuthError::UnsupportedAlgorithm),
        }

        let claims: Claims = serde_json::from_slice(&b64(p)?).map_err(|_| AuthError::Malformed)?;
        // Any i64 is a well-formed claim: the arithmetic is done in i128, where `claim ± 30` and
        // `now ± 30` cannot overflow (`exp: i64::MAX` panicked here in debug builds).
        let (now, leeway) = (i128::from(now), i128::from(LEEWAY_S));
        let exp = claims.exp.ok_or(AuthError::Expired)?;
        if i128::from(exp) + leeway <= now {
            return Err(AuthError::Expired);
        }
        if claims.nbf.is_some_and(|nbf| i128::from(nbf) > now + leeway) {
            return Err(AuthError::NotYetValid);
        }
        if claims.iat.is_some_and(|iat| i128::from(iat) > now + leeway) {
            return Err(AuthError::IssuedInFuture);
        }
        let audience_ok = match &claims.aud {
            Some(Audience::One(a)) => a == AUDIENCE,
            Some(Audience::Many(list)) => list.iter().any(|a| a == AUDIENCE),
            None => false,
        };
        if !audience_ok {
            return Err(AuthError::InvalidAudience);
        }
        if let Some(expected) = &self.issuer {
            if claims.iss.as_deref() != Some(expected.as_str()) {
                return Err(AuthError::InvalidIssuer);
            }
        }
        if claims.role.as_deref().is_some_and(|r| r != AUDIENCE) {
            return Err(AuthError::InvalidSubject);
        }
        let id = claims
            .sub
            .as_deref()
            .and_then(|s| uuid::Uuid::parse_str(s).ok())
            .ok_or(AuthError::InvalidSubject)?;
        Ok(User {
            id,
            email: claims.email.filter(|e| e.contains('@') && e.len() <= 320),
            is_anonymous: claims.is_anonymous.unwrap_or(false),
        })
    }

    async fn key(&self, kid: &str) -> Result<PublicKey, AuthError> {
        if self.jwks_url.is_none() {
            return Err(AuthError::UnsupportedAlgorithm);
        }
        if let Some(key) = self.cached(kid) {
            return Ok(key);
        }
        // Unknown kid: refetch, unless another request just did or the floor has not passed.
        let _guard = self.refetch.lock().await;
        if let Some(key) = self.cached(kid) {
            return Ok(key);
        }
        let due = self
            .state
            .read()
            .map(|s| {
                s.fetched_at
                    .is_none_or(|t| t.elapsed() >= self.config.jwks_refetch_floor)
            })
            .unwrap_or(true);
        if due {
            self.fetch_jwks().await;
        }
        self.cached(kid).ok_or(AuthError::UnknownKey)
    }

    fn cached(&self, kid: &str) -> Option<PublicKey> {
        self.state
            .read()
            .ok()
            .and_then(|s| s.keys.get(kid).cloned())
    }

    async fn fetch_jwks(&self) {
        let (Some(url), Some(http)) = (&self.jwks_url, &self.http) else {
            return;
        };
        let result = async {
            let response = http
                .get(url)
                .send()
                .await
                .map_err(|e| e.without_url().to_string())?;
            if !response.status().is_success() {
                return Err(format!("status {}", response.status()));
            }
            let jwks: Jwks = response
                .json()
                .await
                .map_err(|e| e.without_url().to_string())?;
            Ok(parse_jwks(jwks))
        }
        .await;
        if let Ok(mut state) = self.state.write() {
            state.fetched_at = Some(Instant::now());
            match result {
                Ok(keys) => {
                    tracing::info!(keys = keys.len(), "fetched Supabase JWKS");
                    state.keys = keys;
                }
                Err(error) => tracing::error!(%error, "could not fetch Supabase JWKS"),
            }
        }
    }
}

fn parse_jwks(jwks: Jwks) -> HashMap<String, PublicKey> {
    let mut keys = HashMap::new();
    for jwk in jwks.keys {
        let Some(kid) = jwk.kid.clone() else { continue };
        let key = match jwk.kty.as_str() {
            "EC" if jwk.crv.as_deref() == Some("P-256") => {
                let (Some(x), Some(y)) = (&jwk.x, &jwk.y) else {
                    continue;
                };
                let (Ok(x), Ok(y)) = (b64(x), b64(y)) else {
                    continue;
                };
                if x.len() != 32 || y.len() != 32 {
                    continue;
                }
                let mut point = Vec::with_capacity(65);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                PublicKey::Es256(point)
            }
            "RSA" => {
                let (Some(n), Some(e)) = (&jwk.n, &jwk.e) else {
                    continue;
                };
                let (Ok(n), Ok(e)) = (b64(n), b64(e)) else {
                    continue;
                };
                PublicKey::Rs256 { n, e }
            }
            _ => continue,
        };
        keys.insert(kid, key);
    }
    keys
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// `WWW-Authenticate` for 401 answers (RFC 6750).
pub fn www_authenticate() -> HeaderValue {
    HeaderValue::from_static("Bearer error=\"invalid_token\"")
}
