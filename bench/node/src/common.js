// What the handlers share, as the Rust `shared` crate does: configuration from the environment,
// JSON answers and the error envelope, Supabase access-token verification (HS256, node:crypto
// only), the store (SQL functions through supabase.rpc), and one EMF metrics line plus one JSON
// log line per request. Written for the three routes; chat is the one left (see README.md).

import { createHmac, createSecretKey, timingSafeEqual } from 'node:crypto';
import { createClient } from '@supabase/supabase-js';
import ws from 'ws';

// ---------------------------------------------------------------------------------------------
// Configuration

/** Reads variables, collecting every problem before failing (like shared::config::EnvReader). */
export class Env {
  constructor(source = process.env) {
    this.source = source;
    this.problems = [];
  }

  optional(name) {
    const value = this.source[name];
    if (value === undefined) return undefined;
    const trimmed = value.trim();
    return trimmed === '' ? undefined : trimmed;
  }

  required(name) {
    const value = this.optional(name);
    if (value === undefined) this.problem(name, 'is required but not set');
    return value;
  }

  problem(name, what) {
    this.problems.push(`${name}: ${what}`);
  }

  integer(name, fallback, min, max) {
    const raw = this.optional(name);
    if (raw === undefined) return fallback;
    const value = /^\d+$/.test(raw) ? Number(raw) : NaN;
    if (!(value >= min && value <= max)) {
      this.problem(name, `must be a whole number from ${min} to ${max}`);
      return fallback;
    }
    return value;
  }

  boolean(name, fallback) {
    const raw = this.optional(name);
    if (raw === undefined) return fallback;
    if (raw !== 'true' && raw !== 'false') {
      this.problem(name, 'must be true or false');
      return fallback;
    }
    return raw === 'true';
  }

  appEnv() {
    const raw = (this.optional('APP_ENV') ?? 'development').toLowerCase();
    const known = { development: 'development', dev: 'development', local: 'development',
      test: 'test', staging: 'staging', production: 'production', prod: 'production' };
    if (!known[raw]) this.problem('APP_ENV', 'must be one of development, test, staging, production');
    return known[raw] ?? 'development';
  }

  /** SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY (the Node baseline has no direct-Postgres path). */
  supabase() {
    const url = this.required('SUPABASE_URL');
    const key = this.required('SUPABASE_SERVICE_ROLE_KEY');
    if (url && !/^https?:\/\//.test(url)) this.problem('SUPABASE_URL', 'must be an http(s) URL');
    return { url: url?.replace(/\/+$/, ''), key };
  }

  finish(value) {
    if (this.problems.length) {
      throw new Error(`invalid configuration (${this.problems.length} problem(s)):\n  - ${this.problems.join('\n  - ')}`);
    }
    return value;
  }
}

// ---------------------------------------------------------------------------------------------
// Answers

/** An error answer with a stable code (the Rust ApiError). */
export class ApiError extends Error {
  constructor(status, code, message, { retryAfter, allow, wwwAuthenticate } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
    this.allow = allow;
    this.wwwAuthenticate = wwwAuthenticate;
  }

  static methodNotAllowed(allowed) {
    return new ApiError(405, 'method_not_allowed', `this endpoint accepts ${allowed}`, { allow: allowed });
  }

  static bodyTooLarge(limit) {
    return new ApiError(413, 'body_too_large', `the request body exceeds ${limit} bytes`);
  }

  static internal() {
    return new ApiError(500, 'internal', 'an internal error occurred; it has been logged');
  }
}

/** A function-URL result with a JSON body and `Cache-Control: no-store`. */
export function jsonResponse(statusCode, body, headers = {}) {
  return {
    statusCode,
    headers: { 'content-type': 'application/json', 'cache-control': 'no-store', ...headers },
    body: JSON.stringify(body),
    isBase64Encoded: false,
  };
}

/** `{"error": {code, message, request_id}}` with Retry-After / Allow / WWW-Authenticate. */
export function errorResponse(error, requestId) {
  const headers = {};
  if (error.retryAfter !== undefined) headers['retry-after'] = String(error.retryAfter);
  if (error.allow) headers.allow = error.allow;
  if (error.wwwAuthenticate) headers['www-authenticate'] = 'Bearer error="invalid_token"';
  return jsonResponse(error.status, { error: { code: error.code, message: error.message, request_id: requestId } }, headers);
}

// ---------------------------------------------------------------------------------------------
// Requests (function-URL events, payload format 2.0)

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

/** The raw body bytes; 400 when it claims base64 but is not (as shared::lambda::into_request). */
export function readBody(event) {
  const body = event.body ?? '';
  if (!event.isBase64Encoded) return Buffer.from(body, 'utf8');
  if (body.length % 4 !== 0 || !BASE64.test(body)) {
    throw new ApiError(400, 'invalid_body_encoding', 'the request body is flagged base64 but is not valid base64');
  }
  return Buffer.from(body, 'base64');
}

/** A request header (function URLs deliver lower-case names). */
export function header(event, name) {
  return event.headers?.[name];
}

export function method(event) {
  return event.requestContext?.http?.method ?? 'GET';
}

export function hasJsonBody(event) {
  const type = header(event, 'content-type');
  return type !== undefined && type.trim().toLowerCase().startsWith('application/json');
}

// ---------------------------------------------------------------------------------------------
// Supabase access tokens (HS256 with the project's JWT secret)

const MAX_TOKEN_LEN = 8 * 1024;
const LEEWAY_S = 30;
const AUDIENCE = 'authenticated';
const B64URL = /^[A-Za-z0-9_-]*$/;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

const AUTH_MESSAGES = {
  missing_token: 'an Authorization: Bearer token is required',
  invalid_token: 'the token is not a well-formed JWT',
  unsupported_token_algorithm: "the token's algorithm is not accepted",
  invalid_token_signature: "the token's signature is invalid",
  token_expired: 'the token has expired',
  token_not_yet_valid: 'the token is not valid yet',
  invalid_token_audience: 'the token is not for this audience',
  invalid_token_issuer: 'the token was issued by another project',
  invalid_token_subject: 'the token does not name a user',
};

export class AuthError extends ApiError {
  constructor(code) {
    super(401, code, AUTH_MESSAGES[code], { wwwAuthenticate: true });
  }
}

function b64urlJson(part) {
  if (!B64URL.test(part)) throw new AuthError('invalid_token');
  try {
    return JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
  } catch {
    throw new AuthError('invalid_token');
  }
}

/**
 * A verifier for `SUPABASE_JWT_SECRET`: verify(event, nowSeconds) -> {id, email, isAnonymous}.
 * With the project URL known, `iss` must be `{SUPABASE_URL}/auth/v1`, as the Rust verifier checks.
 */
export function createVerifier(secret, supabaseUrl) {
  const key = createSecretKey(Buffer.from(secret, 'utf8'));
  const issuer = supabaseUrl ? `${supabaseUrl}/auth/v1` : undefined;
  return function verify(event, now) {
    const value = header(event, 'authorization')?.trim();
    const space = value?.indexOf(' ') ?? -1;
    if (!value || space < 0 || value.slice(0, space).toLowerCase() !== 'bearer') throw new AuthError('missing_token');
    const token = value.slice(space + 1).trim();
    if (!token) throw new AuthError('missing_token');
    if (token.length > MAX_TOKEN_LEN) throw new AuthError('invalid_token');
    const parts = token.split('.');
    if (parts.length !== 3) throw new AuthError('invalid_token');
    const [h, p, s] = parts;
    const head = b64urlJson(h);
    if (!B64URL.test(s)) throw new AuthError('invalid_token');
    if (head?.alg !== 'HS256') throw new AuthError('unsupported_token_algorithm');
    const signature = Buffer.from(s, 'base64url');
    const expected = createHmac('sha256', key).update(`${h}.${p}`).digest();
    if (signature.length !== expected.length || !timingSafeEqual(signature, expected)) {
      throw new AuthError('invalid_token_signature');
    }
    const claims = b64urlJson(p);
    if (claims === null || typeof claims !== 'object') throw new AuthError('invalid_token');
    if (!Number.isInteger(claims.exp) || claims.exp + LEEWAY_S <= now) throw new AuthError('token_expired');
    if (Number.isInteger(claims.nbf) && claims.nbf > now + LEEWAY_S) throw new AuthError('token_not_yet_valid');
    const aud = claims.aud;
    if (!(aud === AUDIENCE || (Array.isArray(aud) && aud.includes(AUDIENCE)))) throw new AuthError('invalid_token_audience');
    if (issuer !== undefined && claims.iss !== issuer) throw new AuthError('invalid_token_issuer');
    if (claims.role != null && claims.role !== AUDIENCE) throw new AuthError('invalid_token_subject');
    if (typeof claims.sub !== 'string' || !UUID.test(claims.sub)) throw new AuthError('invalid_token_subject');
    const email = typeof claims.email === 'string' && claims.email.includes('@') && claims.email.length <= 320
      ? claims.email : undefined;
    return { id: claims.sub.toLowerCase(), email, isAnonymous: claims.is_anonymous === true };
  };
}

// ---------------------------------------------------------------------------------------------
// The store: the project's SQL functions through PostgREST (supabase.rpc)

/**
 * The service-role client, built once per cold start. supabase-js 2.109 (the last release for
 * Node 20) builds its realtime client eagerly and, on Node 20 (no global WebSocket), refuses to
 * start without a WebSocket transport: `ws` is the one its error message prescribes. No socket
 * is opened; only rpc() is used.
 */
export function createSupabase({ url, key }) {
  return createClient(url, key, {
    auth: { persistSession: false, autoRefreshToken: false },
    realtime: { transport: ws },
  });
}

/** Why a store call failed: kind is unavailable | conflict | database | decode. */
export class StoreError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

/** Calls `fn` with named args; returns its JSON result or throws a classified StoreError. */
export async function rpc(supabase, fn, args) {
  const { data, error, status } = await supabase.rpc(fn, args);
  if (!error) return data;
  const code = error.code || `http_${status}`;
  const message = `${fn}: ${code}: ${error.message}`;
  if (status === 0) throw new StoreError('unavailable', message);
  if (code === '23505') throw new StoreError('conflict', message);
  if (status >= 500 || status === 429) {
    if (code.startsWith('PGRST0') || code.startsWith('http_') || ['57014', '40001', '40P01'].includes(code)) {
      throw new StoreError('unavailable', message);
    }
  }
  throw new StoreError('database', message);
}

/** Checks the `state` a SQL function answered with (the Rust side decodes into an enum). */
export function decodeState(value, fn) {
  if (value === null || typeof value !== 'object' || typeof value.state !== 'string') {
    throw new StoreError('decode', `${fn}: unexpected answer`);
  }
  return value;
}

// ---------------------------------------------------------------------------------------------
// Logs and metrics (CloudWatch EMF on stdout, as shared::telemetry)

const NAMESPACE = 'SaasFunctions';
const LEVELS = { trace: 0, debug: 1, info: 2, warn: 3, error: 4, fatal: 4 };
const LOG_LEVEL = LEVELS[(process.env.AWS_LAMBDA_LOG_LEVEL ?? process.env.RUST_LOG ?? 'info').toLowerCase()] ?? 2;

/** One JSON log line, when `level` passes AWS_LAMBDA_LOG_LEVEL. */
export function log(level, message, fields = {}) {
  if (LEVELS[level] < LOG_LEVEL) return;
  process.stdout.write(`${JSON.stringify({ timestamp: new Date().toISOString(), level: level.toUpperCase(), message, ...fields })}\n`);
}

/** The one log line per request. */
export function logRequest(route, status, durationMs, requestId, outcome) {
  const level = status >= 500 ? 'error' : status >= 400 ? 'warn' : 'info';
  log(level, 'request', { route, status, duration_ms: durationMs, request_id: requestId, outcome });
}

/** Metrics recorded while handling one request; flush() writes them as one EMF line. */
export class MetricSet {
  constructor(fn) {
    this.fn = fn;
    this.groups = [];
    this.properties = {};
  }

  group(dimension) {
    const key = dimension ? `${dimension[0]}\u0000${dimension[1]}` : '';
    let group = this.groups.find((g) => g.key === key);
    if (!group) {
      group = { key, dimension, values: new Map() };
      this.groups.push(group);
    }
    return group;
  }

  add(dimension, name, unit, value) {
    const values = this.group(dimension).values;
    const existing = values.get(name);
    if (existing && unit === 'Count') existing.value += value;
    else values.set(name, { unit, value });
  }

  count(name, n = 1) { this.add(undefined, name, 'Count', n); }
  millis(name, ms) { this.add(undefined, name, 'Milliseconds', ms); }
  countBy(name, dimension, value, n = 1) { this.add([dimension, value], name, 'Count', n); }
  property(key, value) { this.properties[key] = value; }

  status(status) {
    if (status >= 500) this.count('Http5xx');
    else if (status >= 400) this.count('Http4xx');
  }

  flush() {
    if (this.groups.every((g) => g.values.size === 0)) return;
    const root = { ...this.properties, Function: this.fn };
    const directives = [];
    for (const group of this.groups) {
      let dimensions = [['Function']];
      if (group.dimension) {
        root[group.dimension[0]] = group.dimension[1];
        dimensions = [['Function'], ['Function', group.dimension[0]]];
      }
      const metrics = [];
      for (const [name, { unit, value }] of group.values) {
        metrics.push({ Name: name, Unit: unit });
        root[name] = value;
      }
      directives.push({ Namespace: NAMESPACE, Dimensions: dimensions, Metrics: metrics });
    }
    root._aws = { Timestamp: Date.now(), CloudWatchMetrics: directives };
    process.stdout.write(`${JSON.stringify(root)}\n`);
  }
}

/** Closes a request: status and duration metrics, the metrics line, the log line. */
/** The start of a request: its clock, id and metric set with the first count (as Rust's handlers). */
export function startRequest(route, context, firstCount) {
  const started = performance.now();
  const requestId = context.awsRequestId;
  const metrics = new MetricSet(route);
  metrics.property('request_id', requestId);
  metrics.count(firstCount);
  return { started, requestId, metrics };
}

export function finishRequest(metrics, durationMetric, route, status, started, requestId, outcome) {
  const elapsed = performance.now() - started;
  metrics.status(status);
  metrics.millis(durationMetric, elapsed);
  metrics.flush();
  logRequest(route, status, elapsed, requestId, outcome);
}
