//! Supabase-shaped access tokens for tests and local runs: HS256 with a secret, ES256 with a
//! generated P-256 key, RS256 with the test-only RSA key in `tests/fixtures/keys/`.

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{json, Value};
use sha2::Sha256;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The claims Supabase puts in a user's access token, valid for an hour.
pub fn user_claims(user: &str, issuer: Option<&str>) -> Value {
    let now = crate::fixtures::now();
    let mut claims = json!({
        "aud": "authenticated",
        "exp": now + 3600,
        "iat": now,
        "sub": user,
        "email": format!("{}@example.com", &user[..8.min(user.len())]),
        "phone": "",
        "role": "authenticated",
        "aal": "aal1",
        "session_id": uuid::Uuid::new_v4().to_string(),
        "is_anonymous": false,
    });
    if let Some(iss) = issuer {
        claims["iss"] = json!(iss);
    }
    claims
}

fn compact(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

/// An HS256 token signed with `secret` (Supabase's legacy JWT secret).
pub fn hs256(claims: &Value, secret: &[u8]) -> String {
    let signing_input = compact(&json!({"alg": "HS256", "typ": "JWT"}), claims);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key size");
    mac.update(signing_input.as_bytes());
    format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()))
}

/// A token with any header and a given signature (for attacks: `alg: none`, forged parts).
pub fn raw(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!("{}.{}", compact(header, claims), b64(signature))
}

/// A P-256 signing key with its JWK.
pub struct EsKey {
    pub kid: String,
    pair: EcdsaKeyPair,
}

impl EsKey {
    /// A new random key.
    pub fn generate(kid: &str) -> EsKey {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("keygen");
        let pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .expect("key");
        EsKey {
            kid: kid.to_owned(),
            pair,
        }
    }

    /// The public key as Supabase's JWKS lists it.
    pub fn jwk(&self) -> Value {
        let point = self.pair.public_key().as_ref();
        json!({"kty": "EC", "kid": self.kid, "use": "sig", "alg": "ES256", "crv": "P-256",
               "x": b64(&point[1..33]), "y": b64(&point[33..65]), "key_ops": ["verify"], "ext": true})
    }

    /// The uncompressed public point (to try it as an HMAC key in attacks).
    pub fn public_bytes(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// An ES256 token for `claims`.
    pub fn sign(&self, claims: &Value) -> String {
        let input = compact(
            &json!({"alg": "ES256", "typ": "JWT", "kid": self.kid}),
            claims,
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .expect("sign");
        format!("{input}.{}", b64(sig.as_ref()))
    }
}

/// The test-only RSA key.
pub struct RsKey {
    pub kid: String,
    pair: RsaKeyPair,
}

impl RsKey {
    /// Loads `tests/fixtures/keys/rsa2048-test-only.pk8`.
    pub fn load(kid: &str) -> RsKey {
        let der = std::fs::read(
            crate::workspace_root().join("tests/fixtures/keys/rsa2048-test-only.pk8"),
        )
        .expect("test RSA key");
        RsKey {
            kid: kid.to_owned(),
            pair: RsaKeyPair::from_pkcs8(&der).expect("RSA key"),
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Value {
        let components: signature::RsaPublicKeyComponents<Vec<u8>> = self.pair.public().into();
        json!({"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
               "n": b64(&components.n), "e": b64(&components.e)})
    }

    /// An RS256 token for `claims`.
    pub fn sign(&self, claims: &Value) -> String {
        let input = compact(
            &json!({"alg": "RS256", "typ": "JWT", "kid": self.kid}),
            claims,
        );
        let mut sig = vec![0; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .expect("sign");
        format!("{input}.{}", b64(&sig))
    }
}
