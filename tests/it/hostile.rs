//! Hostile input: property-based tests (bounded by PROPTEST_CASES, default 256 per property) on
//! every parser, and attacks on headers. No panic, no 5xx, bounded time.

use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use shared::auth::{AuthConfig, Verifier};
use shared::config::Secret;
use shared::stripe::signature::{self, SignatureError, DEFAULT_TOLERANCE};
use testkit::fixtures::FunctionUrlRequest;

const NOW: i64 = 1_800_000_000;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn signature_header_parser_never_panics(header in ".{0,600}", body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let result = signature::verify(&body, &header, &[Secret::new("whsec_x")], NOW, DEFAULT_TOLERANCE);
        prop_assert!(result.is_err());
    }

    #[test]
    fn signed_bodies_verify_and_any_change_breaks_them(
        body in proptest::collection::vec(any::<u8>(), 0..2048),
        secret in "whsec_[A-Za-z0-9]{1,40}",
        flip in any::<prop::sample::Index>(),
        t in (NOW - 300)..(NOW + 1000),
    ) {
        let secret = Secret::new(secret);
        let header = signature::sign(&body, &secret, t);
        prop_assert_eq!(signature::verify(&body, &header, std::slice::from_ref(&secret), NOW, DEFAULT_TOLERANCE), Ok(t));
        if !body.is_empty() {
            let mut changed = body.clone();
            let i = flip.index(changed.len());
            changed[i] ^= 0x01;
            prop_assert_eq!(signature::verify(&changed, &header, &[secret], NOW, DEFAULT_TOLERANCE), Err(SignatureError::NoMatch));
        }
    }

    #[test]
    fn event_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = shared::stripe::events::parse(&body);
    }

    #[test]
    fn event_parser_survives_event_shaped_json(type_ in "(checkout\\.session\\.completed|invoice\\.paid|customer\\.subscription\\.updated|x)", object in any_json()) {
        let body = serde_json::json!({"id": "evt_1", "type": type_, "created": 1, "livemode": false, "data": {"object": object}}).to_string();
        if let Ok(event) = shared::stripe::events::parse(body.as_bytes()) {
            let _ = event.event.effect();
        }
    }

    #[test]
    fn chat_request_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..1024), json in any_json()) {
        let limits = chat::request::Limits {
            max_messages: 8, max_message_chars: 100, max_total_chars: 300, max_tokens: 64,
            allow_client_system: false, models: vec!["m".into()], default_model: "m".into(),
        };
        let _ = chat::request::parse(&body, &limits);
        let wrapped = serde_json::json!({"messages": [{"role": "user", "content": json}]}).to_string();
        let _ = chat::request::parse(wrapped.as_bytes(), &limits);
        // The useChat body on the root, raw and with arbitrary parts.
        let _ = chat::wire::parse("/", &body, &limits);
        let ui = serde_json::json!({"id": "c", "trigger": "regenerate-message",
            "messages": [{"id": "m", "role": "user", "parts": json}]}).to_string();
        let _ = chat::wire::parse("/", ui.as_bytes(), &limits);
    }

    #[test]
    fn checkout_body_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..6000), json_type in any::<bool>()) {
        let mut request = FunctionUrlRequest::post("/", &body);
        if !json_type {
            request = request.header("content-type", "text/plain");
        }
        if let Ok(request) = request.into_request() {
            if let Err(e) = checkout::parse_body(&request) {
                prop_assert!(e.to_api_error().status.is_client_error());
            }
        }
    }

    #[test]
    fn rule_engine_answers_any_text_quickly(text in "\\PC{0,2000}") {
        let book = chat::rules::RuleBook::embedded();
        let started = std::time::Instant::now();
        let answer = book.answer(&text);
        prop_assert!(!answer.reply.is_empty());
        prop_assert!(started.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn rules_file_parser_never_panics(text in "\\PC{0,400}") {
        let _ = chat::rules::RuleBook::parse(&text);
    }

    #[test]
    fn lambda_adapter_never_panics_on_bodies(body in ".{0,300}", base64 in any::<bool>()) {
        let request = FunctionUrlRequest::post("/", b"").raw_body(&body, base64);
        let _ = request.into_request();
    }
}

fn any_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "\\PC{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::hash_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

#[tokio::test]
async fn token_verifier_refuses_any_garbage() {
    let verifier = Verifier::new(AuthConfig {
        hs256_secret: Some(Secret::new("secret")),
        supabase_url: None,
        jwks_refetch_floor: Duration::from_secs(30),
    });
    let mut runner = proptest::test_runner::TestRunner::new(config());
    let tokens: Vec<String> = (0..runner.config().cases)
        .map(|_| {
            "[A-Za-z0-9_.=-]{0,300}"
                .new_tree(&mut runner)
                .unwrap()
                .current()
        })
        .collect();
    for token in tokens {
        assert!(verifier.verify(&token, NOW).await.is_err(), "{token}");
    }
    // An oversized header is refused, not processed.
    let huge = "a".repeat(100_000);
    assert!(verifier.verify(&huge, NOW).await.is_err());
}
