//! Building answers: headers naming the source, and a whole answer (rules, cache, a complete LLM
//! answer) in the format the request asked for.

use http::{header, HeaderValue, Response};
use shared::lambda::StreamBody;
use shared::llm::Usage;

use crate::reply::{self, Meta};
use crate::request::Chat;
use crate::wire::Wire;
use crate::{ui_stream, FALLBACK_HEADER, SOURCE_HEADER};

pub(crate) fn with_source(mut response: Response<StreamBody>, meta: &Meta) -> Response<StreamBody> {
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
    response
}

pub(crate) fn sse_response(meta: &Meta, body: StreamBody) -> Response<StreamBody> {
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    with_source(response, meta)
}

/// An answer that exists at once (rules, cache, a complete LLM answer), in the format asked for.
pub(crate) fn whole_answer(
    wire: Wire,
    chat: &Chat,
    meta: &Meta,
    content: &str,
    finish_reason: &str,
    usage: Option<Usage>,
) -> Response<StreamBody> {
    if wire == Wire::UiStream {
        let events = ui_stream::whole(meta, content, finish_reason);
        return ui_stream::response(meta, StreamBody::full(events));
    }
    if chat.stream {
        let events = reply::whole_stream(meta, content, finish_reason, usage, chat.include_usage);
        return sse_response(meta, StreamBody::full(events));
    }
    let body = reply::completion(meta, content, finish_reason, usage);
    let mut response = Response::new(StreamBody::full(body.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    with_source(response, meta)
}
