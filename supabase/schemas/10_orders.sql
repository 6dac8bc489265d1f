-- Orders, the event ledger, the money trail and entitlements: what the app owns (docs/payments.md).
-- Users read their own rows through RLS; only the service role writes, through the functions in
-- the files that follow.

-- One attempt of a user to buy a product through a Checkout Session we create. The idempotency key
-- of its session is `checkout-{id}`; every create parameter derives from the row (I9). `status`,
-- `closed_reason`, `paid_at` and the payment columns are decisions kept here for readers
-- (billing.settle writes them from the facts in 20_facts.sql); the rest is checkout's own state.
create table public.orders (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  product text not null default 'full_report',
  -- pending: no session yet, or one that is open; processing: paid by a method still in flight;
  -- paid, refunded (all of it, or a chargeback lost), disputed (a chargeback open); failed, expired.
  status text not null default 'pending',
  stripe_checkout_session_id text unique,
  checkout_url text,
  checkout_expires_at timestamptz,
  session_created_at timestamptz,
  stripe_payment_intent_id text,
  stripe_customer_id text,
  amount_total bigint,
  currency text,
  -- When the order first took money (the payment was first seen succeeded).
  paid_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  -- The lease on creating the session: concurrent clicks wait for its holder.
  session_claimed_until timestamptz,
  -- The e-mail the session is created with, fixed when the order opens (I9).
  customer_email text,
  -- Null while the order can still be paid through its session: completed (its session
  -- completed), expired (its session expired), retired (its session can never be created);
  -- superseded and session_expired are kept from before 2026-12.
  closed_reason text,
  amount_refunded bigint not null default 0,
  session_claimed_by uuid,
  constraint orders_status_check check (status in
    ('pending', 'processing', 'paid', 'failed', 'expired', 'refunded', 'disputed')),
  constraint orders_closed_reason_check check (closed_reason in
    ('completed', 'expired', 'retired', 'superseded', 'session_expired'))
);
-- At most one open order per user and product: the database half of "one payable session".
create unique index orders_one_open_per_user_product
  on public.orders (user_id, product) where closed_reason is null;
create index orders_user_created on public.orders (user_id, created_at desc);
-- One payment intent pays one order.
create unique index orders_payment_intent
  on public.orders (stripe_payment_intent_id) where stripe_payment_intent_id is not null;

-- Every Stripe event received, once (the id is claimed in the transaction that applies it), with
-- its payload: the audit trail of what Stripe told us.
create table public.stripe_events (
  id text primary key,
  type text not null,
  api_version text,
  created timestamptz not null,
  livemode boolean not null,
  payload jsonb not null,
  outcome text not null,
  detail text,
  received_at timestamptz not null,
  processed_at timestamptz not null default now(),
  constraint stripe_events_outcome_check check (outcome in ('applied', 'ignored', 'stale', 'unmatched'))
);
create index stripe_events_type_created on public.stripe_events (type, created desc);

-- Which user a Stripe customer is; the first mapping stands (I7).
create table public.stripe_customers (
  stripe_customer_id text primary key,
  user_id uuid not null references auth.users (id) on delete cascade,
  created_at timestamptz not null default now()
);
create index stripe_customers_user on public.stripe_customers (user_id);

-- Append-only money trail: one row per change of an order's money, kept if the user is deleted.
create table public.payment_audit (
  id bigint generated always as identity primary key,
  event_id text references public.stripe_events (id),
  user_id uuid,
  kind text not null,
  order_id uuid,
  invoice_id text,
  amount bigint,
  currency text,
  created_at timestamptz not null default now(),
  -- What the row is about: a payment intent, refund, dispute or session id.
  reference text,
  constraint payment_audit_kind_check check (kind in (
    'order_paid', 'order_processing', 'order_payment_failed', 'order_expired',
    'duplicate_payment', 'invoice_paid', 'invoice_payment_failed',
    'order_refunded', 'order_partially_refunded', 'dispute_opened', 'dispute_won', 'dispute_lost',
    'duplicate_refunded', 'order_superseded', 'order_retired', 'session_unverified',
    'refund_reversed'))
);
create index payment_audit_user on public.payment_audit (user_id, created_at desc);
create index payment_audit_kind on public.payment_audit (kind, created_at desc);
-- What must be written once, whichever event or read gets there first.
create unique index payment_audit_order_paid_once
  on public.payment_audit (order_id) where kind = 'order_paid';
create unique index payment_audit_invoice_paid_once
  on public.payment_audit (invoice_id) where kind = 'invoice_paid';
create unique index payment_audit_duplicate_once
  on public.payment_audit (order_id) where kind = 'duplicate_payment';
create unique index payment_audit_duplicate_refunded_once
  on public.payment_audit (order_id) where kind = 'duplicate_refunded';

-- What a user may use now: `full_report` while one of their purchases of it is paid,
-- `subscription` while one of their subscriptions is live. Kept by billing.settle and
-- billing.sync_subscription_entitlement.
create table public.entitlements (
  user_id uuid not null references auth.users (id) on delete cascade,
  product text not null,
  active boolean not null,
  -- the order id (one-time purchase) or the subscription id
  source text not null,
  granted_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  primary key (user_id, product)
);

alter table public.orders enable row level security;
alter table public.stripe_events enable row level security;
alter table public.stripe_customers enable row level security;
alter table public.payment_audit enable row level security;
alter table public.entitlements enable row level security;

create policy "own orders" on public.orders
  for select to authenticated using (user_id = (select auth.uid()));
create policy "own customer ids" on public.stripe_customers
  for select to authenticated using (user_id = (select auth.uid()));
create policy "own payment audit" on public.payment_audit
  for select to authenticated using (user_id = (select auth.uid()));
create policy "own entitlements" on public.entitlements
  for select to authenticated using (user_id = (select auth.uid()));

revoke all on public.orders, public.stripe_events, public.stripe_customers, public.payment_audit,
  public.entitlements from anon, authenticated;
grant select on public.orders, public.stripe_customers, public.payment_audit, public.entitlements
  to authenticated;
grant all on public.orders, public.stripe_events, public.stripe_customers, public.payment_audit,
  public.entitlements to service_role;
