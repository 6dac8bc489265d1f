//! template.yaml's dashboard and alarms against the code. Every metric they name must be one the
//! functions write, with the same name and dimensions: the EMF lines are captured while each
//! function answers the requests below (the integration harness's states, configured from
//! variables as a deployed function is), then every `SaasFunctions` metric of a widget, a SEARCH
//! expression or an alarm is looked up among them. Lambda's own metrics must be ones Lambda
//! publishes, of this template's functions and alias. Every alarm is on the dashboard's alarm
//! widget and in the runbook's table, which names a widget of the dashboard.
//!
//! A new function adds its scenario to [`capture`] (the reconciler's runs are in [`payments`]):
//! its metric lines then count, and the checks below need no change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use shared::config::EnvReader;
use shared::store::Store;
use testkit::apps::{self, MetricLines};
use testkit::db::TestDb;
use testkit::fixtures::{self, FunctionUrlRequest};
use testkit::money::{Setup, World};
use testkit::proxy::DbProxy;
use testkit::stripe_fake::FakeStripe;
use testkit::{llm_fake, tokens};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};
use yaml_rust2::{Yaml, YamlLoader};

/// The metrics Lambda publishes that a widget or alarm may read (AWS/Lambda: invocation,
/// performance, concurrency and function URL metrics).
const LAMBDA_METRICS: &[&str] = &[
    "Invocations",
    "Errors",
    "Throttles",
    "Duration",
    "ConcurrentExecutions",
    "UrlRequestCount",
    "Url4xxCount",
    "Url5xxCount",
    "UrlRequestLatency",
];

// ---- template.yaml -------------------------------------------------------------------------

struct Template {
    resources: Vec<(String, Yaml)>,
    globals: Yaml,
}

impl Template {
    fn load() -> Template {
        let text = std::fs::read_to_string(testkit::workspace_root().join("template.yaml"))
            .expect("template.yaml");
        // Local tags (!Ref, !Sub, !GetAtt, !If) are dropped by the loader: a tagged value reads
        // as what it tags (`!Ref X` as "X", `!Sub "..."` as the string).
        let doc = YamlLoader::load_from_str(&text)
            .expect("template.yaml is YAML")
            .remove(0);
        let resources = doc["Resources"]
            .as_hash()
            .expect("Resources")
            .iter()
            .map(|(k, v)| (k.as_str().unwrap_or_default().to_owned(), v.clone()))
            .collect();
        Template {
            resources,
            globals: doc["Globals"].clone(),
        }
    }

    fn of_type<'a>(&'a self, type_: &'a str) -> impl Iterator<Item = (&'a str, &'a Yaml)> + 'a {
        self.resources
            .iter()
            .filter(move |(_, r)| r["Type"].as_str() == Some(type_))
            .map(|(id, r)| (id.as_str(), r))
    }

    fn functions(&self) -> BTreeSet<String> {
        self.of_type("AWS::Serverless::Function")
            .map(|(id, _)| id.to_owned())
            .collect()
    }

    fn alarms(&self) -> BTreeSet<String> {
        self.of_type("AWS::CloudWatch::Alarm")
            .map(|(id, _)| id.to_owned())
            .collect()
    }

    fn alias(&self) -> String {
        self.globals["Function"]["AutoPublishAlias"]
            .as_str()
            .expect("Globals: AutoPublishAlias")
            .to_owned()
    }

    /// The dashboard body, JSON under `!Sub` (its `${...}` sit inside JSON strings).
    fn dashboard(&self) -> Value {
        let (_, dashboard) = self
            .of_type("AWS::CloudWatch::Dashboard")
            .next()
            .expect("an AWS::CloudWatch::Dashboard");
        let body = dashboard["Properties"]["DashboardBody"]
            .as_str()
            .expect("DashboardBody");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("DashboardBody is not JSON: {e}"))
    }
}

fn widgets(dashboard: &Value) -> &Vec<Value> {
    dashboard["widgets"].as_array().expect("widgets")
}

fn title(widget: &Value) -> &str {
    widget["properties"]["title"].as_str().unwrap_or_default()
}

// ---- the metrics a dashboard or an alarm names ----------------------------------------------

/// One metric a widget, a SEARCH or an alarm reads. A dimension without a value (a SEARCH
/// listing it) matches any value.
#[derive(Debug)]
struct Named {
    place: String,
    namespace: String,
    name: String,
    dimensions: BTreeMap<String, Option<String>>,
}

fn named_by_dashboard(dashboard: &Value) -> Vec<Named> {
    let mut named = Vec::new();
    for widget in widgets(dashboard) {
        if widget["type"] != "metric" {
            continue;
        }
        let place = format!("widget {:?}", title(widget));
        for entry in widget["properties"]["metrics"]
            .as_array()
            .unwrap_or_else(|| panic!("{place}: no metrics"))
        {
            let parts = entry.as_array().expect("a metric is an array");
            if let Some(expression) = parts[0]["expression"].as_str() {
                if let Some(search) = search(expression) {
                    named.push(Named {
                        place: place.clone(),
                        ..search
                    });
                }
                continue;
            }
            let words: Vec<&str> = parts.iter().filter_map(Value::as_str).collect();
            assert!(
                words.len() >= 2 && words.len().is_multiple_of(2) && !words.contains(&"."),
                "{place}: write [namespace, name, dimension, value, ...] in full: {entry}"
            );
            named.push(Named {
                place: place.clone(),
                namespace: words[0].to_owned(),
                name: words[1].to_owned(),
                dimensions: words[2..]
                    .chunks(2)
                    .map(|p| (p[0].to_owned(), Some(p[1].to_owned())))
                    .collect(),
            });
        }
    }
    named
}

/// `SEARCH('{Namespace,Dim,...} MetricName="X" Dim="v"', 'Sum', 300)` as a [`Named`].
fn search(expression: &str) -> Option<Named> {
    let inner = expression.strip_prefix("SEARCH('")?;
    let schema = &inner[inner.find('{')? + 1..inner.find('}')?];
    let mut names = schema.split(',').map(str::trim);
    let namespace = names.next()?.to_owned();
    let mut dimensions: BTreeMap<String, Option<String>> =
        names.map(|d| (d.to_owned(), None)).collect();
    let terms = &inner[inner.find('}')? + 1..inner.find('\'')?];
    let mut name = None;
    for term in terms.split_whitespace() {
        let (key, value) = term.split_once('=')?;
        let value = value.trim_matches('"').to_owned();
        if key == "MetricName" {
            name = Some(value);
        } else {
            assert!(
                dimensions.contains_key(key),
                "{expression}: {key} is not in the schema"
            );
            dimensions.insert(key.to_owned(), Some(value));
        }
    }
    Some(Named {
        place: String::new(),
        namespace,
        name: name.unwrap_or_else(|| panic!("{expression}: no MetricName")),
        dimensions,
    })
}

fn named_by_alarms(template: &Template) -> Vec<Named> {
    let mut named = Vec::new();
    for (id, alarm) in template.of_type("AWS::CloudWatch::Alarm") {
        let properties = &alarm["Properties"];
        let mut metrics = Vec::new();
        if properties["MetricName"].as_str().is_some() {
            metrics.push(properties);
        }
        if let Some(queries) = properties["Metrics"].as_vec() {
            metrics.extend(
                queries
                    .iter()
                    .map(|q| &q["MetricStat"]["Metric"])
                    .filter(|m| !m.is_badvalue()),
            );
        }
        assert!(!metrics.is_empty(), "alarm {id} reads no metric");
        for metric in metrics {
            named.push(Named {
                place: format!("alarm {id}"),
                namespace: metric["Namespace"].as_str().expect("Namespace").to_owned(),
                name: metric["MetricName"]
                    .as_str()
                    .expect("MetricName")
                    .to_owned(),
                dimensions: metric["Dimensions"]
                    .as_vec()
                    .map(|dims| {
                        dims.iter()
                            .map(|d| {
                                let value = match &d["Value"] {
                                    Yaml::String(s) => s.clone(),
                                    other => panic!("alarm {id}: dimension value {other:?}"),
                                };
                                (d["Name"].as_str().unwrap_or("").to_owned(), Some(value))
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
    }
    named
}

// ---- the metrics the functions write --------------------------------------------------------

/// Every (namespace, metric, dimensions with their values) the EMF lines declare, as CloudWatch
/// extracts them: each metric under each of its directive's dimension sets.
#[derive(Default)]
struct Catalog {
    metrics: BTreeSet<(String, String, BTreeMap<String, String>)>,
}

impl Catalog {
    fn add_line(&mut self, line: &str) {
        let doc: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for directive in doc["_aws"]["CloudWatchMetrics"]
            .as_array()
            .unwrap_or_else(|| panic!("not an EMF line: {line}"))
        {
            let namespace = directive["Namespace"].as_str().expect("Namespace");
            for set in directive["Dimensions"].as_array().expect("Dimensions") {
                let dimensions: BTreeMap<String, String> = set
                    .as_array()
                    .expect("a dimension set")
                    .iter()
                    .map(|d| {
                        let d = d.as_str().expect("a dimension name");
                        let value = doc[d].as_str().unwrap_or_else(|| panic!("{d}: {line}"));
                        (d.to_owned(), value.to_owned())
                    })
                    .collect();
                for metric in directive["Metrics"].as_array().expect("Metrics") {
                    let name = metric["Name"].as_str().expect("Name").to_owned();
                    self.metrics
                        .insert((namespace.to_owned(), name, dimensions.clone()));
                }
            }
        }
    }

    fn add(&mut self, lines: &MetricLines) {
        for line in lines.lock().unwrap().iter() {
            self.add_line(line);
        }
    }

    fn has(&self, named: &Named) -> bool {
        self.metrics.iter().any(|(namespace, name, dimensions)| {
            *namespace == named.namespace
                && *name == named.name
                && dimensions.len() == named.dimensions.len()
                && named.dimensions.iter().all(|(k, want)| {
                    dimensions
                        .get(k)
                        .is_some_and(|got| want.as_ref().is_none_or(|w| w == got))
                })
        })
    }
}

/// The metric lines of every function while it answers what the dashboard is about.
async fn capture() -> Catalog {
    let mut catalog = Catalog::default();
    payments(&mut catalog).await;
    chat(&mut catalog).await;
    catalog
}

/// The webhook and checkout in the money harness: payments, their failures, duplicates,
/// refunds, disputes, foreign sessions, Stripe errors and the database gone.
async fn payments(catalog: &mut Catalog) {
    let w = World::new(Setup::default()).await;
    let deliver_all = || async {
        for event in w.stripe.take_events() {
            w.deliver(&event).await;
        }
    };

    // Paid, delivered twice; the paid user clicks again; a Payment Link paid on top is the
    // duplicate, refunded; then the first payment is refunded in the Dashboard.
    let user = w.user().await;
    let (status, first) = w.click(&user).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(w.click(&user).await.0, 200, "the same session again");
    let session = first["session_id"].as_str().unwrap().to_owned();
    let pi = w.stripe.pay(&session).unwrap();
    let events = w.stripe.take_events();
    for event in events.iter().chain(&events) {
        w.deliver(event).await;
    }
    assert_eq!(w.click(&user).await.0, 409, "already paid");
    let link = w.stripe.foreign_session(&user, apps::PRICE, 1900);
    w.stripe.pay(&link).unwrap();
    deliver_all().await;
    w.stripe.refund(&pi, None).unwrap();
    deliver_all().await;

    // A payment disputed.
    let disputed = w.user().await;
    let (_, clicked) = w.click(&disputed).await;
    let pi = w
        .stripe
        .pay(clicked["session_id"].as_str().unwrap())
        .unwrap();
    w.stripe.dispute(&pi).unwrap();
    deliver_all().await;

    // A duplicate whose refunds all fail at Stripe.
    let twice = w.user().await;
    let (_, clicked) = w.click(&twice).await;
    w.stripe
        .pay(clicked["session_id"].as_str().unwrap())
        .unwrap();
    deliver_all().await;
    let link = w.stripe.foreign_session(&twice, apps::PRICE, 1900);
    w.stripe.pay(&link).unwrap();
    w.stripe.next_refund_status(Some("failed"));
    deliver_all().await;
    w.stripe.next_refund_status(None);

    // The reconciler: a payment whose event was lost, applied by a run; the duplicate above
    // refused again, then refunded by the next run; a run that cannot reach Stripe.
    let lost = w.user().await;
    let (_, clicked) = w.click(&lost).await;
    w.stripe
        .pay(clicked["session_id"].as_str().unwrap())
        .unwrap();
    assert_eq!(w.stripe.take_events().len(), 1);
    w.stripe.next_refund_status(Some("failed"));
    let run = w.reconcile(None).await;
    assert_eq!(run.events_new, 1, "{run:?}");
    assert!(!run.failures.is_empty(), "the refund refused: {run:?}");
    w.stripe.next_refund_status(None);
    let run = w.reconcile(None).await;
    assert!(run.failures.is_empty(), "{run:?}");
    assert!(w.owns(&lost).await);
    w.proxy.down();
    assert!(reconcile::handle(&w.reconciler, None, None).await.is_err());
    w.proxy.up();
    deliver_all().await;

    // A session that expires, an async payment that fails, a session for another product.
    let late = w.user().await;
    let (_, expiring) = w.click(&late).await;
    assert!(w.stripe.expire(expiring["session_id"].as_str().unwrap()));
    let slow = w.user().await;
    let (_, pending) = w.click(&slow).await;
    let pending = pending["session_id"].as_str().unwrap().to_owned();
    w.stripe.pay_async(&pending).unwrap();
    w.stripe.settle_async(&pending, false).unwrap();
    let other = w.user().await;
    let foreign = w
        .stripe
        .foreign_session(&other, "price_something_else", 100);
    w.stripe.pay(&foreign).unwrap();
    deliver_all().await;

    // A forged delivery.
    let body = fixtures::body(&fixtures::checkout_event(
        "checkout.session.completed",
        "cs_test_forged",
        &uuid::Uuid::new_v4().to_string(),
        &user,
        "paid",
    ));
    let forged = FunctionUrlRequest::post("/", &body)
        .header("stripe-signature", &fixtures::sign(&body, "whsec_not_ours"))
        .into_request()
        .unwrap();
    assert_eq!(webhook::handle(&w.webhook, forged).await.status(), 400);

    // Stripe failing a click (more 500s than any retry policy tries), then the database gone
    // for a click and a delivery.
    w.stripe
        .script(std::iter::repeat_n(FakeStripe::server_error(), 10));
    let unlucky = w.user().await;
    assert_eq!(w.click(&unlucky).await.0, 503, "Stripe down");
    let event = fixtures::checkout_event(
        "checkout.session.completed",
        "cs_test_db_down",
        &uuid::Uuid::new_v4().to_string(),
        &user,
        "paid",
    );
    w.proxy.down();
    assert_eq!(w.deliver(&event).await.0, 503, "database down");
    assert_eq!(w.click(&unlucky).await.0, 503, "database down");
    w.proxy.up();

    catalog.add(&w.webhook_metrics);
    catalog.add(&w.reconcile_metrics);
    for lines in &w.checkout_metrics {
        catalog.add(lines);
    }
}

/// The chat function configured from its variables: an LLM answer, an upstream that times
/// out, and the database gone.
async fn chat(catalog: &mut Catalog) {
    let db = TestDb::new().await;
    let proxy = DbProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = proxy.url_through(&db.url);
    let good = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(llm_fake::completion("Hello from the LLM")),
        )
        .mount(&good)
        .await;
    let slow = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(llm_fake::completion("too late"))
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&slow)
        .await;
    let sql = db.client().await;
    let user = db.create_user(&sql).await.to_string();
    let secret = "dashboard-test-jwt-secret-0123456789-abc";
    let token = tokens::hs256(&tokens::user_claims(&user, None), secret.as_bytes());

    for (upstream, question) in [(&good, "hello there"), (&slow, "are you there?")] {
        let variables = BTreeMap::from([
            ("APP_ENV", "test".to_owned()),
            ("DATABASE_URL", url.clone()),
            ("SUPABASE_JWT_SECRET", secret.to_owned()),
            ("OPENAI_API_KEY", "sk-test-dashboard".to_owned()),
            ("OPENAI_BASE_URL", format!("{}/v1", upstream.uri())),
            ("LLM_TIMEOUT_MS", "300".to_owned()),
            ("LLM_MAX_RETRIES", "0".to_owned()),
            ("LLM_TOTAL_BUDGET_MS", "2000".to_owned()),
        ]);
        let config = chat::Config::read(EnvReader::new(|k| variables.get(k).cloned()))
            .unwrap_or_else(|e| panic!("chat config: {e}"));
        let (state, lines) = apps::chat_state(config, Store::postgres(&url, 2).unwrap());
        let state = Arc::new(state);
        let ask = |text: &str| {
            let body = json!({"messages": [{"role": "user", "content": text}]});
            FunctionUrlRequest::post("/v1/chat/completions", body.to_string().as_bytes())
                .bearer(&token)
                .into_request()
                .unwrap()
        };
        let response = chat::handle(state.clone(), ask(question)).await;
        assert_eq!(response.status(), 200);
        response.into_body().collect().await;
        if upstream.uri() == slow.uri() {
            proxy.down();
            let response = chat::handle(state.clone(), ask("and without a database?")).await;
            assert_eq!(response.status(), 200);
            response.into_body().collect().await;
            proxy.up();
        }
        catalog.add(&lines);
    }
}

// ---- the checks -----------------------------------------------------------------------------

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alarms_read_is_one_the_functions_write() {
    let template = Template::load();
    let functions = template.functions();
    let alias = template.alias();
    let mut named = named_by_dashboard(&template.dashboard());
    named.extend(named_by_alarms(&template));
    let catalog = capture().await;

    let mut wrong = Vec::new();
    let mut ours = 0;
    for metric in &named {
        match metric.namespace.as_str() {
            shared::telemetry::NAMESPACE => {
                ours += 1;
                if !catalog.has(metric) {
                    wrong.push(format!(
                        "{}: {metric:?}: no function writes it",
                        metric.place
                    ));
                }
            }
            "AWS/Lambda" => {
                if let Err(why) = lambda_metric(metric, &functions, &alias) {
                    wrong.push(format!("{}: {metric:?}: {why}", metric.place));
                }
            }
            other => wrong.push(format!("{}: namespace {other}", metric.place)),
        }
    }
    // The parsing must have found what it is meant to check: a changed layout that reads
    // nothing would pass on nothing.
    assert!(ours > 60, "only {ours} SaasFunctions metrics named");
    assert!(
        wrong.is_empty(),
        "{} metric(s) the functions do not write as named:\n{}\n\nwritten:\n{}",
        wrong.len(),
        wrong.join("\n"),
        catalog
            .metrics
            .iter()
            .map(|m| format!("{m:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A Lambda metric of one of this template's functions: `FunctionName` names a function,
/// `Resource` its alias, `ExecutedVersion` its published version.
fn lambda_metric(metric: &Named, functions: &BTreeSet<String>, alias: &str) -> Result<(), String> {
    if !LAMBDA_METRICS.contains(&metric.name.as_str()) {
        return Err("not a metric Lambda publishes".into());
    }
    let reference = |v: &Option<String>| {
        v.as_deref()
            .unwrap_or_default()
            .trim_start_matches("${")
            .trim_end_matches('}')
            .to_owned()
    };
    let function = reference(metric.dimensions.get("FunctionName").unwrap_or(&None));
    if !functions.contains(&function) {
        return Err(format!("FunctionName {function:?} is not a function here"));
    }
    for (name, value) in &metric.dimensions {
        let ok = match name.as_str() {
            "FunctionName" => true,
            "Resource" => {
                value.as_deref() == Some(&format!("${{{function}}}:{alias}"))
                    || value.as_deref() == Some(&format!("{function}:{alias}"))
            }
            "ExecutedVersion" => value.as_deref() == Some(&format!("{function}.Version.Version")),
            _ => false,
        };
        if !ok {
            return Err(format!("dimension {name}={value:?}"));
        }
    }
    Ok(())
}

#[test]
fn every_alarm_is_on_the_dashboard_and_in_the_runbook() {
    let template = Template::load();
    let dashboard = template.dashboard();
    let alarms = template.alarms();
    let on_widget: BTreeSet<String> = widgets(&dashboard)
        .iter()
        .filter(|w| w["type"] == "alarm")
        .flat_map(|w| {
            w["properties"]["alarms"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|a| {
            let a = a.as_str().unwrap_or_default();
            a.trim_start_matches("${")
                .trim_end_matches(".Arn}")
                .to_owned()
        })
        .collect();
    assert_eq!(on_widget, alarms, "the dashboard's alarm widget");

    let titles: BTreeSet<&str> = widgets(&dashboard).iter().map(title).collect();
    let operations =
        std::fs::read_to_string(testkit::workspace_root().join("docs/operations.md")).unwrap();
    // The runbook's table: | `AlarmName` | widget title | what to do |
    let runbook: BTreeMap<String, String> = operations
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| {
            let (alarm, rest) = l.split_once("` | ")?;
            let widget = rest.split(" | ").next()?.trim();
            alarms
                .contains(alarm)
                .then(|| (alarm.to_owned(), widget.to_owned()))
        })
        .collect();
    for alarm in &alarms {
        let widget = runbook
            .get(alarm)
            .unwrap_or_else(|| panic!("{alarm} has no row in docs/operations.md's alarm table"));
        assert!(
            titles.contains(widget.as_str()),
            "{alarm}: the runbook names widget {widget:?}, the dashboard has {titles:?}"
        );
    }
}

#[test]
fn the_dashboard_reads_every_log_group_of_the_template() {
    let template = Template::load();
    let groups: BTreeSet<String> = template
        .of_type("AWS::Logs::LogGroup")
        .map(|(id, _)| id.to_owned())
        .collect();
    let dashboard = template.dashboard();
    for widget in widgets(&dashboard).iter().filter(|w| w["type"] == "log") {
        let query = widget["properties"]["query"].as_str().unwrap_or_default();
        let sources: BTreeSet<String> = query
            .split("SOURCE '")
            .skip(1)
            .filter_map(|s| s.split('\'').next())
            .map(|s| s.trim_start_matches("${").trim_end_matches('}').to_owned())
            .collect();
        assert_eq!(sources, groups, "widget {:?}", title(widget));
    }
}

/// `scripts/vercel-config` and `scripts/check-deploy` read a stack's outputs through the fixture
/// `deploy/fixtures/describe-stacks.json`: it names exactly the outputs the template declares.
#[test]
fn the_describe_stacks_fixture_has_the_template_s_outputs() {
    let root = testkit::workspace_root();
    let text = std::fs::read_to_string(root.join("template.yaml")).unwrap();
    let doc = YamlLoader::load_from_str(&text).unwrap().remove(0);
    let declared: BTreeSet<String> = doc["Outputs"]
        .as_hash()
        .expect("Outputs")
        .keys()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect();
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/fixtures/describe-stacks.json")).unwrap(),
    )
    .unwrap();
    let listed: BTreeSet<String> = fixture["Stacks"][0]["Outputs"]
        .as_array()
        .expect("Outputs")
        .iter()
        .filter_map(|o| o["OutputKey"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(listed, declared);
}
