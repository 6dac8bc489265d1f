//! Hostile input: property-based tests (bounded by PROPTEST_CASES, default 256 per property) on
//! every parser, and attacks on headers. Each input is accepted as a valid value or refused with
//! a 4xx (through the function's own error map): no panic, no 5xx, bounded time.

use std::time::Duration;

use base64::Engine as _;
use lambda_http::aws_lambda_events::apigw::ApiGatewayV2httpRequest;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use shared::auth::{AuthConfig, Verifier};
use shared::config::Secret;
use shared::function_url::FunctionUrlEvent;
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
    fn any_bytes_are_an_event_or_a_400(body in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let outcome = webhook::parse_event(&body);
        if serde_json::from_slice::<serde_json::Value>(&body).is_err() {
            prop_assert!(outcome.is_err(), "not JSON, yet an event");
        }
        check_event(outcome)?;
    }

    #[test]
    fn event_shaped_json_is_an_event_or_a_400(type_ in "(checkout\\.session\\.completed|invoice\\.paid|customer\\.subscription\\.updated|x)", object in any_json()) {
        let body = serde_json::json!({"id": "evt_1", "type": type_, "created": 1, "livemode": false, "data": {"object": object}}).to_string();
        let outcome = webhook::parse_event(body.as_bytes());
        if type_ == "x" {
            // A type the webhook does not handle is recorded as ignored, whatever its object.
            prop_assert!(outcome.is_ok(), "{outcome:?}");
        }
        check_event(outcome)?;
    }

    #[test]
    fn any_chat_body_is_a_valid_chat_or_a_400(body in proptest::collection::vec(any::<u8>(), 0..1024), json in any_json()) {
        let limits = chat::conversation::Limits {
            max_messages: 8, max_message_chars: 100, max_total_chars: 300, max_tokens: 64,
            allow_client_system: false, models: vec!["m".into()], default_model: "m".into(),
        };
        check_chat(chat::wire::openai::parse(&body, &limits), &limits)?;
        let wrapped = serde_json::json!({"messages": [{"role": "user", "content": json}]}).to_string();
        check_chat(chat::wire::openai::parse(wrapped.as_bytes(), &limits), &limits)?;
        // The useChat body on the root, raw and with arbitrary parts.
        check_chat(chat::wire::parse("/", &body, &limits).map(|p| p.chat), &limits)?;
        let ui = serde_json::json!({"id": "c", "trigger": "regenerate-message",
            "messages": [{"id": "m", "role": "user", "parts": json}]}).to_string();
        check_chat(chat::wire::parse("/", ui.as_bytes(), &limits).map(|p| p.chat), &limits)?;
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
    fn rule_engine_answers_any_text(text in "\\PC{0,2000}") {
        // How fast is a benchmark (bench/benches/micro.rs, rules_match_2000_chars), not a
        // timed assertion that a loaded CI machine can fail.
        let book = chat::rules::RuleBook::embedded();
        let answer = book.answer(&text);
        prop_assert!(!answer.reply.trim().is_empty());
    }

    #[test]
    fn any_rules_file_is_a_rule_book_that_answers_or_an_error(
        text in prop_oneof![
            "\\PC{0,400}",
            (any_json(), any_json()).prop_map(|(default_reply, rules)|
                serde_json::json!({"default_reply": default_reply, "rules": rules}).to_string()),
            ("\\PC{0,20}", "\\PC{0,20}").prop_map(|(reply, pattern)| serde_json::json!({
                "default_reply": reply,
                "rules": [{"name": "r", "priority": 1, "patterns": [pattern], "reply": "matched"}],
            }).to_string()),
        ],
        question in "\\PC{0,40}",
    ) {
        // A rules file is read at cold start: a bad one is a configuration problem with a
        // reason (CHAT_RULES_PATH), never a rule book that cannot answer.
        match chat::rules::RuleBook::parse(&text) {
            Ok(book) => {
                // The file's own text holds its patterns, so asking it exercises the rules too.
                for asked in [&question, &text] {
                    prop_assert!(!book.answer(asked).reply.trim().is_empty());
                }
            }
            Err(reason) => {
                prop_assert!(!reason.is_empty());
                if serde_json::from_str::<serde_json::Value>(&text).is_err() {
                    prop_assert!(reason.starts_with("not a rules file"), "{reason}");
                }
            }
        }
    }

    #[test]
    fn any_body_reaches_the_handler_as_sent_or_gets_a_400(body in ".{0,300}", base64 in any::<bool>()) {
        let request = FunctionUrlRequest::post("/", b"").raw_body(&body, base64);
        let decoded = base64::engine::general_purpose::STANDARD.decode(&body);
        match request.into_request() {
            Ok(request) => {
                let expected = if base64 { decoded.unwrap() } else { body.into_bytes() };
                prop_assert_eq!(request.body().as_ref(), expected.as_slice());
            }
            Err(answer) => {
                prop_assert_eq!(answer.status(), http::StatusCode::BAD_REQUEST);
                prop_assert!(base64 && decoded.is_err(), "a body was refused: {:?}", body);
            }
        }
    }

    #[test]
    fn lambda_adapter_answers_4xx_for_any_host_proto_path_query_or_stage(
        host in prop_oneof![Just(None), "\\PC{0,30}".prop_map(Some), "[a-z0-9.:\\[\\]@%-]{0,30}".prop_map(Some)],
        proto in prop_oneof![Just(None), "\\PC{0,10}".prop_map(Some), "[a-z+.:-]{0,8}".prop_map(Some)],
        domain in prop_oneof![Just(None), "\\PC{0,20}".prop_map(Some)],
        path in prop_oneof!["\\PC{0,30}", "/[a-z0-9/%?#@:. -]{0,30}"],
        query in "\\PC{0,30}",
        stage in prop_oneof![Just(None), Just(Some("$default".to_owned())), "\\PC{0,10}".prop_map(Some)],
    ) {
        let mut event = base_event();
        let headers = event["headers"].as_object_mut().unwrap();
        headers.remove("host");
        headers.remove("x-forwarded-proto");
        if let Some(host) = host {
            headers.insert("host".into(), host.into());
        }
        if let Some(proto) = proto {
            headers.insert("x-forwarded-proto".into(), proto.into());
        }
        event["requestContext"]["domainName"] = domain.map_or(serde_json::Value::Null, Into::into);
        event["requestContext"]["stage"] = stage.map_or(serde_json::Value::Null, Into::into);
        event["rawPath"] = path.into();
        event["rawQueryString"] = query.into();
        if let Err(status) = adapt(&event) {
            prop_assert!(status.is_client_error(), "{status}");
        }
    }

    #[test]
    fn lambda_adapter_answers_4xx_for_any_header_set(
        headers in proptest::collection::vec(("\\PC{0,12}", any_json()), 0..40),
        copies in 0usize..3,
    ) {
        let mut event = base_event();
        let map = event["headers"].as_object_mut().unwrap();
        for (i, (name, value)) in headers.iter().enumerate() {
            for copy in 0..=copies {
                map.insert(format!("{name}{}", i * 3 + copy), value.clone());
            }
        }
        if let Err(status) = adapt(&event) {
            prop_assert!(status.is_client_error(), "{status}");
        }
    }
}

/// An event or, through the webhook's one error map, a 400 `invalid_event`; an event names the
/// object its type says (what the webhook reads back from Stripe).
fn check_event(
    outcome: Result<shared::stripe::events::ParsedEvent<'_>, webhook::WebhookError>,
) -> Result<(), TestCaseError> {
    match outcome {
        Ok(parsed) => {
            prop_assert!(parsed.id.starts_with("evt_"));
            let target = shared::payments::target_of(&parsed.event);
            let named = match parsed.type_.as_str() {
                "checkout.session.completed" => {
                    matches!(target, Some(shared::payments::Target::Session(_)))
                }
                "invoice.paid" => matches!(target, Some(shared::payments::Target::Invoice(_))),
                "customer.subscription.updated" => {
                    matches!(target, Some(shared::payments::Target::Subscription(_)))
                }
                _ => return Ok(()),
            };
            prop_assert!(named, "{} names {:?}", parsed.type_, target);
        }
        Err(e) => {
            // The webhook's own refusal, through its one error map.
            let answer = e.to_api_error();
            prop_assert_eq!(
                (answer.status.as_u16(), answer.code),
                (400, "invalid_event")
            );
        }
    }
    Ok(())
}

/// A chat within `limits` or, through chat's one error map, a 400 with a stable code.
fn check_chat(
    outcome: Result<chat::conversation::Chat, chat::conversation::Invalid>,
    limits: &chat::conversation::Limits,
) -> Result<(), TestCaseError> {
    match outcome {
        Ok(chat) => {
            prop_assert!(limits.models.contains(&chat.model));
            prop_assert!((1..=limits.max_messages).contains(&chat.messages.len()));
            prop_assert!((1..=limits.max_tokens).contains(&chat.max_tokens));
            let chars: Vec<usize> = chat
                .messages
                .iter()
                .map(|m| m.content.chars().count())
                .collect();
            prop_assert!(chars.iter().all(|&n| n <= limits.max_message_chars));
            prop_assert!(chars.iter().sum::<usize>() <= limits.max_total_chars);
            prop_assert!(chat
                .messages
                .iter()
                .all(|m| m.role == "user" || m.role == "assistant"));
            prop_assert!(chat
                .messages
                .iter()
                .any(|m| m.role == "user" && !m.content.trim().is_empty()));
        }
        Err(invalid) => {
            let code = invalid.code;
            prop_assert!(
                !code.is_empty() && code.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            );
            let answer = chat::ChatError::Invalid(invalid).to_api_error();
            prop_assert_eq!((answer.status.as_u16(), answer.code), (400, code));
        }
    }
    Ok(())
}

/// A real function-URL event (POST /, JSON body).
fn base_event() -> serde_json::Value {
    FunctionUrlRequest::post("/", br#"{"a":1}"#).event().clone()
}

/// As the runtime delivers an event: JSON text into the runtime's event type, then the adapter.
/// `Err` is the status of the adapter's own answer.
fn adapt(event: &serde_json::Value) -> Result<lambda_http::Request, http::StatusCode> {
    let text = serde_json::to_vec(event).unwrap();
    let event: FunctionUrlEvent = serde_json::from_slice(&text).expect("any headers deserialize");
    shared::lambda::event_into_request(event, lambda_http::Context::default()).map_err(|e| e.status)
}

/// Runs `f`, catching a panic without printing its message.
fn quietly<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> std::thread::Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(f);
    std::panic::set_hook(hook);
    result
}

/// What `lambda_http` alone does with the same event: `true` if its conversion panics.
fn lambda_http_alone_panics(event: &serde_json::Value) -> bool {
    let Ok(v2) = serde_json::from_value::<ApiGatewayV2httpRequest>(event.clone()) else {
        return false;
    };
    quietly(|| lambda_http::Request::from(lambda_http::request::LambdaRequest::ApiGatewayV2(v2)))
        .is_err()
}

/// `true` if `aws_lambda_events`' own event type refuses the event, or panics reading it.
fn aws_events_alone_fail(event: &serde_json::Value) -> bool {
    let text = serde_json::to_vec(event).unwrap();
    !matches!(
        quietly(move || serde_json::from_slice::<ApiGatewayV2httpRequest>(&text).is_err()),
        Ok(false)
    )
}

#[test]
fn hostile_function_url_events_get_4xx_where_lambda_http_would_panic() {
    let with_header = |name: &str, value: serde_json::Value| {
        let mut event = base_event();
        event["headers"][name] = value;
        event
    };
    let with = |pointer: &str, value: serde_json::Value| {
        let mut event = base_event();
        *event.pointer_mut(pointer).unwrap() = value;
        event
    };
    let uri_cases = [
        (
            "Host with a space",
            with_header("host", "exa mple.com".into()),
        ),
        (
            "Host with a bad port",
            with_header("host", "example.com:port".into()),
        ),
        ("Host an unclosed IPv6", with_header("host", "[::1".into())),
        (
            "X-Forwarded-Proto not a scheme",
            with_header("x-forwarded-proto", "h t t p".into()),
        ),
        (
            "X-Forwarded-Proto empty",
            with_header("x-forwarded-proto", "".into()),
        ),
        (
            "X-Forwarded-Proto a quote",
            with_header("x-forwarded-proto", "a\"b".into()),
        ),
        (
            "query with a space",
            with("/rawQueryString", "a=1 2".into()),
        ),
        (
            "query with a quote",
            with("/rawQueryString", "a=\"x\"".into()),
        ),
    ];
    for (name, event) in &uri_cases {
        assert!(
            lambda_http_alone_panics(event),
            "{name}: lambda_http alone panics"
        );
        assert_eq!(
            adapt(event).err(),
            Some(http::StatusCode::BAD_REQUEST),
            "{name}"
        );
    }

    let header_cases: Vec<(&str, serde_json::Value, u16)> = vec![
        (
            "a control character in a value",
            with_header("x-note", "a\u{1}b".into()),
            400,
        ),
        (
            "a name with a space",
            with_header("bad name", "x".into()),
            400,
        ),
        ("an empty name", with_header("", "x".into()), 400),
        ("a number for a value", with_header("x-n", 42.into()), 400),
        (
            "an object for a value",
            with_header("x-o", serde_json::json!({"a": 1})),
            400,
        ),
        (
            "a list with a number",
            with_header("x-l", serde_json::json!(["a", 1])),
            400,
        ),
        ("600 headers", many_headers(600), 431),
        (
            "40,000 headers (HeaderMap's limit is 32,768)",
            many_headers(40_000),
            431,
        ),
    ];
    for (name, event, status) in &header_cases {
        assert!(
            *status == 431 && event["headers"].as_object().unwrap().len() < 32_768
                || aws_events_alone_fail(event),
            "{name}: aws_lambda_events alone fails (or panics on) the whole event"
        );
        assert_eq!(
            adapt(event).err().map(|s| s.as_u16()),
            Some(*status),
            "{name}"
        );
    }

    // What a real client sends still passes: odd but valid values, multi-value headers, a huge one.
    let fine = [
        with_header("host", "abc.lambda-url.us-east-1.on.aws:443".into()),
        with_header("x-forwarded-proto", "http".into()),
        with_header("x-list", serde_json::json!(["a", "b"])),
        with_header("x-name", "Zoë 张".into()),
        with_header("x-big", "v".repeat(1 << 20).into()),
        with("/rawQueryString", "session_id=cs_test_1&x=%20".into()),
        with("/rawQueryString", "name=Zoë".into()),
        many_headers(400),
    ];
    for event in &fine {
        let request = adapt(event).unwrap();
        assert_eq!(request.method(), http::Method::POST);
    }
    let multi = adapt(&fine[2]).unwrap();
    assert_eq!(multi.headers().get_all("x-list").iter().count(), 2);
}

fn many_headers(n: usize) -> serde_json::Value {
    let mut event = base_event();
    let map = event["headers"].as_object_mut().unwrap();
    for i in 0..n {
        map.insert(format!("x-h{i}"), "v".into());
    }
    event
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
