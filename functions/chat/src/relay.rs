//! The relay of a streamed LLM answer: the rest of the upstream's events, chunk by chunk in the
//! wire format asked for, each wait for the upstream bounded by the idle timeout and the
//! deadline, each wait for the client by the deadline. When the client leaves (or reads too
//! slowly to finish by the deadline) the upstream connection is closed, so the provider stops
//! generating; its usage chunk, which comes last, is then lost, and the attempt is charged the
//! most it can have cost (the prompt's bound and the completion cap). However it ends (complete,
//! broken, the client gone, the deadline), the attempt is charged and the request settled before
//! the body ends: Lambda may freeze the instance once the stream closes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use shared::llm::{self, sse::Event, LlmError, Message};
use shared::telemetry::RequestContext;

use crate::budget::Ended;
use crate::meta::{Meta, Source};
use crate::settle::{self, Cacheable};
use crate::upstream::Ledger;
use crate::wire::Wire;
use crate::State;

/// The rest of a streamed LLM answer, relayed chunk by chunk.
pub(crate) struct StreamTask {
    pub state: Arc<State>,
    pub ledger: Ledger,
    /// The prompt sent upstream and the completion cap, for the charge.
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    pub cache_key: Option<String>,
    pub wire: Wire,
    pub meta: Meta,
    pub deadline: Instant,
    pub context: RequestContext,
}

impl StreamTask {
    pub(crate) async fn run(
        mut self,
        first: Vec<Event>,
        mut stream: llm::sse::EventStream,
        tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) {
        // A send waits for room in the body's buffer only until the deadline: a client that
        // stops reading cannot hold the request past it.
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let send = |text: String| {
            let tx = tx.clone();
            async move {
                matches!(
                    tokio::time::timeout_at(deadline, tx.send(bytes::Bytes::from(text))).await,
                    Ok(Ok(()))
                )
            }
        };
        let mut content = String::new();
        let mut finish_reason: Option<String> = None;
        let mut usage = None;
        let mut failure: Option<LlmError> = None;
        let mut open = send(self.wire.opening(&self.meta)).await;
        let mut pending: VecDeque<Event> = first.into();
        let idle = self.state.config.idle_timeout;
        while open {
            let event = match pending.pop_front() {
                Some(event) => Some(event),
                None => {
                    let left = self.deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(idle.min(left), stream.next_event()).await {
                        Err(_) => {
                            failure = Some(LlmError::StreamStalled);
                            break;
                        }
                        Ok(Err(e)) => {
                            failure = Some(e);
                            break;
                        }
                        Ok(Ok(event)) => event,
                    }
                }
            };
            match event {
                Some(Event::Done) => break,
                // The body ended without `[DONE]`: whole only if it said how it finished, else
                // cut short (a proxy or server that ended the response after an error), which is
                // charged as cut, reported as broken and never cached.
                None if finish_reason.is_some() => break,
                None => {
                    failure = Some(LlmError::Connect { sent: true });
                    break;
                }
                Some(Event::Role) => {}
                Some(Event::Delta(text)) => {
                    content.push_str(&text);
                    open = send(self.wire.delta(&self.meta, &text)).await;
                }
                Some(Event::Finish(reason)) => finish_reason = Some(reason),
                Some(Event::Usage(u)) => usage = Some(u),
            }
        }
        // Dropping the upstream stream closes its connection: the provider stops generating.
        drop(stream);
        // Whole only when the upstream ended it and the client was there to the end; a stream
        // cut on either side may have generated up to the cap.
        let ended = if failure.is_none() && open {
            Ended::Complete(&content)
        } else {
            Ended::Cut
        };
        self.ledger.charges.attempt(
            &self.messages,
            self.max_tokens,
            usage,
            ended,
            failure.is_some(),
        );
        let charged = self.ledger.charges.total();
        let complete = failure.is_none() && open;
        let outcome = match (&failure, open) {
            (Some(error), true) => {
                let metrics = &mut self.context.metrics;
                metrics.count_by("LlmErrors", "Class", error.class(), 1);
                metrics.count("StreamInterrupted", 1);
                tracing::warn!(request_id = %self.context.request_id, class = error.class(), "stream broke after it started");
                send(self.wire.broken(error.class())).await;
                "stream_interrupted"
            }
            (_, false) => {
                self.context.metrics.count("ClientDisconnects", 1);
                "client_disconnected"
            }
            (None, true) => {
                let reason = finish_reason.as_deref().unwrap_or("stop");
                send(self.wire.closing(&self.meta, reason, usage, charged)).await;
                self.meta.source.as_str()
            }
        };
        let finish_reason = finish_reason.as_deref().unwrap_or("stop");
        // Only complete answers of the first model are cached.
        let cacheable = match (&self.cache_key, complete, self.meta.source) {
            (Some(key), true, Source::Llm) if finish_reason == "stop" && !content.is_empty() => {
                Some(Cacheable {
                    key,
                    content: &content,
                    finish_reason,
                    usage,
                })
            }
            _ => None,
        };
        settle::settle(
            &self.state,
            &self.ledger,
            self.meta.source,
            cacheable,
            &mut self.context.metrics,
        )
        .await;
        drop(tx);
        self.context
            .metrics
            .count_by("Answers", "Source", self.meta.source.as_str(), 1);
        self.context.finish(200, outcome).await;
    }
}
