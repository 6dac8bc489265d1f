// The OpenAI Chat Completions request as functions/chat/src/request.rs accepts it, its cache key,
// and the rule engine of functions/chat/src/rules.rs (same rules file).

import { createHash } from 'node:crypto';

export class Invalid extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

// Parameters the SDKs send: the ones that matter are read, the rest accepted and ignored.
const REQUEST_FIELDS = new Set(['model', 'messages', 'stream', 'stream_options', 'max_tokens',
  'max_completion_tokens', 'temperature', 'n', 'top_p', 'stop', 'presence_penalty', 'frequency_penalty',
  'seed', 'user', 'store', 'metadata', 'logprobs', 'parallel_tool_calls']);
const MESSAGE_FIELDS = new Set(['role', 'content', 'name', 'refusal']);
const TYPES = {
  model: 'string', stream: 'boolean', max_tokens: 'u32', max_completion_tokens: 'u32', temperature: 'number',
  n: 'u32', top_p: 'number', presence_penalty: 'number', frequency_penalty: 'number', seed: 'integer',
  user: 'string', store: 'boolean', logprobs: 'boolean', parallel_tool_calls: 'boolean',
};
const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

function typeOk(value, type) {
  if (value === null || value === undefined) return true;
  switch (type) {
    case 'u32': return Number.isInteger(value) && value >= 0 && value <= 0xffffffff;
    case 'integer': return Number.isInteger(value);
    default: return typeof value === type; // eslint-disable-line valid-typeof
  }
}

const shapeError = () => new Invalid('invalid_json', 'the body is not a valid chat completion request');
const charCount = (text) => {
  let n = 0;
  for (const _ of text) n += 1; // eslint-disable-line no-unused-vars
  return n;
};

/** Parses and validates a request body (a Buffer) against `limits`. */
export function parseChat(body, limits) {
  let raw;
  try {
    raw = JSON.parse(body.toString('utf8'));
  } catch {
    throw shapeError();
  }
  if (!isObject(raw)) throw shapeError();
  for (const key of Object.keys(raw)) {
    if (!REQUEST_FIELDS.has(key)) throw new Invalid('unknown_field', `unknown field \`${key}\``);
    if (TYPES[key] && !typeOk(raw[key], TYPES[key])) throw shapeError();
  }
  if (!('messages' in raw)) throw new Invalid('missing_field', 'missing field `messages`');
  if (!Array.isArray(raw.messages)) throw shapeError();
  if (raw.stream_options != null) {
    if (!isObject(raw.stream_options)) throw shapeError();
    for (const key of Object.keys(raw.stream_options)) {
      if (key !== 'include_usage') throw new Invalid('unknown_field', `unknown field \`${key}\``);
    }
    if (!typeOk(raw.stream_options.include_usage, 'boolean')) throw shapeError();
  }
  for (const m of raw.messages) {
    if (!isObject(m)) throw shapeError();
    for (const key of Object.keys(m)) {
      if (!MESSAGE_FIELDS.has(key)) throw new Invalid('unknown_field', `unknown field \`${key}\``);
    }
    if (!('role' in m)) throw new Invalid('missing_field', 'missing field `role`');
    if (typeof m.role !== 'string' || !typeOk(m.name, 'string')) throw shapeError();
    const c = m.content;
    if (c != null && typeof c !== 'string'
      && !(Array.isArray(c) && c.every((p) => isObject(p) && typeof p.type === 'string' && typeOk(p.text, 'string')))) {
      throw shapeError();
    }
  }

  let model = limits.defaultModel;
  if (raw.model != null) {
    if (!limits.models.includes(raw.model)) {
      throw new Invalid('model_not_allowed', `model ${JSON.stringify(raw.model)} is not available; use one of ${JSON.stringify(limits.models)}`);
    }
    model = raw.model;
  }
  if (raw.messages.length === 0) throw new Invalid('empty_messages', 'messages must not be empty');
  if (raw.messages.length > limits.maxMessages) throw new Invalid('too_many_messages', `at most ${limits.maxMessages} messages`);
  if (raw.n != null && raw.n !== 1) throw new Invalid('invalid_parameter', 'n must be 1');
  if (raw.temperature != null && !(raw.temperature >= 0 && raw.temperature <= 2)) {
    throw new Invalid('invalid_parameter', 'temperature must be between 0 and 2');
  }
  const requested = raw.max_completion_tokens ?? raw.max_tokens ?? null;
  if (requested === 0) throw new Invalid('invalid_parameter', 'max_tokens must be at least 1');

  let total = 0;
  const messages = raw.messages.map((m, i) => {
    const role = m.role;
    if (role === 'system' || role === 'developer') {
      if (!limits.allowClientSystem) throw new Invalid('system_message_not_allowed', 'the system prompt is set by the server');
    } else if (role === 'tool' || role === 'function') {
      throw new Invalid('unsupported_role', `messages[${i}]: ${role} messages are not supported`);
    } else if (role !== 'user' && role !== 'assistant') {
      throw new Invalid('unknown_role', `messages[${i}]: unknown role ${JSON.stringify(role)}`);
    }
    let content = '';
    if (typeof m.content === 'string') content = m.content;
    else if (Array.isArray(m.content)) {
      for (const part of m.content) {
        if (part.type !== 'text' || typeof part.text !== 'string') {
          throw new Invalid('non_text_content', `messages[${i}]: only text content is supported`);
        }
        content += part.text;
      }
    }
    const chars = charCount(content);
    if (chars > limits.maxMessageChars) {
      throw new Invalid('message_too_long', `messages[${i}] is longer than ${limits.maxMessageChars} characters`);
    }
    total += chars;
    if (total > limits.maxTotalChars) {
      throw new Invalid('conversation_too_long', `the conversation is longer than ${limits.maxTotalChars} characters`);
    }
    return { role: role === 'developer' ? 'system' : role, content };
  });
  if (!messages.some((m) => m.role === 'user' && m.content.trim() !== '')) {
    throw new Invalid('no_user_message', 'at least one user message with text is required');
  }
  return {
    model,
    messages,
    stream: raw.stream === true,
    includeUsage: raw.stream_options?.include_usage === true,
    maxTokens: Math.min(requested ?? limits.maxTokens, limits.maxTokens),
    temperature: raw.temperature ?? null,
  };
}

/** The user's last message (what the rule engine answers). */
export function lastUserText(chat) {
  for (let i = chat.messages.length - 1; i >= 0; i -= 1) {
    if (chat.messages[i].role === 'user') return chat.messages[i].content;
  }
  return '';
}

/** sha256 over everything that determines the answer, normalised (trimmed), as Chat::cache_key. */
export function cacheKey(chat, systemPrompt) {
  const hash = createHash('sha256');
  const zero = Buffer.from([0]);
  const one = Buffer.from([1]);
  hash.update(chat.model);
  hash.update(zero);
  hash.update(systemPrompt.trim());
  for (const m of chat.messages) {
    hash.update(zero);
    hash.update(m.role);
    hash.update(one);
    hash.update(m.content.trim());
  }
  hash.update(zero);
  const tail = Buffer.alloc(12);
  tail.writeUInt32LE(chat.maxTokens, 0);
  tail.writeDoubleLE(chat.temperature ?? -1, 4);
  hash.update(tail);
  return hash.digest('hex');
}

/** A validated rules file: answer(text) -> {rule, reply}. */
export class RuleBook {
  constructor(file) {
    if (!isObject(file) || typeof file.default_reply !== 'string' || file.default_reply.trim() === '') {
      throw new Error('not a rules file with a default_reply');
    }
    this.defaultReply = file.default_reply;
    this.rules = (file.rules ?? []).map((rule) => {
      const patterns = (rule.patterns ?? []).map((p) => p.trim().toLowerCase()).filter((p) => p !== '');
      if (patterns.length === 0) throw new Error(`rule ${JSON.stringify(rule.name)} has no pattern`);
      if (patterns.some((p) => charCount(p) > 200) || typeof rule.reply !== 'string' || rule.reply.trim() === ''
        || charCount(rule.reply) > 8000) {
        throw new Error(`rule ${JSON.stringify(rule.name)} has an empty or oversized pattern or reply`);
      }
      return { name: rule.name, priority: rule.priority ?? 0, patterns: patterns.map((p) => [p, charCount(p)]), reply: rule.reply };
    });
  }

  /** The highest priority rule with a matching pattern; then the longest pattern; then the earlier rule. */
  answer(text) {
    const lowered = text.toLowerCase();
    let best = null;
    let bestLen = 0;
    for (const rule of this.rules) {
      let matched = -1;
      for (const [pattern, len] of rule.patterns) {
        if (len > matched && lowered.includes(pattern)) matched = len;
      }
      if (matched < 0) continue;
      if (!best || rule.priority > best.priority || (rule.priority === best.priority && matched > bestLen)) {
        best = rule;
        bestLen = matched;
      }
    }
    return best ? { rule: best.name, reply: best.reply } : { rule: 'default', reply: this.defaultReply };
  }
}
