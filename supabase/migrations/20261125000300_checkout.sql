-- Checkout: start or resume the one-time purchase without ever creating two sessions for one
-- open order, per-user rate limits, and reconciliation from Stripe when the webhook is late.
-- Every function is one transaction and one round trip; service role only.

-- Reconciliation writes audit rows with no event behind them.
alter table public.payment_audit alter column event_id drop not null;

-- A short lease on creating the Checkout Session of an order: concurrent clicks wait for the
-- holder instead of calling Stripe themselves; a lease left by a crashed instance just expires.
alter table public.orders add column session_claimed_until timestamptz;

create schema if not exists internal;
revoke all on schema internal from public;
grant usage on schema internal to service_role;

-- Fixed-window counters shared by every instance of every function.
create table internal.rate_limits (
  user_id uuid not null,
  bucket text not null,
  window_start timestamptz not null,
  hits integer not null,
  primary key (user_id, bucket)
);
alter table internal.rate_limits enable row level security;
grant all on internal.rate_limits to service_role;

-- Counts one hit; returns 0 when allowed, else the seconds until the window resets.
create or replace function internal.rate_limit_hit(p_user uuid, p_bucket text, p_limit integer, p_window_s integer)
returns integer
language plpgsql set search_path = ''
as $$
declare
  v_row internal.rate_limits;
begin
  if p_limit is null or p_limit <= 0 then
    return 0;
  end if;
  insert into internal.rate_limits as r (user_id, bucket, window_start, hits)
  values (p_user, p_bucket, now(), 1)
  on conflict (user_id, bucket) do update set
    hits = case when r.window_start > now() - make_interval(secs => p_window_s) then r.hits + 1 else 1 end,
    window_start = case when r.window_start > now() - make_interval(secs => p_window_s) then r.window_start else now() end
  returning * into v_row;
  if v_row.hits <= p_limit then
    return 0;
  end if;
  return greatest(1, ceil(extract(epoch from (v_row.window_start + make_interval(secs => p_window_s) - now())))::integer);
end
$$;

create or replace function billing.order_json(p_order public.orders) returns jsonb
language sql stable set search_path = ''
as $$
  select jsonb_build_object(
    'order_id', p_order.id,
    'status', p_order.status,
    'session_id', p_order.stripe_checkout_session_id,
    'url', p_order.checkout_url,
    'expires_at', extract(epoch from p_order.checkout_expires_at)::bigint,
    'created_at', extract(epoch from p_order.created_at)::bigint,
    'paid_at', extract(epoch from p_order.paid_at)::bigint)
$$;

-- Start or resume checkout. Answers one of these states:
--   rate_limited {retry_after}       already_paid {order}       processing {order}
--   open_session {order}             (pending order with a session: ask Stripe if still open)
--   create_session {order}           (this caller holds the lease: create the session)
--   in_progress {order}              (another caller holds the lease: wait, ask again)
--   unknown_user
-- p_limit null skips the rate limit (a caller asking again while waiting).
create or replace function public.checkout_begin(
  p_user uuid, p_product text, p_limit integer, p_window_s integer,
  p_lease_s integer, p_session_ttl_s integer)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_retry integer;
  v_order public.orders;
begin
  v_retry := internal.rate_limit_hit(p_user, 'checkout', p_limit, p_window_s);
  if v_retry > 0 then
    return jsonb_build_object('state', 'rate_limited', 'retry_after', v_retry);
  end if;
  if not exists (select 1 from auth.users where id = p_user) then
    return jsonb_build_object('state', 'unknown_user');
  end if;

  select * into v_order from public.orders
  where user_id = p_user and product = p_product and status = 'paid'
  order by paid_at limit 1;
  if v_order.id is not null then
    return jsonb_build_object('state', 'already_paid', 'order', billing.order_json(v_order));
  end if;

  -- A pending order that never got a session and is too old for a session with the configured
  -- lifetime (Stripe needs expires_at at least 30 minutes ahead) is retired.
  update public.orders set status = 'expired', updated_at = now()
  where user_id = p_user and product = p_product and status = 'pending'
    and stripe_checkout_session_id is null
    and created_at + make_interval(secs => p_session_ttl_s) < now() + interval '31 minutes';

  -- The partial unique index makes concurrent inserts collapse into one open order.
  insert into public.orders (user_id, product) values (p_user, p_product)
  on conflict (user_id, product) where status in ('pending', 'processing') do nothing;
  select * into v_order from public.orders
  where user_id = p_user and product = p_product and status in ('pending', 'processing')
  for update;

  if v_order.status = 'processing' then
    return jsonb_build_object('state', 'processing', 'order', billing.order_json(v_order));
  end if;
  if v_order.stripe_checkout_session_id is not null then
    return jsonb_build_object('state', 'open_session', 'order', billing.order_json(v_order));
  end if;
  if v_order.session_claimed_until is null or v_order.session_claimed_until < now() then
    update public.orders set session_claimed_until = now() + make_interval(secs => p_lease_s)
    where id = v_order.id;
    return jsonb_build_object('state', 'create_session', 'order', billing.order_json(v_order));
  end if;
  return jsonb_build_object('state', 'in_progress', 'order', billing.order_json(v_order),
    'retry_ms', greatest(50, least(1000,
      (extract(epoch from (v_order.session_claimed_until - now())) * 1000)::integer)));
end
$$;

-- Stores the created session on its order and releases the lease.
create or replace function public.checkout_attach_session(
  p_order uuid, p_session_id text, p_url text, p_expires_at bigint, p_session_created bigint)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_order public.orders;
begin
  update public.orders set
    stripe_checkout_session_id = p_session_id,
    checkout_url = p_url,
    checkout_expires_at = to_timestamp(p_expires_at),
    session_created_at = coalesce(to_timestamp(p_session_created), now()),
    session_claimed_until = null,
    updated_at = now()
  where id = p_order
    and (stripe_checkout_session_id is null or stripe_checkout_session_id = p_session_id)
  returning * into v_order;
  if v_order.id is null then
    select * into v_order from public.orders where id = p_order;
    return jsonb_build_object('attached', false, 'order', billing.order_json(v_order));
  end if;
  return jsonb_build_object('attached', true, 'order', billing.order_json(v_order));
end
$$;

-- Gives the lease back after a failed Stripe call, so the next click retries at once.
create or replace function public.checkout_release_lease(p_order uuid)
returns jsonb
language sql set search_path = ''
as $$
  update public.orders set session_claimed_until = null
  where id = p_order and stripe_checkout_session_id is null
  returning jsonb_build_object('released', true)
$$;

-- Applies what Stripe reports about a session (the webhook may be late): the same code path as
-- the webhook's checkout events, without an event.
create or replace function public.checkout_reconcile(p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_result jsonb;
  v_order public.orders;
begin
  v_result := billing.apply_checkout_session(null, p_effect);
  select * into v_order from public.orders
  where stripe_checkout_session_id = p_effect ->> 'session_id';
  return v_result || jsonb_build_object('order', billing.order_json(v_order));
end
$$;

-- The order the success page polls: by session id (the user's own only), else the latest.
create or replace function public.checkout_status(
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

revoke all on all functions in schema internal from public, anon, authenticated;
grant execute on all functions in schema internal to service_role;
revoke all on all functions in schema billing from public, anon, authenticated;
grant execute on all functions in schema billing to service_role;
revoke all on function
  public.checkout_begin(uuid, text, integer, integer, integer, integer),
  public.checkout_attach_session(uuid, text, text, bigint, bigint),
  public.checkout_release_lease(uuid),
  public.checkout_reconcile(jsonb),
  public.checkout_status(uuid, text, integer, integer)
from public, anon, authenticated;
grant execute on function
  public.checkout_begin(uuid, text, integer, integer, integer, integer),
  public.checkout_attach_session(uuid, text, text, bigint, bigint),
  public.checkout_release_lease(uuid),
  public.checkout_reconcile(jsonb),
  public.checkout_status(uuid, text, integer, integer)
to service_role;
