//! The relay of a streamed LLM answer: the rest of the upstream's events, chunk by chunk in the
//! wire format asked for, each wait bounded by the idle timeout and the deadline; the answer is
//! recorded and the request closed before the body ends.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use shared::llm::{self, sse::Event, LlmError, Message};
use shared::telemetry::RequestContext;

use crate::admit::Asker;
use crate::reply::Meta;
use crate::wire::Wire;
use crate::{bookkeeping, State};

/// The rest of a streamed LLM answer, relayed chunk by chunk.
pub(crate) struct StreamTask {
    pub state: Arc<State>,
    pub user: Asker,
    pub messages: Vec<Message>,
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
        let send = |text: String| {
            let tx = tx.clone();
            async move { tx.send(bytes::Bytes::from(text)).await.is_ok() }
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
                None | Some(Event::Done) => break,
                Some(Event::Role) => {}
                Some(Event::Delta(text)) => {
                    content.push_str(&text);
                    open = send(self.wire.delta(&self.meta, &text)).await;
                }
                Some(Event::Finish(reason)) => finish_reason = Some(reason),
                Some(Event::Usage(u)) => usage = Some(u),
            }
        }
        let status_outcome = match (&failure, open) {
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
                send(self.wire.closing(&self.meta, reason, usage)).await;
                "llm"
            }
        };
        // Recorded before the body ends: Lambda may freeze the instance once the stream closes.
        let complete = failure.is_none() && open;
        let reason = if complete {
            finish_reason.as_deref().unwrap_or("stop")
        } else {
            "interrupted"
        };
        bookkeeping::record(
            &self.state,
            self.user,
            self.cache_key.as_deref(),
            &self.messages,
            &content,
            reason,
            usage,
            &mut self.context.metrics,
        )
        .await;
        drop(tx);
        self.context.metrics.count_by("Answers", "Source", "llm", 1);
        self.context.finish(200, status_outcome).await;
    }
}
