//! Adapts Lambda function-URL events to plain `http` handlers, without `lambda_http`'s panics.
//!
//! `lambda_http` decodes a body flagged `isBase64Encoded` with `expect`, so an invalid one panics
//! before any handler runs and the caller sees a bare 502. This adapter checks the encoding first
//! and answers 400 itself, then hands the request to `lambda_http`'s own conversion (so every
//! `RequestExt` accessor keeps working) and turns the handler's response into the function-URL
//! response shape. Events are read straight into the function-URL (HTTP API v2) shape in one
//! JSON pass; `lambda_http`'s own `LambdaRequest` deserializer copies each event into a
//! `RawValue` first and parses it a second time (see docs/benchmarks.md). Headers and the request
//! URI are checked first too ([`crate::function_url`]): no request reaches a panic.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use futures_util::Stream;
use lambda_http::lambda_runtime::{MetadataPrelude, StreamResponse};

use base64::Engine;
use http::{Response, StatusCode};
use lambda_http::aws_lambda_events::apigw::ApiGatewayV2httpResponse;
use lambda_http::request::LambdaRequest;
use lambda_http::{Body, Context, LambdaEvent, Request, RequestExt};

use crate::error::ApiError;
use crate::function_url::{check_uri, FunctionUrlEvent};

/// Runs the Lambda runtime loop with `handler` answering every function-URL request.
pub async fn run<H, F>(handler: H) -> Result<(), lambda_http::lambda_runtime::Error>
where
    H: Fn(Request) -> F,
    F: Future<Output = Response<Body>>,
{
    let handler = &handler;
    lambda_http::lambda_runtime::run(lambda_http::lambda_runtime::service_fn(
        move |event: LambdaEvent<FunctionUrlEvent>| async move {
            let response = match event.payload.into_v2() {
                Ok(v2) => dispatch(handler, LambdaRequest::ApiGatewayV2(v2), event.context).await,
                Err(error) => error.into_response(&event.context.request_id),
            };
            Ok::<_, Infallible>(into_function_url_response(response))
        },
    ))
    .await
}

/// The request for a function-URL event as the runtime delivers it, or the adapter's own 4xx.
pub fn event_into_request(event: FunctionUrlEvent, context: Context) -> Result<Request, ApiError> {
    into_request(LambdaRequest::ApiGatewayV2(event.into_v2()?), context)
}

/// Converts one event into a request and runs `handler`, answering 400 for an invalid body.
pub async fn dispatch<H, F>(handler: &H, event: LambdaRequest, context: Context) -> Response<Body>
where
    H: Fn(Request) -> F,
    F: Future<Output = Response<Body>>,
{
    match into_request(event, context.clone()) {
        Ok(request) => handler(request).await,
        Err(error) => error.into_response(&context.request_id),
    }
}

/// The request `lambda_http` would build, or 400 when the body claims base64 but is not, or when
/// Host, X-Forwarded-Proto, path and query do not form a URI (`lambda_http` would panic). A base64
/// body is decoded once, here (`lambda_http` would decode it again, with `expect`), and becomes the
/// `Body::Binary` that `lambda_http` itself makes of it.
pub fn into_request(event: LambdaRequest, context: Context) -> Result<Request, ApiError> {
    #[allow(irrefutable_let_patterns)]
    let LambdaRequest::ApiGatewayV2(mut v2) = event
    else {
        return Ok(Request::from(event).with_lambda_context(context));
    };
    check_uri(&v2)?;
    let decoded = match (v2.is_base64_encoded, v2.body.take()) {
        (true, Some(body)) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_body_encoding",
                        "the request body is flagged base64 but is not valid base64",
                    )
                })?,
        ),
        (_, body) => {
            v2.body = body;
            None
        }
    };
    if decoded.is_some() {
        v2.is_base64_encoded = false;
    }
    let mut request = Request::from(LambdaRequest::ApiGatewayV2(v2)).with_lambda_context(context);
    if let Some(bytes) = decoded {
        *request.body_mut() = Body::Binary(bytes);
    }
    Ok(request)
}

/// A response body sent through Lambda response streaming: one chunk, or chunks from a channel
/// as they are produced.
pub struct StreamBody {
    inner: Pin<Box<dyn Stream<Item = Result<Bytes, Infallible>> + Send>>,
}

impl StreamBody {
    /// A body of one chunk.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Self {
            inner: Box::pin(futures_util::stream::iter([Ok(bytes)])),
        }
    }

    /// A body fed by the returned sender; it ends when the sender is dropped.
    pub fn channel(capacity: usize) -> (tokio::sync::mpsc::Sender<Bytes>, Self) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (Ok(chunk), rx))
        });
        (
            tx,
            Self {
                inner: Box::pin(stream),
            },
        )
    }

    /// Reads the whole body (tests, buffered callers).
    pub async fn collect(mut self) -> Vec<u8> {
        use futures_util::StreamExt;
        let mut out = Vec::new();
        while let Some(Ok(chunk)) = self.inner.next().await {
            out.extend_from_slice(&chunk);
        }
        out
    }
}

impl Stream for StreamBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// An `ApiError` as a streamed response.
pub fn error_stream(error: ApiError, request_id: &str) -> Response<StreamBody> {
    error
        .into_response(request_id)
        .map(|body| StreamBody::full(body.as_ref().to_vec()))
}

/// Runs the Lambda runtime loop with response streaming (function URL `InvokeMode:
/// RESPONSE_STREAM`): the handler's status and headers go in the prelude, its body as chunks.
pub async fn run_streaming<H, F>(handler: H) -> Result<(), lambda_http::lambda_runtime::Error>
where
    H: Fn(Request) -> F,
    F: Future<Output = Response<StreamBody>>,
{
    let handler = &handler;
    lambda_http::lambda_runtime::run(lambda_http::lambda_runtime::service_fn(
        move |event: LambdaEvent<FunctionUrlEvent>| async move {
            let request_id = event.context.request_id.clone();
            let response = match event_into_request(event.payload, event.context) {
                Ok(request) => handler(request).await,
                Err(error) => error_stream(error, &request_id),
            };
            Ok::<_, Infallible>(into_stream_response(response))
        },
    ))
    .await
}

/// The runtime's streaming response for `response`.
pub fn into_stream_response(response: Response<StreamBody>) -> StreamResponse<StreamBody> {
    let (parts, body) = response.into_parts();
    let cookies = parts
        .headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    let mut headers = parts.headers;
    headers.remove(http::header::SET_COOKIE);
    StreamResponse {
        metadata_prelude: MetadataPrelude {
            status_code: parts.status,
            headers,
            cookies,
        },
        stream: body,
    }
}

/// The function-URL (API Gateway v2) response for `response`.
pub fn into_function_url_response(response: Response<Body>) -> ApiGatewayV2httpResponse {
    let (parts, body) = response.into_parts();
    let mut out = ApiGatewayV2httpResponse::default();
    out.status_code = i64::from(parts.status.as_u16());
    out.is_base64_encoded = matches!(body, Body::Binary(_));
    out.body = match body {
        Body::Empty => None,
        Body::Text(text) => Some(Body::Text(text)),
        Body::Binary(bytes) => Some(Body::Text(
            base64::engine::general_purpose::STANDARD.encode(bytes),
        )),
        _ => None,
    };
    out.cookies = parts
        .headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    let mut headers = parts.headers;
    headers.remove(http::header::SET_COOKIE);
    out.headers = headers;
    out
}

/// True when the request declares a JSON body (`application/json`, any parameters).
pub fn has_json_body(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim()
                .to_ascii_lowercase()
                .starts_with("application/json")
        })
}

/// The invocation's request id: the Lambda context's, else an `x-request-id` header, else a new
/// random id (local runs and tests).
pub fn request_id(request: &Request) -> String {
    if let Some(id) = request
        .lambda_context_ref()
        .map(|c| c.request_id.as_str())
        .filter(|id| !id.is_empty())
    {
        return id.to_owned();
    }
    request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(body: &str, base64: bool) -> LambdaRequest {
        let json = serde_json::json!({
            "version": "2.0",
            "routeKey": "$default",
            "rawPath": "/",
            "rawQueryString": "",
            "headers": {"content-type": "application/json", "host": "abc.lambda-url.us-east-1.on.aws"},
            "requestContext": {
                "accountId": "123456789012", "apiId": "abc", "domainName": "abc.lambda-url.us-east-1.on.aws",
                "domainPrefix": "abc",
                "http": {"method": "POST", "path": "/", "protocol": "HTTP/1.1", "sourceIp": "1.2.3.4", "userAgent": "Stripe/1.0"},
                "requestId": "r", "routeKey": "$default", "stage": "$default", "time": "01/Jan/2026:00:00:00 +0000", "timeEpoch": 0
            },
            "body": body,
            "isBase64Encoded": base64
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn invalid_base64_body_is_a_400_not_a_panic() {
        let err = into_request(event("%%% not base64", true), Context::default()).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.code, "invalid_body_encoding");
    }

    #[test]
    fn base64_body_is_decoded_to_exact_bytes() {
        let raw = "{\"name\":\"Zoë 张\"}";
        let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
        let request = into_request(event(&encoded, true), Context::default()).unwrap();
        assert_eq!(request.body().as_ref(), raw.as_bytes());
        assert!(
            matches!(request.body(), Body::Binary(_)),
            "as lambda_http makes it"
        );
        assert_eq!(request.method(), http::Method::POST);
    }

    #[test]
    fn text_and_empty_bodies_are_lambda_https_own() {
        let text = into_request(event("{\"a\":1}", false), Context::default()).unwrap();
        assert_eq!(text.body(), &Body::Text("{\"a\":1}".into()));
        let mut empty = event("", true);
        if let LambdaRequest::ApiGatewayV2(v2) = &mut empty {
            v2.body = None;
        }
        let empty = into_request(empty, Context::default()).unwrap();
        assert_eq!(empty.body(), &Body::Empty);
    }

    #[test]
    fn binary_response_is_base64_encoded() {
        let response = Response::new(Body::Binary(vec![0, 159, 146]));
        let out = into_function_url_response(response);
        assert!(out.is_base64_encoded);
        assert_eq!(out.body, Some(Body::Text("AJ+S".into())));
    }
}
