//! Reading an upstream `text/event-stream` of `chat.completion.chunk`s into events.

use super::{LlmError, Usage};

/// One thing the upstream said.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The role announcement (no content yet).
    Role,
    /// A piece of the answer.
    Delta(String),
    /// `finish_reason` of the choice.
    Finish(String),
    /// The usage chunk (`stream_options.include_usage`).
    Usage(Usage),
    /// `data: [DONE]`.
    Done,
}

/// Upstream chunks, parsed line by line.
pub struct EventStream {
    response: reqwest::Response,
    buffer: Vec<u8>,
    pending: std::collections::VecDeque<Event>,
    finished: bool,
}

impl EventStream {
    /// Reads events from an upstream response.
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            buffer: Vec::new(),
            pending: std::collections::VecDeque::new(),
            finished: false,
        }
    }

    /// The next event; `None` when the upstream closed the stream.
    pub async fn next_event(&mut self) -> Result<Option<Event>, LlmError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(Some(event));
            }
            if self.finished {
                return Ok(None);
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => {
                    self.buffer.extend_from_slice(&bytes);
                    if self.buffer.len() > 1 << 20 {
                        return Err(LlmError::InvalidResponse(
                            "an event longer than 1 MiB".into(),
                        ));
                    }
                    self.drain_lines()?;
                }
                Ok(None) => {
                    self.finished = true;
                    self.buffer.push(b'\n');
                    self.drain_lines()?;
                }
                Err(e) if e.is_timeout() => return Err(LlmError::Timeout),
                Err(_) => return Err(LlmError::Connect { sent: true }),
            }
        }
    }

    fn drain_lines(&mut self) -> Result<(), LlmError> {
        while let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(data) = line.strip_prefix("data:") {
                parse_data(data.trim(), &mut self.pending)?;
            }
        }
        Ok(())
    }
}

/// Parses one `data:` payload into events.
pub fn parse_data(data: &str, out: &mut std::collections::VecDeque<Event>) -> Result<(), LlmError> {
    if data == "[DONE]" {
        out.push_back(Event::Done);
        return Ok(());
    }
    if data.is_empty() {
        return Ok(());
    }
    let chunk: serde_json::Value =
        serde_json::from_str(data).map_err(|e| LlmError::InvalidResponse(format!("chunk: {e}")))?;
    if chunk.get("error").is_some() {
        return Err(LlmError::Upstream5xx { status: 500 });
    }
    if let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) {
        let delta = &choice["delta"];
        match delta.get("content").and_then(|c| c.as_str()) {
            Some(text) if !text.is_empty() => out.push_back(Event::Delta(text.to_owned())),
            _ if delta.get("role").is_some() => out.push_back(Event::Role),
            _ => {}
        }
        if let Some(reason) = choice.get("finish_reason").and_then(|r| r.as_str()) {
            out.push_back(Event::Finish(reason.to_owned()));
        }
    }
    if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
        if let Ok(usage) = serde_json::from_value::<Usage>(usage.clone()) {
            out.push_back(Event::Usage(usage));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    #[test]
    fn chunks_become_events() {
        let mut out = VecDeque::new();
        for data in [
            r#"{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"你好"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
            "[DONE]",
        ] {
            parse_data(data, &mut out).unwrap();
        }
        assert_eq!(
            out.into_iter().collect::<Vec<_>>(),
            vec![
                Event::Role,
                Event::Delta("你好".into()),
                Event::Finish("stop".into()),
                Event::Usage(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 2,
                    total_tokens: 5
                }),
                Event::Done
            ]
        );
    }

    #[test]
    fn malformed_chunk_is_invalid_response() {
        let mut out = VecDeque::new();
        assert!(matches!(
            parse_data("{not json", &mut out),
            Err(LlmError::InvalidResponse(_))
        ));
        assert!(matches!(
            parse_data(r#"{"error":{"message":"boom"}}"#, &mut out),
            Err(LlmError::Upstream5xx { .. })
        ));
    }
}
