//! Cost ceilings, the pure part: the token budget per user and UTC day and the smaller limits
//! of anonymous sessions (config), the worst case a request reserves, and what each upstream
//! attempt is charged.
//!
//! Admission reserves [`worst_case`] (the prompt's upper bound plus the completion cap) in the
//! same round trip as the request limit and the cache; each further attempt (a retry, the
//! fallback model) first extends the reservation by the prompt bound; settlement replaces the
//! reservation by [`Charges`]: every attempt that reached the upstream, at its reported usage or
//! an estimate. A charge never exceeds what was reserved for it as long as the upstream honours
//! `max_tokens` and a token is at least one byte, so the day's spend never passes the budget.

use shared::config::EnvReader;
use shared::llm::{Message, Usage};
use shared::store::chat::AdmitLimits;

/// Defaults: ~25 maximal requests (8k-token prompt + 1k answer) or hundreds of usual ones a day.
pub const DEFAULT_DAILY_TOKENS: u64 = 200_000;
/// Anonymous sessions cost nothing to create, so each gets a tenth.
pub const DEFAULT_ANONYMOUS_DAILY_TOKENS: u64 = 20_000;
pub const DEFAULT_ANONYMOUS_RATE_LIMIT_PER_MIN: u32 = 5;

/// Per-user limits by kind of session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// Tokens (prompt + completion) per user and UTC day; 0: no budget.
    pub daily_tokens: u64,
    /// The same for anonymous sessions (`is_anonymous: true`); 0: no budget.
    pub anonymous_daily_tokens: u64,
    /// Requests per minute of an anonymous session.
    pub anonymous_rate_limit_per_min: u32,
}

impl Default for Budgets {
    fn default() -> Self {
        Self {
            daily_tokens: DEFAULT_DAILY_TOKENS,
            anonymous_daily_tokens: DEFAULT_ANONYMOUS_DAILY_TOKENS,
            anonymous_rate_limit_per_min: DEFAULT_ANONYMOUS_RATE_LIMIT_PER_MIN,
        }
    }
}

impl Budgets {
    /// `CHAT_DAILY_TOKEN_BUDGET`, `CHAT_ANONYMOUS_DAILY_TOKEN_BUDGET`,
    /// `CHAT_ANONYMOUS_RATE_LIMIT_PER_MIN`.
    pub fn read(env: &mut EnvReader<'_>) -> Self {
        Self {
            daily_tokens: env.integer(
                "CHAT_DAILY_TOKEN_BUDGET",
                DEFAULT_DAILY_TOKENS,
                0..=1_000_000_000,
            ),
            anonymous_daily_tokens: env.integer(
                "CHAT_ANONYMOUS_DAILY_TOKEN_BUDGET",
                DEFAULT_ANONYMOUS_DAILY_TOKENS,
                0..=1_000_000_000,
            ),
            anonymous_rate_limit_per_min: env.integer(
                "CHAT_ANONYMOUS_RATE_LIMIT_PER_MIN",
                u64::from(DEFAULT_ANONYMOUS_RATE_LIMIT_PER_MIN),
                1..=100_000,
            ) as u32,
        }
    }

    /// The limits for one request: `rate_limit_per_min` is the signed-in users' rate.
    pub fn limits(&self, anonymous: bool, rate_limit_per_min: u32, window_s: u32) -> AdmitLimits {
        let (per_window, daily) = if anonymous {
            (
                self.anonymous_rate_limit_per_min,
                self.anonymous_daily_tokens,
            )
        } else {
            (rate_limit_per_min, self.daily_tokens)
        };
        AdmitLimits {
            per_window,
            window_s,
            daily_tokens: (daily > 0).then_some(daily),
        }
    }
}

/// Tokens counted for a message's framing (role, separators), as OpenAI's own guide counts them.
const PER_MESSAGE: u32 = 4;
/// Tokens that prime the reply (`<|start|>assistant<|message|>`).
const REPLY_PRIMING: u64 = 3;

/// A deliberately high estimate of an exchange's tokens, for when the upstream reports no usage
/// (a server that ignores `stream_options.include_usage`, a stream cut before its usage chunk):
/// one token per 3 UTF-8 bytes, which is about right for Chinese (3 bytes, ~1 token a character)
/// and over-counts English (~4 bytes a token), so an unreported answer never costs less than it
/// should.
pub fn estimate(prompt: &[Message], completion: &str) -> Usage {
    let tokens = |text: &str| u32::try_from(text.len().div_ceil(3)).unwrap_or(u32::MAX);
    let prompt_tokens = prompt.iter().fold(0u32, |sum, m| {
        sum.saturating_add(tokens(&m.content))
            .saturating_add(PER_MESSAGE)
    });
    let completion_tokens = tokens(completion);
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens.saturating_add(completion_tokens),
    }
}

/// An upper bound of a prompt's tokens: byte-level BPE tokenizers (OpenAI's, Llama's) never make
/// a token of less than one byte, so the UTF-8 bytes plus each message's framing and the reply's
/// priming bound the count whatever the text (the estimate above is a third of that).
pub fn prompt_bound(prompt: &[Message]) -> u64 {
    prompt.iter().fold(REPLY_PRIMING, |sum, m| {
        sum.saturating_add(m.content.len() as u64)
            .saturating_add(u64::from(PER_MESSAGE))
    })
}

/// The most one upstream attempt can cost: the prompt's bound plus the completion cap.
pub fn worst_case(prompt: &[Message], max_tokens: u32) -> u64 {
    prompt_bound(prompt).saturating_add(u64::from(max_tokens))
}

/// What one request's upstream attempts cost, accumulated attempt by attempt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Charges {
    /// Attempts that reached the upstream.
    pub attempts: u32,
    /// Of those, the ones that failed.
    pub failed: u32,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Part of the charge is an estimate (the upstream reported no usage for an attempt).
    pub estimated: bool,
}

impl Charges {
    /// Charges one attempt that reached the upstream: its reported usage, else the prompt's
    /// estimate plus the estimate of the text it produced (`text`: what was streamed before a
    /// cut, or the whole answer), never more than the completion cap `max_tokens`.
    pub fn attempt(
        &mut self,
        prompt: &[Message],
        max_tokens: u32,
        usage: Option<Usage>,
        text: &str,
        failed: bool,
    ) {
        let (prompt_tokens, completion_tokens) = match usage {
            Some(u) => (u64::from(u.prompt_tokens), u64::from(u.completion_tokens)),
            None => {
                self.estimated = true;
                let guess = estimate(prompt, text);
                (
                    u64::from(guess.prompt_tokens),
                    u64::from(guess.completion_tokens.min(max_tokens)),
                )
            }
        };
        self.attempts = self.attempts.saturating_add(1);
        if failed {
            self.failed = self.failed.saturating_add(1);
        }
        self.prompt_tokens = self.prompt_tokens.saturating_add(prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(completion_tokens);
    }

    /// Everything charged so far.
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(vars: &'static [(&'static str, &'static str)]) -> (Budgets, Vec<&'static str>) {
        let mut env = EnvReader::new(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        });
        let budgets = Budgets::read(&mut env);
        let problems = match env.finish(()) {
            Ok(()) => Vec::new(),
            Err(e) => e.problems.iter().map(|p| p.variable).collect(),
        };
        (budgets, problems)
    }

    #[test]
    fn defaults_zero_and_bad_values() {
        assert_eq!(read(&[]), (Budgets::default(), vec![]));
        let (off, problems) = read(&[("CHAT_DAILY_TOKEN_BUDGET", "0")]);
        assert!(problems.is_empty());
        assert_eq!(off.limits(false, 20, 60).daily_tokens, None, "0 = off");
        let (_, problems) = read(&[
            ("CHAT_ANONYMOUS_DAILY_TOKEN_BUDGET", "-1"),
            ("CHAT_ANONYMOUS_RATE_LIMIT_PER_MIN", "0"),
        ]);
        assert_eq!(
            problems,
            [
                "CHAT_ANONYMOUS_DAILY_TOKEN_BUDGET",
                "CHAT_ANONYMOUS_RATE_LIMIT_PER_MIN"
            ]
        );
    }

    #[test]
    fn anonymous_sessions_get_their_own_limits() {
        let budgets = Budgets {
            daily_tokens: 1000,
            anonymous_daily_tokens: 100,
            anonymous_rate_limit_per_min: 3,
        };
        assert_eq!(
            budgets.limits(false, 20, 60),
            AdmitLimits {
                per_window: 20,
                window_s: 60,
                daily_tokens: Some(1000)
            }
        );
        assert_eq!(
            budgets.limits(true, 20, 60),
            AdmitLimits {
                per_window: 3,
                window_s: 60,
                daily_tokens: Some(100)
            }
        );
    }

    #[test]
    fn estimate_counts_high_for_english_and_about_right_for_chinese() {
        let message = |content: &str| Message {
            role: "user".into(),
            content: content.into(),
        };
        // "Say hello" is 2-3 tokens for OpenAI's tokenizers.
        let english = estimate(&[message("Say hello")], "Hello there!");
        assert_eq!(
            (english.prompt_tokens, english.completion_tokens),
            (3 + 4, 4)
        );
        // 9 characters, 27 bytes; about 9 tokens.
        let chinese = estimate(&[message("我想购买完整的报告")], "完整报告");
        assert_eq!(
            (chinese.prompt_tokens, chinese.completion_tokens),
            (9 + 4, 4)
        );
        assert_eq!(chinese.total_tokens, 17);
        assert_eq!(estimate(&[], "").total_tokens, 0);
    }

    #[test]
    fn the_prompt_bound_holds_whatever_the_text_and_the_reservation_covers_any_charge() {
        let message = |content: &str| Message {
            role: "user".into(),
            content: content.into(),
        };
        // One token per byte is the worst a byte-level tokenizer can do: random ASCII and
        // emoji come close, and the 1-per-3-bytes estimate is far below it.
        let hostile = [message("x9$Qz!#k~@1^"), message("🙂🙃🫠")];
        assert_eq!(prompt_bound(&hostile), 3 + (12 + 4) + (12 + 4));
        assert!(u64::from(estimate(&hostile, "").prompt_tokens) < prompt_bound(&hostile));
        assert_eq!(worst_case(&hostile, 100), prompt_bound(&hostile) + 100);
        assert_eq!(prompt_bound(&[]), 3);

        // An attempt cut after a long answer without usage: the completion estimate is capped.
        let mut charges = Charges::default();
        let long_answer = "word ".repeat(400);
        charges.attempt(&hostile, 100, None, &long_answer, true);
        assert_eq!(charges.completion_tokens, 100, "never more than max_tokens");
        assert!(charges.total() <= worst_case(&hostile, 100));
        assert!(charges.estimated);
        // Reported usage is charged as reported.
        charges.attempt(
            &hostile,
            100,
            Some(Usage {
                prompt_tokens: 11,
                completion_tokens: 5,
                total_tokens: 16,
            }),
            "ignored",
            false,
        );
        assert_eq!(
            (charges.attempts, charges.failed, charges.prompt_tokens),
            (2, 1, u64::from(estimate(&hostile, "").prompt_tokens) + 11)
        );
        assert_eq!(charges.completion_tokens, 105);
    }
}
