-- A refund that fails after the report was revoked gives the report back (I4). Found by the
-- payments model: a user refunded in full clicks and gets a session (they own nothing), then the
-- refund fails and the report returns, and the user owned the product while holding a payable
-- session (I1, I2). The reversal now closes the orders opened meanwhile and hands their sessions
-- to the webhook to expire at Stripe, exactly as a payment does; and it takes the purchase lock,
-- so a click and the reversal are serialized like a click and a payment. The audit also says
-- `order_refunded` when a payment is applied after its refund (charge.refunded came first).

-- The user owns `p_owned`'s product (a payment, or a refund that failed): their other pending
-- orders close (`superseded`, audited), and their sessions are to be expired at Stripe until
-- confirmed (I1). One place for the paid path and the refund reversal.
create or replace function billing.supersede_pending(p_event_id text, p_owned public.orders)
returns void
language sql set search_path = ''
as $$
  with closed as (
    update public.orders set status = 'expired', closed_reason = 'superseded',
      session_claimed_until = null,
      session_expire_pending = stripe_checkout_session_id is not null, updated_at = now()
    where user_id = p_owned.user_id and product = p_owned.product and status = 'pending'
      and id <> p_owned.id
    returning id
  )
  insert into public.payment_audit (event_id, user_id, kind, order_id)
  select p_event_id, p_owned.user_id, 'order_superseded', id from closed;
$$;

create or replace function billing.apply_refund(p_event_id text, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_pi text;
  v_payment public.payments;
  v_before text;
  v_order public.orders;
  v_owner uuid;
  v_user uuid;
  v_product text;
begin
  -- Serialized with checkout_begin and the paid path of the same user and product (I1), the
  -- purchase lock first, as they take it (the payment intent found as record_refund finds it).
  select user_id, product into v_user, v_product from public.orders
  where stripe_payment_intent_id = coalesce(p_effect ->> 'payment_intent_id',
    (select payment_intent_id from public.payments where charge_id = p_effect ->> 'charge_id'
     limit 1));
  if v_user is not null then
    perform billing.lock_purchase(v_user, v_product);
  end if;
  v_pi := billing.record_refund(p_effect, null);
  if v_pi is null then
    return jsonb_build_object('outcome', 'unmatched',
      'detail', 'refund of a payment we do not know');
  end if;
  v_payment := billing.refresh_payment(v_pi);
  select status into v_before from public.orders where stripe_payment_intent_id = v_pi;
  if p_effect ->> 'status' in ('failed', 'canceled') then
    update public.orders set refund_id = null, updated_at = now()
    where stripe_payment_intent_id = v_pi and refund_id = p_effect ->> 'id';
  end if;
  v_order := billing.settle_payment(v_pi);
  if v_order.id is null then
    return jsonb_build_object('outcome', 'ignored',
      'detail', 'no order paid with this payment intent (yet): kept for when it is');
  end if;
  if v_before = 'refunded' and v_order.status = 'paid' and v_order.duplicate_of is null then
    select id into v_owner from public.orders
    where user_id = v_order.user_id and product = v_order.product and id <> v_order.id
      and status in ('paid', 'disputed')
    order by paid_at
    limit 1;
    if v_owner is not null then
      update public.orders set duplicate_of = v_owner, refund_id = null, updated_at = now()
      where id = v_order.id
      returning * into v_order;
      insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
      values (p_event_id, v_order.user_id, 'duplicate_payment', v_order.id, v_order.amount_total,
              v_order.currency, v_pi)
      on conflict do nothing;
    end if;
  end if;
  if v_before = 'refunded' and v_order.status in ('paid', 'disputed') and v_owner is null then
    -- The refund failed: the user owns the product again. Orders opened while it was refunded
    -- close, and their sessions are to be expired at Stripe until confirmed (I1, I2), as when a
    -- payment closes them.
    perform billing.supersede_pending(p_event_id, v_order);
  end if;
  if v_before is distinct from v_order.status then
    insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
    values (p_event_id, v_order.user_id,
            case when v_order.status = 'refunded' then 'order_refunded' else 'refund_reversed' end,
            v_order.id, v_payment.amount_refunded, v_payment.currency, p_effect ->> 'id');
  end if;
  return jsonb_build_object('outcome', 'applied', 'refunded', p_effect ->> 'status' in ('succeeded', 'pending'),
    'detail', 'refund ' || coalesce(p_effect ->> 'status', 'unknown') || ', order ' || v_order.status,
    'order_id', v_order.id, 'user_id', v_order.user_id,
    'duplicate_payment', v_owner is not null, 'refund', billing.refund_due(v_order),
    'expire_sessions', billing.expiries_due(v_order.user_id, v_order.product));
end
$$;

-- Pays an order (locked by the caller), as before; an order whose payment was refunded before it
-- was paid here is audited refunded too.
create or replace function billing.pay_order(p_event_id text, p_order uuid, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_order public.orders;
  v_owner uuid;
  v_expire jsonb;
  v_delay_ms bigint;
  v_pi text := coalesce(
    (select stripe_payment_intent_id from public.orders where id = p_order),
    billing.payment_intent_for(p_order, p_effect ->> 'payment_intent_id'));
begin
  if v_pi is not null then
    insert into public.payments as p (payment_intent_id, amount, currency)
    values (v_pi, (p_effect ->> 'amount_total')::bigint, p_effect ->> 'currency')
    on conflict (payment_intent_id) do update
      set amount = coalesce(p.amount, excluded.amount),
          currency = coalesce(p.currency, excluded.currency), updated_at = now();
    perform billing.refresh_payment(v_pi);
  end if;
  select * into v_order from public.orders where id = p_order for update;
  if v_order.paid_at is not null then
    return jsonb_build_object('outcome', 'applied', 'detail', 'order already paid',
      'order_id', v_order.id, 'user_id', v_order.user_id, 'refund', billing.refund_due(v_order),
      'expire_sessions', billing.expiries_due(v_order.user_id, v_order.product));
  end if;
  select id into v_owner from public.orders
  where user_id = v_order.user_id and product = v_order.product and id <> v_order.id
    and status in ('paid', 'disputed')
  order by paid_at
  limit 1;
  update public.orders set
    status = 'paid',
    paid_at = clock_timestamp(),
    closed_reason = null,
    session_claimed_until = null,
    session_expire_pending = false,
    duplicate_of = v_owner,
    stripe_checkout_session_id = coalesce(stripe_checkout_session_id, p_effect ->> 'session_id'),
    session_created_at = coalesce(session_created_at, billing.unix_ts(p_effect -> 'session_created')),
    stripe_payment_intent_id = coalesce(stripe_payment_intent_id, v_pi),
    stripe_customer_id = coalesce(p_effect ->> 'customer_id', stripe_customer_id),
    amount_total = coalesce((p_effect ->> 'amount_total')::bigint, amount_total),
    currency = coalesce(p_effect ->> 'currency', currency),
    updated_at = now()
  where id = v_order.id
  returning * into v_order;
  delete from internal.verifications where session_id = v_order.stripe_checkout_session_id;

  insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
  values (p_event_id, v_order.user_id, 'order_paid', v_order.id, v_order.amount_total,
          v_order.currency, v_order.stripe_payment_intent_id)
  on conflict do nothing;
  if v_owner is not null then
    insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
    values (p_event_id, v_order.user_id, 'duplicate_payment', v_order.id, v_order.amount_total,
            v_order.currency, v_order.stripe_payment_intent_id)
    on conflict do nothing;
  end if;

  -- The user owns the product now: their other pending orders close, and their sessions are to
  -- be expired at Stripe until confirmed (I1).
  perform billing.supersede_pending(p_event_id, v_order);
  v_expire := billing.expiries_due(v_order.user_id, v_order.product);

  v_order := billing.settle_order(v_order.id);
  perform billing.sync_entitlement(v_order.user_id, v_order.product);
  -- Its money already went back (charge.refunded came first): the audit says so, as it would
  -- have had the refund come after.
  if v_order.status = 'refunded' then
    insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
    select p_event_id, v_order.user_id, 'order_refunded', v_order.id, p.amount_refunded,
           p.currency, p.charge_id
    from public.payments p where p.payment_intent_id = v_order.stripe_payment_intent_id
    on conflict do nothing;
  end if;

  v_delay_ms := (extract(epoch from (v_order.paid_at - v_order.session_created_at)) * 1000)::bigint;
  return jsonb_build_object('outcome', 'applied', 'detail', 'order ' || v_order.status,
    'order_id', v_order.id, 'user_id', v_order.user_id, 'sync_delay_ms', v_delay_ms,
    'duplicate_payment', v_owner is not null, 'refund', billing.refund_due(v_order),
    'expire_sessions', v_expire);
end
$$;
