// The chat endpoint (/api/llm/chat), as functions/chat: OpenAI Chat Completions on the wire, an
// answer always. Verify the token, validate the request, then one round trip (`chat_admit`)
// counts it against the user's request window, looks the answer up in the per-user cache and
// reserves the request's worst case against the daily budget. A miss goes to the LLM (the
// official `openai` client, non-streamed) and the request is settled (`chat_settle`: the
// reservation replaced by the usage, the answer cached); with no key, or when the LLM fails for
// good, the rule engine answers (after settling what the attempt cost).
// The source is in the `x-chat-source` header and the `x_source` body field. Deployed with
// InvokeMode RESPONSE_STREAM like the Rust function, so answers go out in streaming mode.

import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import OpenAI from 'openai';
import defaultRules from '../../../functions/chat/rules/default.json' with { type: 'json' };
import {
  ApiError, Env, createSupabase, createVerifier, decodeState, errorResponse, finishRequest, hasJsonBody, log, method, readBody,
  rpc, startRequest,
} from './common.js';
import { Invalid, RuleBook, cacheKey, lastUserText, parseChat } from './chat-request.js';
import { run } from './runtime.js';

const ROUTE = 'chat';
const RATE_WINDOW_S = 60;
const MIN_ATTEMPT_MS = 250;
const DEFAULT_SYSTEM_PROMPT = "You are the helpful assistant of this app. Answer briefly and in the language of the user. For payments and accounts, point users to the app's own pages.";
const CHAT_PATHS = new Set(['', '/v1/chat/completions', '/chat/completions']);

function readConfig() {
  const env = new Env();
  const appEnv = env.appEnv();
  const supabase = env.supabase();
  const jwtSecret = env.required('SUPABASE_JWT_SECRET');
  const openaiKey = env.optional('OPENAI_API_KEY');
  if (appEnv === 'production' && !openaiKey && !env.boolean('CHAT_RULES_ONLY', false)) {
    env.problem('OPENAI_API_KEY', 'is required when APP_ENV=production (or set CHAT_RULES_ONLY=true)');
  }
  const openaiBaseUrl = env.optional('OPENAI_BASE_URL') ?? 'https://api.openai.com/v1';
  const defaultModel = env.optional('LLM_MODEL') ?? 'gpt-4o-mini';
  const models = (env.optional('LLM_MODELS') ?? '').split(',').map((m) => m.trim()).filter(Boolean);
  if (!models.includes(defaultModel)) models.unshift(defaultModel);
  let rules;
  const rulesPath = env.optional('CHAT_RULES_PATH');
  try {
    rules = new RuleBook(rulesPath ? JSON.parse(readFileSync(rulesPath, 'utf8')) : defaultRules);
  } catch (error) {
    env.problem('CHAT_RULES_PATH', `is not a usable rules file (${error.message})`);
  }
  return env.finish({
    supabase,
    jwtSecret,
    openaiKey,
    openaiBaseUrl,
    timeoutMs: env.integer('LLM_TIMEOUT_MS', 30_000, 100, 600_000),
    // The field the cap goes upstream in, chosen by the server as in the Rust chat.
    capField: process.env.LLM_MAX_TOKENS_FIELD === 'max_tokens' ? 'max_tokens' : 'max_completion_tokens',
    maxRetries: env.integer('LLM_MAX_RETRIES', 2, 0, 5),
    totalBudgetMs: env.integer('LLM_TOTAL_BUDGET_MS', 55_000, 500, 900_000),
    deadlineReserveMs: env.integer('CHAT_DEADLINE_RESERVE_MS', 1500, 0, 60_000),
    limits: {
      maxMessages: env.integer('CHAT_MAX_MESSAGES', 50, 1, 1000),
      maxMessageChars: env.integer('CHAT_MAX_MESSAGE_CHARS', 8000, 1, 1_000_000),
      maxTotalChars: env.integer('CHAT_MAX_TOTAL_CHARS', 32_000, 1, 4_000_000),
      maxTokens: env.integer('CHAT_MAX_TOKENS', 1024, 1, 128_000),
      allowClientSystem: env.boolean('CHAT_ALLOW_CLIENT_SYSTEM', false),
      models,
      defaultModel,
    },
    systemPrompt: env.optional('CHAT_SYSTEM_PROMPT') ?? DEFAULT_SYSTEM_PROMPT,
    rateLimitPerMin: env.integer('CHAT_RATE_LIMIT_PER_MIN', 20, 1, 100_000),
    dailyTokenBudget: env.integer('CHAT_DAILY_TOKEN_BUDGET', 200_000, 0, 1_000_000_000),
    cacheTtlS: env.integer('CHAT_CACHE_TTL_S', 3600, 0, 30 * 86_400),
    maxBodyBytes: env.integer('CHAT_MAX_BODY_BYTES', 256 * 1024, 1024, 6 << 20),
    rules,
  });
}

/** The failure class of an OpenAI client error (LlmError::class in the Rust client). */
function llmClass(error) {
  if (error instanceof OpenAI.APIConnectionTimeoutError) return 'timeout';
  if (error instanceof OpenAI.APIConnectionError) return 'connect';
  if (error instanceof OpenAI.APIError && typeof error.status === 'number') {
    if (error.status === 401 || error.status === 403) return 'auth';
    if (error.status === 429) return 'rate_limited';
    return error.status >= 500 ? 'upstream_5xx' : 'upstream_4xx';
  }
  return 'invalid_response';
}

const usageOf = (u) => (u && typeof u === 'object'
  ? { prompt_tokens: u.prompt_tokens ?? 0, completion_tokens: u.completion_tokens ?? 0, total_tokens: u.total_tokens ?? 0 }
  : null);

/** The answer in the format asked for: a chat.completion object, or its SSE events. */
function wholeAnswer(chat, meta, content, finishReason, usage) {
  const headers = { 'x-chat-source': meta.source, 'cache-control': 'no-store' };
  if (meta.fallbackReason) headers['x-chat-fallback-reason'] = meta.fallbackReason;
  const usageJson = usage ?? { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 };
  const base = { id: meta.id, created: meta.created, model: meta.model };
  if (!chat.stream) {
    const body = {
      ...base,
      object: 'chat.completion',
      choices: [{ index: 0, message: { role: 'assistant', content, refusal: null }, logprobs: null, finish_reason: finishReason }],
      usage: usageJson,
      x_source: meta.source,
      x_fallback_reason: meta.fallbackReason,
    };
    return { statusCode: 200, headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) };
  }
  const chunk = (delta, finish) => `data: ${JSON.stringify({ ...base, object: 'chat.completion.chunk',
    choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }], x_source: meta.source })}\n\n`;
  let body = chunk({ role: 'assistant', content: '' }, null) + chunk({ content }, null) + chunk({}, finishReason);
  if (chat.includeUsage) {
    body += `data: ${JSON.stringify({ ...base, object: 'chat.completion.chunk', choices: [], usage: usageJson })}\n\n`;
  }
  body += 'data: [DONE]\n\n';
  return { statusCode: 200, headers: { 'content-type': 'text/event-stream; charset=utf-8', ...headers }, body };
}

function init() {
  const config = readConfig();
  const supabase = createSupabase(config.supabase);
  const openai = config.openaiKey
    ? new OpenAI({ apiKey: config.openaiKey, baseURL: config.openaiBaseUrl, timeout: config.timeoutMs, maxRetries: config.maxRetries })
    : null;
  const verify = createVerifier(config.jwtSecret, config.supabase.url);

  /** Token, body and admission (rate limit + cache lookup in one round trip). */
  async function admit(event, metrics) {
    if (!CHAT_PATHS.has((event.rawPath ?? '/').replace(/\/+$/, ''))) {
      throw new ApiError(404, 'not_found', 'POST to /v1/chat/completions, /chat/completions or /');
    }
    if (method(event) !== 'POST') throw ApiError.methodNotAllowed('POST');
    const user = verify(event, Math.floor(Date.now() / 1000));
    const body = readBody(event);
    if (body.length > config.maxBodyBytes) throw ApiError.bodyTooLarge(config.maxBodyBytes);
    if (!hasJsonBody(event)) throw new ApiError(415, 'unsupported_media_type', 'send the body as application/json');
    let chat;
    try {
      chat = parseChat(body, config.limits);
    } catch (error) {
      if (!(error instanceof Invalid)) throw error;
      metrics.countBy('InvalidRequests', 'Code', error.code);
      throw new ApiError(400, error.code, error.message);
    }
    const key = config.cacheTtlS > 0 ? cacheKey(chat, config.systemPrompt) : null;
    // The worst case: one token per UTF-8 byte of the prompt plus framing, and the cap.
    const prompt = upstreamMessages(chat);
    const reserve = prompt.reduce((sum, m) => sum + Buffer.byteLength(m.content, 'utf8') + 4, 3) + chat.maxTokens;
    const budget = openai && config.dailyTokenBudget > 0 ? config.dailyTokenBudget : null;
    // If the database is down the request is still answered (uncached, unlimited).
    let cached = null;
    let reservation = null;
    try {
      const admission = decodeState(await rpc(supabase, 'chat_admit', {
        p_user: user.id, p_cache_key: key, p_limit: config.rateLimitPerMin, p_window_s: RATE_WINDOW_S,
        p_token_budget: budget, p_reserve: reserve, p_hold_s: Math.ceil(config.totalBudgetMs / 1000) + 7,
        p_now_ms: Date.now(),
      }), 'chat_admit');
      if (admission.state === 'rate_limited') {
        metrics.count('RateLimited');
        throw new ApiError(429, 'rate_limited', 'too many chat requests; try again shortly', { retryAfter: admission.rate.retry_after });
      }
      if (admission.state === 'budget_exceeded') {
        metrics.count('BudgetExceeded');
        throw new ApiError(429, 'token_budget_exceeded', "you have used today's chat allowance", { retryAfter: admission.budget.reset_s });
      }
      if (admission.state === 'unknown_user') throw new ApiError(403, 'unknown_user', "the token's user does not exist in this project");
      if (admission.state === 'hit') cached = admission.response;
      reservation = admission.reservation ?? null;
    } catch (error) {
      if (error instanceof ApiError) throw error;
      metrics.count('StoreErrors');
      log('error', 'chat admission failed; answering without cache or rate limit', { error: error.message });
    }
    return { user, chat, key, cached, reservation, prompt };
  }

  function upstreamMessages(chat) {
    return config.systemPrompt ? [{ role: 'system', content: config.systemPrompt }, ...chat.messages] : chat.messages;
  }

  /** Releases the reservation and charges what the attempt used (and caches a whole answer). */
  async function settle(user, reservation, key, response, source, usage, failed, metrics) {
    try {
      await rpc(supabase, 'chat_settle', {
        p_user: user.id,
        p_reservation: reservation,
        p_cache_key: key,
        p_response: response,
        p_cache_ttl_s: response ? config.cacheTtlS : 0,
        p_source: source,
        p_prompt_tokens: usage ? usage.prompt_tokens : 0,
        p_completion_tokens: usage ? usage.completion_tokens : 0,
        p_attempts: 1,
        p_failed_attempts: failed ? 1 : 0,
        p_usage_estimated: !usage,
        p_anonymous: user.isAnonymous ?? false,
        p_now_ms: Date.now(),
      });
    } catch (error) {
      metrics.count('StoreErrors');
      log('error', 'could not settle the chat request', { error: error.message });
    }
  }

  async function answer(event, context, metrics) {
    const { user, chat, key, cached, reservation, prompt } = await admit(event, metrics);
    const meta = (source, fallbackReason = null) => ({
      id: `chatcmpl-${randomUUID().replaceAll('-', '')}`, created: Math.floor(Date.now() / 1000), model: chat.model, source, fallbackReason,
    });
    if (cached) {
      metrics.count('CacheHits');
      const content = typeof cached.content === 'string' ? cached.content : '';
      return wholeAnswer(chat, meta('cache'), content, cached.finish_reason ?? 'stop', usageOf(cached.usage));
    }
    const rules = (reason) => {
      const ruled = config.rules.answer(lastUserText(chat));
      metrics.countBy('Fallbacks', 'Reason', reason);
      log('info', 'answered from rules', { request_id: context.awsRequestId, reason, rule: ruled.rule });
      return wholeAnswer(chat, meta('rules', reason), ruled.reply, 'stop', null);
    };
    if (!openai) return rules('no_api_key');

    // The budget: LLM_TOTAL_BUDGET_MS, shortened by the invocation's deadline minus a reserve.
    let budget = config.totalBudgetMs;
    const left = context.getRemainingTimeInMillis();
    if (left > 1000 && left < 15 * 60 * 1000) budget = Math.min(budget, Math.max(left - config.deadlineReserveMs, 100));
    if (budget < MIN_ATTEMPT_MS) return rules('timeout');
    const params = { model: chat.model, messages: prompt, stream: false };
    params[config.capField] = chat.maxTokens;
    if (chat.temperature !== null) params.temperature = chat.temperature;

    const started = performance.now();
    let content;
    let finishReason;
    let usage;
    try {
      const completion = await openai.chat.completions.create(params, { timeout: Math.min(config.timeoutMs, budget) });
      const choice = completion?.choices?.[0];
      if (!choice) throw new Error('no choices');
      content = choice.message?.content ?? '';
      finishReason = choice.finish_reason ?? 'stop';
      usage = usageOf(completion.usage);
      metrics.millis('UpstreamLatency', performance.now() - started);
    } catch (error) {
      const reason = llmClass(error);
      metrics.countBy('LlmErrors', 'Class', reason);
      if (reason === 'timeout') metrics.count('Timeouts');
      if (reason === 'auth') metrics.count('UpstreamAuthErrors');
      log(reason === 'auth' ? 'error' : 'warn', 'LLM call failed', { class: reason });
      if (reason !== 'connect') {
        // The attempt reached the upstream and no usage came: charged the most it can have
        // cost, as the Rust chat does: the prompt's bound, plus the cap unless it was refused.
        const promptBound = prompt.reduce((sum, m) => sum + Buffer.byteLength(m.content, 'utf8') + 4, 3);
        const refused = reason === 'rate_limited' || reason === 'auth' || (reason === 'upstream_4xx' && ![408, 499].includes(error.status));
        const charged = { prompt_tokens: promptBound, completion_tokens: refused ? 0 : chat.maxTokens };
        await settle(user, reservation, null, null, 'rules', charged, true, metrics);
      } else {
        await settle(user, reservation, null, null, 'rules', null, true, metrics);
      }
      return rules(reason);
    }

    if (usage) {
      metrics.count('PromptTokens', usage.prompt_tokens);
      metrics.count('CompletionTokens', usage.completion_tokens);
    }
    // Only complete answers are cached.
    const cacheable = finishReason === 'stop' && content !== '';
    await settle(user, reservation, key, cacheable ? { content, finish_reason: finishReason, usage } : null, 'llm', usage, false, metrics);
    return wholeAnswer(chat, meta('llm'), content, finishReason, usage);
  }

  return async function handler(event, context) {
    const { started, requestId, metrics } = startRequest(ROUTE, context, 'Requests');
    let response;
    let outcome;
    try {
      response = await answer(event, context, metrics);
      outcome = response.headers['x-chat-source'];
      metrics.countBy('Answers', 'Source', outcome);
    } catch (error) {
      let api = error;
      if (!(error instanceof ApiError)) {
        log('error', 'unexpected error', { request_id: requestId, error: String(error?.stack ?? error) });
        api = ApiError.internal();
      } else if (api.status === 401) {
        metrics.count('AuthFailures');
        log('warn', 'token refused', { request_id: requestId, reason: api.code });
      }
      response = errorResponse(api, requestId);
      outcome = api.code;
    }
    finishRequest(metrics, 'Duration', ROUTE, response.statusCode, started, requestId, outcome);
    return response;
  };
}

run(init, { streaming: true });
