//! The per-user cache key: SHA-256 over the canonical JSON of what decides the answer, taken
//! from the upstream request itself, so it is the same whatever wire format the client used.
//!
//! JSON quotes and escapes every string and delimits every list, so no content can imitate a
//! separator: two different conversations never share an encoding (a hash collision aside).
//! `stream` and `stream_options` are left out (a streamed and a whole answer are the same answer),
//! and message text is trimmed (surrounding whitespace does not change the question). Users are
//! kept apart by the cache table's own key (`user_id`, `key`).

use serde::Serialize;
use sha2::{Digest, Sha256};
use shared::llm;

/// Bumped when the encoding changes, so old entries are never read under new rules.
const VERSION: u8 = 2;

#[derive(Serialize)]
struct Canonical<'a> {
    v: u8,
    model: &'a str,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f64>,
    messages: Vec<CanonicalMessage<'a>>,
}

#[derive(Serialize)]
struct CanonicalMessage<'a> {
    role: &'a str,
    content: &'a str,
}

/// Hashes what is written into it.
struct HashWriter(Sha256);

impl std::io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The key of `request`'s answer (hex), or `None` if it cannot be encoded (then nothing is cached).
pub fn cache_key(request: &llm::Request<'_>) -> Option<String> {
    let canonical = Canonical {
        v: VERSION,
        model: request.model,
        max_tokens: request.max_tokens,
        max_completion_tokens: request.max_completion_tokens,
        temperature: request.temperature,
        messages: request
            .messages
            .iter()
            .map(|m| CanonicalMessage {
                role: &m.role,
                content: m.content.trim(),
            })
            .collect(),
    };
    let mut hasher = HashWriter(Sha256::new());
    serde_json::to_writer(&mut hasher, &canonical).ok()?;
    Some(hex::encode(hasher.0.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::llm::Message;

    fn key(messages: &[(&str, &str)], tweak: impl FnOnce(&mut llm::Request<'_>)) -> String {
        let messages: Vec<Message> = messages
            .iter()
            .map(|(role, content)| Message {
                role: (*role).into(),
                content: (*content).into(),
            })
            .collect();
        let mut request = llm::Request {
            model: "gpt-4o-mini",
            messages: &messages,
            max_tokens: Some(256),
            max_completion_tokens: None,
            temperature: None,
            stream: false,
            stream_options: None,
        };
        tweak(&mut request);
        cache_key(&request).unwrap()
    }

    #[test]
    fn content_that_imitates_the_old_separators_cannot_merge_messages() {
        // The old key hashed role \x01 content \0 role \x01 content ...: both of these hashed the
        // same bytes.
        let one = key(&[("user", "a\0user\u{1}b")], |_| {});
        let two = key(&[("user", "a"), ("user", "b")], |_| {});
        assert_ne!(one, two);
        // Moving text between a message and the next does not collide either.
        assert_ne!(
            key(&[("user", "ab"), ("assistant", "c")], |_| {}),
            key(&[("user", "a"), ("assistant", "bc")], |_| {})
        );
        assert_ne!(
            key(&[("system", "x"), ("user", "y")], |_| {}),
            key(&[("user", "y")], |_| {})
        );
    }

    #[test]
    fn parameters_count_and_streaming_does_not() {
        let base = key(&[("user", "hello")], |_| {});
        assert_eq!(base, key(&[("user", "  hello\n")], |_| {}), "trimmed");
        assert_eq!(
            base,
            key(&[("user", "hello")], |r| {
                r.stream = true;
                r.stream_options = Some(llm::StreamOptions {
                    include_usage: true,
                })
            })
        );
        for changed in [
            key(&[("user", "hello")], |r| r.model = "gpt-4o"),
            key(&[("user", "hello")], |r| r.max_tokens = Some(255)),
            key(&[("user", "hello")], |r| {
                r.max_tokens = None;
                r.max_completion_tokens = Some(256)
            }),
            key(&[("user", "hello")], |r| r.temperature = Some(0.0)),
            key(&[("assistant", "hello")], |_| {}),
        ] {
            assert_ne!(base, changed);
        }
        assert_eq!(base.len(), 64);
    }
}
