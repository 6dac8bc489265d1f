-- Payment integrity, schema half: money states after payment (refunds, disputes), the create
-- parameters kept on the order, and what Stripe reported about each payment, whatever order its
-- events arrive in. The invariants these serve are written down in docs/payments.md.

-- An order that took money ends paid, refunded (fully refunded or a lost dispute) or disputed
-- (a dispute is open). Refunded orders free the product for a new purchase.
alter table public.orders drop constraint orders_status_check;
alter table public.orders add constraint orders_status_check
  check (status in ('pending', 'processing', 'paid', 'failed', 'expired', 'refunded', 'disputed'));

alter table public.orders
  -- Create parameters derive only from the order: the e-mail of the token that opened it (a
  -- later e-mail change must not make the idempotent create differ) and `checkout_expires_at`,
  -- set when the order is opened.
  add column customer_email text,
  -- Why an order closed without a payment: session_expired, superseded (the user paid through
  -- another order), retired (its Stripe create can never succeed).
  add column closed_reason text,
  -- The order through which the user already owned the product when this one was paid: this
  -- payment is a duplicate, refunded automatically (`refund_id` once done).
  add column duplicate_of uuid references public.orders (id),
  add column refund_id text,
  add column amount_refunded bigint not null default 0;

-- One payment intent pays one order.
create unique index orders_payment_intent
  on public.orders (stripe_payment_intent_id) where stripe_payment_intent_id is not null;

-- What Stripe reported about a payment (charge.refunded), keyed by payment intent, kept even when
-- no order is known yet: an order paid later picks it up.
create table public.payments (
  payment_intent_id text primary key,
  charge_id text,
  amount bigint,
  amount_refunded bigint not null default 0,
  currency text,
  fully_refunded boolean not null default false,
  updated_at timestamptz not null default now()
);
create index payments_charge on public.payments (charge_id);

-- Disputes (charge.dispute.created / closed). Closed is final: a late `created` never reopens one.
create table public.disputes (
  id text primary key,
  payment_intent_id text,
  charge_id text,
  status text not null,
  reason text,
  amount bigint,
  currency text,
  closed boolean not null default false,
  opened_at timestamptz not null default now(),
  closed_at timestamptz,
  updated_at timestamptz not null default now()
);
create index disputes_payment_intent on public.disputes (payment_intent_id);
create index disputes_charge on public.disputes (charge_id);

alter table public.payments enable row level security;
alter table public.disputes enable row level security;
revoke all on public.payments, public.disputes from anon, authenticated;
grant all on public.payments, public.disputes to service_role;

-- Subscription events of the same second apply in lifecycle order: created (0) < updated (1) <
-- deleted (2).
alter table public.subscriptions add column last_event_rank smallint not null default 1;

-- The money trail grows the outcomes that follow a payment.
alter table public.payment_audit drop constraint payment_audit_kind_check;
alter table public.payment_audit add constraint payment_audit_kind_check check (kind in (
  'order_paid', 'order_processing', 'order_payment_failed', 'order_expired',
  'duplicate_payment', 'invoice_paid', 'invoice_payment_failed',
  'order_refunded', 'order_partially_refunded', 'dispute_opened', 'dispute_won', 'dispute_lost',
  'duplicate_refunded', 'order_superseded', 'order_retired', 'session_unverified'
));
-- What the refund or dispute row is about (re_..., dp_..., ch_...).
alter table public.payment_audit add column reference text;

create unique index payment_audit_duplicate_once
  on public.payment_audit (order_id) where kind = 'duplicate_payment';
create unique index payment_audit_duplicate_refunded_once
  on public.payment_audit (order_id) where kind = 'duplicate_refunded';
