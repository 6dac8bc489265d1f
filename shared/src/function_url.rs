//! The function-URL event (API Gateway HTTP API v2 payload), read so that no request can make
//! the runtime or `lambda_http` panic or fail the invocation.
//!
//! Two places turned odd requests into a bare 502:
//! - `aws_lambda_events` deserializes headers straight into an `http::HeaderMap`: a name or value
//!   `http` refuses fails the whole event (the runtime reports an invocation error), and more than
//!   32,768 headers panic inside `HeaderMap`, before any handler runs;
//! - `lambda_http` builds the request URI from `Host`, `X-Forwarded-Proto`, the path and the raw
//!   query with `unwrap`/`expect`, so a Host such as `a b` or a proto such as `h t t p` panics.
//!
//! [`FunctionUrlEvent`] reads headers leniently (a bad one is recorded, not fatal) and caps their
//! number; [`check_uri`] builds the URI exactly as `lambda_http` will, first, so each of these is a
//! clear 4xx. What AWS itself writes (the request context) is read as before.

use std::collections::HashMap;

use http::header::{HeaderName, HeaderValue, HOST};
use http::{HeaderMap, StatusCode};
use lambda_http::aws_lambda_events::apigw::{
    ApiGatewayV2httpRequest, ApiGatewayV2httpRequestContext,
};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// More headers than any browser or SDK sends; `HeaderMap` itself panics past 32,768.
pub const MAX_HEADERS: usize = 512;

/// A function-URL event as the runtime hands it over.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionUrlEvent {
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    route_key: Option<String>,
    #[serde(default, alias = "path")]
    raw_path: Option<String>,
    /// Function URLs always send it (possibly empty); `lambda_http` parses the query from it.
    #[serde(default)]
    raw_query_string: Option<String>,
    #[serde(default)]
    cookies: Option<Vec<String>>,
    #[serde(default)]
    headers: Headers,
    #[serde(default)]
    path_parameters: Option<HashMap<String, String>>,
    request_context: ApiGatewayV2httpRequestContext,
    #[serde(default)]
    stage_variables: Option<HashMap<String, String>>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    is_base64_encoded: bool,
}

impl FunctionUrlEvent {
    /// The event in `lambda_http`'s own shape, or the 4xx its headers deserve.
    pub fn into_v2(self) -> Result<ApiGatewayV2httpRequest, ApiError> {
        match self.headers.problem {
            None => {}
            Some(HeaderProblem::TooMany) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "too_many_headers",
                    format!("a request may carry at most {MAX_HEADERS} headers"),
                ))
            }
            Some(HeaderProblem::Invalid) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_header",
                    "a header name or value is not valid HTTP",
                ))
            }
        }
        let mut v2 = ApiGatewayV2httpRequest::default();
        v2.version = self.version;
        v2.route_key = self.route_key;
        v2.raw_path = self.raw_path;
        v2.raw_query_string = self.raw_query_string;
        v2.cookies = self.cookies;
        v2.headers = self.headers.map;
        v2.path_parameters = self.path_parameters.unwrap_or_default();
        v2.request_context = self.request_context;
        v2.stage_variables = self.stage_variables.unwrap_or_default();
        v2.body = self.body;
        v2.is_base64_encoded = self.is_base64_encoded;
        Ok(v2)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HeaderProblem {
    Invalid,
    TooMany,
}

/// Headers read without failing: the first problem is kept, the rest of the map is still read.
#[derive(Debug, Default)]
struct Headers {
    map: HeaderMap,
    problem: Option<HeaderProblem>,
}

impl Headers {
    fn add(&mut self, name: &HeaderName, value: String, first: bool) {
        if self.map.len() >= MAX_HEADERS {
            self.problem.get_or_insert(HeaderProblem::TooMany);
            return;
        }
        match HeaderValue::try_from(value) {
            Ok(value) if first => {
                self.map.insert(name, value);
            }
            Ok(value) => {
                self.map.append(name, value);
            }
            Err(_) => {
                self.problem.get_or_insert(HeaderProblem::Invalid);
            }
        }
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_option(HeadersVisitor)
    }
}

struct HeadersVisitor;

impl<'de> Visitor<'de> for HeadersVisitor {
    type Value = Headers;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a map of header names to values")
    }

    fn visit_none<E>(self) -> Result<Headers, E> {
        Ok(Headers::default())
    }

    fn visit_unit<E>(self) -> Result<Headers, E> {
        Ok(Headers::default())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Headers, D::Error> {
        deserializer.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Headers, A::Error> {
        let mut headers = Headers::default();
        // Any JSON value is accepted here, so no header can fail the event.
        while let Some((name, value)) = access.next_entry::<String, Value>()? {
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                headers.problem.get_or_insert(HeaderProblem::Invalid);
                continue;
            };
            match value {
                Value::Null => {}
                Value::String(text) => headers.add(&name, text, true),
                Value::Array(items) => {
                    for (i, item) in items.into_iter().enumerate() {
                        match item {
                            Value::String(text) => headers.add(&name, text, i == 0),
                            _ => {
                                headers.problem.get_or_insert(HeaderProblem::Invalid);
                            }
                        }
                    }
                }
                _ => {
                    headers.problem.get_or_insert(HeaderProblem::Invalid);
                }
            }
        }
        Ok(headers)
    }
}

/// The URI `lambda_http` will build for `v2` (`into_api_gateway_v2_request`), built here first
/// with the same steps so that a value it would `unwrap` on is a 400 instead of a panic.
pub fn check_uri(v2: &ApiGatewayV2httpRequest) -> Result<(), ApiError> {
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_target",
            "the Host, X-Forwarded-Proto, path or query of the request do not form a URL",
        )
    };
    let host = v2
        .headers
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .or(v2.request_context.domain_name.as_deref());
    let path = path_with_stage(
        v2.request_context.stage.as_deref(),
        v2.raw_path.as_deref().unwrap_or_default(),
    );
    let mut uri = match host {
        None => url::Url::parse(&format!("http://localhost{path}"))
            .map_err(|_| bad())?
            .path()
            .to_owned(),
        Some(host) => {
            let scheme = v2
                .headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("https");
            url::Url::parse(&format!("{scheme}://{host}{path}"))
                .map_err(|_| bad())?
                .to_string()
        }
    };
    if let Some(query) = v2.raw_query_string.as_deref().filter(|q| !q.is_empty()) {
        uri.push('?');
        uri.push_str(query);
    }
    http::Uri::try_from(uri).map(|_| ()).map_err(|_| bad())
}

/// `lambda_http`'s `apigw_path_with_stage`.
fn path_with_stage(stage: Option<&str>, path: &str) -> String {
    if std::env::var("AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH").is_ok() {
        return path.into();
    }
    match stage {
        None | Some("$default") => path.into(),
        Some(stage) if path.starts_with(&format!("/{stage}/")) => path.into(),
        Some(stage) => format!("/{stage}{path}"),
    }
}
