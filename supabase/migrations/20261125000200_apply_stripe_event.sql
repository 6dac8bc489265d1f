-- Applying a Stripe event: one call, one transaction, one round trip. The event id is claimed in
-- the same transaction as the effect, so a redelivered or concurrently duplicated event changes
-- nothing. Callers parse the event and pass its effect as typed JSON (`p_effect`); the raw event is
-- kept for the audit trail (`p_payload`).

create schema if not exists billing;
revoke all on schema billing from public;
grant usage on schema billing to service_role;

create or replace function billing.user_if_known(p_user text) returns uuid
language sql stable set search_path = ''
as $$
  select u.id from auth.users u
  where p_user ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
    and u.id = p_user::uuid
$$;

create or replace function billing.unix_ts(p_value jsonb) returns timestamptz
language sql immutable set search_path = ''
as $$
  select case when jsonb_typeof(p_value) = 'number' then to_timestamp((p_value)::text::bigint) end
$$;

-- checkout.session.completed / async_payment_succeeded / async_payment_failed / expired
create or replace function billing.apply_checkout_session(p_event_id text, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_transition text := p_effect ->> 'transition';
  v_session text := p_effect ->> 'session_id';
  v_user uuid := billing.user_if_known(p_effect ->> 'user_id');
  v_customer text := p_effect ->> 'customer_id';
  v_product text := coalesce(p_effect ->> 'product', 'full_report');
  v_pays boolean;
  v_order public.orders;
  v_other uuid;
  v_delay_ms bigint;
  v_audit_kind text;
begin
  if v_user is not null and v_customer is not null then
    insert into public.stripe_customers (stripe_customer_id, user_id)
    values (v_customer, v_user)
    on conflict (stripe_customer_id) do nothing;
  end if;

  if p_effect ->> 'mode' is distinct from 'payment' then
    return jsonb_build_object(
      'outcome', case when v_user is not null and v_customer is not null then 'applied' else 'ignored' end,
      'detail', 'mode ' || coalesce(p_effect ->> 'mode', 'unknown') || ' is tracked by subscription events');
  end if;

  v_pays := v_transition = 'async_payment_succeeded'
    or (v_transition = 'completed' and p_effect ->> 'payment_status' in ('paid', 'no_payment_required'));

  select * into v_order from public.orders
  where stripe_checkout_session_id = v_session for update;
  if v_order.id is null and p_effect ->> 'order_id' ~* '^[0-9a-f-]{36}$' then
    select * into v_order from public.orders
    where id = (p_effect ->> 'order_id')::uuid
      and (v_user is null or user_id = v_user)
    for update;
  end if;

  if v_order.id is null then
    if not v_pays or v_user is null then
      return jsonb_build_object('outcome', 'unmatched',
        'detail', 'no order for this session and no known user in its metadata');
    end if;
    -- Paid through a session we did not create an order for (a Payment Link, the old app):
    -- money was taken, so the order is created here.
    insert into public.orders (user_id, product, status, stripe_checkout_session_id)
    values (v_user, v_product, 'paid', v_session)
    returning * into v_order;
    v_order.status := 'pending';
  end if;

  if v_pays then
    if v_order.status = 'paid' and v_order.paid_at is not null then
      return jsonb_build_object('outcome', 'applied', 'detail', 'order already paid',
        'order_id', v_order.id, 'user_id', v_order.user_id);
    end if;
    select id into v_other from public.orders
    where user_id = v_order.user_id and product = v_order.product and status = 'paid'
      and paid_at is not null and id <> v_order.id
    limit 1;
    update public.orders set
      status = 'paid',
      paid_at = now(),
      stripe_checkout_session_id = coalesce(stripe_checkout_session_id, v_session),
      session_created_at = coalesce(session_created_at, billing.unix_ts(p_effect -> 'session_created')),
      stripe_payment_intent_id = coalesce(p_effect ->> 'payment_intent_id', stripe_payment_intent_id),
      stripe_customer_id = coalesce(v_customer, stripe_customer_id),
      amount_total = coalesce((p_effect ->> 'amount_total')::bigint, amount_total),
      currency = coalesce(p_effect ->> 'currency', currency),
      updated_at = now()
    where id = v_order.id
    returning * into v_order;

    insert into public.entitlements (user_id, product, active, source)
    values (v_order.user_id, v_order.product, true, v_order.id::text)
    on conflict (user_id, product) do update
      set active = true, source = excluded.source, updated_at = now();

    insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency)
    values (p_event_id, v_order.user_id, 'order_paid', v_order.id, v_order.amount_total, v_order.currency)
    on conflict do nothing;
    if v_other is not null then
      insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency)
      values (p_event_id, v_order.user_id, 'duplicate_payment', v_order.id, v_order.amount_total, v_order.currency);
    end if;

    v_delay_ms := (extract(epoch from (v_order.paid_at - v_order.session_created_at)) * 1000)::bigint;
    return jsonb_build_object('outcome', 'applied', 'detail', 'order paid',
      'order_id', v_order.id, 'user_id', v_order.user_id,
      'sync_delay_ms', v_delay_ms, 'duplicate_payment', v_other is not null);
  end if;

  -- The remaining transitions only move an open order forward, and only for its current session.
  if v_order.stripe_checkout_session_id is distinct from v_session
     and v_order.stripe_checkout_session_id is not null then
    return jsonb_build_object('outcome', 'stale', 'detail', 'order has moved to another session',
      'order_id', v_order.id);
  end if;

  if v_transition = 'completed' and v_order.status = 'pending' then
    update public.orders set status = 'processing', updated_at = now(),
      stripe_checkout_session_id = coalesce(stripe_checkout_session_id, v_session)
    where id = v_order.id;
    v_audit_kind := 'order_processing';
  elsif v_transition = 'async_payment_failed' and v_order.status in ('pending', 'processing') then
    update public.orders set status = 'failed', updated_at = now() where id = v_order.id;
    v_audit_kind := 'order_payment_failed';
  elsif v_transition = 'expired' and v_order.status = 'pending' then
    update public.orders set status = 'expired', updated_at = now() where id = v_order.id;
    v_audit_kind := 'order_expired';
  else
    return jsonb_build_object('outcome', 'stale',
      'detail', 'order is ' || v_order.status || ', ' || v_transition || ' does not change it',
      'order_id', v_order.id);
  end if;

  insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency)
  values (p_event_id, v_order.user_id, v_audit_kind, v_order.id,
          (p_effect ->> 'amount_total')::bigint, p_effect ->> 'currency');
  return jsonb_build_object('outcome', 'applied', 'detail', v_audit_kind,
    'order_id', v_order.id, 'user_id', v_order.user_id);
end
$$;

-- customer.subscription.created / updated / deleted
create or replace function billing.apply_subscription(p_event_id text, p_created timestamptz, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_user uuid;
  v_row public.subscriptions;
begin
  v_user := coalesce(
    billing.user_if_known(p_effect ->> 'user_id'),
    (select user_id from public.stripe_customers where stripe_customer_id = p_effect ->> 'customer_id'));

  -- Newest state wins: the update happens only if this event is not older than the state applied,
  -- and a canceled subscription stays canceled (Stripe never reactivates one).
  insert into public.subscriptions as s (
    id, user_id, stripe_customer_id, status, price_id, current_period_start, current_period_end,
    cancel_at_period_end, cancel_at, canceled_at, ended_at, last_event_created, last_event_id)
  values (
    p_effect ->> 'id', v_user, p_effect ->> 'customer_id', p_effect ->> 'status',
    p_effect ->> 'price_id',
    billing.unix_ts(p_effect -> 'current_period_start'),
    billing.unix_ts(p_effect -> 'current_period_end'),
    coalesce((p_effect ->> 'cancel_at_period_end')::boolean, false),
    billing.unix_ts(p_effect -> 'cancel_at'),
    billing.unix_ts(p_effect -> 'canceled_at'),
    billing.unix_ts(p_effect -> 'ended_at'),
    p_created, p_event_id)
  on conflict (id) do update set
    user_id = coalesce(excluded.user_id, s.user_id),
    stripe_customer_id = excluded.stripe_customer_id,
    status = excluded.status,
    price_id = coalesce(excluded.price_id, s.price_id),
    current_period_start = coalesce(excluded.current_period_start, s.current_period_start),
    current_period_end = coalesce(excluded.current_period_end, s.current_period_end),
    cancel_at_period_end = excluded.cancel_at_period_end,
    cancel_at = excluded.cancel_at,
    canceled_at = excluded.canceled_at,
    ended_at = excluded.ended_at,
    last_event_created = excluded.last_event_created,
    last_event_id = excluded.last_event_id,
    updated_at = now()
  where s.last_event_created <= excluded.last_event_created
    and not (s.status = 'canceled' and excluded.status <> 'canceled')
  returning * into v_row;

  if v_row.id is null then
    return jsonb_build_object('outcome', 'stale',
      'detail', 'a newer state of this subscription is already applied');
  end if;

  if v_row.user_id is not null then
    insert into public.entitlements (user_id, product, active, source)
    values (v_row.user_id, 'subscription',
            v_row.status in ('active', 'trialing', 'past_due'), v_row.id)
    on conflict (user_id, product) do update
      set active = excluded.active, source = excluded.source, updated_at = now()
      -- another, live subscription of the same user keeps the entitlement
      where entitlements.source = excluded.source or excluded.active;
  end if;

  return jsonb_build_object('outcome', 'applied', 'detail', 'subscription ' || v_row.status,
    'user_id', v_row.user_id);
end
$$;

-- invoice.paid / invoice.payment_succeeded / invoice.payment_failed
create or replace function billing.apply_invoice(p_event_id text, p_created timestamptz, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_transition text := p_effect ->> 'transition';
  v_user uuid;
  v_row public.invoices;
  v_paid boolean := v_transition in ('paid', 'payment_succeeded');
begin
  v_user := coalesce(
    (select user_id from public.stripe_customers where stripe_customer_id = p_effect ->> 'customer_id'),
    (select user_id from public.subscriptions where id = p_effect ->> 'subscription_id'));

  insert into public.invoices as i (
    id, user_id, stripe_customer_id, subscription_id, status, billing_reason, amount_due,
    amount_paid, currency, attempt_count, hosted_invoice_url, period_start, period_end,
    next_payment_attempt, paid_at, last_event_created, last_event_id)
  values (
    p_effect ->> 'id', v_user, p_effect ->> 'customer_id', p_effect ->> 'subscription_id',
    p_effect ->> 'status', p_effect ->> 'billing_reason',
    coalesce((p_effect ->> 'amount_due')::bigint, 0), coalesce((p_effect ->> 'amount_paid')::bigint, 0),
    p_effect ->> 'currency', coalesce((p_effect ->> 'attempt_count')::integer, 0),
    p_effect ->> 'hosted_invoice_url',
    billing.unix_ts(p_effect -> 'period_start'), billing.unix_ts(p_effect -> 'period_end'),
    billing.unix_ts(p_effect -> 'next_payment_attempt'),
    case when v_paid then now() end,
    p_created, p_event_id)
  on conflict (id) do update set
    user_id = coalesce(excluded.user_id, i.user_id),
    subscription_id = coalesce(excluded.subscription_id, i.subscription_id),
    status = excluded.status,
    amount_due = excluded.amount_due,
    amount_paid = excluded.amount_paid,
    attempt_count = greatest(excluded.attempt_count, i.attempt_count),
    hosted_invoice_url = coalesce(excluded.hosted_invoice_url, i.hosted_invoice_url),
    next_payment_attempt = excluded.next_payment_attempt,
    paid_at = coalesce(i.paid_at, excluded.paid_at),
    last_event_created = excluded.last_event_created,
    last_event_id = excluded.last_event_id,
    updated_at = now()
  where i.last_event_created <= excluded.last_event_created
    and not (i.status in ('paid', 'void') and excluded.status not in ('paid', 'void'))
  returning * into v_row;

  -- The audit records what happened even when the invoice row already holds newer state.
  insert into public.payment_audit (event_id, user_id, kind, invoice_id, amount, currency)
  values (p_event_id, coalesce(v_row.user_id, v_user),
          case when v_paid then 'invoice_paid' else 'invoice_payment_failed' end,
          p_effect ->> 'id',
          case when v_paid then (p_effect ->> 'amount_paid')::bigint else (p_effect ->> 'amount_due')::bigint end,
          p_effect ->> 'currency')
  on conflict do nothing;

  if v_row.id is null then
    return jsonb_build_object('outcome', 'stale',
      'detail', 'a newer state of this invoice is already applied');
  end if;
  return jsonb_build_object('outcome', 'applied', 'detail', 'invoice ' || coalesce(v_row.status, 'unknown'),
    'user_id', v_row.user_id);
end
$$;

-- The one entry point, called by the webhook function through PostgREST RPC or directly.
-- p_event: {id, type, api_version, created (unix s), livemode, received_at_ms}
create or replace function public.apply_stripe_event(p_event jsonb, p_payload jsonb, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_id text := p_event ->> 'id';
  v_created timestamptz := billing.unix_ts(p_event -> 'created');
  v_result jsonb;
begin
  if v_id is null or v_created is null or p_event ->> 'type' is null then
    raise exception 'event id, type and created are required' using errcode = '22023';
  end if;

  -- Claim the id first. A concurrent delivery of the same event waits here for this transaction
  -- and then finds the conflict; if this one fails, the other goes on and applies it.
  insert into public.stripe_events (id, type, api_version, created, livemode, payload, outcome, received_at)
  values (v_id, p_event ->> 'type', p_event ->> 'api_version', v_created,
          coalesce((p_event ->> 'livemode')::boolean, false), p_payload, 'applied',
          coalesce(to_timestamp((p_event ->> 'received_at_ms')::double precision / 1000), now()))
  on conflict (id) do nothing;
  if not found then
    select jsonb_build_object('outcome', 'duplicate', 'detail', 'first applied as ' || outcome)
      into v_result
    from public.stripe_events where id = v_id;
    return v_result;
  end if;

  v_result := case p_effect ->> 'kind'
    when 'checkout_session' then billing.apply_checkout_session(v_id, p_effect)
    when 'subscription' then billing.apply_subscription(v_id, v_created, p_effect)
    when 'invoice' then billing.apply_invoice(v_id, v_created, p_effect)
    else jsonb_build_object('outcome', 'ignored', 'detail', 'event type not handled')
  end;

  update public.stripe_events
     set outcome = v_result ->> 'outcome', detail = v_result ->> 'detail', processed_at = now()
   where id = v_id;
  return v_result;
end
$$;

revoke all on all functions in schema billing from public, anon, authenticated;
grant execute on all functions in schema billing to service_role;
revoke all on function public.apply_stripe_event(jsonb, jsonb, jsonb) from public, anon, authenticated;
grant execute on function public.apply_stripe_event(jsonb, jsonb, jsonb) to service_role;
