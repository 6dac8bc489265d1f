-- Payments data: orders, Stripe events (audit trail and exactly-once ledger), customers,
-- subscriptions, invoices, payment audit and entitlements.
-- Users read their own rows through RLS; only the service role writes, through the SQL functions
-- in the next migration.

create table public.orders (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  product text not null default 'full_report',
  -- pending: session created or being created; processing: completed, async payment in flight;
  -- paid, failed, expired: terminal (paid may still replace expired/failed: money was taken).
  status text not null default 'pending'
    check (status in ('pending', 'processing', 'paid', 'failed', 'expired')),
  stripe_checkout_session_id text unique,
  checkout_url text,
  checkout_expires_at timestamptz,
  session_created_at timestamptz,
  stripe_payment_intent_id text,
  stripe_customer_id text,
  amount_total bigint,
  currency text,
  paid_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
-- At most one open order per user and product: the database half of "never pay twice".
create unique index orders_one_open_per_user_product
  on public.orders (user_id, product) where status in ('pending', 'processing');
create index orders_user_created on public.orders (user_id, created_at desc);

create table public.stripe_events (
  id text primary key,
  type text not null,
  api_version text,
  created timestamptz not null,
  livemode boolean not null,
  payload jsonb not null,
  outcome text not null
    check (outcome in ('applied', 'ignored', 'stale', 'unmatched')),
  detail text,
  received_at timestamptz not null,
  processed_at timestamptz not null default now()
);
create index stripe_events_type_created on public.stripe_events (type, created desc);

create table public.stripe_customers (
  stripe_customer_id text primary key,
  user_id uuid not null references auth.users (id) on delete cascade,
  created_at timestamptz not null default now()
);
create index stripe_customers_user on public.stripe_customers (user_id);

create table public.subscriptions (
  id text primary key,
  user_id uuid references auth.users (id) on delete set null,
  stripe_customer_id text not null,
  status text not null,
  price_id text,
  current_period_start timestamptz,
  current_period_end timestamptz,
  cancel_at_period_end boolean not null default false,
  cancel_at timestamptz,
  canceled_at timestamptz,
  ended_at timestamptz,
  -- `created` of the newest event applied: an older event never overwrites newer state.
  last_event_created timestamptz not null,
  last_event_id text not null,
  updated_at timestamptz not null default now()
);
create index subscriptions_user on public.subscriptions (user_id);
create index subscriptions_customer on public.subscriptions (stripe_customer_id);

create table public.invoices (
  id text primary key,
  user_id uuid references auth.users (id) on delete set null,
  stripe_customer_id text,
  subscription_id text,
  status text,
  billing_reason text,
  amount_due bigint not null default 0,
  amount_paid bigint not null default 0,
  currency text,
  attempt_count integer not null default 0,
  hosted_invoice_url text,
  period_start timestamptz,
  period_end timestamptz,
  next_payment_attempt timestamptz,
  paid_at timestamptz,
  last_event_created timestamptz not null,
  last_event_id text not null,
  updated_at timestamptz not null default now()
);
create index invoices_user on public.invoices (user_id);
create index invoices_subscription on public.invoices (subscription_id);

-- Append-only money trail: one row per payment outcome, kept even if the user is deleted.
create table public.payment_audit (
  id bigint generated always as identity primary key,
  event_id text not null references public.stripe_events (id),
  user_id uuid,
  kind text not null check (kind in (
    'order_paid', 'order_processing', 'order_payment_failed', 'order_expired',
    'duplicate_payment', 'invoice_paid', 'invoice_payment_failed'
  )),
  order_id uuid,
  invoice_id text,
  amount bigint,
  currency text,
  created_at timestamptz not null default now()
);
create index payment_audit_user on public.payment_audit (user_id, created_at desc);
create index payment_audit_kind on public.payment_audit (kind, created_at desc);

create table public.entitlements (
  user_id uuid not null references auth.users (id) on delete cascade,
  product text not null,
  active boolean not null,
  -- order id (one-time purchase) or subscription id
  source text not null,
  granted_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  primary key (user_id, product)
);

-- Row level security: a signed-in user reads only their own rows; nobody but the service role
-- (which bypasses RLS) writes. stripe_events has no policy at all: service role only.
alter table public.orders enable row level security;
alter table public.stripe_events enable row level security;
alter table public.stripe_customers enable row level security;
alter table public.subscriptions enable row level security;
alter table public.invoices enable row level security;
alter table public.payment_audit enable row level security;
alter table public.entitlements enable row level security;

create policy "own orders" on public.orders
  for select to authenticated using (user_id = (select auth.uid()));
create policy "own customer ids" on public.stripe_customers
  for select to authenticated using (user_id = (select auth.uid()));
create policy "own subscriptions" on public.subscriptions
  for select to authenticated using (user_id = (select auth.uid()));
create policy "own invoices" on public.invoices
  for select to authenticated using (user_id = (select auth.uid()));
create policy "own payment audit" on public.payment_audit
  for select to authenticated using (user_id = (select auth.uid()));
create policy "own entitlements" on public.entitlements
  for select to authenticated using (user_id = (select auth.uid()));

-- Supabase grants every privilege on new public tables to anon and authenticated by default;
-- take writes away so RLS is not the only guard.
revoke all on public.orders, public.stripe_events, public.stripe_customers, public.subscriptions,
  public.invoices, public.payment_audit, public.entitlements from anon, authenticated;
grant select on public.orders, public.stripe_customers, public.subscriptions, public.invoices,
  public.payment_audit, public.entitlements to authenticated;
grant all on public.orders, public.stripe_events, public.stripe_customers, public.subscriptions,
  public.invoices, public.payment_audit, public.entitlements to service_role;

-- Each payment is audited once, whichever of its events (invoice.paid, invoice.payment_succeeded,
-- checkout.session.completed, ...async_payment_succeeded) arrives first.
create unique index payment_audit_invoice_paid_once
  on public.payment_audit (invoice_id) where kind = 'invoice_paid';
create unique index payment_audit_order_paid_once
  on public.payment_audit (order_id) where kind = 'order_paid';
