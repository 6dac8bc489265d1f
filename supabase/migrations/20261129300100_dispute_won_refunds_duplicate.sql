-- Duplicates and disputes (I3), found by the payments model and an outside review.
--
-- A duplicate under a chargeback: a user's Payment Link payment is charged back and arrives after
-- their checkout payment, so it is the duplicate and reads `disputed`. Stripe refuses to refund a
-- charged-back charge (`charge_disputed`); the money is with the cardholder. A lost dispute
-- leaves it so; a won one gives it back to the merchant and the duplicate reads `paid` again:
-- the dispute event now carries the refund that is due, as a payment event does.
--
-- Which payment stands is decided from the money as it is now, not from the owner recorded when a
-- payment arrived: of a user's `paid` orders for a product not being refunded, one stands (the
-- one that is nobody's duplicate, else the earliest paid) and every other one is due for a
-- refund. A `disputed` order holds no money for the merchant: a user whose first payment is
-- charged back and who pays again keeps the report through the second payment (a third is
-- refunded); if the chargeback is lost that payment stays, if it is won the first one stands
-- again and the dispute event carries the refund of the other. Two orders never name each
-- other as duplicates (a refund reversal makes the old owner the duplicate of the payment that
-- stood meanwhile, which then is nobody's duplicate).
--
-- Dispute and charge events take the purchase lock of their user and product, as clicks,
-- payments and refunds do: two chargebacks of one user decided at the same moment see each
-- other's outcome.
--
-- A refund the webhook made whose key Stripe replays after that refund failed (the replay shows
-- the old success) leaves the duplicate due: the webhook goes on to the next key.
--
-- A redelivered charge, refund or dispute event carries what its payment still needs too (a
-- duplicate's refund, closed orders' sessions to expire), as a redelivered checkout event
-- already did: a refund that failed for now is made by Stripe's next delivery.

-- I3: the refund this order still needs, or null: it is paid, not being refunded, and another of
-- the user's paid orders for the product stands (nobody's duplicate first, then the earliest).
create or replace function billing.refund_due(p_order public.orders) returns jsonb
language sql stable set search_path = ''
as $$
  select case when p_order.status = 'paid' and p_order.refund_id is null
      and p_order.stripe_payment_intent_id is not null
      and p_order.id <> (select k.id from public.orders k
                         where k.user_id = p_order.user_id and k.product = p_order.product
                           and k.status = 'paid' and k.refund_id is null
                         order by k.duplicate_of is not null, k.paid_at, k.id
                         limit 1)
    then jsonb_build_object('order_id', p_order.id,
      'payment_intent_id', p_order.stripe_payment_intent_id,
      'amount', p_order.amount_total, 'currency', p_order.currency,
      'attempt', 1 + (select count(*) from public.refunds r
                      where r.payment_intent_id = p_order.stripe_payment_intent_id
                        and r.status in ('failed', 'canceled')))
  end
$$;

-- The order paid with the payment an effect names (by payment intent, or by its charge).
create or replace function billing.order_of_payment(p_effect jsonb) returns public.orders
language sql stable set search_path = ''
as $$
  select o.* from public.orders o
  where o.stripe_payment_intent_id = coalesce(p_effect ->> 'payment_intent_id',
    (select payment_intent_id from public.payments where charge_id = p_effect ->> 'charge_id'
     limit 1))
$$;

-- Two orders never name each other as duplicates: when an order becomes the duplicate of another
-- (a refund reversal makes the old owner the duplicate of the payment that stood meanwhile),
-- that other one is the purchase, and no longer a duplicate of it.
create or replace function billing.one_owner() returns trigger
language plpgsql set search_path = ''
as $$
begin
  update public.orders set duplicate_of = null, updated_at = now()
  where id = new.duplicate_of and duplicate_of = new.id;
  return null;
end
$$;

create trigger orders_one_owner after update of duplicate_of on public.orders
for each row when (new.duplicate_of is not null and new.duplicate_of is distinct from old.duplicate_of)
execute function billing.one_owner();

-- What a payment's order still needs done at Stripe, for the webhook's follow-up: the refunds due
-- among its user's orders for the product (its own as a duplicate, or another one's once it
-- stands again after a won dispute), the sessions of closed orders to expire.
create or replace function billing.still_due(p_order public.orders) returns jsonb
language sql stable set search_path = ''
as $$
  select case when p_order.id is null then '{}'::jsonb
    else jsonb_build_object('order_id', p_order.id,
      'refunds', (select coalesce(jsonb_agg(due), '[]'::jsonb) from (
          select billing.refund_due(o) due from public.orders o
          where o.user_id = p_order.user_id and o.product = p_order.product
        ) dues where due is not null),
      'expire_sessions', billing.expiries_due(p_order.user_id, p_order.product))
  end
$$;

-- A duplicate's refund made by the webhook, as before; the refund's status is the one recorded
-- (a failed or canceled one stays so), not the answer's: Stripe replays a key's first answer.
create or replace function public.record_duplicate_refund(p_order uuid, p_refund jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_order public.orders;
  v_status text;
begin
  select * into v_order from public.orders where id = p_order;
  if v_order.id is null or v_order.stripe_payment_intent_id is null then
    return jsonb_build_object('recorded', false);
  end if;
  -- Serialized with the events that decide which payment stands (and in their lock order).
  perform billing.lock_purchase(v_order.user_id, v_order.product);
  perform billing.record_refund(
    p_refund || jsonb_build_object('payment_intent_id', v_order.stripe_payment_intent_id),
    v_order.stripe_payment_intent_id);
  perform billing.refresh_payment(v_order.stripe_payment_intent_id);
  select status into v_status from public.refunds where id = p_refund ->> 'id';
  -- A refund that failed (at once, or since: a replayed key) leaves the duplicate due: the
  -- webhook tries the next key.
  if v_status in ('failed', 'canceled') then
    return jsonb_build_object('recorded', true, 'refund_due', true);
  end if;
  update public.orders set refund_id = p_refund ->> 'id', updated_at = now()
  where id = p_order and refund_id is null;
  insert into public.payment_audit (user_id, kind, order_id, amount, currency, reference)
  values (v_order.user_id, 'duplicate_refunded', v_order.id, (p_refund ->> 'amount')::bigint,
          p_refund ->> 'currency', p_refund ->> 'id')
  on conflict do nothing;
  v_order := billing.settle_order(p_order);
  perform billing.sync_entitlement(v_order.user_id, v_order.product);
  return jsonb_build_object('recorded', true, 'refund_due', false, 'order', billing.order_json(v_order));
end
$$;

-- The order a payment event is about: a checkout session's, or a charge's, refund's or dispute's.
create or replace function billing.order_of_effect(p_effect jsonb) returns public.orders
language plpgsql stable set search_path = ''
as $$
begin
  if p_effect ->> 'kind' = 'checkout_session' then
    return billing.order_of_session(p_effect);
  elsif p_effect ->> 'kind' in ('charge', 'refund', 'dispute') then
    return billing.order_of_payment(p_effect);
  end if;
  return null;
end
$$;

-- Which function applies an effect. Dispute and charge events take the purchase lock (refunds and
-- payments take it themselves). Every payment event also carries what its user's orders for the
-- product still need: a dispute won, a refund that failed or a payment can change which payment
-- stands, and the other one is then due. (Read in a statement of its own: the stable functions
-- see what the apply functions wrote only from the next statement on.)
create or replace function billing.dispatch(p_event_id text, p_created timestamptz, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_result jsonb;
  v_order public.orders;
begin
  if p_effect ->> 'kind' in ('dispute', 'charge') then
    v_order := billing.order_of_effect(p_effect);
    if v_order.id is not null then
      perform billing.lock_purchase(v_order.user_id, v_order.product);
    end if;
  end if;
  v_result := case p_effect ->> 'kind'
    when 'checkout_session' then billing.apply_checkout_session_confirmed(p_event_id, p_effect)
    when 'subscription' then billing.apply_subscription(p_event_id, p_created, p_effect)
    when 'invoice' then billing.apply_invoice_owned(p_event_id, p_created, p_effect)
    when 'charge' then billing.apply_charge(p_event_id, p_effect)
    when 'refund' then billing.apply_refund(p_event_id, p_effect)
    when 'dispute' then billing.apply_dispute(p_event_id, p_effect)
    else jsonb_build_object('outcome', 'ignored', 'detail', 'event type not handled')
  end;
  return v_result || billing.still_due(billing.order_of_effect(p_effect));
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
    end if;
    return v_result || billing.still_due(billing.order_of_effect(p_effect));
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

revoke all on all functions in schema billing from public, anon, authenticated;
grant execute on all functions in schema billing to service_role;

-- I2, I9: a session of ours completed with its payment still on its way (an async method) after
-- its order was closed because another payment was applied first. The money is in flight: the
-- order opens again (and reads processing once the event is applied), so a click answers
-- payment_processing, and its success counts (a duplicate is refunded, or it is the purchase if
-- the other payment was refunded meanwhile). Found by the payments model: the other payment was
-- refunded, and a click got a new session while this payment was still in flight.
create or replace function billing.reopen_in_flight(p_event_id text, p_effect jsonb) returns void
language plpgsql set search_path = ''
as $$
declare
  v_order public.orders;
begin
  if p_effect ->> 'transition' is distinct from 'completed'
     or p_effect ->> 'payment_status' is distinct from 'unpaid' then
    return;
  end if;
  v_order := billing.order_of_session(p_effect);
  if v_order.id is null or v_order.closed_reason is distinct from 'superseded'
     or v_order.stripe_checkout_session_id is distinct from p_effect ->> 'session_id' then
    return;
  end if;
  perform billing.lock_purchase(v_order.user_id, v_order.product);
  select * into v_order from public.orders where id = v_order.id for update;
  -- One open order per user and product: another payment in flight already answers clicks.
  if v_order.status <> 'expired' or exists (
      select 1 from public.orders where user_id = v_order.user_id
        and product = v_order.product and status = 'processing') then
    return;
  end if;
  perform billing.supersede_pending(p_event_id, v_order);
  update public.orders set status = 'pending', closed_reason = null,
    session_expire_pending = false, updated_at = now()
  where id = v_order.id;
end
$$;

create or replace function billing.apply_checkout_session_confirmed(p_event_id text, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
begin
  perform billing.confirm_expired(p_effect);
  perform billing.reopen_in_flight(p_event_id, p_effect);
  return billing.apply_checkout_session(p_event_id, p_effect);
end
$$;

revoke all on all functions in schema billing from public, anon, authenticated;
grant execute on all functions in schema billing to service_role;
