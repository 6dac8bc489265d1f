//! Contract tests for the PostgREST backend against a fake that checks what PostgREST needs
//! (method, path, headers, body) and answers with PostgREST's documented bodies.

use std::time::Duration;

use serde_json::{json, Value};
use shared::config::{Secret, StoreConfig, StripeMode};
use shared::store::{Arg, Call, Store, StoreError};
use shared::telemetry::Metrics;
use testkit::fixtures::{self, FunctionUrlRequest};
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KEY: &str = "service-role-key-for-tests";

fn rpc(name: &'static str) -> wiremock::MockBuilder {
    Mock::given(method("POST"))
        .and(path(format!("/rest/v1/rpc/{name}")))
        .and(header("apikey", KEY))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .and(header("content-type", "application/json"))
        .and(header("accept", "application/json"))
}

fn store(server: &MockServer) -> Store {
    Store::postgrest(&server.uri(), Secret::new(KEY)).unwrap()
}

#[tokio::test]
async fn call_sends_named_arguments_and_reads_the_json_result() {
    let server = MockServer::start().await;
    rpc("do_thing")
        .and(body_partial_json(
            json!({"p_text": "张", "p_json": {"a": [1, 2]}}),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"ok": true})))
        .expect(1)
        .mount(&server)
        .await;
    let raw = serde_json::value::RawValue::from_string("{\"a\": [1, 2]}".into()).unwrap();

    let result = store(&server)
        .call(Call {
            function: "do_thing",
            args: vec![("p_text", Arg::Text("张")), ("p_json", Arg::Json(&raw))],
        })
        .await
        .unwrap();

    assert_eq!(result, json!({"ok": true}));
}

#[tokio::test]
async fn postgrest_errors_are_classified() {
    let server = MockServer::start().await;
    let cases = [
        (
            409,
            json!({"code": "23505", "message": "duplicate key value violates unique constraint", "details": "Key (id)=(1) already exists.", "hint": null}),
            "conflict",
        ),
        (
            400,
            json!({"code": "22023", "message": "event id, type and created are required", "details": null, "hint": null}),
            "database",
        ),
        (
            404,
            json!({"code": "PGRST202", "message": "Could not find the function public.f without parameters in the schema cache", "details": "Searched for the function public.f", "hint": null}),
            "database",
        ),
        (
            503,
            json!({"code": "PGRST001", "message": "Database client error. Retrying the connection.", "details": null, "hint": null}),
            "unavailable",
        ),
        (
            504,
            json!({"code": "PGRST003", "message": "Timed out acquiring connection from connection pool.", "details": null, "hint": null}),
            "unavailable",
        ),
    ];
    for (i, (status, body, _)) in cases.iter().enumerate() {
        rpc(Box::leak(format!("f{i}").into_boxed_str()))
            .respond_with(ResponseTemplate::new(*status).set_body_json(body))
            .mount(&server)
            .await;
    }
    let store = store(&server);
    for (i, (_, _, want)) in cases.iter().enumerate() {
        let name: &'static str = Box::leak(format!("f{i}").into_boxed_str());
        let err = store
            .call(Call {
                function: name,
                args: vec![],
            })
            .await
            .unwrap_err();
        let got = match err {
            StoreError::Conflict(_) => "conflict",
            StoreError::Database { .. } => "database",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Decode(_) => "decode",
        };
        assert_eq!(got, *want, "case {i}");
    }
}

#[tokio::test]
async fn unreachable_postgrest_is_unavailable() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let err = Store::postgrest(&uri, Secret::new(KEY))
        .unwrap()
        .call(Call {
            function: "f",
            args: vec![],
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

fn webhook_state(server: &MockServer) -> webhook::State {
    webhook::State {
        config: webhook::Config {
            store: StoreConfig::PostgRest {
                url: server.uri(),
                service_key: Secret::new(KEY),
            },
            secrets: vec![Secret::new("whsec_rest")],
            tolerance: Duration::from_secs(300),
            stripe_mode: StripeMode::Test,
            max_body_bytes: 1 << 20,
        },
        store: store(server),
        metrics: Metrics::in_memory("webhook").0,
    }
}

fn signed_invoice_request() -> (Value, FunctionUrlRequest) {
    let mut event = fixtures::load("stripe/invoice.paid.dahlia.json");
    fixtures::set(&mut event, "/created", json!(fixtures::now()));
    let body = fixtures::body(&event);
    let request = FunctionUrlRequest::post("/", &body)
        .header("stripe-signature", &fixtures::sign(&body, "whsec_rest"));
    (event, request)
}

#[tokio::test]
async fn webhook_through_postgrest_sends_the_event_verbatim() {
    let server = MockServer::start().await;
    rpc("apply_stripe_event")
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"outcome": "applied", "detail": "invoice paid"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let (event, request) = signed_invoice_request();

    let response = webhook::handle(&webhook_state(&server), request.into_request().unwrap()).await;

    assert_eq!(response.status(), 200);
    assert_eq!(fixtures::json_body(&response)["outcome"], "applied");
    let received = server.received_requests().await.unwrap();
    let sent: Value = serde_json::from_slice(&received[0].body).unwrap();
    assert_eq!(
        sent["p_payload"], event,
        "raw event kept for the audit trail"
    );
    assert_eq!(sent["p_event"]["id"], event["id"]);
    assert_eq!(sent["p_event"]["type"], "invoice.paid");
    assert_eq!(sent["p_effect"]["kind"], "invoice");
    assert_eq!(
        sent["p_effect"]["subscription_id"],
        "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw"
    );
    assert_eq!(sent["p_effect"]["amount_paid"], 2000);
}

#[tokio::test]
async fn webhook_answers_503_when_postgrest_is_down() {
    let server = MockServer::start().await;
    rpc("apply_stripe_event")
        .respond_with(ResponseTemplate::new(503).set_body_json(json!({"code": "PGRST001", "message": "Database client error.", "details": null, "hint": null})))
        .mount(&server)
        .await;
    let (_, request) = signed_invoice_request();

    let response = webhook::handle(&webhook_state(&server), request.into_request().unwrap()).await;

    assert_eq!(response.status(), 503);
    let body = fixtures::json_body(&response);
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert!(
        !body.to_string().contains("PGRST"),
        "internals stay in the logs"
    );
}
