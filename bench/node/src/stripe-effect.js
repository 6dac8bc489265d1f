// Typed reading of Stripe events and the effect each one has on the app's data, as
// shared/src/stripe/events.rs computes it for the `apply_stripe_event` / `checkout_reconcile`
// SQL functions. Both invoice shapes are read: before `2025-03-31.basil` an invoice names its
// subscription at `subscription`, since then at `parent.subscription_details.subscription`
// (and each line at `parent.subscription_item_details.subscription`).

export class EventError extends Error {}

const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
const optString = (v) => (typeof v === 'string' ? v : null);
const optInt = (v) => (Number.isInteger(v) ? v : null);

/** An id Stripe may send as an id or, expanded, as an object with an `id`. */
function idOf(field) {
  if (typeof field === 'string') return field;
  if (isObject(field) && typeof field.id === 'string') return field.id;
  return null;
}

function metadataValue(session, key) {
  const value = isObject(session.metadata) ? session.metadata[key] : undefined;
  return typeof value === 'string' && value !== '' ? value : null;
}

const CHECKOUT_TRANSITIONS = {
  'checkout.session.completed': 'completed',
  'checkout.session.async_payment_succeeded': 'async_payment_succeeded',
  'checkout.session.async_payment_failed': 'async_payment_failed',
  'checkout.session.expired': 'expired',
};
const INVOICE_TRANSITIONS = {
  'invoice.paid': 'paid',
  'invoice.payment_succeeded': 'payment_succeeded',
  'invoice.payment_failed': 'payment_failed',
};
const SUBSCRIPTION_TYPES = new Set([
  'customer.subscription.created',
  'customer.subscription.updated',
  'customer.subscription.deleted',
]);

/** The effect of a Checkout Session `transition` (also used by checkout reconciliation). */
export function checkoutEffect(transition, session) {
  return {
    kind: 'checkout_session',
    transition,
    session_id: session.id,
    mode: optString(session.mode),
    payment_status: optString(session.payment_status),
    order_id: metadataValue(session, 'order_id'),
    user_id: metadataValue(session, 'user_id') ?? optString(session.client_reference_id),
    product: metadataValue(session, 'product'),
    customer_id: idOf(session.customer),
    payment_intent_id: idOf(session.payment_intent),
    amount_total: optInt(session.amount_total),
    currency: optString(session.currency),
    session_created: optInt(session.created),
  };
}

function subscriptionEffect(deleted, s) {
  if (typeof s.id !== 'string' || idOf(s.customer) === null || typeof s.status !== 'string') {
    throw new EventError('data.object is not a subscription');
  }
  const first = Array.isArray(s.items?.data) ? s.items.data[0] : undefined;
  const userId = isObject(s.metadata) && typeof s.metadata.user_id === 'string' ? s.metadata.user_id : null;
  return {
    kind: 'subscription',
    id: s.id,
    customer_id: idOf(s.customer),
    user_id: userId,
    // A deleted subscription is canceled whatever status the payload carries.
    status: deleted ? 'canceled' : s.status,
    deleted,
    price_id: first ? idOf(first.price) : null,
    current_period_start: optInt(s.current_period_start) ?? optInt(first?.current_period_start),
    current_period_end: optInt(s.current_period_end) ?? optInt(first?.current_period_end),
    cancel_at_period_end: s.cancel_at_period_end === true,
    cancel_at: optInt(s.cancel_at),
    canceled_at: optInt(s.canceled_at),
    ended_at: optInt(s.ended_at),
  };
}

/** The subscription an invoice bills, wherever the event's API version puts it. */
function invoiceSubscription(invoice) {
  const direct = idOf(invoice.subscription) ?? idOf(invoice.parent?.subscription_details?.subscription);
  if (direct) return direct;
  const lines = Array.isArray(invoice.lines?.data) ? invoice.lines.data : [];
  for (const line of lines) {
    const id = idOf(line?.subscription) ?? idOf(line?.parent?.subscription_item_details?.subscription);
    if (id) return id;
  }
  return null;
}

function invoiceEffect(transition, i) {
  if (typeof i.id !== 'string') throw new EventError('data.object is not a invoice');
  return {
    kind: 'invoice',
    transition,
    id: i.id,
    customer_id: idOf(i.customer),
    subscription_id: invoiceSubscription(i),
    status: optString(i.status),
    amount_due: optInt(i.amount_due) ?? 0,
    amount_paid: optInt(i.amount_paid) ?? 0,
    currency: optString(i.currency),
    billing_reason: optString(i.billing_reason),
    attempt_count: optInt(i.attempt_count) ?? 0,
    hosted_invoice_url: optString(i.hosted_invoice_url),
    period_start: optInt(i.period_start),
    period_end: optInt(i.period_end),
    next_payment_attempt: optInt(i.next_payment_attempt),
  };
}

/** Reads a verified event: its envelope and the effect of its type (`ignored` for the rest). */
export function parseEvent(event) {
  if (!isObject(event) || typeof event.id !== 'string' || typeof event.type !== 'string'
    || !Number.isInteger(event.created) || typeof event.livemode !== 'boolean' || !isObject(event.data)
    || !('object' in event.data)) {
    throw new EventError('the body is not a Stripe event');
  }
  if (!event.id.startsWith('evt_') || event.id.length > 255) {
    throw new EventError('the event id is not a Stripe event id');
  }
  const object = event.data.object;
  let effect;
  if (CHECKOUT_TRANSITIONS[event.type]) {
    if (!isObject(object) || typeof object.id !== 'string') throw new EventError('data.object is not a checkout session');
    effect = checkoutEffect(CHECKOUT_TRANSITIONS[event.type], object);
  } else if (SUBSCRIPTION_TYPES.has(event.type)) {
    if (!isObject(object)) throw new EventError('data.object is not a subscription');
    effect = subscriptionEffect(event.type === 'customer.subscription.deleted', object);
  } else if (INVOICE_TRANSITIONS[event.type]) {
    if (!isObject(object)) throw new EventError('data.object is not a invoice');
    effect = invoiceEffect(INVOICE_TRANSITIONS[event.type], object);
  } else {
    effect = { kind: 'ignored' };
  }
  return {
    id: event.id,
    type: event.type,
    created: event.created,
    livemode: event.livemode,
    apiVersion: optString(event.api_version),
    effect,
  };
}
