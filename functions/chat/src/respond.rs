//! Answers as HTTP responses: the content headers of the protocol, and the headers every answer
//! carries (who answered, why the first model did not, the tokens charged, the limits).

use http::{header, HeaderValue, Response};
use shared::lambda::StreamBody;

use crate::meta::Meta;
use crate::ratelimit::Quotas;
use crate::wire::{Whole, Wire};

/// Header naming the answer's source: `llm`, `fallback`, `cache` or `rules`.
pub const SOURCE_HEADER: &str = "x-chat-source";
/// Header naming why the first model did not answer (fallback model and rule answers).
pub const FALLBACK_HEADER: &str = "x-chat-fallback-reason";
/// Header with the tokens a whole answer was charged against the budget (0: free).
pub const CHARGED_HEADER: &str = "x-chat-tokens-charged";

fn headed(body: StreamBody, wire: Wire, meta: &Meta, quotas: &Quotas) -> Response<StreamBody> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        SOURCE_HEADER,
        HeaderValue::from_static(meta.source.as_str()),
    );
    if let Some(reason) = meta
        .fallback_reason
        .as_deref()
        .and_then(|r| HeaderValue::from_str(r).ok())
    {
        headers.insert(FALLBACK_HEADER, reason);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    quotas.insert(headers);
    wire.headers(headers);
    response
}

/// An answer that exists at once (rules, cache, a complete LLM answer).
pub(crate) fn whole(
    wire: Wire,
    meta: &Meta,
    quotas: &Quotas,
    answer: Whole<'_>,
) -> Response<StreamBody> {
    let body = wire.whole(meta, answer);
    let mut response = headed(StreamBody::full(body), wire, meta, quotas);
    response
        .headers_mut()
        .insert(CHARGED_HEADER, HeaderValue::from(answer.charged));
    response
}

/// The head of a streamed answer whose events come through `body`.
pub(crate) fn stream(
    wire: Wire,
    meta: &Meta,
    quotas: &Quotas,
    body: StreamBody,
) -> Response<StreamBody> {
    headed(body, wire, meta, quotas)
}
