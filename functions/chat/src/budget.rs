//! Cost ceilings, the pure part: the token budget per user and UTC day and the smaller limits
//! of anonymous sessions (config), the worst case a request reserves, and what each upstream
//! attempt is charged.
//!
//! Admission reserves [`worst_case`] (the prompt's upper bound plus the completion cap) in the
//! same round trip as the request limit and the cache; each further attempt (a retry, the
//! fallback model) first extends the reservation by the same worst case; settlement replaces
//! the reservation by [`Charges`]: every attempt that reached the upstream, at its reported usage
//! or, unreported, at the most it can have cost. A charge never exceeds what was reserved for it
//! as long as the upstream honours `max_tokens` and a token is at least one byte, so the day's
//! spend never passes the budget.

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

/// An upper bound of a prompt's tokens: byte-level BPE tokenizers (OpenAI's, Llama's) never make
/// a token of less than one byte, so the UTF-8 bytes plus each message's framing and the reply's
/// priming bound the count whatever the text (English runs at about a quarter of it, Chinese at
/// a third).
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

/// How an attempt ended, which bounds what it can have cost when the upstream reported no usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended<'a> {
    /// The upstream answered with an error status (429, a 4xx other than a gateway's 408 or
    /// 499): it generated nothing.
    Refused,
    /// The whole answer arrived (`text`, what the client sees).
    Complete(&'a str),
    /// Cut before its end (a timeout, a broken connection, a 5xx, a stalled stream, a stream
    /// that stopped without its end): the upstream may have generated up to the completion cap.
    Cut,
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
    /// Part of the charge is a bound, not a count (the upstream reported no usage for an
    /// attempt).
    pub estimated: bool,
}

impl Charges {
    /// Charges one attempt that reached the upstream: its reported usage when that is a count
    /// (a prompt of at least one token, and completion tokens for an answer with text), else the
    /// most it can have cost: the prompt's bound plus the completion cap, or no completion when
    /// the upstream refused the request. Not the answer's visible bytes: a reasoning model's
    /// hidden tokens are billed too. A cut attempt is charged at least that bound even with a
    /// usage (a server that sends running totals was cut before its last). Never an estimate
    /// below the truth: a guess that could be low would let the day's real spend pass the
    /// budget.
    pub fn attempt(
        &mut self,
        prompt: &[Message],
        max_tokens: u32,
        usage: Option<Usage>,
        ended: Ended<'_>,
        failed: bool,
    ) {
        let bound_prompt = prompt_bound(prompt);
        let bound_completion = match ended {
            Ended::Refused => 0,
            Ended::Complete(_) | Ended::Cut => u64::from(max_tokens),
        };
        let counted = usage.filter(|u| {
            u.prompt_tokens > 0
                && (u.completion_tokens > 0
                    || !matches!(ended, Ended::Complete(t) if !t.is_empty()))
        });
        let (prompt_tokens, completion_tokens) = match (counted, ended) {
            (Some(u), Ended::Cut) => (
                u64::from(u.prompt_tokens).max(bound_prompt),
                u64::from(u.completion_tokens).max(bound_completion),
            ),
            (Some(u), _) => (u64::from(u.prompt_tokens), u64::from(u.completion_tokens)),
            (None, _) => {
                self.estimated = true;
                (bound_prompt, bound_completion)
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
    fn the_prompt_bound_holds_whatever_the_text_and_the_reservation_covers_any_charge() {
        let message = |content: &str| Message {
            role: "user".into(),
            content: content.into(),
        };
        // One token per byte is the worst a byte-level tokenizer can do: random ASCII and
        // emoji come close.
        let hostile = [message("x9$Qz!#k~@1^"), message("🙂🙃🫠")];
        assert_eq!(prompt_bound(&hostile), 3 + (12 + 4) + (12 + 4));
        assert_eq!(worst_case(&hostile, 100), prompt_bound(&hostile) + 100);
        assert_eq!(prompt_bound(&[]), 3);

        // Without usage, each way an attempt ends is charged the most it can have cost, and
        // never more than one attempt's worst case.
        let bound = prompt_bound(&hostile);
        let charge = |usage: Option<Usage>, ended: Ended<'_>| {
            let mut charges = Charges::default();
            charges.attempt(&hostile, 100, usage, ended, false);
            (
                charges.prompt_tokens,
                charges.completion_tokens,
                charges.estimated,
            )
        };
        assert_eq!(charge(None, Ended::Refused), (bound, 0, true));
        assert_eq!(charge(None, Ended::Cut), (bound, 100, true));
        assert_eq!(
            charge(None, Ended::Complete("Hello there!")),
            (bound, 100, true)
        );
        // A usage that is no count is no usage: `{}`, a total alone, no completion for text.
        let usage = |prompt_tokens, completion_tokens| {
            Some(Usage {
                prompt_tokens,
                completion_tokens,
                total_tokens: 0,
            })
        };
        assert_eq!(
            charge(usage(0, 0), Ended::Complete("Hi")),
            (bound, 100, true)
        );
        assert_eq!(
            charge(usage(7, 0), Ended::Complete("Hi")),
            (bound, 100, true)
        );
        assert_eq!(charge(usage(7, 0), Ended::Complete("")), (7, 0, false));
        assert_eq!(charge(usage(7, 2), Ended::Complete("Hi")), (7, 2, false));
        // Cut after a running total: at least the bound.
        assert_eq!(charge(usage(7, 2), Ended::Cut), (bound, 100, false));
        assert_eq!(charge(usage(900, 2), Ended::Cut), (900, 100, false));

        // Reported usage is charged as reported, and attempts add up.
        let mut charges = Charges::default();
        charges.attempt(&hostile, 100, None, Ended::Cut, true);
        charges.attempt(
            &hostile,
            100,
            Some(Usage {
                prompt_tokens: 11,
                completion_tokens: 5,
                total_tokens: 16,
            }),
            Ended::Complete("ignored"),
            false,
        );
        assert_eq!(
            (charges.attempts, charges.failed, charges.prompt_tokens),
            (2, 1, bound + 11)
        );
        assert_eq!(charges.completion_tokens, 105);
    }
}
