//! Contract tests for the PostgREST backend against a fake that checks what PostgREST needs
//! (method, path, headers, body) and answers with PostgREST's documented bodies.

use serde_json::{json, Value};
use shared::config::{Secret, StoreConfig};
use shared::store::{Arg, Call, Store, StoreError};
use testkit::apps;
use testkit::fixtures::{self, FunctionUrlRequest};
use testkit::stripe_fake::FakeStripe;
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

fn webhook_state(server: &MockServer, stripe: &FakeStripe) -> webhook::State {
    let config = webhook::Config {
        secrets: vec![Secret::new("whsec_rest")],
        ..apps::webhook_config(
            StoreConfig::PostgRest {
                url: server.uri(),
                service_key: Secret::new(KEY),
            },
            &stripe.uri(),
        )
    };
    apps::webhook_state(config, store(server)).0
}

/// The invoice.paid fixture, its invoice held at the fake, signed for the webhook.
fn signed_invoice_request(stripe: &FakeStripe) -> (Value, FunctionUrlRequest) {
    let mut event = fixtures::load("stripe/invoice.paid.dahlia.json");
    fixtures::set(&mut event, "/created", json!(fixtures::now()));
    stripe.hold(&event["data"]["object"]);
    let body = fixtures::body(&event);
    let request = FunctionUrlRequest::post("/", &body)
        .header("stripe-signature", &fixtures::sign(&body, "whsec_rest"));
    (event, request)
}

#[tokio::test]
async fn webhook_through_postgrest_sends_the_event_verbatim_with_what_stripe_says() {
    let server = MockServer::start().await;
    let stripe = FakeStripe::start().await;
    rpc("record_stripe_facts")
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"outcome": "applied", "detail": "1 changed"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let (event, request) = signed_invoice_request(&stripe);

    let response = webhook::handle(
        &webhook_state(&server, &stripe),
        request.into_request().unwrap(),
    )
    .await;

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
    assert_eq!(
        sent["p_facts"]["invoices"][0]["subscription_id"],
        "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw"
    );
    assert_eq!(sent["p_facts"]["invoices"][0]["amount_paid"], 2000);
    assert!(sent["p_facts"]["read_at_ms"].as_i64().unwrap() > 1_700_000_000_000);
    assert_eq!(sent["p_actions"], json!([]));
}

#[tokio::test]
async fn webhook_answers_503_when_postgrest_is_down() {
    let server = MockServer::start().await;
    let stripe = FakeStripe::start().await;
    rpc("record_stripe_facts")
        .respond_with(ResponseTemplate::new(503).set_body_json(json!({"code": "PGRST001", "message": "Database client error.", "details": null, "hint": null})))
        .mount(&server)
        .await;
    let (_, request) = signed_invoice_request(&stripe);

    let response = webhook::handle(
        &webhook_state(&server, &stripe),
        request.into_request().unwrap(),
    )
    .await;

    assert_eq!(response.status(), 503);
    let body = fixtures::json_body(&response);
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert!(
        !body.to_string().contains("PGRST"),
        "internals stay in the logs"
    );
}

// The same backend against the PostgREST stand-in (testkit::postgrest) on the real schema: the
// functions' named arguments, types and grants as PostgREST would bind and check them.

mod live {
    use super::*;
    use testkit::db::TestDb;
    use testkit::postgrest::PostgRest;

    async fn live() -> (TestDb, PostgRest, Store) {
        let db = TestDb::new().await;
        let rest = PostgRest::start(&db.url, KEY).await;
        let store = Store::postgrest(&rest.uri(), Secret::new(KEY)).unwrap();
        (db, rest, store)
    }

    #[tokio::test]
    async fn webhook_applies_an_event_once_through_postgrest() {
        let (db, rest, store) = live().await;
        let sql = db.client().await;
        let user = db.create_user(&sql).await.to_string();
        let order: String = sql
            .query_one(
                "insert into orders (user_id) values ($1::text::uuid) returning id::text",
                &[&user],
            )
            .await
            .unwrap()
            .get(0);
        let stripe = FakeStripe::start().await;
        let session = stripe.session_for_order(&user, &order);
        sql.execute(
            "update orders set stripe_checkout_session_id = $2 where id = $1::text::uuid",
            &[&order, &session],
        )
        .await
        .unwrap();
        stripe.pay(&session).unwrap();
        let event = stripe.take_events().remove(0);
        let body = fixtures::body(&event);
        let config = webhook::Config {
            secrets: vec![Secret::new("whsec_rest")],
            ..apps::webhook_config(
                StoreConfig::PostgRest {
                    url: rest.uri(),
                    service_key: Secret::new(KEY),
                },
                &stripe.uri(),
            )
        };
        let (state, _) = apps::webhook_state(config, store);
        let deliver = || {
            FunctionUrlRequest::post("/", &body)
                .header("stripe-signature", &fixtures::sign(&body, "whsec_rest"))
                .into_request()
                .unwrap()
        };

        let first = webhook::handle(&state, deliver()).await;
        let again = webhook::handle(&state, deliver()).await;

        assert_eq!(first.status(), 200);
        assert_eq!(fixtures::json_body(&first)["outcome"], "applied");
        assert_eq!(again.status(), 200);
        assert_eq!(fixtures::json_body(&again)["outcome"], "duplicate");
        let row = sql
            .query_one(
                "select status, (select count(*) from stripe_events where id = $2)
                 from orders where id = $1::text::uuid",
                &[&order, &event["id"].as_str().unwrap()],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "paid");
        assert_eq!(row.get::<_, i64>(1), 1);
    }

    #[tokio::test]
    async fn checkout_functions_bind_typed_arguments_through_postgrest() {
        let (db, _rest, store) = live().await;
        let sql = db.client().await;
        let user = db.create_user(&sql).await;

        let limits = shared::store::orders::BeginLimits {
            per_window: Some(10),
            window_s: 60,
            lease_s: 30,
            session_ttl_s: 7200,
        };

        let begun = store
            .checkout_begin(
                user,
                shared::store::orders::FULL_REPORT,
                None,
                uuid::Uuid::new_v4(),
                limits,
            )
            .await
            .unwrap();
        let again = store
            .checkout_begin(
                user,
                shared::store::orders::FULL_REPORT,
                None,
                uuid::Uuid::new_v4(),
                limits,
            )
            .await
            .unwrap();

        let orders: i64 = sql
            .query_one("select count(*) from orders where user_id = $1", &[&user])
            .await
            .unwrap()
            .get(0);
        assert_eq!(orders, 1);
        assert!(
            matches!(begun, shared::store::orders::Begin::CreateSession { .. }),
            "{begun:?}"
        );
        assert!(
            !matches!(again, shared::store::orders::Begin::CreateSession { .. }),
            "the lease is held: {again:?}"
        );
    }

    #[tokio::test]
    async fn errors_carry_postgrest_codes_and_statuses() {
        let (_db, _rest, store) = live().await;

        let missing = store
            .call(Call {
                function: "no_such_function",
                args: vec![("p_x", Arg::Int(Some(1)))],
            })
            .await
            .unwrap_err();
        let bad_type = store
            .call(Call {
                function: "chat_admit",
                args: vec![
                    ("p_user", Arg::Text("not-a-uuid")),
                    ("p_cache_key", Arg::Text("k")),
                    ("p_limit", Arg::Int(Some(1))),
                    ("p_window_s", Arg::Int(Some(60))),
                ],
            })
            .await
            .unwrap_err();
        let unknown_argument = store
            .call(Call {
                function: "chat_admit",
                args: vec![("p_nope", Arg::Int(Some(1)))],
            })
            .await
            .unwrap_err();

        assert!(
            matches!(&missing, StoreError::Database { code, .. } if code == "PGRST202"),
            "{missing:?}"
        );
        assert!(
            matches!(&bad_type, StoreError::Database { code, .. } if code == "22P02"),
            "{bad_type:?}"
        );
        assert!(
            matches!(&unknown_argument, StoreError::Database { code, .. } if code == "PGRST202"),
            "{unknown_argument:?}"
        );
    }
}
