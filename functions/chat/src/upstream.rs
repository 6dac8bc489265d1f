//! The LLM attempts of one request: the first model under the one retry loop
//! (`shared::retry`), then, when it failed before its first token for a reason another model
//! may not share (timeout, connection, 429, 5xx), the fallback model under the same deadline.
//! Every attempt but the request's first extends the token reservation by its worst case before
//! it is made (one round trip; refused: no more attempts), and every attempt that reached the
//! upstream is charged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shared::llm::{self, Completion, LlmClient, LlmError, Message};
use shared::retry::{After, Deadline, OutOfTime};
use shared::store::chat::Extension;
use shared::telemetry::MetricSet;

use crate::admit::{Asker, Reservation};
use crate::budget::{self, Charges, Ended};
use crate::conversation::{CapField, Chat};
use crate::meta::Source;
use crate::State;

/// An attempt with less time than this left is not started.
const MIN_ATTEMPT: Duration = Duration::from_millis(250);

/// What the attempts gave.
pub(crate) enum Outcome {
    /// A whole answer (the request was not streamed).
    Complete {
        source: Source,
        model: String,
        completion: Completion,
    },
    /// A stream whose first token has arrived: from here on it is relayed, never retried.
    Stream {
        source: Source,
        model: String,
        first: Vec<llm::sse::Event>,
        stream: llm::sse::EventStream,
    },
    /// No model answered; the rules will.
    Failed,
}

/// The request's spend: its reservation and what its attempts were charged.
#[derive(Debug)]
pub(crate) struct Ledger {
    pub user: Asker,
    pub reservation: Option<Reservation>,
    pub charges: Charges,
    /// Attempts started (reached or not): every one after the first needs an extension.
    started: u32,
    /// Why the first model did not answer (`timeout`, `upstream_5xx`, ...; `token_budget` when
    /// the budget could not cover another attempt).
    pub reason: Option<&'static str>,
}

impl Ledger {
    pub(crate) fn new(user: Asker, reservation: Option<Reservation>) -> Self {
        Self {
            user,
            reservation,
            charges: Charges::default(),
            started: 0,
            reason: None,
        }
    }

    /// Tokens reserved now (0 without a reservation).
    pub(crate) fn reserved(&self) -> u64 {
        self.reservation.map_or(0, |r| r.tokens)
    }
}

/// Why an attempt was not made or failed.
#[derive(Clone, Debug, PartialEq)]
enum AttemptError {
    Llm(LlmError),
    /// The reservation could not be extended: the budget (or the database) does not cover
    /// another attempt.
    NotCovered(&'static str),
    /// Covering the attempt left no time to make it: not made, not charged.
    NoTime,
}

impl From<OutOfTime> for AttemptError {
    fn from(out: OutOfTime) -> Self {
        AttemptError::Llm(out.into())
    }
}

impl AttemptError {
    fn reason(&self) -> &'static str {
        match self {
            AttemptError::Llm(e) => e.class(),
            AttemptError::NotCovered(why) => why,
            AttemptError::NoTime => "timeout",
        }
    }

    /// A failure another model may not share: worth the fallback model.
    fn calls_for_fallback(&self) -> bool {
        matches!(
            self,
            AttemptError::Llm(
                LlmError::Timeout
                    | LlmError::Connect { .. }
                    | LlmError::RateLimited { .. }
                    | LlmError::Upstream5xx { .. }
            )
        )
    }
}

/// Asks the first model, then the fallback model, within `deadline`.
pub(crate) async fn ask(
    state: &State,
    chat: &Chat,
    messages: &[Message],
    deadline: Instant,
    ledger: &mut Ledger,
    metrics: &mut MetricSet,
) -> Outcome {
    let Some(llm) = &state.llm else {
        ledger.reason = Some("no_api_key");
        return Outcome::Failed;
    };
    let fallback = state.fallback.as_ref();
    let primary = Target {
        client: llm,
        model: &chat.model,
        key_variable: "OPENAI_API_KEY",
        fallback_waits: fallback.is_some(),
        cap_field: state.config.cap_field,
    };
    let first = attempts(state, primary, chat, messages, deadline, ledger, metrics).await;
    let error = match first {
        Ok(outcome) => return outcome.into_outcome(Source::Llm, &chat.model),
        Err(error) => error,
    };
    ledger.reason = Some(error.reason());
    let Some((client, model, cap_field)) = fallback.filter(|_| error.calls_for_fallback()) else {
        return Outcome::Failed;
    };
    metrics.count("FallbackModelTries", 1);
    tracing::warn!(
        reason = error.reason(),
        "the first model failed before its first token; trying the fallback model"
    );
    let second = Target {
        client,
        model,
        key_variable: "LLM_FALLBACK_API_KEY",
        fallback_waits: false,
        cap_field: *cap_field,
    };
    match attempts(state, second, chat, messages, deadline, ledger, metrics).await {
        Ok(outcome) => outcome.into_outcome(Source::Fallback, model),
        Err(AttemptError::NotCovered(why)) => {
            ledger.reason = Some(why);
            Outcome::Failed
        }
        Err(e) => {
            tracing::warn!(class = e.reason(), "the fallback model failed too");
            Outcome::Failed
        }
    }
}

/// What one model gave.
enum Answered {
    Complete(Completion),
    Stream(Vec<llm::sse::Event>, llm::sse::EventStream),
}

impl Answered {
    fn into_outcome(self, source: Source, model: &str) -> Outcome {
        match self {
            Answered::Complete(completion) => Outcome::Complete {
                source,
                model: model.to_owned(),
                completion,
            },
            Answered::Stream(first, stream) => Outcome::Stream {
                source,
                model: model.to_owned(),
                first,
                stream,
            },
        }
    }
}

/// One model to ask.
#[derive(Clone, Copy)]
struct Target<'a> {
    client: &'a LlmClient,
    model: &'a str,
    /// The variable holding its key, for the log line when the upstream refuses it.
    key_variable: &'static str,
    /// A fallback model waits: a timeout ends this model's tries at once, since a model that
    /// just used the whole per-attempt timeout would leave the fallback no time.
    fallback_waits: bool,
    /// The field its server takes the completion cap in.
    cap_field: CapField,
}

/// One model's tries under the retry loop.
async fn attempts(
    state: &State,
    target: Target<'_>,
    chat: &Chat,
    messages: &[Message],
    deadline: Instant,
    ledger: &mut Ledger,
    metrics: &mut MetricSet,
) -> Result<Answered, AttemptError> {
    let config = &state.config;
    let Target {
        client,
        model,
        cap_field,
        ..
    } = target;
    let request = chat.upstream(model, messages, cap_field);
    // A failed attempt may be charged its whole worst case (cut after generating up to the cap),
    // so each further attempt reserves that much before it is made.
    let per_attempt = budget::worst_case(messages, chat.max_tokens);
    let extended = AtomicU64::new(0);
    let reservation = ledger.reservation;
    let user = ledger.user.id;
    let started_before = ledger.started;
    let mut started = 0u32;
    let attempt = |mut left: Duration| {
        started += 1;
        let first_of_request = started_before + started == 1;
        let (request, extended) = (&request, &extended);
        async move {
            if !first_of_request {
                cover(state, user, reservation, per_attempt, extended).await?;
                left = deadline.saturating_duration_since(Instant::now());
                if left < MIN_ATTEMPT {
                    return Err(AttemptError::NoTime);
                }
            }
            let began = Instant::now();
            let answered = if chat.stream {
                client
                    .open_stream(request, config.first_token_timeout.min(left))
                    .await
                    .map(|(first, stream)| Answered::Stream(first, stream))
            } else {
                client
                    .complete(request, config.timeout.min(left))
                    .await
                    .map(Answered::Complete)
            };
            answered
                .map(|a| (a, began.elapsed()))
                .map_err(AttemptError::Llm)
        }
    };
    let mut charges = ledger.charges;
    let max_delay = config.backoff.max_delay;
    let judge = |error: &AttemptError, retry: u32| {
        let AttemptError::Llm(error) = error else {
            return After::Stop;
        };
        if error.reached_upstream() {
            // Billed by the provider whether or not it answered: a refusal its prompt at most,
            // anything cut (a timeout, a broken connection, a 5xx) up to the completion cap too.
            let ended = if error.generated_nothing() {
                Ended::Refused
            } else {
                Ended::Cut
            };
            charges.attempt(messages, chat.max_tokens, None, ended, true);
        }
        metrics.count_by("LlmErrors", "Class", error.class(), 1);
        if *error == LlmError::Timeout {
            metrics.count("Timeouts", 1);
        }
        if let LlmError::Auth { status } = error {
            metrics.count("UpstreamAuthErrors", 1);
            tracing::error!(
                status,
                model,
                "the LLM upstream refused {}: configuration error",
                target.key_variable
            );
        } else {
            tracing::warn!(class = error.class(), retry, model, "LLM attempt failed");
        }
        match error.retry_after() {
            _ if !error.is_retryable() => After::Stop,
            _ if target.fallback_waits && *error == LlmError::Timeout => After::Stop,
            Some(after) if after > max_delay => After::Stop,
            retry_after => After::Retry { retry_after },
        }
    };
    let result = config
        .backoff
        .run(
            Some(Deadline {
                at: deadline,
                min_attempt: MIN_ATTEMPT,
            }),
            attempt,
            judge,
            |_, _, _| {},
        )
        .await;
    ledger.started += started;
    ledger.charges = charges;
    if let Some(r) = &mut ledger.reservation {
        r.tokens = r.tokens.saturating_add(extended.load(Ordering::Relaxed));
    }
    if started > 1 {
        metrics.count("Retries", u64::from(started - 1));
    }
    let (answered, latency) = result?;
    metrics.millis("UpstreamLatency", latency);
    Ok(answered)
}

/// Extends the reservation by one more attempt's worst case before it is made. Nothing to extend
/// without a reservation (no budget, or the database was down at admission with no budget).
async fn cover(
    state: &State,
    user: uuid::Uuid,
    reservation: Option<Reservation>,
    tokens: u64,
    extended: &AtomicU64,
) -> Result<(), AttemptError> {
    let Some(reservation) = reservation else {
        return Ok(());
    };
    let answer = state
        .store
        .chat_extend(
            user,
            reservation.id,
            tokens,
            Some(reservation.budget),
            state.clock.unix_ms(),
        )
        .await;
    match answer {
        Ok(Extension::Extended { .. }) => {
            extended.fetch_add(tokens, Ordering::Relaxed);
            Ok(())
        }
        Ok(Extension::BudgetExceeded { .. }) => {
            tracing::info!("the token budget does not cover another attempt");
            Err(AttemptError::NotCovered("token_budget"))
        }
        Ok(Extension::Gone) => {
            tracing::warn!("the reservation expired before another attempt");
            Err(AttemptError::NotCovered("token_budget"))
        }
        Err(e) => {
            tracing::error!(error = %e, "could not extend the reservation; no further attempt");
            Err(AttemptError::NotCovered("store_unavailable"))
        }
    }
}
