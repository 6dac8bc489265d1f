//! A local stand-in for the Lambda Runtime API (`AWS_LAMBDA_RUNTIME_API`), enough to drive a real
//! function binary: `GET /2018-06-01/runtime/invocation/next` hands out queued events, and
//! `POST .../{id}/response` (buffered or streamed) and `.../{id}/error` are recorded with the
//! arrival time of every body chunk, so time to first byte and gaps between chunks are measured
//! where Lambda would see them. Plain sockets with default options: a stock Linux peer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex};

/// What a function answered to one invocation.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub request_id: String,
    /// `response` or `error`.
    pub kind: String,
    pub streaming: bool,
    /// When `next` handed the event out.
    pub handed_out: Instant,
    /// When the response request's head arrived.
    pub response_started: Instant,
    /// Arrival of each body read after the streaming prelude and its 8-NUL delimiter (or of the
    /// whole body when buffered).
    pub body_reads: Vec<(Instant, usize)>,
    pub finished: Instant,
    /// The payload (prelude stripped when streamed).
    pub body: Vec<u8>,
    /// The streaming prelude (status and headers), when streamed.
    pub prelude: Option<String>,
}

impl Outcome {
    /// Time from handing the event out to the first payload byte.
    pub fn time_to_first_byte(&self) -> Option<Duration> {
        self.body_reads
            .first()
            .map(|(t, _)| t.duration_since(self.handed_out))
    }

    /// Time from handing the event out to the end of the response.
    pub fn total(&self) -> Duration {
        self.finished.duration_since(self.handed_out)
    }
}

struct Shared {
    queue: Mutex<mpsc::Receiver<(String, String)>>,
    handed_out: Mutex<HashMap<String, Instant>>,
    outcomes: mpsc::Sender<Outcome>,
}

/// A running stand-in.
pub struct RuntimeApi {
    pub addr: std::net::SocketAddr,
    events: mpsc::Sender<(String, String)>,
    outcomes: mpsc::Receiver<Outcome>,
}

impl RuntimeApi {
    /// Starts on a free loopback port.
    pub async fn start() -> RuntimeApi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind runtime api");
        let addr = listener.local_addr().expect("addr");
        let (events, queue) = mpsc::channel(1024);
        let (outcome_tx, outcomes) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            queue: Mutex::new(queue),
            handed_out: Mutex::new(HashMap::new()),
            outcomes: outcome_tx,
        });
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve(socket, shared.clone()));
            }
        });
        RuntimeApi {
            addr,
            events,
            outcomes,
        }
    }

    /// Queues an event (JSON text); returns its request id.
    pub async fn invoke(&self, event: String) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let _ = self.events.send((id.clone(), event)).await;
        id
    }

    /// The next outcome, or `None` after `timeout`.
    pub async fn outcome(&mut self, timeout: Duration) -> Option<Outcome> {
        tokio::time::timeout(timeout, self.outcomes.recv())
            .await
            .ok()
            .flatten()
    }
}

async fn read_head(
    socket: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(String, HashMap<String, String>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let mut lines = head.split("\r\n");
            let request_line = lines.next()?.to_owned();
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            return Some((request_line, headers));
        }
        let mut chunk = [0u8; 8192];
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads a body, timestamping each socket read that carried body bytes.
async fn read_body(
    socket: &mut TcpStream,
    buf: &mut Vec<u8>,
    headers: &HashMap<String, String>,
) -> Option<Vec<(Instant, Vec<u8>)>> {
    let mut pieces = Vec::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            // Parse complete chunk frames out of buf.
            while let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") {
                let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                        .ok()?;
                if size == 0 {
                    if buf.len() >= line_end + 4 {
                        buf.drain(..line_end + 4);
                        return Some(pieces);
                    }
                    break;
                }
                if buf.len() < line_end + 2 + size + 2 {
                    break;
                }
                let data = buf[line_end + 2..line_end + 2 + size].to_vec();
                buf.drain(..line_end + 2 + size + 2);
                pieces.push((Instant::now(), data));
            }
            let mut chunk = [0u8; 8192];
            let n = socket.read(&mut chunk).await.ok()?;
            if n == 0 {
                return Some(pieces);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < length {
        let mut chunk = [0u8; 8192];
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let data: Vec<u8> = buf.drain(..length.min(buf.len())).collect();
    pieces.push((Instant::now(), data));
    Some(pieces)
}

async fn serve(mut socket: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    while let Some((request_line, headers)) = read_head(&mut socket, &mut buf).await {
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_owned();
        if path.ends_with("/invocation/next") {
            let next = shared.queue.lock().await.recv().await;
            let Some((id, event)) = next else { return };
            let deadline = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64 + 60_000)
                .unwrap_or_default();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nlambda-runtime-aws-request-id: {id}\r\n\
                 lambda-runtime-deadline-ms: {deadline}\r\nlambda-runtime-invoked-function-arn: arn:aws:lambda:us-east-1:123456789012:function:bench\r\n\
                 lambda-runtime-trace-id: Root=1-00000000-000000000000000000000000;Sampled=0\r\ncontent-length: {}\r\n\r\n",
                event.len()
            );
            // One write, as a well-behaved server sends a small response.
            let mut message = head.into_bytes();
            message.extend_from_slice(event.as_bytes());
            shared
                .handed_out
                .lock()
                .await
                .insert(id.clone(), Instant::now());
            if socket.write_all(&message).await.is_err() {
                return;
            }
            continue;
        }
        let response_started = Instant::now();
        let streaming = headers
            .get("lambda-runtime-function-response-mode")
            .is_some_and(|v| v.eq_ignore_ascii_case("streaming"));
        let Some(pieces) = read_body(&mut socket, &mut buf, &headers).await else {
            return;
        };
        let finished = Instant::now();
        let _ = socket
            .write_all(b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n{\"status\":\"OK\"}\n")
            .await;
        let id = path.split('/').rev().nth(1).unwrap_or("").to_owned();
        let kind = path.rsplit('/').next().unwrap_or("").to_owned();
        let handed_out = shared
            .handed_out
            .lock()
            .await
            .remove(&id)
            .unwrap_or(response_started);
        // Split the streaming prelude (JSON, then 8 NUL bytes) from the payload.
        let mut prelude = None;
        let mut body_reads = Vec::new();
        let mut body = Vec::new();
        let mut seen = Vec::new();
        for (at, data) in pieces {
            if streaming && prelude.is_none() {
                seen.extend_from_slice(&data);
                if let Some(pos) = seen.windows(8).position(|w| w == [0u8; 8]) {
                    prelude = Some(String::from_utf8_lossy(&seen[..pos]).into_owned());
                    let rest = seen[pos + 8..].to_vec();
                    if !rest.is_empty() {
                        body_reads.push((at, rest.len()));
                        body.extend_from_slice(&rest);
                    }
                }
                continue;
            }
            if !data.is_empty() {
                body_reads.push((at, data.len()));
                body.extend_from_slice(&data);
            }
        }
        let _ = shared
            .outcomes
            .send(Outcome {
                request_id: id,
                kind,
                streaming,
                handed_out,
                response_started,
                body_reads,
                finished,
                body,
                prelude,
            })
            .await;
    }
}
