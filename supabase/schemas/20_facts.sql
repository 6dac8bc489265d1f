-- Facts: Stripe's objects as Stripe last showed them, each stored with when it was read. Every
-- Stripe event is only a notification that an object changed: the webhook (and checkout, and the
-- reconciler) read the object from the API and store it here. A read replaces an older read,
-- never a newer one (`read_at`), whatever order the deliveries finish in; `changed_at` is the
-- read that last changed something. Amounts and statuses are Stripe's fields, never arithmetic
-- over events. Service role only, through public.record_stripe_facts (40_sync.sql).

-- Checkout Sessions. A session of ours names its order in `metadata[order_id]`; any other (a
-- Payment Link's, the old app's) names its user in `client_reference_id` and is a purchase only if
-- its line items hold the product (`sells_product`, read once: line items never change).
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

-- Payment intents with their latest charge (`GET /v1/payment_intents/{id}?expand[]=latest_charge`).
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

-- Refunds (`GET /v1/refunds?payment_intent=`).
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

-- Disputes (`GET /v1/disputes?payment_intent=`).
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

-- Subscriptions (`GET /v1/subscriptions/{id}`), with their owner (I7).
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
  updated_at timestamptz not null default now(),
  read_at timestamptz not null,
  changed_at timestamptz not null
);
create index subscriptions_user on public.subscriptions (user_id);
create index subscriptions_customer on public.subscriptions (stripe_customer_id);

-- Invoices (`GET /v1/invoices/{id}`).
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
  -- When the invoice was first read paid.
  paid_at timestamptz,
  updated_at timestamptz not null default now(),
  read_at timestamptz not null,
  changed_at timestamptz not null
);
create index invoices_user on public.invoices (user_id);
create index invoices_subscription on public.invoices (subscription_id);

alter table public.stripe_sessions enable row level security;
alter table public.stripe_payments enable row level security;
alter table public.stripe_refunds enable row level security;
alter table public.stripe_disputes enable row level security;
alter table public.subscriptions enable row level security;
alter table public.invoices enable row level security;
create policy "own subscriptions" on public.subscriptions
  for select to authenticated using (user_id = (select auth.uid()));
create policy "own invoices" on public.invoices
  for select to authenticated using (user_id = (select auth.uid()));
revoke all on public.stripe_sessions, public.stripe_payments, public.stripe_refunds,
  public.stripe_disputes, public.subscriptions, public.invoices from anon, authenticated;
grant select on public.subscriptions, public.invoices to authenticated;
grant all on public.stripe_sessions, public.stripe_payments, public.stripe_refunds,
  public.stripe_disputes, public.subscriptions, public.invoices to service_role;

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

-- A paid session of another channel is being read at Stripe (its line items): a payment in
-- flight for its user until the read is stored (I2), at most 30 seconds.
create table internal.verifications (
  session_id text primary key,
  user_id uuid not null,
  product text not null,
  until timestamptz not null
);
alter table internal.verifications enable row level security;
grant all on internal.verifications to service_role;

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
