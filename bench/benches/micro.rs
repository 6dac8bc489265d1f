//! In-process microbenchmarks (criterion): signature verification against the HMAC-SHA256 floor,
//! event parsing, request validation, rule matching, and the webhook's work before the database.
//! Run: `cargo bench -p bench`.

#![allow(clippy::unwrap_used)] // benchmark code: a failed unwrap is a broken benchmark

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use shared::config::Secret;
use shared::stripe::signature;

fn body_of(len: usize) -> Vec<u8> {
    let mut event = testkit::fixtures::load("stripe/checkout.session.completed.json");
    let pad = "x".repeat(len.saturating_sub(testkit::fixtures::body(&event).len() + 20));
    testkit::fixtures::set(
        &mut event,
        "/data/object/metadata/pad",
        serde_json::json!(pad),
    );
    testkit::fixtures::body(&event)
}

fn signatures(c: &mut Criterion) {
    let secret = Secret::new("whsec_bench_secret_0123456789");
    let mut group = c.benchmark_group("signature");
    for size in [1024usize, 10 * 1024, 100 * 1024] {
        let body = body_of(size);
        let header = signature::sign(&body, &secret, 1_800_000_000);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("verify", size), &body, |b, body| {
            b.iter(|| {
                signature::verify(
                    black_box(body),
                    &header,
                    std::slice::from_ref(&secret),
                    1_800_000_000,
                    signature::DEFAULT_TOLERANCE,
                )
            })
        });
        group.bench_with_input(BenchmarkId::new("hmac_floor", size), &body, |b, body| {
            b.iter(|| {
                let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).unwrap();
                mac.update(b"1800000000.");
                mac.update(black_box(body));
                mac.finalize()
            })
        });
    }
    group.finish();
}

fn parsing(c: &mut Criterion) {
    let event = testkit::fixtures::body(&testkit::fixtures::load(
        "stripe/checkout.session.completed.json",
    ));
    let invoice =
        testkit::fixtures::body(&testkit::fixtures::load("stripe/invoice.paid.dahlia.json"));
    c.bench_function("event_parse_checkout", |b| {
        b.iter(|| {
            shared::stripe::events::parse(black_box(&event))
                .map(|e| shared::payments::target_of(&e.event))
        })
    });
    c.bench_function("event_parse_invoice", |b| {
        b.iter(|| {
            shared::stripe::events::parse(black_box(&invoice))
                .map(|e| shared::payments::target_of(&e.event))
        })
    });
    let limits = chat::conversation::Limits {
        max_messages: 50,
        max_message_chars: 8000,
        max_total_chars: 32_000,
        max_tokens: 1024,
        allow_client_system: false,
        models: vec!["gpt-4o-mini".into()],
        default_model: "gpt-4o-mini".into(),
    };
    let chat_body = serde_json::json!({"model": "gpt-4o-mini", "stream": true, "messages": [
        {"role": "user", "content": "How much is the full report?"},
        {"role": "assistant", "content": "It is a one-time purchase."},
        {"role": "user", "content": "我想购买完整报告，怎么支付？"}]})
    .to_string();
    c.bench_function("chat_request_validate", |b| {
        b.iter(|| chat::wire::openai::parse(black_box(chat_body.as_bytes()), &limits))
    });
    // The same conversation as useChat posts it to the root: probe, UIMessages, the OpenAI parse.
    let ui_body = serde_json::json!({"id": "chat-1", "trigger": "submit-message", "messages": [
        {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "How much is the full report?"}]},
        {"id": "a1", "role": "assistant", "metadata": {"source": "llm", "model": "gpt-4o-mini"},
         "parts": [{"type": "step-start"}, {"type": "text", "text": "It is a one-time purchase.", "state": "done"}]},
        {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "我想购买完整报告，怎么支付？"}]}]})
    .to_string();
    c.bench_function("chat_request_validate_openai_on_root", |b| {
        b.iter(|| chat::wire::parse("/", black_box(chat_body.as_bytes()), &limits))
    });
    c.bench_function("chat_request_validate_use_chat", |b| {
        b.iter(|| chat::wire::parse("/", black_box(ui_body.as_bytes()), &limits))
    });
    let book = chat::rules::RuleBook::embedded();
    c.bench_function("rules_match_english", |b| {
        b.iter(|| {
            book.answer(black_box(
                "Hi, I was charged twice for the full report, can I get a refund?",
            ))
        })
    });
    c.bench_function("rules_match_chinese", |b| {
        b.iter(|| book.answer(black_box("你好，我的完整报告支付失败了，怎么办？")))
    });
    // 2,200 characters of near-misses: more than the longest text hostile.rs's property test
    // generates (2,000), which asserts only that an answer comes.
    let long: String = "refun paymen charg 报告 ".repeat(100);
    c.bench_function("rules_match_2000_chars", |b| {
        b.iter(|| book.answer(black_box(long.as_str())))
    });
}

/// Everything the webhook does per delivery except the Stripe read and the database call: the
/// function-URL event conversion, signature, parse, the object to read, the facts read (a
/// session, as the reader makes them) serialized as the store call's argument, metrics and the
/// answer.
fn webhook_without_database(c: &mut Criterion) {
    let body = testkit::fixtures::body(&testkit::fixtures::load(
        "stripe/checkout.session.completed.json",
    ));
    let secret = Secret::new("whsec_bench_secret_0123456789");
    let now = 1_800_000_000;
    let header = signature::sign(&body, &secret, now);
    let event = testkit::fixtures::FunctionUrlRequest::post("/", &body)
        .header("stripe-signature", &header)
        .event()
        .to_string();
    let (metrics, _) = shared::telemetry::Metrics::in_memory("webhook");
    c.bench_function("webhook_pipeline_without_db", |b| {
        b.iter(|| {
            // As shared::lambda::run: the function-URL shape read directly, in one pass, headers
            // and URI checked.
            let lambda: shared::function_url::FunctionUrlEvent =
                serde_json::from_str(black_box(&event)).unwrap();
            let request =
                shared::lambda::event_into_request(lambda, lambda_http::Context::default())
                    .unwrap();
            let body = request.body().as_ref();
            let sig = request.headers()["stripe-signature"].to_str().unwrap();
            signature::verify(
                body,
                sig,
                std::slice::from_ref(&secret),
                now,
                signature::DEFAULT_TOLERANCE,
            )
            .unwrap();
            let parsed = shared::stripe::events::parse(body).unwrap();
            let target = shared::payments::target_of(&parsed.event);
            let shared::stripe::events::Event::CheckoutSession { session, .. } = &parsed.event
            else {
                panic!("a session event")
            };
            let mut facts = shared::payments::Facts::at(now * 1000);
            facts
                .sessions
                .push(shared::payments::facts::SessionFact::of(session, None));
            let effect = (target, serde_json::value::to_raw_value(&facts).unwrap());
            let mut set = metrics.start();
            set.count("Received", 1);
            set.count_by("Processed", "EventType", &parsed.type_, 1);
            let line = set.to_emf(0);
            let answer =
                serde_json::json!({"received": true, "event_id": parsed.id, "outcome": "applied"})
                    .to_string();
            (effect, line, answer)
        })
    });
}

/// The adapter's event reading: `lambda_http`'s own types (which fail or panic on odd headers and
/// URIs) against `shared::function_url` (lenient headers, URI checked first), same event.
fn function_url_event(c: &mut Criterion) {
    let event = testkit::fixtures::FunctionUrlRequest::post("/", br#"{"a":1}"#)
        .header("authorization", "Bearer x.y.z")
        .event()
        .to_string();
    c.bench_function("function_url_event_lambda_http_alone", |b| {
        b.iter(|| {
            let v2: lambda_http::aws_lambda_events::apigw::ApiGatewayV2httpRequest =
                serde_json::from_str(black_box(&event)).unwrap();
            lambda_http::Request::from(lambda_http::request::LambdaRequest::ApiGatewayV2(v2))
        })
    });
    c.bench_function("function_url_event_checked", |b| {
        b.iter(|| {
            let event: shared::function_url::FunctionUrlEvent =
                serde_json::from_str(black_box(&event)).unwrap();
            shared::lambda::event_into_request(event, lambda_http::Context::default()).unwrap()
        })
    });
}

criterion_group!(
    benches,
    signatures,
    parsing,
    webhook_without_database,
    function_url_event
);
criterion_main!(benches);
