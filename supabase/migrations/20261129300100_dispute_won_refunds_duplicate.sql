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

-- A dispute event also carries what its payment's order still needs: a duplicate whose dispute
-- was won holds the merchant's money again, and its refund is due. (Read in a statement of its
-- own: the stable functions see what apply_dispute wrote only from the next statement on.)
create or replace function billing.dispatch(p_event_id text, p_created timestamptz, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_result jsonb;
begin
  if p_effect ->> 'kind' = 'dispute' then
    v_result := billing.apply_dispute(p_event_id, p_effect);
    return v_result || billing.still_due(billing.order_of_payment(p_effect));
  end if;
  return case p_effect ->> 'kind'
    when 'checkout_session' then billing.apply_checkout_session_confirmed(p_event_id, p_effect)
    when 'subscription' then billing.apply_subscription(p_event_id, p_created, p_effect)
    when 'invoice' then billing.apply_invoice_owned(p_event_id, p_created, p_effect)
    when 'charge' then billing.apply_charge(p_event_id, p_effect)
    when 'refund' then billing.apply_refund(p_event_id, p_effect)
    else jsonb_build_object('outcome', 'ignored', 'detail', 'event type not handled')
  end;
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
