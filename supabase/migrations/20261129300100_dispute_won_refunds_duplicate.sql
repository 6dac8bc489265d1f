-- A duplicate payment under a chargeback is refunded once the dispute is won (I3). Found by the
-- payments model: a user's Payment Link payment is disputed and arrives after their checkout
-- payment, so it is the duplicate; it reads `disputed`, and Stripe refuses to refund a charged-back
-- charge (`charge_disputed`), so nothing is due while the dispute is open (the money is with
-- the cardholder). A lost dispute leaves it so. A won dispute gives the money back to the
-- merchant and the duplicate reads `paid` again: the dispute event now carries the refund that
-- is due, as a payment event does.
--
-- A redelivered charge, refund or dispute event carries what its payment still needs too (a
-- duplicate's refund, closed orders' sessions to expire), as a redelivered checkout event
-- already did: a refund that failed for now is made by Stripe's next delivery.

-- The order paid with the payment an effect names (by payment intent, or by its charge).
create or replace function billing.order_of_payment(p_effect jsonb) returns public.orders
language sql stable set search_path = ''
as $$
  select o.* from public.orders o
  where o.stripe_payment_intent_id = coalesce(p_effect ->> 'payment_intent_id',
    (select payment_intent_id from public.payments where charge_id = p_effect ->> 'charge_id'
     limit 1))
$$;

-- What a payment's order still needs done at Stripe, for the webhook's follow-up.
create or replace function billing.still_due(p_order public.orders) returns jsonb
language sql stable set search_path = ''
as $$
  select case when p_order.id is null then '{}'::jsonb
    else jsonb_build_object('order_id', p_order.id, 'refund', billing.refund_due(p_order),
      'expire_sessions', billing.expiries_due(p_order.user_id, p_order.product))
  end
$$;

create or replace function billing.apply_dispute(p_event_id text, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_dispute public.disputes;
  v_closed boolean := p_effect ->> 'transition' = 'closed'
    or p_effect ->> 'status' in ('won', 'lost', 'warning_closed');
  v_withdrawn boolean := p_effect ->> 'transition' = 'funds_withdrawn'
    or coalesce(p_effect ->> 'status', '') not like 'warning%';
  v_pi text;
  v_order public.orders;
  v_kind text;
begin
  insert into public.disputes as d (id, payment_intent_id, charge_id, status, reason, amount,
                                    currency, closed, closed_at, funds_withdrawn)
  values (p_effect ->> 'id', p_effect ->> 'payment_intent_id', p_effect ->> 'charge_id',
          p_effect ->> 'status', p_effect ->> 'reason', (p_effect ->> 'amount')::bigint,
          p_effect ->> 'currency', v_closed, case when v_closed then now() end, v_withdrawn)
  on conflict (id) do update set
    payment_intent_id = coalesce(d.payment_intent_id, excluded.payment_intent_id),
    charge_id = coalesce(d.charge_id, excluded.charge_id),
    status = case when d.closed and not excluded.closed then d.status else excluded.status end,
    closed = d.closed or excluded.closed,
    closed_at = coalesce(d.closed_at, excluded.closed_at),
    funds_withdrawn = d.funds_withdrawn or excluded.funds_withdrawn,
    updated_at = now()
  returning * into v_dispute;

  v_pi := coalesce(v_dispute.payment_intent_id,
    (select payment_intent_id from public.payments where charge_id = v_dispute.charge_id limit 1));
  if v_pi is null then
    return jsonb_build_object('outcome', 'unmatched', 'dispute', v_dispute.status,
      'detail', 'dispute without a payment intent we know');
  end if;
  insert into public.payments as p (payment_intent_id, charge_id, currency)
  values (v_pi, v_dispute.charge_id, v_dispute.currency)
  on conflict (payment_intent_id) do update
    set charge_id = coalesce(p.charge_id, excluded.charge_id), updated_at = now();
  v_order := billing.settle_payment(v_pi);
  if v_order.id is null then
    return jsonb_build_object('outcome', 'ignored', 'dispute', v_dispute.status,
      'detail', 'no order paid with this payment intent (yet): kept for when it is');
  end if;
  v_kind := case when not v_dispute.closed then 'dispute_opened'
                 when v_dispute.status = 'lost' then 'dispute_lost'
                 else 'dispute_won' end;
  insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
  values (p_event_id, v_order.user_id, v_kind, v_order.id, v_dispute.amount, v_dispute.currency,
          v_dispute.id);
  -- A duplicate whose dispute was won holds the merchant's money again: its refund is due.
  return jsonb_build_object('outcome', 'applied', 'dispute', v_dispute.status,
    'funds_withdrawn', v_dispute.funds_withdrawn and not v_dispute.closed,
    'detail', v_kind || ', order ' || v_order.status,
    'user_id', v_order.user_id) || billing.still_due(v_order);
end
$$;

create or replace function public.apply_stripe_event(p_event jsonb, p_payload jsonb, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_id text := p_event ->> 'id';
  v_created timestamptz := billing.unix_ts(p_event -> 'created');
  v_result jsonb;
  v_order public.orders;
begin
  if v_id is null or v_created is null or p_event ->> 'type' is null then
    raise exception 'event id, type and created are required' using errcode = '22023';
  end if;

  if not exists (select 1 from public.stripe_events where id = v_id)
     and billing.session_needs_verification(p_effect) then
    perform billing.begin_verification(p_effect);
    return jsonb_build_object('outcome', 'needs_verification',
      'detail', 'paid session without an order: its line items must be checked at Stripe');
  end if;
  insert into public.stripe_events (id, type, api_version, created, livemode, payload, outcome, received_at)
  values (v_id, p_event ->> 'type', p_event ->> 'api_version', v_created,
          coalesce((p_event ->> 'livemode')::boolean, false), p_payload, 'applied',
          coalesce(to_timestamp((p_event ->> 'received_at_ms')::double precision / 1000), now()))
  on conflict (id) do nothing;
  if not found then
    select jsonb_build_object('outcome', 'duplicate', 'detail', 'first applied as ' || outcome)
      into v_result
    from public.stripe_events where id = v_id;
    -- A redelivery retries what the first delivery could not finish for this payment: a
    -- duplicate's refund, the expiry of closed orders' sessions. A delivery that raced the
    -- first one may have marked a verification after the first one cleared it: clear it again.
    if p_effect ->> 'kind' = 'checkout_session' then
      delete from internal.verifications where session_id = p_effect ->> 'session_id';
      v_order := billing.order_of_session(p_effect);
    elsif p_effect ->> 'kind' in ('charge', 'refund', 'dispute') then
      v_order := billing.order_of_payment(p_effect);
    end if;
    return v_result || billing.still_due(v_order);
  end if;

  v_result := billing.dispatch(v_id, v_created, p_effect);
  if p_effect ->> 'kind' = 'checkout_session' then
    delete from internal.verifications where session_id = p_effect ->> 'session_id';
  end if;

  update public.stripe_events
     set outcome = v_result ->> 'outcome', detail = v_result ->> 'detail', processed_at = now()
   where id = v_id;
  return v_result;
end
$$;
