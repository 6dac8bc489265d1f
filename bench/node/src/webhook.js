// The Stripe webhook (/api/stripe/webhook), as functions/webhook: verify `Stripe-Signature` over
// the exact bytes received (stripe.webhooks.constructEvent), read the event, and record it and
// apply its effect exactly once with one SQL call, `apply_stripe_event`, through supabase.rpc.
//
// 200 once the event is recorded (applied, duplicate, ignored, stale or unmatched); 4xx for
// requests that are not genuine, current events for this mode; 503/500 when the database cannot
// take the event, so Stripe delivers it again.

import Stripe from 'stripe';
import {
  ApiError, Env, createSupabase, StoreError, errorResponse, finishRequest, startRequest, hasJsonBody, header, jsonResponse, log,
  method, readBody, rpc, stripeKeyMode,
} from './common.js';
import { EventError, parseEvent } from './stripe-effect.js';
import { run } from './runtime.js';

const ROUTE = 'webhook';

function readConfig() {
  const env = new Env();
  const appEnv = env.appEnv();
  const supabase = env.supabase();
  const secrets = (env.required('STRIPE_WEBHOOK_SECRET') ?? '').split(',').map((s) => s.trim()).filter(Boolean);
  if (secrets.length === 0) env.problem('STRIPE_WEBHOOK_SECRET', 'holds no secret');
  const tolerance = env.integer('STRIPE_WEBHOOK_TOLERANCE_S', 300, 1, 86_400);
  const key = env.optional('STRIPE_SECRET_KEY');
  const stripeMode = key ? stripeKeyMode(key) ?? 'test' : appEnv === 'production' ? 'live' : 'test';
  const maxBodyBytes = env.integer('WEBHOOK_MAX_BODY_BYTES', 1 << 20, 1024, 6 << 20);
  return env.finish({ supabase, secrets, tolerance, stripeMode, maxBodyBytes });
}

const SIGNATURE_MESSAGES = {
  missing_signature: 'the Stripe-Signature header is missing',
  malformed_signature: 'the Stripe-Signature header is malformed',
  no_v1_signature: 'the Stripe-Signature header has no v1 signature',
  timestamp_outside_tolerance: 'the signature timestamp is outside the tolerance',
  signature_mismatch: 'no signature matches the payload',
};

/** stripe-node's verification error, under the Rust function's stable codes and messages. */
function signatureError(error) {
  const message = String(error?.message ?? '');
  let code = 'signature_mismatch';
  if (/Timestamp outside the tolerance/.test(message)) code = 'timestamp_outside_tolerance';
  else if (/Unable to extract timestamp/.test(message)) code = 'malformed_signature';
  else if (/No signatures found with expected scheme/.test(message)) code = 'no_v1_signature';
  else if (/No stripe-signature header/.test(message)) code = 'missing_signature';
  return new ApiError(400, code, SIGNATURE_MESSAGES[code]);
}

function storeFailure(error) {
  if (error instanceof StoreError && error.kind === 'unavailable') {
    return new ApiError(503, 'store_unavailable', 'the event could not be stored now; Stripe will deliver it again',
      { retryAfter: 60 });
  }
  return ApiError.internal();
}

function init() {
  const config = readConfig();
  const supabase = createSupabase(config.supabase);
  // Verification is local; the key is never used for a call from this function.
  const stripe = new Stripe(process.env.STRIPE_SECRET_KEY || 'sk_test_unused');

  async function accept(event, metrics) {
    if (method(event) !== 'POST') throw ApiError.methodNotAllowed('POST');
    // Stripe always sends a JSON content type; a request without one is judged by its signature.
    if (header(event, 'content-type') !== undefined && !hasJsonBody(event)) {
      throw new ApiError(415, 'unsupported_media_type', 'Stripe events are sent as application/json');
    }
    const body = readBody(event);
    if (body.length > config.maxBodyBytes) throw ApiError.bodyTooLarge(config.maxBodyBytes);
    const signature = header(event, 'stripe-signature');
    if (signature === undefined) throw new ApiError(400, 'missing_signature', SIGNATURE_MESSAGES.missing_signature);

    let verified;
    let lastError;
    for (const secret of config.secrets) {
      try {
        verified = stripe.webhooks.constructEvent(body, signature, secret, config.tolerance);
        break;
      } catch (error) {
        // A genuine signature over a body that is not JSON: stripe-node's JSON.parse failed.
        if (error instanceof SyntaxError) {
          metrics.count('InvalidEvents');
          throw new ApiError(400, 'invalid_event', 'the body is not a Stripe event this endpoint can read');
        }
        lastError = error;
      }
    }
    if (!verified) {
      metrics.count('SignatureFailures');
      throw signatureError(lastError);
    }

    let parsed;
    try {
      parsed = parseEvent(verified);
    } catch (error) {
      if (!(error instanceof EventError)) throw error;
      metrics.count('InvalidEvents');
      throw new ApiError(400, 'invalid_event', 'the body is not a Stripe event this endpoint can read');
    }
    if ((parsed.livemode ? 'live' : 'test') !== config.stripeMode) {
      metrics.count('LivemodeMismatches');
      throw new ApiError(400, 'livemode_mismatch', parsed.livemode
        ? 'a live-mode event was sent to a test-mode endpoint'
        : 'a test-mode event was sent to a live-mode endpoint');
    }

    const storeStarted = performance.now();
    let applied;
    try {
      applied = await rpc(supabase, 'apply_stripe_event', {
        p_event: {
          id: parsed.id,
          type: parsed.type,
          created: parsed.created,
          livemode: parsed.livemode,
          api_version: parsed.apiVersion,
          received_at_ms: Date.now(),
        },
        p_payload: verified,
        p_effect: parsed.effect,
      });
      if (typeof applied?.outcome !== 'string') throw new StoreError('decode', 'apply_stripe_event: unexpected answer');
    } catch (error) {
      metrics.count('Errors');
      log('error', 'event not stored; Stripe will redeliver', { error: String(error.message) });
      throw storeFailure(error);
    }
    metrics.millis('StoreTime', performance.now() - storeStarted);

    if (applied.outcome === 'duplicate') metrics.count('Duplicates');
    else if (applied.outcome === 'unmatched') {
      metrics.count('Unmatched');
      log('warn', 'event matched no order or user', { event_id: parsed.id, event_type: parsed.type });
    } else metrics.countBy('Processed', 'EventType', parsed.type);
    if (Number.isInteger(applied.sync_delay_ms) && applied.sync_delay_ms >= 0) {
      metrics.millis('OrderSyncDelay', applied.sync_delay_ms);
    }
    if (applied.duplicate_payment === true) {
      metrics.count('DuplicatePayments');
      log('error', 'a second paid order for the same user and product', { event_id: parsed.id, order_id: applied.order_id ?? '' });
    }
    return { eventId: parsed.id, outcome: applied.outcome };
  }

  return async function handler(event, context) {
    const { started, requestId, metrics } = startRequest(ROUTE, context, 'Received');
    let response;
    let outcome;
    try {
      const result = await accept(event, metrics);
      response = jsonResponse(200, { received: true, event_id: result.eventId, outcome: result.outcome });
      outcome = result.outcome;
    } catch (error) {
      const api = error instanceof ApiError ? error : ApiError.internal();
      if (!(error instanceof ApiError)) log('error', 'unexpected error', { error: String(error?.stack ?? error) });
      response = errorResponse(api, requestId);
      outcome = api.code;
    }
    finishRequest(metrics, 'Duration', ROUTE, response.statusCode, started, requestId, outcome);
    return response;
  };
}

run(init);
