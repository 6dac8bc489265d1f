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
