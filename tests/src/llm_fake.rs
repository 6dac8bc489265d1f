//! OpenAI-compatible upstream fakes: wiremock answers for whole responses, and a raw TCP server
//! for streams that send some chunks and then stall (wiremock writes bodies at once).

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A `chat.completion` body as OpenAI sends it.
pub fn completion(content: &str) -> Value {
    json!({
        "id": "chatcmpl-upstream1", "object": "chat.completion", "created": 1_795_644_000,
        "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
    })
}

/// An OpenAI error body.
pub fn error(message: &str, type_: &str, code: &str) -> Value {
    json!({"error": {"message": message, "type": type_, "param": null, "code": code}})
}

/// `data:` events of a streamed answer made of `pieces`, with a usage chunk and `[DONE]`.
pub fn sse(pieces: &[&str]) -> String {
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
        )
    };
    let mut out = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
    for p in pieces {
        out.push_str(&chunk(json!({"content": p}), Value::Null));
    }
    out.push_str(&chunk(json!({}), json!("stop")));
    out.push_str(&format!("data: {}\n\n", json!({"id": "chatcmpl-up", "object": "chat.completion.chunk",
        "created": 1, "model": "gpt-4o-mini", "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": pieces.len(), "total_tokens": 9 + pieces.len()}})));
    out.push_str("data: [DONE]\n\n");
    out
}

/// A server that answers every request with a 200 event stream, writes `events`, then holds the
/// connection open for `stall` without a byte more.
pub async fn stalling_stream(events: Vec<String>, stall: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let events = events.clone();
            tokio::spawn(async move {
                // Read the request head and body (Content-Length) before answering.
                if read_request(&mut socket).await.is_none() {
                    return;
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for event in events {
                    let frame = format!("{:x}\r\n{event}\r\n", event.len());
                    if socket.write_all(frame.as_bytes()).await.is_err() {
                        return;
                    }
                    let _ = socket.flush().await;
                }
                tokio::time::sleep(stall).await;
            });
        }
    });
    format!("http://{addr}/v1")
}

/// An upstream that misbehaves on request: the last user message names the behaviour
/// (`hang`, `reset`, `slow`, `429`, `500`, `malformed`, `stall`, else a good answer), streamed or
/// not as asked.
pub async fn chaos_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(body) = read_request(&mut socket).await else {
                    return;
                };
                let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let last = request["messages"]
                    .as_array()
                    .and_then(|m| m.last())
                    .and_then(|m| m["content"].as_str())
                    .unwrap_or("")
                    .to_owned();
                let stream = request["stream"] == Value::Bool(true);
                let mode = ["hang", "reset", "slow", "429", "500", "malformed", "stall"]
                    .into_iter()
                    .find(|m| last.contains(m))
                    .unwrap_or("ok");
                let respond = |status: &str, content_type: &str, body: &str| {
                    format!("HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
                };
                let answer = match mode {
                    "hang" => {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    "reset" => return,
                    "429" => respond(
                        "429 Too Many Requests",
                        "application/json",
                        &error("slow down", "requests", "rate_limit_exceeded").to_string(),
                    )
                    .replace("connection: close", "retry-after: 0\r\nconnection: close"),
                    "500" => respond(
                        "500 Internal Server Error",
                        "application/json",
                        &error("boom", "server_error", "server_error").to_string(),
                    ),
                    "malformed" => {
                        respond("200 OK", "application/json", "{\"choices\": [{\"message\"")
                    }
                    "stall" if stream => {
                        let events: String =
                            sse(&["partial"]).split_inclusive("\n\n").take(2).collect();
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{events}\r\n", events.len());
                        let _ = socket.write_all(head.as_bytes()).await;
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    "stall" => {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    "slow" | "ok" => {
                        if mode == "slow" {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        if stream {
                            respond("200 OK", "text/event-stream", &sse(&["fine", " answer"]))
                        } else {
                            respond(
                                "200 OK",
                                "application/json",
                                &completion("fine answer").to_string(),
                            )
                        }
                    }
                    _ => return,
                };
                let _ = socket.write_all(answer.as_bytes()).await;
                let _ = socket.flush().await;
            });
        }
    });
    format!("http://{addr}/v1")
}

async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return Some(buf[end + 4..end + 4 + length].to_vec());
            }
        }
    }
}

/// The most expensive upstream an honest provider can be: every answer uses the whole
/// completion cap the request asked for (`max_tokens` or `max_completion_tokens`), and the
/// prompt is counted one token per byte plus OpenAI's framing (no byte-level tokenizer counts
/// more). Streams send one chunk per token and the usage chunk only when
/// `stream_options.include_usage` asks for it, as OpenAI does; `delay` comes before the answer.
#[derive(Clone, Debug)]
pub struct Metered {
    pub delay: Duration,
}

impl Metered {
    /// The usage this upstream reports for `request` (an upstream request body).
    pub fn usage(request: &Value) -> (u64, u64) {
        let messages = request["messages"].as_array().cloned().unwrap_or_default();
        let prompt = messages.iter().fold(3u64, |sum, m| {
            sum + m["content"].as_str().map_or(0, |c| c.len() as u64) + 4
        });
        let completion = request["max_completion_tokens"]
            .as_u64()
            .or_else(|| request["max_tokens"].as_u64())
            .unwrap_or(16);
        (prompt, completion)
    }
}

impl wiremock::Respond for Metered {
    fn respond(&self, request: &wiremock::Request) -> wiremock::ResponseTemplate {
        let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
            return wiremock::ResponseTemplate::new(400).set_body_json(error(
                "We could not parse the JSON body of your request.",
                "invalid_request_error",
                "invalid_json",
            ));
        };
        let (prompt, completion) = Self::usage(&body);
        let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion});
        let pieces: Vec<String> = (0..completion).map(|i| format!("t{i} ")).collect();
        let response = if body["stream"] == Value::Bool(true) {
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            // The whole cap used: the finish reason is `length`.
            let mut events: String = sse(&refs)
                .split_inclusive("\n\n")
                .filter(|e| !e.contains("\"usage\""))
                .collect::<String>()
                .replace("\"finish_reason\":\"stop\"", "\"finish_reason\":\"length\"");
            if body["stream_options"]["include_usage"] == Value::Bool(true) {
                let chunk = json!({"id": "chatcmpl-up", "object": "chat.completion.chunk",
                    "created": 1, "model": body["model"], "choices": [], "usage": usage});
                events = events.replace(
                    "data: [DONE]\n\n",
                    &format!("data: {chunk}\n\ndata: [DONE]\n\n"),
                );
            }
            wiremock::ResponseTemplate::new(200).set_body_raw(events, "text/event-stream")
        } else {
            let mut answer = completion_with(&pieces.concat(), "length");
            answer["usage"] = usage;
            answer["model"] = body["model"].clone();
            wiremock::ResponseTemplate::new(200).set_body_json(answer)
        };
        response.set_delay(self.delay)
    }
}

/// A `chat.completion` body with `content` and `finish_reason`.
pub fn completion_with(content: &str, finish_reason: &str) -> Value {
    let mut body = completion(content);
    body["choices"][0]["finish_reason"] = json!(finish_reason);
    body
}

/// A server that streams an answer of `pieces` chunks, one every `gap`, for every request, and
/// stops as soon as a write fails (the client went away). The counter tells how many content
/// chunks were written.
pub async fn trickling_stream(
    pieces: usize,
    gap: Duration,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let written = std::sync::Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let counter = written.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                if read_request(&mut socket).await.is_none() {
                    return;
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let piece_refs: Vec<String> = (0..pieces).map(|i| format!("p{i} ")).collect();
                let refs: Vec<&str> = piece_refs.iter().map(String::as_str).collect();
                let events: Vec<String> = sse(&refs)
                    .split_inclusive("\n\n")
                    .map(str::to_owned)
                    .collect();
                for event in events {
                    let frame = format!("{:x}\r\n{event}\r\n", event.len());
                    if socket.write_all(frame.as_bytes()).await.is_err()
                        || socket.flush().await.is_err()
                    {
                        return;
                    }
                    if event.contains("\"content\":\"p") {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(gap).await;
                }
                let _ = socket.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    (format!("http://{addr}/v1"), written)
}
