//! Access-token verification: HS256 with the legacy secret, ES256/RS256 from a faked JWKS
//! endpoint, and the attacks that must all end in 401.

use std::time::Duration;

use serde_json::json;
use shared::auth::{AuthConfig, AuthError, Verifier};
use shared::config::Secret;
use testkit::fixtures::now;
use testkit::tokens::{self, EsKey, RsKey};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SECRET: &[u8] = b"super-secret-jwt-token-with-at-least-32-characters-long";
const USER: &str = "8d5b4c6e-1f2a-4b3c-9d8e-7f6a5b4c3d2e";

fn hs_verifier() -> Verifier {
    Verifier::new(AuthConfig {
        hs256_secret: Some(Secret::new(String::from_utf8(SECRET.to_vec()).unwrap())),
        supabase_url: None,
        jwks_refetch_floor: Duration::from_secs(30),
    })
}

async fn jwks_server(keys: Vec<serde_json::Value>) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/auth/v1/.well-known/jwks.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"keys": keys})))
        .mount(&server)
        .await;
    server
}

fn jwks_verifier(server: &MockServer, floor: Duration) -> Verifier {
    Verifier::new(AuthConfig {
        hs256_secret: None,
        supabase_url: Some(server.uri()),
        jwks_refetch_floor: floor,
    })
}

/// A project publishing an ES256 and an RS256 key in its JWKS, a verifier for it, and a
/// user's claims with the project's issuer.
struct Project {
    es: EsKey,
    rs: RsKey,
    server: MockServer,
    v: Verifier,
    claims: serde_json::Value,
}

async fn project_with_published_keys() -> Project {
    let es = EsKey::generate("es-key-1");
    let rs = RsKey::load("rs-key-1");
    let server = jwks_server(vec![es.jwk(), rs.jwk()]).await;
    let v = jwks_verifier(&server, Duration::from_secs(30));
    let claims = tokens::user_claims(USER, Some(&format!("{}/auth/v1", server.uri())));
    Project {
        es,
        rs,
        server,
        v,
        claims,
    }
}

#[tokio::test]
async fn hs256_token_names_the_user() {
    let token = tokens::hs256(&tokens::user_claims(USER, None), SECRET);
    let user = hs_verifier().verify(&token, now()).await.unwrap();
    assert_eq!(user.id.to_string(), USER);
    assert_eq!(user.email.as_deref(), Some("8d5b4c6e@example.com"));
}

#[tokio::test]
async fn time_claims_allow_thirty_seconds_of_skew_like_postgrest() {
    let v = hs_verifier();
    let at = now();
    let token = |claim: &str, value: i64| {
        let mut claims = tokens::user_claims(USER, None);
        claims[claim] = json!(value);
        tokens::hs256(&claims, SECRET)
    };
    let cases = [
        ("iat", at + 30, None),
        ("iat", at + 31, Some(AuthError::IssuedInFuture)),
        ("nbf", at + 30, None),
        ("nbf", at + 31, Some(AuthError::NotYetValid)),
        ("exp", at - 29, None),
        ("exp", at - 30, Some(AuthError::Expired)),
    ];
    for (claim, value, want) in cases {
        let got = v.verify(&token(claim, value), at).await.err();
        assert_eq!(got, want, "{claim} = now {:+}", value - at);
    }
    assert_eq!(
        AuthError::IssuedInFuture.to_api_error().code,
        "token_issued_in_future"
    );
}

/// A correctly signed token may carry any integer in its time claims: `exp: i64::MAX` panicked
/// (`exp + 30` overflowed in debug builds, wrapped to "expired" in release).
#[tokio::test]
async fn extreme_time_claims_never_overflow() {
    let v = hs_verifier();
    let at = now();
    let token = |claim: &str, value: i64| {
        let mut claims = tokens::user_claims(USER, None);
        claims[claim] = json!(value);
        tokens::hs256(&claims, SECRET)
    };
    let cases = [
        ("exp", i64::MAX, None),
        ("exp", i64::MAX - 29, None),
        ("exp", i64::MIN, Some(AuthError::Expired)),
        ("nbf", i64::MAX, Some(AuthError::NotYetValid)),
        ("nbf", i64::MIN, None),
        ("iat", i64::MAX, Some(AuthError::IssuedInFuture)),
        ("iat", i64::MIN, None),
    ];
    for (claim, value, want) in cases {
        let got = v.verify(&token(claim, value), at).await.err();
        assert_eq!(got, want, "{claim} = {value}");
    }
    // The verifier's own clock at either end of the range.
    let forever = token("exp", i64::MAX);
    assert_eq!(v.verify(&forever, i64::MAX).await.err(), None);
    assert_eq!(
        v.verify(&forever, i64::MIN).await.err(),
        Some(AuthError::IssuedInFuture),
        "its iat is now"
    );
    let usual = tokens::hs256(&tokens::user_claims(USER, None), SECRET);
    assert_eq!(
        v.verify(&usual, i64::MAX).await.err(),
        Some(AuthError::Expired)
    );
    assert_eq!(
        v.verify(&usual, i64::MIN).await.err(),
        Some(AuthError::IssuedInFuture)
    );
}

#[tokio::test]
async fn hs256_attacks_are_refused() {
    let v = hs_verifier();
    let good = tokens::user_claims(USER, None);
    // The good claims with one claim set to a value, or removed (`None`).
    let with = |claim: &str, value: Option<serde_json::Value>| {
        let mut c = good.clone();
        match value {
            Some(value) => c[claim] = value,
            None => {
                c.as_object_mut().unwrap().remove(claim);
            }
        }
        tokens::hs256(&c, SECRET)
    };
    let cases: Vec<(&str, String, AuthError)> = vec![
        (
            "wrong secret",
            tokens::hs256(&good, b"another-secret-another-secret-another"),
            AuthError::InvalidSignature,
        ),
        (
            "alg none",
            tokens::raw(&json!({"alg": "none", "typ": "JWT"}), &good, b""),
            AuthError::UnsupportedAlgorithm,
        ),
        (
            "alg HS512",
            tokens::raw(&json!({"alg": "HS512"}), &good, b"x"),
            AuthError::UnsupportedAlgorithm,
        ),
        (
            "expired",
            with("exp", Some(json!(now() - 120))),
            AuthError::Expired,
        ),
        ("no exp", with("exp", None), AuthError::Expired),
        (
            "not yet valid",
            with("nbf", Some(json!(now() + 600))),
            AuthError::NotYetValid,
        ),
        (
            "issued an hour ahead",
            with("iat", Some(json!(now() + 3600))),
            AuthError::IssuedInFuture,
        ),
        (
            "wrong audience",
            with("aud", Some(json!("anon"))),
            AuthError::InvalidAudience,
        ),
        ("no audience", with("aud", None), AuthError::InvalidAudience),
        ("missing sub", with("sub", None), AuthError::InvalidSubject),
        (
            "sub not a uuid",
            with("sub", Some(json!("admin"))),
            AuthError::InvalidSubject,
        ),
        (
            "service role key",
            tokens::hs256(
                &json!({"iss": "supabase", "role": "service_role", "aud": "authenticated", "exp": now() + 60}),
                SECRET,
            ),
            AuthError::InvalidSubject,
        ),
        (
            "anon key",
            tokens::hs256(
                &json!({"iss": "supabase", "role": "anon", "exp": now() + 60}),
                SECRET,
            ),
            AuthError::InvalidAudience,
        ),
        ("garbage", "not.a.jwt".into(), AuthError::Malformed),
        ("two parts", "abc.def".into(), AuthError::Malformed),
        ("huge", "a".repeat(10_000), AuthError::Malformed),
    ];
    for (name, token, want) in cases {
        assert_eq!(v.verify(&token, now()).await.err(), Some(want), "{name}");
    }
    // A tampered payload under the original signature.
    let token = tokens::hs256(&good, SECRET);
    let parts: Vec<&str> = token.split('.').collect();
    let forged_claims = tokens::raw(
        &json!({}),
        &tokens::user_claims("00000000-0000-4000-8000-000000000999", None),
        b"",
    );
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        forged_claims.split('.').nth(1).unwrap(),
        parts[2]
    );
    assert_eq!(
        v.verify(&forged, now()).await.err(),
        Some(AuthError::InvalidSignature)
    );
}

#[tokio::test]
async fn es256_and_rs256_tokens_verify_against_the_jwks() {
    let Project {
        es,
        rs,
        server,
        v,
        claims,
    } = project_with_published_keys().await;

    for token in [es.sign(&claims), rs.sign(&claims)] {
        let user = v.verify(&token, now()).await.unwrap();
        assert_eq!(user.id.to_string(), USER);
    }
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        1,
        "JWKS fetched once"
    );
}

#[tokio::test]
async fn asymmetric_attacks_are_refused() {
    let Project {
        es,
        rs,
        server: _server, // serves the JWKS until the test ends
        v,
        claims,
    } = project_with_published_keys().await;

    // HS256 "signed" with the public key: never checked against a public key.
    let confused = tokens::hs256(&claims, &es.public_bytes());
    assert_eq!(
        v.verify(&confused, now()).await.err(),
        Some(AuthError::UnsupportedAlgorithm)
    );
    // Signed by a key the project does not publish.
    let stranger = EsKey::generate("es-key-1");
    assert_eq!(
        v.verify(&stranger.sign(&claims), now()).await.err(),
        Some(AuthError::InvalidSignature)
    );
    // Wrong issuer (another project).
    let other = tokens::user_claims(USER, Some("https://other.supabase.co/auth/v1"));
    assert_eq!(
        v.verify(&es.sign(&other), now()).await.err(),
        Some(AuthError::InvalidIssuer)
    );
    // ES256 header naming the RSA key.
    let input_sig = es.sign(&claims);
    let mut parts: Vec<String> = input_sig.split('.').map(str::to_owned).collect();
    parts[0] = tokens::raw(&json!({"alg": "ES256", "kid": "rs-key-1"}), &json!({}), b"")
        .split('.')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(
        v.verify(&parts.join("."), now()).await.err(),
        Some(AuthError::InvalidSignature)
    );
    // Expired and wrong audience hold for asymmetric tokens too.
    let mut expired = claims.clone();
    expired["exp"] = json!(now() - 100);
    assert_eq!(
        v.verify(&rs.sign(&expired), now()).await.err(),
        Some(AuthError::Expired)
    );
    let mut aud = claims.clone();
    aud["aud"] = json!(["anon"]);
    assert_eq!(
        v.verify(&es.sign(&aud), now()).await.err(),
        Some(AuthError::InvalidAudience)
    );
}

#[tokio::test]
async fn unknown_kid_refetches_once_then_respects_the_floor() {
    let old = EsKey::generate("old");
    let new = EsKey::generate("new");
    let server = MockServer::start().await;
    // First fetch lists only the old key; later fetches list both (a key rotation).
    Mock::given(method("GET"))
        .and(path("/auth/v1/.well-known/jwks.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"keys": [old.jwk()]})))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/auth/v1/.well-known/jwks.json"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"keys": [old.jwk(), new.jwk()]})),
        )
        .mount(&server)
        .await;
    let v = jwks_verifier(&server, Duration::from_secs(0));
    let claims = tokens::user_claims(USER, Some(&format!("{}/auth/v1", server.uri())));
    v.prefetch().await;

    assert!(v.verify(&old.sign(&claims), now()).await.is_ok());
    assert!(
        v.verify(&new.sign(&claims), now()).await.is_ok(),
        "rotated key found by refetch"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 2);

    let floored = jwks_verifier(&server, Duration::from_secs(3600));
    floored.prefetch().await;
    let unknown = EsKey::generate("nobody");
    for _ in 0..5 {
        assert_eq!(
            floored.verify(&unknown.sign(&claims), now()).await.err(),
            Some(AuthError::UnknownKey)
        );
    }
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        3,
        "one fetch for the floored verifier"
    );
}

/// How long the verifier may take when its JWKS cannot be fetched: its HTTP client's total
/// timeout (`shared::auth`: 2 s to connect, 4 s in all) and 2 s of slack for a slow machine.
const JWKS_GIVE_UP: Duration = Duration::from_secs(4 + 2);

#[tokio::test]
async fn jwks_down_means_401_not_a_hang_or_a_500() {
    // Down: nothing listens on the port any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    // Hanging: the kernel accepts the connection, nobody ever answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hanging = format!("http://{}", silent.local_addr().unwrap());
    let es = EsKey::generate("k");

    for url in [down, hanging] {
        let v = Verifier::new(AuthConfig {
            hs256_secret: None,
            supabase_url: Some(url.clone()),
            jwks_refetch_floor: Duration::from_secs(1),
        });
        let token = es.sign(&tokens::user_claims(USER, Some(&format!("{url}/auth/v1"))));
        let answer = tokio::time::timeout(JWKS_GIVE_UP, v.verify(&token, now()))
            .await
            .unwrap_or_else(|_| panic!("{url}: no answer within {JWKS_GIVE_UP:?}"));
        let error = answer.expect_err("no key could be fetched");
        assert_eq!(error, AuthError::UnknownKey, "{url}");
        let api = error.to_api_error();
        assert_eq!(
            (api.status.as_u16(), api.code),
            (401, "unknown_signing_key")
        );
    }
    drop(silent);
}
