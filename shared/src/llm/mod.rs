//! A client for any OpenAI-compatible Chat Completions server (`OPENAI_BASE_URL`).
//!
//! One call is one attempt with its own timeout; retries, the deadline and the fallback are the
//! caller's (the chat function's) policy. Every failure has a class for logs and metrics.

pub mod sse;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Secret;

/// A message sent upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One upstream request.
#[derive(Clone, Debug, Serialize)]
pub struct Request<'a> {
    pub model: &'a str,
    pub messages: &'a [Message],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    pub stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
}

/// `stream_options`.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StreamOptions {
    pub include_usage: bool,
}

/// Token counts as the upstream reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u32,
    #[serde(default)]
    pub completion_tokens: u32,
    #[serde(default)]
    pub total_tokens: u32,
}

/// A complete (non-streamed) answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub content: String,
    pub finish_reason: String,
    pub usage: Option<Usage>,
}

/// Why an upstream call failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum LlmError {
    #[error("the upstream did not answer in time")]
    Timeout,
    /// `sent: false`: no connection could be made, so nothing reached the upstream; `true`: the
    /// connection broke after the request went out (a reset, a body cut short).
    #[error("could not connect to the upstream, or the connection broke")]
    Connect { sent: bool },
    #[error("the upstream rate-limited the request")]
    RateLimited { retry_after: Option<Duration> },
    #[error("the upstream failed with {status}")]
    Upstream5xx { status: u16 },
    #[error("the upstream refused the request with {status}")]
    Upstream4xx { status: u16 },
    #[error("the upstream refused our API key ({status})")]
    Auth { status: u16 },
    #[error("the upstream answer is not a chat completion: {0}")]
    InvalidResponse(String),
    #[error("the upstream stream stalled")]
    StreamStalled,
}

impl From<crate::retry::OutOfTime> for LlmError {
    /// No time was left for an attempt: a timeout, as the caller sees it.
    fn from(_: crate::retry::OutOfTime) -> Self {
        LlmError::Timeout
    }
}

impl LlmError {
    /// The class for logs and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            LlmError::Timeout => "timeout",
            LlmError::Connect { .. } => "connect",
            LlmError::RateLimited { .. } => "rate_limited",
            LlmError::Upstream5xx { .. } => "upstream_5xx",
            LlmError::Upstream4xx { .. } => "upstream_4xx",
            LlmError::Auth { .. } => "auth",
            LlmError::InvalidResponse(_) => "invalid_response",
            LlmError::StreamStalled => "stream_stalled",
        }
    }

    /// Timeouts, connection errors, 429 and 5xx are worth another try; 4xx never are.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            LlmError::Timeout
                | LlmError::Connect { .. }
                | LlmError::RateLimited { .. }
                | LlmError::Upstream5xx { .. }
                | LlmError::StreamStalled
        )
    }

    /// False only when the request never left (no connection could be made): any other failed
    /// attempt may have been processed, and billed, by the upstream.
    pub fn reached_upstream(&self) -> bool {
        !matches!(self, LlmError::Connect { sent: false })
    }

    /// The upstream refused the request with a status that means it generated nothing (429,
    /// another 4xx), or it never reached the upstream. A 5xx is not among them, nor a gateway's
    /// 408 or 499 (a timeout, a closed client): they may come after the model generated.
    pub fn generated_nothing(&self) -> bool {
        match self {
            LlmError::Upstream4xx { status } => !matches!(status, 408 | 499),
            LlmError::Connect { sent: false }
            | LlmError::RateLimited { .. }
            | LlmError::Auth { .. } => true,
            _ => false,
        }
    }

    /// `Retry-After` of a 429, if the upstream gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LlmError::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }

    fn from_reqwest(error: &reqwest::Error) -> Self {
        crate::http_client::log_if_untrusted(error, "llm");
        if error.is_connect() {
            // Refused, unreachable, or the connect timed out: the request never left.
            LlmError::Connect { sent: false }
        } else if error.is_timeout() {
            LlmError::Timeout
        } else {
            // Resets and broken bodies: as retryable as a failed connection, but sent.
            LlmError::Connect { sent: true }
        }
    }

    fn from_status(status: u16, headers: &reqwest::header::HeaderMap) -> Self {
        match status {
            401 | 403 => LlmError::Auth { status },
            429 => LlmError::RateLimited {
                retry_after: headers
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(|s| Duration::from_secs_f64(s.min(3600.0))),
            },
            s if s >= 500 => LlmError::Upstream5xx { status: s },
            s => LlmError::Upstream4xx { status: s },
        }
    }
}

#[derive(Deserialize)]
struct CompletionBody {
    choices: Vec<CompletionChoice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct CompletionChoice {
    message: CompletionMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct CompletionMessage {
    #[serde(default)]
    content: Option<String>,
}

/// The client. Build once per cold start.
#[derive(Clone, Debug)]
pub struct LlmClient {
    http: reqwest::Client,
    url: String,
    key: Secret,
}

impl LlmClient {
    /// A client for `base_url` (e.g. `https://api.openai.com/v1`).
    pub fn new(base_url: &str, key: Secret) -> reqwest::Result<Self> {
        // The per-attempt timeout is set on each call; this only bounds a forgotten one.
        let http = crate::http_client::build(Duration::from_secs(5), Duration::from_secs(900))?;
        Ok(Self {
            http,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            key,
        })
    }

    /// Opens the connection to the upstream in the background (no key sent), for the first call.
    pub fn warm_up(&self) {
        crate::http_client::warm_up(&self.http, self.url.clone());
    }

    fn post(&self, request: &Request<'_>) -> reqwest::RequestBuilder {
        self.http
            .post(&self.url)
            .bearer_auth(self.key.expose())
            .json(request)
    }

    /// Sends `request`; a non-2xx answer is its classified error.
    async fn send(&self, request: &Request<'_>) -> Result<reqwest::Response, LlmError> {
        let response = self
            .post(request)
            .send()
            .await
            .map_err(|e| LlmError::from_reqwest(&e))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(LlmError::from_status(status, response.headers()));
        }
        Ok(response)
    }

    /// One non-streamed attempt, bounded by `timeout` from send to the last byte.
    pub async fn complete(
        &self,
        request: &Request<'_>,
        timeout: Duration,
    ) -> Result<Completion, LlmError> {
        let attempt = async {
            let response = self.send(request).await?;
            let bytes = response
                .bytes()
                .await
                .map_err(|e| LlmError::from_reqwest(&e))?;
            let body: CompletionBody = serde_json::from_slice(&bytes)
                .map_err(|e| LlmError::InvalidResponse(e.to_string()))?;
            let choice = body
                .choices
                .into_iter()
                .next()
                .ok_or_else(|| LlmError::InvalidResponse("no choices".into()))?;
            Ok(Completion {
                content: choice.message.content.unwrap_or_default(),
                finish_reason: choice.finish_reason.unwrap_or_else(|| "stop".into()),
                usage: body.usage,
            })
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or(Err(LlmError::Timeout))
    }

    /// Opens a stream and waits for its first content within `first_token_timeout`. The events
    /// read so far (up to and including the first content) come back with the open stream.
    pub async fn open_stream(
        &self,
        request: &Request<'_>,
        first_token_timeout: Duration,
    ) -> Result<(Vec<sse::Event>, sse::EventStream), LlmError> {
        let attempt = async {
            let response = self.send(request).await?;
            let mut stream = sse::EventStream::new(response);
            let mut first = Vec::new();
            loop {
                match stream.next_event().await? {
                    Some(event) => {
                        let done = matches!(
                            event,
                            sse::Event::Delta(_) | sse::Event::Finish(_) | sse::Event::Done
                        );
                        first.push(event);
                        if done {
                            return Ok((first, stream));
                        }
                    }
                    None => {
                        return Err(LlmError::InvalidResponse(
                            "the stream ended before any content".into(),
                        ))
                    }
                }
            }
        };
        tokio::time::timeout(first_token_timeout, attempt)
            .await
            .unwrap_or(Err(LlmError::Timeout))
    }
}
