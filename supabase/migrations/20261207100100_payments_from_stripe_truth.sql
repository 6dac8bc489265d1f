-- Payments from Stripe's truth (issue 20). Stripe's events become notifications: the webhook,
-- checkout and a reconciler read the objects they concern from the API and store them as facts
-- (public.stripe_sessions, stripe_payments, stripe_refunds, stripe_disputes; subscriptions and
-- invoices as read); which payment stands, what is due for a refund or an expiry, each order's
-- state and the entitlements are pure decisions over those facts (billing.decisions and the
-- functions beside it), kept on the orders under the purchase lock by billing.settle. The rules
-- added one interleaving at a time in the earlier payment migrations are dropped with their
-- tables (payments, refunds, disputes: arithmetic over event payloads).
--
-- The current definition of everything lives in supabase/schemas/ (this file creates the
-- functions exactly as written there); tests/it/schema.rs proves migrations and schema files agree.
--
-- Not backwards compatible with the functions before it: deploy this release with
-- DeploymentType AllAtOnce right after the migration (docs/operations.md). The facts of payments
-- made before it are filled from the old tables with read_at = epoch, so nothing is revoked, and
-- the reconciler's first run reads each of them again from Stripe.

-- The old functions and their trigger (orders_one_owner) go; the billing schema holds nothing else.
drop schema billing cascade;
drop function public.apply_stripe_event(jsonb, jsonb, jsonb);
drop function public.checkout_begin(uuid, text, text, uuid, integer, integer, integer, integer);
drop function public.checkout_attach_session(uuid, text, text, bigint, bigint);
drop function public.checkout_release_lease(uuid);
drop function public.checkout_reconcile(jsonb);
drop function public.checkout_retire_order(uuid, text);
drop function public.checkout_status(uuid, text, integer, integer);
drop function public.record_duplicate_refund(uuid, jsonb);
drop function public.checkout_sessions_expired(text[]);
drop function public.payment_health(integer);

create schema billing;
revoke all on schema billing from public;
grant usage on schema billing to service_role;

-- Facts.
create table public.stripe_sessions (
  id text primary key,
  mode text,
  status text not null,
  payment_status text,
  payment_intent_id text,
  customer_id text,
  -- The buyer, when a user we know: the order's user, else `client_reference_id`.
  user_id uuid,
  -- Our order, when the session is ours.
  order_id uuid,
  -- The product bought: the order's, or `full_report` when the line items hold its price.
  product text,
  sells_product boolean,
  amount_total bigint,
  currency text,
  -- Set only while the session is open.
  url text,
  created_at timestamptz,
  expires_at timestamptz,
  read_at timestamptz not null,
  changed_at timestamptz not null
);
create index stripe_sessions_buyer on public.stripe_sessions (user_id, product);
create index stripe_sessions_order on public.stripe_sessions (order_id);
create index stripe_sessions_payment_intent on public.stripe_sessions (payment_intent_id);

create table public.stripe_payments (
  id text primary key,
  -- requires_payment_method, requires_confirmation, requires_action, processing,
  -- requires_capture, canceled, succeeded
  status text not null,
  amount bigint,
  currency text,
  customer_id text,
  charge_id text,
  -- The charge's own fields: refunded so far (pending refunds included), and all of it.
  amount_refunded bigint not null default 0,
  refunded boolean not null default false,
  created_at timestamptz,
  read_at timestamptz not null,
  changed_at timestamptz not null
);
create index stripe_payments_charge on public.stripe_payments (charge_id);

create table public.stripe_refunds (
  id text primary key,
  payment_intent_id text not null,
  charge_id text,
  amount bigint not null,
  currency text,
  -- pending, requires_action, succeeded, failed, canceled
  status text not null,
  reason text,
  -- Made by the webhook for a duplicate payment (`metadata[refunded_by]`).
  by_webhook boolean not null default false,
  created_at timestamptz,
  read_at timestamptz not null,
  changed_at timestamptz not null
);
create index stripe_refunds_payment_intent on public.stripe_refunds (payment_intent_id);

create table public.stripe_disputes (
  id text primary key,
  payment_intent_id text not null,
  charge_id text,
  amount bigint,
  currency text,
  -- warning_needs_response, warning_under_review, warning_closed (an inquiry: nothing withdrawn),
  -- needs_response, under_review (a chargeback: the amount withdrawn), won, lost, prevented
  status text not null,
  reason text,
  created_at timestamptz,
  read_at timestamptz not null,
  changed_at timestamptz not null
);
create index stripe_disputes_payment_intent on public.stripe_disputes (payment_intent_id);

alter table public.stripe_sessions enable row level security;
alter table public.stripe_payments enable row level security;
alter table public.stripe_refunds enable row level security;
alter table public.stripe_disputes enable row level security;
revoke all on public.stripe_sessions, public.stripe_payments, public.stripe_refunds,
  public.stripe_disputes from anon, authenticated;
grant all on public.stripe_sessions, public.stripe_payments, public.stripe_refunds,
  public.stripe_disputes to service_role;

-- What the old tables knew, as facts never read from the API (read_at = epoch: any read replaces
-- them; the reconciler reads each one). Orders with a checkout URL were ours; the others were
-- verified sessions of other channels.
insert into public.stripe_sessions (id, mode, status, payment_status, payment_intent_id,
  customer_id, user_id, order_id, product, sells_product, amount_total, currency, url, created_at,
  expires_at, read_at, changed_at)
select o.stripe_checkout_session_id, 'payment',
  case when o.status in ('paid', 'refunded', 'disputed', 'processing', 'failed') then 'complete'
       when o.status = 'pending' and coalesce(o.checkout_expires_at > now(), true) then 'open'
       else 'expired' end,
  case when o.status in ('paid', 'refunded', 'disputed') then 'paid' else 'unpaid' end,
  o.stripe_payment_intent_id, o.stripe_customer_id, o.user_id,
  case when o.checkout_url is not null then o.id end, o.product,
  case when o.checkout_url is null then true end, o.amount_total, o.currency,
  case when o.status = 'pending' then o.checkout_url end, o.session_created_at,
  o.checkout_expires_at, 'epoch', 'epoch'
from public.orders o
where o.stripe_checkout_session_id is not null;

insert into public.stripe_payments (id, status, amount, currency, customer_id, charge_id,
  amount_refunded, refunded, created_at, read_at, changed_at)
select o.stripe_payment_intent_id,
  case when o.status in ('paid', 'refunded', 'disputed') then 'succeeded'
       when o.status = 'processing' then 'processing'
       else 'requires_payment_method' end,
  coalesce(p.amount, o.amount_total), coalesce(p.currency, o.currency), o.stripe_customer_id,
  p.charge_id, coalesce(p.amount_refunded, o.amount_refunded),
  coalesce(p.fully_refunded, false) or (o.status = 'refunded' and not exists (
    select 1 from public.disputes d where d.payment_intent_id = o.stripe_payment_intent_id
      and d.status = 'lost')),
  coalesce(o.paid_at, o.updated_at), 'epoch', 'epoch'
from public.orders o
left join public.payments p on p.payment_intent_id = o.stripe_payment_intent_id
where o.stripe_payment_intent_id is not null;

insert into public.stripe_refunds (id, payment_intent_id, charge_id, amount, currency, status,
  reason, by_webhook, created_at, read_at, changed_at)
select r.id, r.payment_intent_id, r.charge_id, r.amount, r.currency, r.status, r.reason,
  exists (select 1 from public.orders o where o.refund_id = r.id), r.updated_at, 'epoch', 'epoch'
from public.refunds r
where r.payment_intent_id is not null;

insert into public.stripe_disputes (id, payment_intent_id, charge_id, amount, currency, status,
  reason, created_at, read_at, changed_at)
select d.id, d.payment_intent_id, d.charge_id, d.amount, d.currency, d.status, d.reason,
  d.opened_at, 'epoch', 'epoch'
from public.disputes d
where d.payment_intent_id is not null;

drop table public.payments, public.refunds, public.disputes;

-- Orders: an order is open (one per user and product) until its session completes or expires, or
-- it is retired; which payment stands is decided from the facts, not kept on the order.
alter table public.orders drop column duplicate_of, drop column refund_id,
  drop column session_expire_pending;
update public.orders set closed_reason = case
    when status = 'expired' then coalesce(closed_reason, 'expired')
    else 'completed' end
where status <> 'pending' and closed_reason is null;
drop index public.orders_one_open_per_user_product;
create unique index orders_one_open_per_user_product
  on public.orders (user_id, product) where closed_reason is null;
alter table public.orders add constraint orders_closed_reason_check check (closed_reason in
    ('completed', 'expired', 'retired', 'superseded', 'session_expired'));

-- Subscriptions and invoices as read from Stripe: the newest read wins, not the newest event.
alter table public.subscriptions drop column last_event_created, drop column last_event_id,
  drop column last_event_rank,
  add column read_at timestamptz not null default 'epoch',
  add column changed_at timestamptz not null default 'epoch';
alter table public.subscriptions alter column read_at drop default,
  alter column changed_at drop default;
alter table public.invoices drop column last_event_created, drop column last_event_id,
  add column read_at timestamptz not null default 'epoch',
  add column changed_at timestamptz not null default 'epoch';
alter table public.invoices alter column read_at drop default,
  alter column changed_at drop default;

-- Webhook, checkout and reconciler calls the Stripe API answered with an error (a key Stripe may
-- keep that error under): the next try of an action uses the next idempotency key.
create table internal.stripe_actions (
  kind text not null check (kind in ('refund', 'expire')),
  -- The payment intent refunded, or the session expired.
  object_id text not null,
  -- The idempotency key's number: refund-duplicate-{pi}[-n], expire-{session}[-n].
  attempt integer not null default 1,
  tries integer not null default 0,
  last_error text,
  last_tried_at timestamptz,
  primary key (kind, object_id)
);
alter table internal.stripe_actions enable row level security;
grant all on internal.stripe_actions to service_role;

-- The reconciler's runs: where each one started listing undelivered events, how far it listed
-- them all (`listed_through`: every event created before it was applied), what it repaired.
create table internal.reconciler_runs (
  id bigint generated always as identity primary key,
  started_at timestamptz not null default now(),
  since timestamptz not null,
  listed_through timestamptz,
  finished_at timestamptz,
  events integer not null default 0,
  repaired integer not null default 0,
  error text
);
alter table internal.reconciler_runs enable row level security;
grant all on internal.reconciler_runs to service_role;

-- The functions, views and grants, as in supabase/schemas/ (20, 30, 40, 50 and 70).

create function billing.user_if_known(p_user text) returns uuid
language sql stable set search_path = ''
as $$
  select u.id from auth.users u
  where p_user ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
    and u.id = p_user::uuid
$$;

create function billing.unix_ts(p_value bigint) returns timestamptz
language sql immutable set search_path = ''
as $$
  select to_timestamp(p_value)
$$;

-- Serializes everything that decides whether a user owns a product: clicks, and storing the
-- facts of their payments (I2). Transaction-scoped, so it is safe behind a transaction pooler.
-- Lock order everywhere: payment locks (in id order) -> purchase locks (in (user, product) order)
-- -> customer lock -> fact rows -> order rows -> entitlement rows.
create function billing.lock_purchase(p_user uuid, p_product text) returns void
language sql set search_path = ''
as $$
  select pg_advisory_xact_lock(hashtextextended('purchase/' || p_user::text || '/' || p_product, 0))
$$;

-- Serializes storing the facts that name one payment: the payment itself, its refunds and
-- disputes, and the sessions it paid. Which purchases a payment's facts concern is read from the
-- session that names it; under this lock that link is committed, or not being written.
create function billing.lock_payment(p_payment_intent text) returns void
language sql set search_path = ''
as $$
  select pg_advisory_xact_lock(hashtextextended('payment/' || p_payment_intent, 0))
$$;

-- Serializes what reads or writes a customer's owner (I7).
create function billing.lock_customer(p_customer text) returns void
language sql set search_path = ''
as $$
  select pg_advisory_xact_lock(hashtextextended('customer/' || coalesce(p_customer, ''), 0))
$$;

-- Who a session's buyer and product are, from its metadata: ours when it names an order of ours
-- (of the same user, if it names one), else the known user of `client_reference_id`, who bought
-- the product when the line items hold it.
create function billing.session_buyer(p_session jsonb, p_sells boolean)
returns table (user_id uuid, order_id uuid, product text)
language sql stable rows 1 set search_path = ''
as $$
  select coalesce(o.user_id, billing.user_if_known(
           coalesce(p_session ->> 'metadata_user_id', p_session ->> 'client_reference_id'))),
         o.id,
         coalesce(o.product, case when p_sells then 'full_report' end)
  from (select 1) one
  left join public.orders o
    on p_session ->> 'metadata_order_id' ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
   and o.id = (p_session ->> 'metadata_order_id')::uuid
   and (p_session ->> 'metadata_user_id' is null or o.user_id::text = p_session ->> 'metadata_user_id')
$$;

-- Stores sessions read at p_read_at; returns how many changed. A read without the line-item
-- verdict keeps the one stored.
create function billing.store_sessions(p_sessions jsonb, p_read_at timestamptz) returns integer
language plpgsql set search_path = ''
as $$
declare
  v_changed integer;
begin
  with incoming as (
    select f.value as raw, f.value ->> 'id' as id,
      coalesce((f.value ->> 'sells_product')::boolean,
               (select s.sells_product from public.stripe_sessions s where s.id = f.value ->> 'id')) as sells
    from jsonb_array_elements(p_sessions) f
  ), stored as (
    insert into public.stripe_sessions as t (id, mode, status, payment_status, payment_intent_id,
      customer_id, user_id, order_id, product, sells_product, amount_total, currency, url,
      created_at, expires_at, read_at, changed_at)
    select i.id, i.raw ->> 'mode', i.raw ->> 'status', i.raw ->> 'payment_status',
      i.raw ->> 'payment_intent_id', i.raw ->> 'customer_id', b.user_id, b.order_id, b.product,
      i.sells, (i.raw ->> 'amount_total')::bigint, i.raw ->> 'currency', i.raw ->> 'url',
      billing.unix_ts((i.raw ->> 'created')::bigint), billing.unix_ts((i.raw ->> 'expires_at')::bigint),
      p_read_at, p_read_at
    from incoming i cross join lateral billing.session_buyer(i.raw, i.sells) b
    order by i.id
    on conflict (id) do update set
      mode = excluded.mode, status = excluded.status, payment_status = excluded.payment_status,
      payment_intent_id = excluded.payment_intent_id, customer_id = excluded.customer_id,
      user_id = excluded.user_id, order_id = excluded.order_id, product = excluded.product,
      sells_product = excluded.sells_product, amount_total = excluded.amount_total,
      currency = excluded.currency, url = excluded.url, created_at = excluded.created_at,
      expires_at = excluded.expires_at, read_at = excluded.read_at,
      changed_at = case when (t.status, t.payment_status, t.payment_intent_id, t.user_id,
          t.order_id, t.product, t.amount_total)
        is distinct from (excluded.status, excluded.payment_status, excluded.payment_intent_id,
          excluded.user_id, excluded.order_id, excluded.product, excluded.amount_total)
        then excluded.read_at else t.changed_at end
    where t.read_at <= excluded.read_at
    returning t.changed_at = p_read_at as changed, t.customer_id, t.user_id
  )
  select count(*) filter (where changed) into v_changed from stored;
  -- A session names its buyer's customer: every later subscription and invoice of it is theirs.
  perform billing.link_customer(s.customer_id, s.user_id)
  from public.stripe_sessions s
  where s.id in (select f.value ->> 'id' from jsonb_array_elements(p_sessions) f)
    and s.customer_id is not null and s.user_id is not null
  order by s.customer_id;
  return v_changed;
end
$$;

-- Stores payment intents (with their latest charge) read at p_read_at.
create function billing.store_payments(p_payments jsonb, p_read_at timestamptz) returns integer
language sql set search_path = ''
as $$
  with stored as (
    insert into public.stripe_payments as t (id, status, amount, currency, customer_id, charge_id,
      amount_refunded, refunded, created_at, read_at, changed_at)
    select f.id, f.status, f.amount, f.currency, f.customer_id, f.charge_id,
      coalesce(f.amount_refunded, 0), coalesce(f.refunded, false), billing.unix_ts(f.created),
      p_read_at, p_read_at
    from jsonb_to_recordset(p_payments) as f(id text, status text, amount bigint, currency text,
      customer_id text, charge_id text, amount_refunded bigint, refunded boolean, created bigint)
    order by f.id
    on conflict (id) do update set
      status = excluded.status, amount = excluded.amount, currency = excluded.currency,
      customer_id = excluded.customer_id, charge_id = excluded.charge_id,
      amount_refunded = excluded.amount_refunded, refunded = excluded.refunded,
      created_at = excluded.created_at, read_at = excluded.read_at,
      changed_at = case when (t.status, t.charge_id, t.amount_refunded, t.refunded)
        is distinct from (excluded.status, excluded.charge_id, excluded.amount_refunded, excluded.refunded)
        then excluded.read_at else t.changed_at end
    where t.read_at <= excluded.read_at
    returning t.changed_at = p_read_at as changed
  )
  select count(*) filter (where changed)::integer from stored
$$;

-- Stores refunds read at p_read_at.
create function billing.store_refunds(p_refunds jsonb, p_read_at timestamptz) returns integer
language sql set search_path = ''
as $$
  with stored as (
    insert into public.stripe_refunds as t (id, payment_intent_id, charge_id, amount, currency,
      status, reason, by_webhook, created_at, read_at, changed_at)
    select f.id, f.payment_intent_id, f.charge_id, f.amount, f.currency, f.status, f.reason,
      coalesce(f.by_webhook, false), billing.unix_ts(f.created), p_read_at, p_read_at
    from jsonb_to_recordset(p_refunds) as f(id text, payment_intent_id text, charge_id text,
      amount bigint, currency text, status text, reason text, by_webhook boolean, created bigint)
    where f.payment_intent_id is not null
    order by f.id
    on conflict (id) do update set
      payment_intent_id = excluded.payment_intent_id, charge_id = excluded.charge_id,
      amount = excluded.amount, currency = excluded.currency, status = excluded.status,
      reason = excluded.reason, by_webhook = excluded.by_webhook, created_at = excluded.created_at,
      read_at = excluded.read_at,
      changed_at = case when (t.status, t.amount) is distinct from (excluded.status, excluded.amount)
        then excluded.read_at else t.changed_at end
    where t.read_at <= excluded.read_at
    returning t.changed_at = p_read_at as changed
  )
  select count(*) filter (where changed)::integer from stored
$$;

-- Stores disputes read at p_read_at.
create function billing.store_disputes(p_disputes jsonb, p_read_at timestamptz) returns integer
language sql set search_path = ''
as $$
  with stored as (
    insert into public.stripe_disputes as t (id, payment_intent_id, charge_id, amount, currency,
      status, reason, created_at, read_at, changed_at)
    select f.id, f.payment_intent_id, f.charge_id, f.amount, f.currency, f.status, f.reason,
      billing.unix_ts(f.created), p_read_at, p_read_at
    from jsonb_to_recordset(p_disputes) as f(id text, payment_intent_id text, charge_id text,
      amount bigint, currency text, status text, reason text, created bigint)
    where f.payment_intent_id is not null
    order by f.id
    on conflict (id) do update set
      payment_intent_id = excluded.payment_intent_id, charge_id = excluded.charge_id,
      amount = excluded.amount, currency = excluded.currency, status = excluded.status,
      reason = excluded.reason, created_at = excluded.created_at, read_at = excluded.read_at,
      changed_at = case when t.status is distinct from excluded.status
        then excluded.read_at else t.changed_at end
    where t.read_at <= excluded.read_at
    returning t.changed_at = p_read_at as changed
  )
  select count(*) filter (where changed)::integer from stored
$$;

-- The subscription entitlement: active while any subscription of the user is live.
create function billing.sync_subscription_entitlement(p_user uuid) returns void
language plpgsql set search_path = ''
as $$
declare
  v_live text;
  v_any text;
begin
  if p_user is null then
    return;
  end if;
  insert into public.entitlements (user_id, product, active, source)
  values (p_user, 'subscription', false, 'none')
  on conflict (user_id, product) do nothing;
  perform 1 from public.entitlements where user_id = p_user and product = 'subscription' for update;
  select id into v_live from public.subscriptions
  where user_id = p_user and status in ('active', 'trialing', 'past_due')
  order by read_at desc, id limit 1;
  select id into v_any from public.subscriptions
  where user_id = p_user order by read_at desc, id limit 1;
  update public.entitlements
    set active = v_live is not null, source = coalesce(v_live, v_any, source), updated_at = now()
  where user_id = p_user and product = 'subscription'
    and (active is distinct from (v_live is not null)
         or source is distinct from coalesce(v_live, v_any, source));
end
$$;

-- I7: a customer's user is known from now on; subscriptions and invoices stored before get their
-- owner, and the subscription entitlement follows, in this transaction. The first mapping stands.
create function billing.link_customer(p_customer text, p_user uuid) returns uuid
language plpgsql set search_path = ''
as $$
declare
  v_user uuid;
begin
  if p_customer is null or p_user is null then
    return null;
  end if;
  perform billing.lock_customer(p_customer);
  insert into public.stripe_customers (stripe_customer_id, user_id)
  values (p_customer, p_user)
  on conflict (stripe_customer_id) do nothing;
  select user_id into v_user from public.stripe_customers where stripe_customer_id = p_customer;
  update public.subscriptions set user_id = v_user, updated_at = now()
  where stripe_customer_id = p_customer and user_id is null;
  if found then
    perform billing.sync_subscription_entitlement(v_user);
  end if;
  update public.invoices set user_id = v_user, updated_at = now()
  where user_id is null
    and (stripe_customer_id = p_customer
         or subscription_id in (select id from public.subscriptions where stripe_customer_id = p_customer));
  return v_user;
end
$$;

-- Stores subscriptions read at p_read_at, each under its customer's lock, and keeps their
-- owners' entitlements.
create function billing.store_subscriptions(p_subscriptions jsonb, p_read_at timestamptz)
returns integer
language plpgsql set search_path = ''
as $$
declare
  v_sub record;
  v_user uuid;
  v_row public.subscriptions;
  v_changed integer := 0;
begin
  for v_sub in
    select * from jsonb_to_recordset(p_subscriptions) as f(id text, customer_id text,
      metadata_user_id text, status text, price_id text, current_period_start bigint,
      current_period_end bigint, cancel_at_period_end boolean, cancel_at bigint,
      canceled_at bigint, ended_at bigint)
    order by f.customer_id, f.id
  loop
    perform billing.lock_customer(v_sub.customer_id);
    -- The app puts user_id in a subscription's metadata when it creates one: that maps the
    -- customer for this and every later object (I7).
    v_user := coalesce(
      billing.link_customer(v_sub.customer_id, billing.user_if_known(v_sub.metadata_user_id)),
      (select user_id from public.stripe_customers where stripe_customer_id = v_sub.customer_id));
    insert into public.subscriptions as s (id, user_id, stripe_customer_id, status, price_id,
      current_period_start, current_period_end, cancel_at_period_end, cancel_at, canceled_at,
      ended_at, read_at, changed_at)
    values (v_sub.id, v_user, v_sub.customer_id, v_sub.status, v_sub.price_id,
      billing.unix_ts(v_sub.current_period_start), billing.unix_ts(v_sub.current_period_end),
      coalesce(v_sub.cancel_at_period_end, false), billing.unix_ts(v_sub.cancel_at),
      billing.unix_ts(v_sub.canceled_at), billing.unix_ts(v_sub.ended_at), p_read_at, p_read_at)
    on conflict (id) do update set
      user_id = coalesce(s.user_id, excluded.user_id),
      stripe_customer_id = excluded.stripe_customer_id, status = excluded.status,
      price_id = excluded.price_id, current_period_start = excluded.current_period_start,
      current_period_end = excluded.current_period_end,
      cancel_at_period_end = excluded.cancel_at_period_end, cancel_at = excluded.cancel_at,
      canceled_at = excluded.canceled_at, ended_at = excluded.ended_at,
      updated_at = now(), read_at = excluded.read_at,
      changed_at = case when (s.status, s.price_id, s.current_period_end, s.cancel_at_period_end)
        is distinct from (excluded.status, excluded.price_id, excluded.current_period_end,
          excluded.cancel_at_period_end)
        then excluded.read_at else s.changed_at end
    where s.read_at <= excluded.read_at
    returning * into v_row;
    if v_row.changed_at = p_read_at then
      v_changed := v_changed + 1;
    end if;
    perform billing.sync_subscription_entitlement(coalesce(v_row.user_id, v_user));
  end loop;
  return v_changed;
end
$$;

-- Stores invoices read at p_read_at (under their customer's lock); a paid invoice is audited once.
create function billing.store_invoices(p_invoices jsonb, p_read_at timestamptz, p_event_id text)
returns integer
language plpgsql set search_path = ''
as $$
declare
  v_inv record;
  v_customer text;
  v_user uuid;
  v_row public.invoices;
  v_changed integer := 0;
begin
  for v_inv in
    select * from jsonb_to_recordset(p_invoices) as f(id text, customer_id text,
      subscription_id text, status text, billing_reason text, amount_due bigint,
      amount_paid bigint, currency text, attempt_count integer, hosted_invoice_url text,
      period_start bigint, period_end bigint, next_payment_attempt bigint)
    order by f.customer_id, f.id
  loop
    v_customer := coalesce(v_inv.customer_id,
      (select stripe_customer_id from public.subscriptions where id = v_inv.subscription_id));
    perform billing.lock_customer(v_customer);
    v_user := coalesce(
      (select user_id from public.stripe_customers where stripe_customer_id = v_customer),
      (select user_id from public.subscriptions where id = v_inv.subscription_id));
    insert into public.invoices as i (id, user_id, stripe_customer_id, subscription_id, status,
      billing_reason, amount_due, amount_paid, currency, attempt_count, hosted_invoice_url,
      period_start, period_end, next_payment_attempt, paid_at, read_at, changed_at)
    values (v_inv.id, v_user, v_inv.customer_id, v_inv.subscription_id, v_inv.status,
      v_inv.billing_reason, coalesce(v_inv.amount_due, 0), coalesce(v_inv.amount_paid, 0),
      v_inv.currency, coalesce(v_inv.attempt_count, 0), v_inv.hosted_invoice_url,
      billing.unix_ts(v_inv.period_start), billing.unix_ts(v_inv.period_end),
      billing.unix_ts(v_inv.next_payment_attempt),
      case when v_inv.status = 'paid' then now() end, p_read_at, p_read_at)
    on conflict (id) do update set
      user_id = coalesce(i.user_id, excluded.user_id),
      stripe_customer_id = coalesce(excluded.stripe_customer_id, i.stripe_customer_id),
      subscription_id = coalesce(excluded.subscription_id, i.subscription_id),
      status = excluded.status, billing_reason = excluded.billing_reason,
      amount_due = excluded.amount_due, amount_paid = excluded.amount_paid,
      currency = excluded.currency, attempt_count = excluded.attempt_count,
      hosted_invoice_url = excluded.hosted_invoice_url, period_start = excluded.period_start,
      period_end = excluded.period_end, next_payment_attempt = excluded.next_payment_attempt,
      paid_at = coalesce(i.paid_at, excluded.paid_at), updated_at = now(),
      read_at = excluded.read_at,
      changed_at = case when (i.status, i.amount_paid, i.attempt_count)
        is distinct from (excluded.status, excluded.amount_paid, excluded.attempt_count)
        then excluded.read_at else i.changed_at end
    where i.read_at <= excluded.read_at
    returning * into v_row;
    if v_row.changed_at = p_read_at then
      v_changed := v_changed + 1;
    end if;
    if v_row.status = 'paid' then
      insert into public.payment_audit (event_id, user_id, kind, invoice_id, amount, currency)
      values (p_event_id, v_row.user_id, 'invoice_paid', v_row.id, v_row.amount_paid, v_row.currency)
      on conflict do nothing;
    end if;
  end loop;
  return v_changed;
end
$$;

-- Decisions: pure functions of the facts in 20_facts.sql (and of the orders' own checkout state).
-- Given the same facts they give the same answer, whatever order the facts arrived in; nothing
-- here writes. billing.settle (40_sync.sql) keeps their answers on the orders and entitlements,
-- under the purchase lock; tests/it/decisions.rs checks them against a reference model over
-- generated facts.
-- A payment's money, from its payment intent, latest charge and disputes:
--   held       the merchant has it: succeeded, not refunded in full, no chargeback open or lost
--   refunded   all of it went back (the charge's `refunded`), or a chargeback took it (lost)
--   disputed   a chargeback holds it while the dispute is open (Stripe withdrew the amount;
--              an inquiry, `warning_*`, withdraws nothing)
--   in_flight  paid by a delayed method that has not settled
--   unpaid     failed or canceled
create function billing.money(p public.stripe_payments) returns text
language sql stable set search_path = ''
as $$
  select case
    when p.status = 'succeeded' then case
      when p.refunded or exists (select 1 from public.stripe_disputes d
                                 where d.payment_intent_id = p.id and d.status = 'lost')
        then 'refunded'
      when exists (select 1 from public.stripe_disputes d
                   where d.payment_intent_id = p.id and d.status in ('needs_response', 'under_review'))
        then 'disputed'
      else 'held' end
    when p.status in ('canceled', 'requires_payment_method') then 'unpaid'
    else 'in_flight'
  end
$$;

-- Every purchase of a product: a completed payment-mode session of ours, or one of another channel
-- whose line items hold the product, with its buyer and its money. A session whose payment has not
-- been read counts by its own payment status, made at an unknown time (last): it never outranks a
-- payment that was read, and is never due for a refund.
create view billing.purchases as
select s.user_id, s.product, s.id as session_id, coalesce(s.order_id, o.id) as order_id,
  s.payment_intent_id, p.id is not null as payment_read,
  case when p.id is not null then billing.money(p)
       when s.payment_status in ('paid', 'no_payment_required') then 'held'
       else 'in_flight' end as money,
  case when s.payment_intent_id is null then s.created_at
       else coalesce(p.created_at, 'infinity') end as made_at
from public.stripe_sessions s
left join public.stripe_payments p on p.id = s.payment_intent_id
left join public.orders o on o.stripe_checkout_session_id = s.id
where s.status = 'complete' and s.mode = 'payment' and s.user_id is not null
  and s.product is not null;

-- Which purchase stands, and which are due for a refund: of a user's held purchases of a product
-- the earliest made stands (ties by session id, byte order); every other held one is a duplicate, due for a
-- refund once its payment was read, unless a refund of it is waiting for the customer
-- (requires_action).
create view billing.decisions as
select r.user_id, r.product, r.session_id, r.order_id, r.payment_intent_id, r.money, r.made_at,
  r.money = 'held' and r.held_rank = 1 as stands,
  r.money = 'held' and r.held_rank > 1 as duplicate,
  r.money = 'held' and r.held_rank > 1 and r.payment_read
    and not exists (select 1 from public.stripe_refunds f
                    where f.payment_intent_id = r.payment_intent_id
                      and f.status = 'requires_action') as refund_due
from (
  select pu.*, row_number() over (partition by pu.user_id, pu.product
    order by pu.money = 'held' desc, pu.made_at, pu.session_id collate "C") as held_rank
  from billing.purchases pu
) r;

-- What a user has of a product: owns it (a purchase stands), has a payment in flight (or a paid
-- session of another channel being read now), has one under a chargeback; and the orders behind.
create function billing.ownership(p_user uuid, p_product text)
returns table (owns boolean, in_flight boolean, disputed boolean, standing_order uuid,
               flight_order uuid, disputed_order uuid)
language sql stable rows 1 set search_path = ''
as $$
  select coalesce(bool_or(d.money = 'held'), false),
    coalesce(bool_or(d.money = 'in_flight'), false)
      or exists (select 1 from internal.verifications v
                 where v.user_id = p_user and v.product = p_product and v.until > now()),
    coalesce(bool_or(d.money = 'disputed'), false),
    (array_agg(d.order_id) filter (where d.stands))[1],
    (array_agg(d.order_id order by d.made_at) filter (where d.money = 'in_flight'))[1],
    (array_agg(d.order_id order by d.made_at) filter (where d.money = 'disputed'))[1]
  from billing.decisions d
  where d.user_id = p_user and d.product = p_product
$$;

-- Sessions of ours that Stripe (as last read) still lets someone pay and nobody should: the user
-- owns the product or has a payment in flight, or the session is not its open order's. (A session
-- of an open order that has none attached is that order's: billing.settle attaches it.)
create function billing.expiries_due(p_user uuid, p_product text) returns setof text
language sql stable rows 2 set search_path = ''
as $$
  select s.id from public.stripe_sessions s
  join public.orders o on o.id = s.order_id
  cross join billing.ownership(p_user, p_product) w
  where o.user_id = p_user and o.product = p_product and s.status = 'open'
    and (w.owns or w.in_flight or o.closed_reason is not null
         or o.stripe_checkout_session_id <> s.id)
  order by s.id
$$;

-- An order's state from its session and that session's payment: paid, processing, refunded,
-- disputed or failed by its payment's money; else expired (its session expired, or the order
-- closed without a payment) or pending.
create function billing.order_decision(p_order public.orders)
returns table (status text, closed_reason text, payment_intent_id text, amount_total bigint,
               currency text, amount_refunded bigint, customer_id text)
language sql stable rows 1 set search_path = ''
as $$
  select
    case d.money when 'held' then 'paid' when 'in_flight' then 'processing'
      when 'refunded' then 'refunded' when 'disputed' then 'disputed' when 'unpaid' then 'failed'
      else case when s.status = 'expired' or p_order.closed_reason is not null then 'expired'
                else 'pending' end
    end,
    case when p_order.closed_reason is not null then p_order.closed_reason
         when s.status = 'complete' then 'completed'
         when s.status = 'expired' then 'expired' end,
    s.payment_intent_id, coalesce(p.amount, s.amount_total, p_order.amount_total),
    coalesce(p.currency, s.currency, p_order.currency), coalesce(p.amount_refunded, 0),
    coalesce(s.customer_id, p.customer_id)
  from (select 1) one
  left join public.stripe_sessions s on s.id = p_order.stripe_checkout_session_id
  left join billing.purchases d on d.session_id = s.id
  left join public.stripe_payments p on p.id = s.payment_intent_id
$$;

-- The functions that read these run as their caller, the service role; nobody else reads them.
revoke all on billing.purchases, billing.decisions from public, anon, authenticated;

grant select on billing.purchases, billing.decisions to service_role;

-- Applying what Stripe says: the one entry point for facts (public.record_stripe_facts), the
-- settlement of a user's purchase from them (billing.settle), and the reconciler's bookkeeping.
-- The webhook, checkout and the reconciler read the objects from Stripe first, then call
-- record_stripe_facts once; it answers what is due at Stripe now (refunds, expiries), which the
-- caller does and reports with its next call.
--
-- The entry points run with `jit = off`: they touch one user's rows, and the planner's estimates
-- for the SQL functions they call (opaque to it) made PostgreSQL JIT-compile a 2 ms statement for
-- 590 ms (measured with auto_explain).
-- The audit kind of an order's move from one state to another (null: nothing to record).
create function billing.audit_kind(p_old text, p_new text) returns text
language sql immutable set search_path = ''
as $$
  select case
    when p_old = p_new then null
    when p_new = 'paid' and p_old = 'refunded' then 'refund_reversed'
    when p_new = 'paid' and p_old = 'disputed' then 'dispute_won'
    when p_new = 'refunded' and p_old = 'disputed' then 'dispute_lost'
    when p_new = 'refunded' then 'order_refunded'
    when p_new = 'disputed' then 'dispute_opened'
    when p_new = 'processing' then 'order_processing'
    when p_new = 'failed' then 'order_payment_failed'
    when p_new = 'expired' and p_old in ('pending', 'processing') then 'order_expired'
  end
$$;

-- Settles a user's purchase of a product from the facts, under its purchase lock (the caller's):
-- every order's state, the entitlement, the audit of what changed. Answers what is due at Stripe.
create function billing.settle(p_user uuid, p_product text, p_event_id text) returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_row record;
  v_order public.orders;
  v_kind text;
  v_first_paid boolean;
  v_delays jsonb := '[]'::jsonb;
  v_duplicates integer;
  v_own record;
begin
  -- A purchase through another channel gets an order of its own: the audit, the entitlement and
  -- the status page name it.
  insert into public.orders (user_id, product, stripe_checkout_session_id, closed_reason,
                             session_created_at)
  select s.user_id, s.product, s.id, 'completed', s.created_at
  from public.stripe_sessions s
  where s.user_id = p_user and s.product = p_product and s.order_id is null
    and s.status = 'complete' and s.mode = 'payment'
    and not exists (select 1 from public.orders o where o.stripe_checkout_session_id = s.id)
  order by s.id
  on conflict do nothing;

  -- A session of ours that an instance made and died before attaching belongs to its order (the
  -- order's idempotency key gives no other).
  update public.orders o set stripe_checkout_session_id = s.id, checkout_url = s.url,
    checkout_expires_at = s.expires_at, session_created_at = s.created_at,
    session_claimed_until = null, updated_at = now()
  from public.stripe_sessions s
  where s.order_id = o.id and o.user_id = p_user and o.product = p_product
    and o.closed_reason is null and o.stripe_checkout_session_id is null;

  for v_row in
    select o.id, o.status as old_status, o.closed_reason as old_closed,
      o.stripe_payment_intent_id as old_pi, o.amount_total as old_total,
      o.amount_refunded as old_refunded, o.paid_at, n.*
    from public.orders o cross join lateral billing.order_decision(o) n
    where o.user_id = p_user and o.product = p_product
    order by o.id
  loop
    v_first_paid := v_row.paid_at is null and v_row.status in ('paid', 'refunded', 'disputed');
    if not v_first_paid
       and (v_row.old_status, v_row.old_closed, v_row.old_pi, v_row.old_total, v_row.old_refunded)
           is not distinct from (v_row.status, v_row.closed_reason,
             coalesce(v_row.payment_intent_id, v_row.old_pi), v_row.amount_total, v_row.amount_refunded)
    then
      continue;
    end if;
    update public.orders set status = v_row.status, closed_reason = v_row.closed_reason,
      stripe_payment_intent_id = coalesce(v_row.payment_intent_id, stripe_payment_intent_id),
      amount_total = v_row.amount_total, currency = v_row.currency,
      amount_refunded = v_row.amount_refunded,
      stripe_customer_id = coalesce(v_row.customer_id, stripe_customer_id),
      paid_at = case when v_first_paid then clock_timestamp() else paid_at end,
      session_claimed_until = case when v_row.closed_reason is null then session_claimed_until end,
      updated_at = now()
    where id = v_row.id
    returning * into v_order;
    if v_first_paid then
      insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
      values (p_event_id, p_user, 'order_paid', v_order.id, v_order.amount_total, v_order.currency,
              v_order.stripe_payment_intent_id)
      on conflict do nothing;
      if v_order.session_created_at is not null then
        v_delays := v_delays || to_jsonb((extract(epoch from (v_order.paid_at
          - v_order.session_created_at)) * 1000)::bigint);
      end if;
    end if;
    v_kind := case
      when v_first_paid and v_row.status = 'paid' then null
      when v_first_paid and v_row.status = 'refunded' then 'order_refunded'
      when v_first_paid and v_row.status = 'disputed' then 'dispute_opened'
      when v_row.old_status = v_row.status and v_row.status = 'paid'
           and v_row.old_refunded <> v_row.amount_refunded then 'order_partially_refunded'
      else billing.audit_kind(v_row.old_status, v_row.status) end;
    if v_kind is not null then
      insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
      values (p_event_id, p_user, v_kind, v_order.id,
              case when v_kind like '%refund%' then v_order.amount_refunded else v_order.amount_total end,
              v_order.currency, v_order.stripe_payment_intent_id);
    end if;
  end loop;

  -- The entitlement follows the purchase that stands (row locked before it is read and written).
  select * into v_own from billing.ownership(p_user, p_product);
  insert into public.entitlements (user_id, product, active, source)
  values (p_user, p_product, false, 'none')
  on conflict (user_id, product) do nothing;
  perform 1 from public.entitlements where user_id = p_user and product = p_product for update;
  update public.entitlements
    set active = v_own.owns, source = coalesce(v_own.standing_order::text, source), updated_at = now()
  where user_id = p_user and product = p_product
    and (active is distinct from v_own.owns
         or (v_own.owns and source is distinct from v_own.standing_order::text));

  -- Second payments for a product the user owns, and the refunds of them that moved money back.
  insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
  select p_event_id, p_user, 'duplicate_payment', o.id, o.amount_total, o.currency,
         d.payment_intent_id
  from billing.decisions d join public.orders o on o.id = d.order_id
  where d.user_id = p_user and d.product = p_product and d.duplicate
  on conflict do nothing;
  get diagnostics v_duplicates = row_count;
  insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
  select p_event_id, p_user, 'duplicate_refunded', o.id, r.amount, r.currency, r.id
  from public.stripe_refunds r join public.orders o on o.stripe_payment_intent_id = r.payment_intent_id
  where o.user_id = p_user and o.product = p_product and r.by_webhook
    and r.status in ('succeeded', 'pending')
  order by r.id
  on conflict do nothing;

  return jsonb_build_object('owns', v_own.owns, 'sync_delays_ms', v_delays,
    'duplicates', v_duplicates,
    'refunds', (select coalesce(jsonb_agg(jsonb_build_object('order_id', d.order_id,
          'payment_intent_id', d.payment_intent_id, 'attempt', coalesce(a.attempt, 1),
          -- The payment that stands: read again before the refund, since it may have been
          -- given back since its last read.
          'standing', (select s.payment_intent_id from billing.decisions s
                       where s.user_id = p_user and s.product = p_product and s.stands))
          order by d.made_at, d.session_id), '[]')
        from billing.decisions d
        left join internal.stripe_actions a on a.kind = 'refund' and a.object_id = d.payment_intent_id
        where d.user_id = p_user and d.product = p_product and d.refund_due),
    'expiries', billing.expiries_json(p_user, p_product));
end
$$;

-- The sessions due for expiry, with the idempotency key's number to use for each.
create function billing.expiries_json(p_user uuid, p_product text) returns jsonb
language sql stable set search_path = ''
as $$
  select coalesce(jsonb_agg(jsonb_build_object('session_id', e.id,
           'attempt', coalesce(a.attempt, 1)) order by e.id), '[]')
  from billing.expiries_due(p_user, p_product) e(id)
  left join internal.stripe_actions a on a.kind = 'expire' and a.object_id = e.id
$$;

-- The (user, product) purchases the facts concern, as they will be stored: the sessions' buyers
-- and the buyers of the sessions that name the payments.
create function billing.purchases_touched(p_facts jsonb)
returns table (user_id uuid, product text)
language sql stable rows 2 set search_path = ''
as $$
  with sessions as (
    select b.user_id, b.product
    from jsonb_array_elements(coalesce(p_facts -> 'sessions', '[]')) f
    cross join lateral billing.session_buyer(f.value, coalesce((f.value ->> 'sells_product')::boolean,
      (select s.sells_product from public.stripe_sessions s where s.id = f.value ->> 'id'))) b
  ), intents as (
    select f.value ->> 'id' as pi from jsonb_array_elements(coalesce(p_facts -> 'payments', '[]')) f
    union select f.value ->> 'payment_intent_id' from jsonb_array_elements(coalesce(p_facts -> 'refunds', '[]')) f
    union select f.value ->> 'payment_intent_id' from jsonb_array_elements(coalesce(p_facts -> 'disputes', '[]')) f
  )
  select distinct t.user_id, t.product from (
    select user_id, product from sessions
    union all
    select s.user_id, s.product from public.stripe_sessions s join intents i on i.pi = s.payment_intent_id
  ) t
  where t.user_id is not null and t.product is not null
  order by 1, 2
$$;

-- Stores what Stripe's API answered, in one transaction:
--   p_event    the webhook's event ({id, type, created, livemode, api_version, received_at_ms}),
--              claimed in the ledger (a redelivery is a `duplicate`; its reads are stored all
--              the same: they are newer); null for checkout's and the reconciler's reads;
--   p_payload  the event as received (the audit trail);
--   p_facts    {read_at_ms, sessions, payments, refunds, disputes, subscriptions, invoices}: the
--              objects read at read_at_ms, and `missing` when Stripe did not know the object;
--              null for an event of a type the app does not act on (recorded `ignored`);
--   p_actions  [{kind, object_id, attempt, error}]: calls to Stripe that failed since the last
--              call: their idempotency keys are spent.
-- Takes the purchase lock of every (user, product) the facts concern, stores each object unless a
-- newer read of it is there, settles those purchases, and answers what is due at Stripe now.
create function public.record_stripe_facts(p_event jsonb, p_payload jsonb, p_facts jsonb,
                                           p_actions jsonb)
returns jsonb
language plpgsql set search_path = '' set jit = off
as $$
declare
  v_event text := p_event ->> 'id';
  v_read timestamptz := to_timestamp(coalesce((p_facts ->> 'read_at_ms')::double precision,
                                              extract(epoch from clock_timestamp()) * 1000) / 1000);
  v_duplicate boolean := false;
  v_pair record;
  v_pi text;
  v_action record;
  v_touched jsonb;
  v_settled jsonb;
  v_changed integer := 0;
  v_refunds jsonb := '[]'::jsonb;
  v_expiries jsonb := '[]'::jsonb;
  v_delays jsonb := '[]'::jsonb;
  v_duplicates integer := 0;
  v_pairs integer := 0;
  v_other integer := 0;
  v_unverified boolean := false;
  v_outcome text;
  v_detail text;
begin
  if v_event is not null then
    insert into public.stripe_events (id, type, api_version, created, livemode, payload, outcome,
                                      received_at)
    values (v_event, p_event ->> 'type', p_event ->> 'api_version',
            billing.unix_ts((p_event ->> 'created')::bigint),
            coalesce((p_event ->> 'livemode')::boolean, false), coalesce(p_payload, '{}'), 'applied',
            coalesce(to_timestamp((p_event ->> 'received_at_ms')::double precision / 1000), now()))
    on conflict (id) do nothing;
    v_duplicate := not found;
  end if;

  -- The payments these facts name, locked (in id order) before the purchases are computed: a
  -- session naming one of them that another transaction is storing is committed by then, so its
  -- purchase is among them.
  for v_pi in
    select distinct x.pi from (
      select f.value ->> 'id' as pi from jsonb_array_elements(coalesce(p_facts -> 'payments', '[]')) f
      union all select f.value ->> 'payment_intent_id' from jsonb_array_elements(coalesce(p_facts -> 'sessions', '[]')) f
      union all select f.value ->> 'payment_intent_id' from jsonb_array_elements(coalesce(p_facts -> 'refunds', '[]')) f
      union all select f.value ->> 'payment_intent_id' from jsonb_array_elements(coalesce(p_facts -> 'disputes', '[]')) f
    ) x where x.pi is not null order by 1
  loop
    perform billing.lock_payment(v_pi);
  end loop;
  -- The purchases these facts concern, locked (in one order) before anything is written, as
  -- checkout locks one before it reads.
  select coalesce(jsonb_agg(to_jsonb(t)), '[]') into v_touched from billing.purchases_touched(p_facts) t;
  for v_pair in select * from jsonb_to_recordset(v_touched) as t(user_id uuid, product text) loop
    perform billing.lock_purchase(v_pair.user_id, v_pair.product);
  end loop;

  v_changed := billing.store_sessions(coalesce(p_facts -> 'sessions', '[]'), v_read)
    + billing.store_payments(coalesce(p_facts -> 'payments', '[]'), v_read)
    + billing.store_refunds(coalesce(p_facts -> 'refunds', '[]'), v_read)
    + billing.store_disputes(coalesce(p_facts -> 'disputes', '[]'), v_read);
  v_other := billing.store_subscriptions(coalesce(p_facts -> 'subscriptions', '[]'), v_read)
    + billing.store_invoices(coalesce(p_facts -> 'invoices', '[]'), v_read,
                             case when not v_duplicate then v_event end);
  v_changed := v_changed + v_other;
  delete from internal.verifications
  where session_id in (select f.value ->> 'id'
                       from jsonb_array_elements(coalesce(p_facts -> 'sessions', '[]')) f);

  -- A paid session of another channel whose line items do not hold the product, for a user we
  -- know: audited once, nothing granted (I5).
  insert into public.payment_audit (event_id, user_id, kind, amount, currency, reference)
  select case when not v_duplicate then v_event end, billing.user_if_known(f.value ->> 'client_reference_id'),
    'session_unverified', (f.value ->> 'amount_total')::bigint, f.value ->> 'currency', s.id
  from jsonb_array_elements(coalesce(p_facts -> 'sessions', '[]')) f
  join public.stripe_sessions s on s.id = f.value ->> 'id'
  where s.order_id is null and s.mode = 'payment' and s.status = 'complete'
    and s.sells_product is false
    and not exists (select 1 from public.payment_audit a
                    where a.kind = 'session_unverified' and a.reference = s.id);
  v_unverified := found;

  for v_action in select * from jsonb_to_recordset(coalesce(p_actions, '[]'))
      as a(kind text, object_id text, attempt integer, error text) loop
    insert into internal.stripe_actions as s (kind, object_id, attempt, tries, last_error, last_tried_at)
    values (v_action.kind, v_action.object_id,
            case when v_action.error is null then v_action.attempt else v_action.attempt + 1 end,
            1, v_action.error, now())
    on conflict (kind, object_id) do update set
      attempt = greatest(s.attempt, excluded.attempt), tries = s.tries + 1,
      last_error = excluded.last_error, last_tried_at = excluded.last_tried_at;
  end loop;

  for v_pair in select * from jsonb_to_recordset(v_touched) as t(user_id uuid, product text) loop
    v_pairs := v_pairs + 1;
    v_settled := billing.settle(v_pair.user_id, v_pair.product,
                                case when not v_duplicate then v_event end);
    v_refunds := v_refunds || (v_settled -> 'refunds');
    v_expiries := v_expiries || (v_settled -> 'expiries');
    v_delays := v_delays || (v_settled -> 'sync_delays_ms');
    v_duplicates := v_duplicates + (v_settled ->> 'duplicates')::integer;
  end loop;

  if p_event ->> 'type' = 'invoice.payment_failed' and not v_duplicate then
    insert into public.payment_audit (event_id, user_id, kind, invoice_id, amount, currency)
    select v_event, i.user_id, 'invoice_payment_failed', i.id, i.amount_due, i.currency
    from public.invoices i
    where i.id in (select f.value ->> 'id' from jsonb_array_elements(coalesce(p_facts -> 'invoices', '[]')) f);
  end if;

  -- Applied: the facts concern a purchase or a subscription of a user we know, or a payment
  -- whose purchase is not known yet (Stripe does not order events). Unmatched: Stripe does not
  -- know the object, or only sessions that concern nobody we know (or sell something else).
  v_outcome := case
    when v_duplicate then 'duplicate'
    when p_facts is null then 'ignored'
    when p_facts ->> 'missing' is not null then 'unmatched'
    when v_pairs > 0
      or jsonb_array_length(coalesce(p_facts -> 'subscriptions', '[]'))
         + jsonb_array_length(coalesce(p_facts -> 'invoices', '[]')) > 0
      or exists (select 1 from public.stripe_sessions s
                 where s.user_id is not null and s.mode is distinct from 'payment'
                   and s.id in (select f.value ->> 'id'
                                from jsonb_array_elements(coalesce(p_facts -> 'sessions', '[]')) f))
      then 'applied'
    when jsonb_array_length(coalesce(p_facts -> 'sessions', '[]')) = 0
         and jsonb_array_length(coalesce(p_facts -> 'payments', '[]')) > 0 then 'applied'
    else 'unmatched' end;
  v_detail := case when v_outcome = 'ignored' then 'event type not handled'
                   when p_facts ->> 'missing' is not null then left(p_facts ->> 'missing', 500)
                   when v_outcome = 'unmatched' then 'the objects concern no purchase of a user we know'
                   else v_changed || ' changed, ' || v_pairs || ' purchase(s) settled' end;
  if v_event is not null and not v_duplicate then
    update public.stripe_events set outcome = v_outcome, detail = v_detail, processed_at = now()
    where id = v_event;
  end if;
  return jsonb_build_object('outcome', v_outcome, 'detail', v_detail, 'changed', v_changed,
    'refunds', v_refunds, 'expiries', v_expiries, 'sync_delays_ms', v_delays,
    'duplicates', v_duplicates, 'unverified', v_unverified);
end
$$;

-- The first look at a paid session of another channel: while the webhook reads its line items at
-- Stripe, its buyer's clicks see a payment in flight (I2). Answers the verdict already stored,
-- if any (then the line items need not be read again).
create function public.stripe_sync_begin(p_session_id text, p_user text) returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_user uuid := billing.user_if_known(p_user);
begin
  if v_user is not null then
    insert into internal.verifications (session_id, user_id, product, until)
    values (p_session_id, v_user, 'full_report', now() + interval '30 seconds')
    on conflict (session_id) do update set until = excluded.until;
  end if;
  return jsonb_build_object('sells_product',
    (select s.sells_product from public.stripe_sessions s where s.id = p_session_id));
end
$$;

-- Starts a reconciler run: where to list undelivered events from (p_since, else 10 minutes before
-- the furthest any run listed through, 3 days back for the first run, never past Stripe's 30
-- days), and what to read again, at most p_limit of each, the most pressing and then the least
-- recently read first (so that runs move through more than p_limit): sessions of ours Stripe may
-- still let someone pay, or never read; payments due for a refund, never read, in flight, or
-- with a refund waiting for the customer. `sessions_due` and `payments_due` count them all.
create function public.reconcile_begin(p_since_s bigint, p_limit integer) returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_since timestamptz := greatest(coalesce(billing.unix_ts(p_since_s),
    (select max(listed_through) - interval '10 minutes' from internal.reconciler_runs),
    now() - interval '3 days'), now() - interval '30 days');
  v_run bigint;
begin
  insert into internal.reconciler_runs (since) values (v_since) returning id into v_run;
  return (
    with sessions as (
      select s.id, s.read_at from public.stripe_sessions s
      where s.order_id is not null and s.status = 'open'
      union
      select o.stripe_checkout_session_id, null from public.orders o
      where o.stripe_checkout_session_id is not null
        and not exists (select 1 from public.stripe_sessions s where s.id = o.stripe_checkout_session_id)
        and o.status in ('pending', 'processing')
    ), payments as (
      select x.pi, min(x.rank) as rank, min(p.read_at) as read_at
      from (
        select d.payment_intent_id as pi, case when d.refund_due then 0 else 2 end as rank
        from billing.decisions d
        where d.payment_intent_id is not null and (d.money = 'in_flight' or d.refund_due)
        union all
        select s.payment_intent_id, 1 from public.stripe_sessions s
        where s.status = 'complete' and s.payment_intent_id is not null
          and not exists (select 1 from public.stripe_payments p where p.id = s.payment_intent_id)
        union all
        select p.id, 1 from public.stripe_payments p where p.read_at = 'epoch'
        union all
        select r.payment_intent_id, 2 from public.stripe_refunds r where r.status = 'requires_action'
      ) x
      left join public.stripe_payments p on p.id = x.pi
      group by x.pi
    )
    select jsonb_build_object('run', v_run, 'since', floor(extract(epoch from v_since))::bigint,
      'sessions', (select coalesce(jsonb_agg(t.id), '[]') from (
          select id from sessions order by read_at nulls first, id limit p_limit) t),
      'sessions_due', (select count(*) from sessions),
      'payments', (select coalesce(jsonb_agg(t.pi), '[]') from (
          select pi from payments order by rank, read_at nulls first, pi limit p_limit) t),
      'payments_due', (select count(*) from payments)));
end
$$;

-- Of the events a reconciler run listed (a JSON array of ids), those not in the ledger: an event
-- applied before (by the webhook or a run cut short) is not read at Stripe again.
create function public.stripe_events_unknown(p_ids jsonb) returns jsonb
language sql stable set search_path = ''
as $$
  select coalesce(jsonb_agg(x.id order by x.n), '[]')
  from jsonb_array_elements_text(p_ids) with ordinality as x(id, n)
  where not exists (select 1 from public.stripe_events e where e.id = x.id)
$$;

-- Ends a reconciler run: what it did, and how far it listed every undelivered event (Unix
-- seconds; null when it listed nothing through to the end of a slice).
create function public.reconcile_finish(p_run bigint, p_events integer, p_repaired integer,
                                        p_error text, p_listed_through_s bigint)
returns jsonb
language sql set search_path = ''
as $$
  update internal.reconciler_runs set finished_at = now(), events = p_events,
    repaired = p_repaired, error = p_error, listed_through = billing.unix_ts(p_listed_through_s)
  where id = p_run
  returning jsonb_build_object('run', id, 'finished', true)
$$;

revoke all on all functions in schema billing from public, anon, authenticated;

grant execute on all functions in schema billing to service_role;

revoke all on function
  public.record_stripe_facts(jsonb, jsonb, jsonb, jsonb),
  public.stripe_sync_begin(text, text),
  public.reconcile_begin(bigint, integer),
  public.stripe_events_unknown(jsonb),
  public.reconcile_finish(bigint, integer, integer, text, bigint)
from public, anon, authenticated;

grant execute on function
  public.record_stripe_facts(jsonb, jsonb, jsonb, jsonb),
  public.stripe_sync_begin(text, text),
  public.reconcile_begin(bigint, integer),
  public.stripe_events_unknown(jsonb),
  public.reconcile_finish(bigint, integer, integer, text, bigint)
to service_role;

-- Checkout: start or resume the one-time purchase with at most one payable session per user and
-- product (I1), never for a user who owns it or has a payment in flight (I2), with create
-- parameters that derive from the order only (I9). Each function is one transaction and one round
-- trip; service role only.
-- The order as the checkout function reads it, with its create parameters.
create function billing.order_json(p_order public.orders) returns jsonb
language sql stable set search_path = ''
as $$
  select case when p_order.id is not null then jsonb_build_object(
    'order_id', p_order.id,
    'status', p_order.status,
    'session_id', p_order.stripe_checkout_session_id,
    'url', p_order.checkout_url,
    -- Whole seconds, rounded down: an expires_at rounded up could lie more than Stripe's 24 h
    -- after the session's creation.
    'expires_at', floor(extract(epoch from p_order.checkout_expires_at))::bigint,
    'created_at', floor(extract(epoch from p_order.created_at))::bigint,
    'paid_at', floor(extract(epoch from p_order.paid_at))::bigint,
    'customer_email', p_order.customer_email,
    'amount_refunded', p_order.amount_refunded) end
$$;

create function billing.order_json(p_order uuid) returns jsonb
language sql stable set search_path = ''
as $$
  select billing.order_json(o) from public.orders o where o.id = p_order
$$;

-- Start or resume checkout. Answers one of these states:
--   rate_limited {retry_after}   unknown_user
--   already_paid {order}         the user owns the product
--   processing {order?}          a payment of theirs is in flight (or being read at Stripe)
--   disputed {order}             their payment is under a chargeback
--   expire_first {sessions}      sessions of ours still payable that nobody should pay: expire
--                                them, store what Stripe answers, ask again
--   open_session {order}         the open order has a session: ask Stripe whether it is open
--   create_session {order}       this caller holds the lease: create the session
--   in_progress {order, retry_ms} another caller holds the lease: wait, ask again
-- The lease names its holder (p_claim): the same claim resumes it. p_limit null skips the rate
-- limit (a caller asking again while waiting).
create function public.checkout_begin(
  p_user uuid, p_product text, p_email text, p_claim uuid, p_limit integer, p_window_s integer,
  p_lease_s integer, p_session_ttl_s integer)
returns jsonb
language plpgsql set search_path = '' set jit = off
as $$
declare
  v_retry integer;
  v_own record;
  v_expire jsonb;
  v_order public.orders;
begin
  v_retry := internal.rate_limit_hit(p_user, 'checkout', p_limit, p_window_s);
  if v_retry > 0 then
    return jsonb_build_object('state', 'rate_limited', 'retry_after', v_retry);
  end if;
  if not exists (select 1 from auth.users where id = p_user) then
    return jsonb_build_object('state', 'unknown_user');
  end if;

  -- A payment being stored holds this lock: its facts are visible once we have it (I2).
  perform billing.lock_purchase(p_user, p_product);
  select * into v_own from billing.ownership(p_user, p_product);
  if v_own.owns then
    return jsonb_build_object('state', 'already_paid', 'order', billing.order_json(v_own.standing_order));
  elsif v_own.in_flight then
    return jsonb_build_object('state', 'processing', 'order', billing.order_json(v_own.flight_order));
  elsif v_own.disputed then
    return jsonb_build_object('state', 'disputed', 'order', billing.order_json(v_own.disputed_order));
  end if;
  v_expire := billing.expiries_json(p_user, p_product);
  if jsonb_array_length(v_expire) > 0 then
    return jsonb_build_object('state', 'expire_first', 'sessions', v_expire);
  end if;

  select * into v_order from public.orders
  where user_id = p_user and product = p_product and closed_reason is null
  for update;
  if v_order.id is null then
    insert into public.orders (user_id, product, customer_email, checkout_expires_at)
    values (p_user, p_product, p_email,
            -- a minute inside Stripe's 24 hours, whatever the clocks say
            now() + make_interval(secs => least(p_session_ttl_s, 86340)))
    returning * into v_order;
  end if;
  if v_order.stripe_checkout_session_id is not null then
    return jsonb_build_object('state', 'open_session', 'order', billing.order_json(v_order));
  end if;
  if v_order.session_claimed_until is null or v_order.session_claimed_until < now()
     or v_order.session_claimed_by = p_claim then
    update public.orders set session_claimed_until = now() + make_interval(secs => p_lease_s),
      session_claimed_by = p_claim
    where id = v_order.id
    returning * into v_order;
    return jsonb_build_object('state', 'create_session', 'order', billing.order_json(v_order));
  end if;
  return jsonb_build_object('state', 'in_progress', 'order', billing.order_json(v_order),
    'retry_ms', greatest(50, least(1000,
      (extract(epoch from (v_order.session_claimed_until - now())) * 1000)::integer)));
end
$$;

-- The lease holder created the order's session (p_session: the session as Stripe answered the
-- create, the session's facts as of its creation). It is the order's session whatever happened
-- meanwhile (the order's idempotency key gives no other), so it is stored and attached; it is
-- payable, and handed out, only if Stripe still lets it be paid (as last read) and the user owns
-- nothing and has no payment in flight. Answers {attached (payable), order, expiries}.
create function public.checkout_attach_session(p_order uuid, p_session jsonb)
returns jsonb
language plpgsql set search_path = '' set jit = off
as $$
declare
  v_order public.orders;
  v_own record;
  v_settled jsonb;
begin
  select * into v_order from public.orders where id = p_order;
  if v_order.id is null then
    return jsonb_build_object('attached', false, 'order', null, 'expiries', '[]'::jsonb);
  end if;
  -- Lock order: the payment a replayed create's session names, then the purchase.
  if p_session ->> 'payment_intent_id' is not null then
    perform billing.lock_payment(p_session ->> 'payment_intent_id');
  end if;
  perform billing.lock_purchase(v_order.user_id, v_order.product);
  perform billing.store_sessions(jsonb_build_array(p_session),
    billing.unix_ts((p_session ->> 'created')::bigint));
  update public.orders set stripe_checkout_session_id = p_session ->> 'id',
    checkout_url = p_session ->> 'url',
    checkout_expires_at = coalesce(billing.unix_ts((p_session ->> 'expires_at')::bigint), checkout_expires_at),
    session_created_at = coalesce(billing.unix_ts((p_session ->> 'created')::bigint), now()),
    session_claimed_until = null, updated_at = now()
  where id = p_order and closed_reason is null
    and (stripe_checkout_session_id is null or stripe_checkout_session_id = p_session ->> 'id');
  v_settled := billing.settle(v_order.user_id, v_order.product, null);
  select * into v_own from billing.ownership(v_order.user_id, v_order.product);
  select * into v_order from public.orders where id = p_order;
  return jsonb_build_object('order', billing.order_json(v_order),
    'attached', v_order.stripe_checkout_session_id = p_session ->> 'id'
      and v_order.closed_reason is null and not v_own.owns and not v_own.in_flight
      and exists (select 1 from public.stripe_sessions s
                  where s.id = p_session ->> 'id' and s.status = 'open'),
    'expiries', v_settled -> 'expiries');
end
$$;

-- Gives the lease back after a failed Stripe call, so the next click retries at once.
create function public.checkout_release_lease(p_order uuid)
returns jsonb
language sql set search_path = ''
as $$
  update public.orders set session_claimed_until = null
  where id = p_order and stripe_checkout_session_id is null
  returning jsonb_build_object('released', true)
$$;

-- The lease holder found that this order's Stripe create can never succeed (an
-- idempotency_error, an error replayed for its key, expires_at no longer acceptable): the order
-- closes so that the next begin opens a fresh one (I9). No session exists under its key.
create function public.checkout_retire_order(p_order uuid, p_reason text)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_order public.orders;
begin
  update public.orders set status = 'expired', closed_reason = 'retired',
    session_claimed_until = null, updated_at = now()
  where id = p_order and closed_reason is null and stripe_checkout_session_id is null
  returning * into v_order;
  if v_order.id is null then
    return jsonb_build_object('retired', false);
  end if;
  insert into public.payment_audit (user_id, kind, order_id, reference)
  values (v_order.user_id, 'order_retired', v_order.id, left(p_reason, 200));
  return jsonb_build_object('retired', true);
end
$$;

-- The order the success page polls: by session id (the user's own only), else the latest.
create function public.checkout_status(
  p_user uuid, p_session_id text, p_limit integer, p_window_s integer)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_retry integer;
  v_order public.orders;
begin
  v_retry := internal.rate_limit_hit(p_user, 'checkout_status', p_limit, p_window_s);
  if v_retry > 0 then
    return jsonb_build_object('state', 'rate_limited', 'retry_after', v_retry);
  end if;
  if p_session_id is not null then
    select * into v_order from public.orders
    where user_id = p_user and stripe_checkout_session_id = p_session_id;
  else
    select * into v_order from public.orders
    where user_id = p_user order by created_at desc limit 1;
  end if;
  if v_order.id is null then
    return jsonb_build_object('state', 'not_found');
  end if;
  return jsonb_build_object('state', 'found', 'order', billing.order_json(v_order));
end
$$;

revoke all on all functions in schema billing from public, anon, authenticated;

grant execute on all functions in schema billing to service_role;

revoke all on function
  public.checkout_begin(uuid, text, text, uuid, integer, integer, integer, integer),
  public.checkout_attach_session(uuid, jsonb),
  public.checkout_release_lease(uuid),
  public.checkout_retire_order(uuid, text),
  public.checkout_status(uuid, text, integer, integer)
from public, anon, authenticated;

grant execute on function
  public.checkout_begin(uuid, text, text, uuid, integer, integer, integer, integer),
  public.checkout_attach_session(uuid, jsonb),
  public.checkout_release_lease(uuid),
  public.checkout_retire_order(uuid, text),
  public.checkout_status(uuid, text, integer, integer)
to service_role;

-- Payment health over the last p_days days, for on-call (see docs/operations.md):
--   payment_success_rate   orders that took money / orders with an outcome
--   webhook_success_rate   events applied, ignored or stale / events recorded
--   order_sync_delay_ms    p50/p95 of checkout session created -> order paid
--   duplicate_payments     second payments for a product the user owned; duplicate_refunds: of
--                          those, refunded by the webhook
--   duplicates_unrefunded  second payments whose money the merchant still holds now, all time
--                          (0 after a reconciler run, unless a refund waits for the customer or
--                          Stripe refused it: then a person looks, runbook)
--   refund_rate, dispute_rate  orders refunded / disputed, over orders that took money
--   unverified_sessions    paid sessions of other channels that did not sell the product
--   reconciler             the last run: when it finished, what it repaired, its error
create function public.payment_health(p_days integer default 7)
returns jsonb
language sql stable set search_path = ''
as $$
  with window_start as (select now() - make_interval(days => p_days) as t),
  orders as (
    select o.* from public.orders o, window_start w
    where o.created_at >= w.t and o.stripe_checkout_session_id is not null
  ),
  events as (
    select e.outcome from public.stripe_events e, window_start w where e.received_at >= w.t
  ),
  audit as (
    select a.* from public.payment_audit a, window_start w where a.created_at >= w.t
  ),
  delays as (
    select extract(epoch from (paid_at - session_created_at)) * 1000 as ms
    from orders where paid_at is not null and session_created_at is not null
  ),
  took_money as (select count(*) as n from orders where paid_at is not null)
  select jsonb_build_object(
    'days', p_days,
    'orders_paid', (select count(*) from orders where status = 'paid'),
    'orders_refunded', (select count(*) from orders where status = 'refunded'),
    'orders_disputed', (select count(*) from orders where status = 'disputed'),
    'orders_failed', (select count(*) from orders where status = 'failed'),
    'orders_expired', (select count(*) from orders where status = 'expired'),
    'orders_open', (select count(*) from orders where status in ('pending', 'processing')),
    'payment_success_rate', (select round(count(*) filter (where paid_at is not null)::numeric
        / nullif(count(*) filter (where paid_at is not null or status in ('failed', 'expired')), 0), 4) from orders),
    'refund_rate', (select round((select count(*) from orders where status = 'refunded')::numeric
        / nullif(n, 0), 4) from took_money),
    'dispute_rate', (select round((select count(distinct order_id) from audit where kind = 'dispute_opened')::numeric
        / nullif(n, 0), 4) from took_money),
    'webhook_events', (select count(*) from events),
    'webhook_success_rate', (select round(count(*) filter (where outcome in ('applied', 'ignored', 'stale'))::numeric
        / nullif(count(*), 0), 4) from events),
    'webhook_unmatched', (select count(*) from events where outcome = 'unmatched'),
    'order_sync_delay_ms_p50', (select round(percentile_cont(0.5) within group (order by ms)::numeric) from delays),
    'order_sync_delay_ms_p95', (select round(percentile_cont(0.95) within group (order by ms)::numeric) from delays),
    'duplicate_payments', (select count(*) from audit where kind = 'duplicate_payment'),
    'duplicate_refunds', (select count(*) from audit where kind = 'duplicate_refunded'),
    'duplicates_unrefunded', (select count(*) from billing.decisions where duplicate),
    'unverified_sessions', (select count(*) from audit where kind = 'session_unverified'),
    'reconciler', (select jsonb_build_object('finished_at', r.finished_at, 'repaired', r.repaired,
        'events', r.events, 'error', r.error)
      from internal.reconciler_runs r where r.finished_at is not null
      order by r.finished_at desc limit 1)
  )
$$;

revoke all on function public.schema_status(), public.payment_health(integer) from public, anon, authenticated;

grant execute on function public.schema_status(), public.payment_health(integer) to service_role;
