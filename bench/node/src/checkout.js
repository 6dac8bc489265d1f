// Checkout for the one-time full report (/api/pay/checkout), as functions/checkout.
//
// POST: start or resume checkout (`checkout_begin`). Already paid: 409 already_paid. A pending
// order whose session Stripe still reports open: that session (reused: true). Complete:
// reconciled (`checkout_reconcile`), 409. Expired: reconciled, then a fresh order and session.
// Otherwise this caller holds the lease: one new Checkout Session (Idempotency-Key derived from
// the order), stored with `checkout_attach_session`; on a Stripe failure the lease is given back
// (`checkout_release_lease`). Concurrent clicks wait for the one holding the lease.
// GET ?session_id= (or the latest order): the order's status, reconciled from Stripe while pending.

import { randomUUID } from 'node:crypto';
import Stripe from 'stripe';
import {
  ApiError, Env, createSupabase, StoreError, createVerifier, decodeState, errorResponse, finishRequest, startRequest, hasJsonBody,
  jsonResponse, log, method, readBody, rpc, stripeKeyMode,
} from './common.js';
import { checkoutEffect } from './stripe-effect.js';
import { run } from './runtime.js';

const ROUTE = 'checkout';
const MAX_BODY_BYTES = 4096;
const RATE_WINDOW_S = 60;
const FULL_REPORT = 'full_report';
/** The Stripe API version the Rust client pins (shared/src/stripe/mod.rs API_VERSION). */
const API_VERSION = '2026-07-29.dahlia';
const SESSION_ID = /^[A-Za-z0-9_]+$/;

function readConfig() {
  const env = new Env();
  const appEnv = env.appEnv();
  const supabase = env.supabase();
  const jwtSecret = env.required('SUPABASE_JWT_SECRET');
  const stripeKey = env.required('STRIPE_SECRET_KEY');
  if (stripeKey && !stripeKeyMode(stripeKey)) env.problem('STRIPE_SECRET_KEY', 'must be a Stripe secret (sk_) or restricted (rk_) key');
  const stripeApiBase = env.optional('STRIPE_API_BASE') ?? 'https://api.stripe.com';
  if (!/^https?:\/\//.test(stripeApiBase)) env.problem('STRIPE_API_BASE', 'must be an http(s) URL');
  const priceId = env.required('STRIPE_FULL_REPORT_PRICE_ID');
  const redirect = (name, fallback) => {
    const value = env.optional(name);
    if (value === undefined && appEnv === 'production') env.problem(name, 'is required when APP_ENV=production');
    else if (value !== undefined && !/^https?:\/\//.test(value)) env.problem(name, 'must be an absolute http(s) URL');
    return value ?? fallback;
  };
  let successUrl = redirect('CHECKOUT_SUCCESS_URL', 'http://localhost:3000/report/success?session_id={CHECKOUT_SESSION_ID}');
  if (!successUrl.includes('{CHECKOUT_SESSION_ID}')) {
    successUrl += `${successUrl.includes('?') ? '&' : '?'}session_id={CHECKOUT_SESSION_ID}`;
  }
  const cancelUrl = redirect('CHECKOUT_CANCEL_URL', 'http://localhost:3000/report?checkout=cancelled');
  const config = {
    supabase,
    jwtSecret,
    stripeKey,
    stripeApiBase,
    priceId,
    successUrl,
    cancelUrl,
    // Stripe accepts expires_at from 30 minutes to 24 hours ahead.
    sessionTtlS: env.integer('CHECKOUT_SESSION_TTL_S', 7200, 1860, 86_400),
    rateLimitPerMin: env.integer('CHECKOUT_RATE_LIMIT_PER_MIN', 10, 1, 10_000),
    statusRateLimitPerMin: env.integer('CHECKOUT_STATUS_RATE_LIMIT_PER_MIN', 60, 1, 10_000),
    stripeTimeoutMs: env.integer('STRIPE_TIMEOUT_MS', 8000, 100, 60_000),
    stripeRetries: env.integer('STRIPE_MAX_RETRIES', 2, 0, 5),
    maxWaitMs: env.integer('CHECKOUT_MAX_WAIT_MS', 20_000, 100, 60_000),
  };
  // The lease a click holds while creating a session: every Stripe try and backoff fits.
  config.leaseS = Math.ceil((config.stripeTimeoutMs / 1000 + 5) * (config.stripeRetries + 1)) + 5;
  return env.finish(config);
}

/** A Stripe failure as the Rust function answers it: 503 when worth retrying, else 502. */
function stripeFailure(error) {
  const status = error?.statusCode;
  const transient = error?.type === 'StripeConnectionError' || status === 409 || status === 429 || status >= 500;
  return transient
    ? new ApiError(503, 'payment_provider_unavailable', 'the payment provider is not answering; try again in a moment', { retryAfter: 5 })
    : new ApiError(502, 'payment_provider_error', 'the payment provider refused the request; it has been logged');
}

const invalidResponse = (what) => Object.assign(new Error(what), { type: 'invalid_response' });
const alreadyPaid = () => new ApiError(409, 'already_paid', 'you have already bought the full report');
const processing = () => new ApiError(409, 'payment_processing', 'your payment is being processed; the report unlocks when it completes');
const disputed = () => new ApiError(409, 'payment_disputed', 'your payment for the full report is disputed; it unlocks again if the dispute is resolved in your favour');
const busy = () => new ApiError(503, 'checkout_in_progress', 'your checkout is still being prepared; try again in a moment', { retryAfter: 2 });
const rateLimited = (after) => new ApiError(429, 'rate_limited', 'too many checkout requests; try again shortly', { retryAfter: after });
const unknownUser = () => new ApiError(403, 'unknown_user', "the token's user does not exist in this project");
const PUBLIC_STATUS = { pending: 'pending', processing: 'pending', paid: 'paid', failed: 'failed', expired: 'expired' };

/** Parses and checks the body of POST: empty, {} or {"product": "full_report"}. */
function checkBody(event) {
  const body = readBody(event);
  if (body.length > MAX_BODY_BYTES) throw ApiError.bodyTooLarge(MAX_BODY_BYTES);
  const text = body.toString('utf8');
  if (text.trim() === '') return;
  if (!hasJsonBody(event)) throw new ApiError(415, 'unsupported_media_type', 'send the body as application/json');
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = undefined;
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)
    || (parsed.product != null && typeof parsed.product !== 'string')) {
    throw new ApiError(400, 'invalid_json', 'the body is not a JSON object of the expected shape');
  }
  const unknown = Object.keys(parsed).find((k) => k !== 'product');
  if (unknown) throw new ApiError(400, 'unknown_field', `unknown field \`${unknown}\`, expected \`product\``);
  if (parsed.product != null && parsed.product !== FULL_REPORT) {
    throw new ApiError(400, 'unknown_product', `the only product sold here is ${FULL_REPORT}`);
  }
}

function init() {
  const config = readConfig();
  const supabase = createSupabase(config.supabase);
  const base = new URL(config.stripeApiBase);
  const stripe = new Stripe(config.stripeKey, {
    apiVersion: /** @type {any} */ (API_VERSION),
    maxNetworkRetries: config.stripeRetries,
    timeout: config.stripeTimeoutMs,
    host: base.hostname,
    port: Number(base.port || (base.protocol === 'https:' ? 443 : 80)),
    protocol: base.protocol === 'https:' ? 'https' : 'http',
  });
  const verify = createVerifier(config.jwtSecret, config.supabase.url);
  const nowS = () => Math.floor(Date.now() / 1000);

  async function stripeCall(metrics, call) {
    const started = performance.now();
    try {
      return await call();
    } finally {
      metrics.millis('StripeLatency', performance.now() - started);
    }
  }

  async function retrieve(sessionId, metrics) {
    if (!sessionId || !SESSION_ID.test(sessionId)) throw invalidResponse('not a Checkout Session id');
    return stripeCall(metrics, () => stripe.checkout.sessions.retrieve(sessionId));
  }

  /** Applies what Stripe reports about a session; returns the order afterwards (if any). */
  async function reconcile(transition, session, metrics) {
    const reconciled = await rpc(supabase, 'checkout_reconcile', { p_effect: checkoutEffect(transition, session) });
    metrics.count('Reconciliations');
    if (reconciled?.duplicate_payment === true) {
      metrics.count('DuplicatePayments');
      log('error', 'a second paid order for the same user and product');
    }
    return reconciled?.order ?? null;
  }

  function answer(order, url, reused) {
    const sessionId = order.session_id ?? '';
    const link = url ?? order.url ?? '';
    if (!link || !sessionId) throw invalidResponse('open session without a URL');
    return { url: link, session_id: sessionId, order_id: order.order_id, reused };
  }

  async function create(user, order, metrics) {
    const orderId = order.order_id;
    const metadata = { order_id: orderId, user_id: user.id, product: FULL_REPORT };
    const params = {
      mode: 'payment',
      line_items: [{ price: config.priceId, quantity: 1 }],
      client_reference_id: user.id,
      success_url: config.successUrl,
      cancel_url: config.cancelUrl,
      // Every parameter derives from the order, as in the Rust function.
      expires_at: order.expires_at ?? order.created_at + config.sessionTtlS,
      metadata,
      payment_intent_data: { metadata },
    };
    if (order.customer_email) params.customer_email = order.customer_email;
    let session;
    try {
      session = await stripeCall(metrics, () => stripe.checkout.sessions.create(params, { idempotencyKey: `checkout-${orderId}` }));
    } catch (error) {
      // Free the lease so the next click tries again at once (same idempotency key).
      await rpc(supabase, 'checkout_release_lease', { p_order: orderId })
        .catch((e) => log('warn', 'could not release the checkout lease; it will expire', { error: e.message }));
      throw error;
    }
    const attached = await rpc(supabase, 'checkout_attach_session', {
      p_order: orderId,
      p_session_id: session.id,
      p_url: session.url ?? null,
      p_expires_at: session.expires_at ?? null,
      p_session_created: session.created ?? null,
    });
    if (!attached?.order) throw new StoreError('decode', 'checkout_attach_session: unexpected answer');
    if (!attached.attached) log('error', 'order already had another session; answering with the stored one', { order_id: orderId });
    metrics.count('SessionsCreated');
    return answer(attached.order, attached.attached ? session.url : undefined, !attached.attached);
  }

  async function post(event, metrics) {
    const user = verify(event, nowS());
    checkBody(event);
    let limit = config.rateLimitPerMin;
    const deadline = performance.now() + config.maxWaitMs;
    let waited = false;
    let expiredRestarts = 0;
    const claim = randomUUID();
    for (;;) {
      const begin = decodeState(await rpc(supabase, 'checkout_begin', {
        p_user: user.id,
        p_product: FULL_REPORT,
        p_email: user.email ?? null,
        p_claim: claim,
        p_limit: limit,
        p_window_s: RATE_WINDOW_S,
        p_lease_s: config.leaseS,
        p_session_ttl_s: config.sessionTtlS,
      }), 'checkout_begin');
      // Only the first look counts against the rate limit.
      limit = null;
      switch (begin.state) {
        case 'rate_limited': throw rateLimited(begin.retry_after);
        case 'unknown_user': throw unknownUser();
        case 'already_paid':
          metrics.count('AlreadyPaid');
          throw alreadyPaid();
        case 'disputed': throw disputed();
        case 'processing':
        case 'verifying': throw processing();
        case 'expire_first': {
          const confirmed = [];
          for (const id of begin.sessions) {
            const expired = await stripeCall(metrics, () => stripe.checkout.sessions.expire(id, {}, { idempotencyKey: `expire-${id}` }))
              .catch(() => retrieve(id, metrics).catch(() => null));
            if (expired && expired.status !== 'open') confirmed.push(id);
          }
          if (confirmed.length === 0) throw busy();
          await rpc(supabase, 'checkout_sessions_expired', { p_session_ids: confirmed });
          break;
        }
        case 'create_session': return create(user, begin.order, metrics);
        case 'in_progress': {
          const pause = Math.min(Math.max(begin.retry_ms, 20), 250);
          if (performance.now() + pause > deadline) throw busy();
          waited = true;
          await new Promise((resolve) => setTimeout(resolve, pause));
          break;
        }
        case 'open_session': {
          if (waited) {
            // A concurrent click created this session moments ago: it is open.
            metrics.count('SessionsReused');
            return answer(begin.order, undefined, true);
          }
          const session = await retrieve(begin.order.session_id, metrics);
          if (session.status === 'open') {
            metrics.count('SessionsReused');
            return answer(begin.order, session.url, true);
          }
          if (session.status === 'complete') {
            const order = await reconcile('completed', session, metrics);
            if ((order?.status ?? 'pending') === 'paid') {
              metrics.count('AlreadyPaid');
              throw alreadyPaid();
            }
            throw processing();
          }
          if (session.status !== 'expired') throw invalidResponse('session without a known status');
          await reconcile('expired', session, metrics);
          expiredRestarts += 1;
          if (expiredRestarts > 2) throw busy();
          break;
        }
        default: throw new StoreError('decode', `checkout_begin: unknown state ${begin.state}`);
      }
    }
  }

  async function get(event, metrics) {
    const user = verify(event, nowS());
    const sessionId = event.queryStringParameters?.session_id
      ?? new URLSearchParams(event.rawQueryString ?? '').get('session_id') ?? null;
    if (sessionId !== null && !(sessionId.startsWith('cs_') && sessionId.length <= 255 && SESSION_ID.test(sessionId))) {
      throw new ApiError(400, 'invalid_session_id', 'session_id must be a Checkout Session id (cs_...)');
    }
    const status = decodeState(await rpc(supabase, 'checkout_status', {
      p_user: user.id,
      p_session_id: sessionId,
      p_limit: config.statusRateLimitPerMin,
      p_window_s: RATE_WINDOW_S,
    }), 'checkout_status');
    if (status.state === 'rate_limited') throw rateLimited(status.retry_after);
    if (status.state === 'not_found') throw new ApiError(404, 'order_not_found', 'no such order for this user');
    let { order } = status;
    if (!order) throw new StoreError('decode', 'checkout_status: unexpected answer');
    if ((order.status === 'pending' || order.status === 'processing') && order.session_id) {
      // A poll never fails because Stripe does: the stored state is still an answer.
      let session;
      try {
        session = await retrieve(order.session_id, metrics);
      } catch (error) {
        metrics.countBy('StripeErrors', 'Class', error?.type ?? 'unknown');
        log('warn', 'could not refresh the order from Stripe; answering the stored state', { error: error?.message });
      }
      let transition = null;
      if (session?.status === 'complete' && (order.status === 'pending' || session.payment_status === 'paid')) transition = 'completed';
      else if (session?.status === 'expired') transition = 'expired';
      if (transition) order = (await reconcile(transition, session, metrics)) ?? order;
    }
    return {
      order_id: order.order_id,
      status: PUBLIC_STATUS[order.status] ?? 'pending',
      session_id: order.session_id ?? null,
      paid_at: order.paid_at ?? null,
    };
  }

  return async function handler(event, context) {
    const { started, requestId, metrics } = startRequest(ROUTE, context, 'Requests');
    let response;
    let outcome = 'ok';
    try {
      const verb = method(event);
      if (verb === 'POST') response = jsonResponse(200, await post(event, metrics));
      else if (verb === 'GET') response = jsonResponse(200, await get(event, metrics));
      else throw ApiError.methodNotAllowed('GET, POST');
    } catch (error) {
      let api = error;
      if (!(error instanceof ApiError)) {
        if (error instanceof StoreError) {
          metrics.count('Errors');
          log('error', 'store call failed', { request_id: requestId, error: error.message });
          api = error.kind === 'unavailable'
            ? new ApiError(503, 'store_unavailable', 'the database is not answering; try again in a moment', { retryAfter: 5 })
            : ApiError.internal();
        } else if (error instanceof Stripe.errors.StripeError || error?.type === 'invalid_response') {
          metrics.countBy('StripeErrors', 'Class', error.type);
          log('error', 'Stripe call failed', { request_id: requestId, error: error.message });
          api = stripeFailure(error);
        } else {
          log('error', 'unexpected error', { request_id: requestId, error: String(error?.stack ?? error) });
          api = ApiError.internal();
        }
      } else if (api.status === 401) {
        metrics.count('AuthFailures');
        log('warn', 'token refused', { request_id: requestId, reason: api.code });
      } else if (api.status === 429) metrics.count('RateLimited');
      response = errorResponse(api, requestId);
      outcome = api.code;
    }
    finishRequest(metrics, 'Duration', ROUTE, response.statusCode, started, requestId, outcome);
    return response;
  };
}

run(init);
