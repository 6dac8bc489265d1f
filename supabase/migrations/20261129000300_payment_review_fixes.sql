-- Payment integrity after an outside review: what Stripe really does that the first version did
-- not follow (docs/payments.md).
--   - Refunds are tracked one by one (`refunds`): a refund that fails or is canceled gives the
--     money, and the report, back; a refund still waiting for the customer (requires_action)
--     has moved no money yet.
--   - An inquiry (a dispute in `warning_*`) withdraws no money: the report stays. A dispute
--     suspends the report once Stripe withdraws the funds (a chargeback's `created`, or
--     `charge.dispute.funds_withdrawn` when an inquiry escalates).
--   - The expiry at Stripe of a superseded order's session is remembered until it is confirmed;
--     no new order opens for that user before it is (I1).
--   - A paid session being verified at Stripe (I5) counts as a payment in flight for clicks
--     (I2): `internal.verifications` holds it for the few hundred milliseconds that takes.
--   - The creation lease names its holder, so a caller that asks again with the same claim (a
--     repeated call after a lost connection) resumes its own lease.
--   - expires_at keeps a minute from Stripe's 24 h limit.

create table public.refunds (
  id text primary key,
  payment_intent_id text,
  charge_id text,
  amount bigint not null,
  currency text,
  -- pending, requires_action, succeeded, failed, canceled
  status text not null,
  reason text,
  updated_at timestamptz not null default now()
);
create index refunds_payment_intent on public.refunds (payment_intent_id);
alter table public.refunds enable row level security;
revoke all on public.refunds from anon, authenticated;
grant all on public.refunds to service_role;

-- The highest amount_refunded any charge event reported (it can include refunds that later fail).
alter table public.payments add column charge_amount_refunded bigint not null default 0;
update public.payments set charge_amount_refunded = amount_refunded;

alter table public.disputes add column funds_withdrawn boolean not null default false;
update public.disputes set funds_withdrawn = status not like 'warning%';

alter table public.orders
  add column session_expire_pending boolean not null default false,
  add column session_claimed_by uuid;

create table internal.verifications (
  session_id text primary key,
  user_id uuid not null,
  product text not null,
  until timestamptz not null
);
alter table internal.verifications enable row level security;
grant all on internal.verifications to service_role;

-- What the money of a payment intent is now: refunded so far (charges' reports, corrected by
-- refunds known to have failed; at least the refunds known to have succeeded) and whether that
-- is all of it. Callers hold the payment's row.
create or replace function billing.refresh_payment(p_pi text) returns public.payments
language plpgsql set search_path = ''
as $$
declare
  v_payment public.payments;
  v_ok bigint;
  v_failed bigint;
  v_refunded bigint;
begin
  select coalesce(sum(amount) filter (where status in ('succeeded', 'pending')), 0),
         coalesce(sum(amount) filter (where status in ('failed', 'canceled')), 0)
    into v_ok, v_failed
  from public.refunds where payment_intent_id = p_pi;
  select * into v_payment from public.payments where payment_intent_id = p_pi;
  if v_payment.payment_intent_id is null then
    return v_payment;
  end if;
  v_refunded := greatest(v_payment.charge_amount_refunded - v_failed, v_ok, 0);
  update public.payments set
    amount_refunded = v_refunded,
    fully_refunded = coalesce(v_payment.amount, 0) > 0 and v_refunded >= v_payment.amount,
    updated_at = now()
  where payment_intent_id = p_pi
  returning * into v_payment;
  return v_payment;
end
$$;

-- I4: the order's status from its payment: refunded (all of it, or a dispute lost), disputed
-- (a dispute whose funds Stripe withdrew is open), else paid.
create or replace function billing.settle_order(p_order uuid) returns public.orders
language plpgsql set search_path = ''
as $$
declare
  v_order public.orders;
  v_payment public.payments;
  v_lost boolean;
  v_open boolean;
  v_status text;
begin
  select * into v_order from public.orders where id = p_order for update;
  if v_order.id is null or v_order.stripe_payment_intent_id is null
     or v_order.status not in ('paid', 'disputed', 'refunded') then
    return v_order;
  end if;
  select * into v_payment from public.payments
  where payment_intent_id = v_order.stripe_payment_intent_id;
  select coalesce(bool_or(d.status = 'lost'), false),
         coalesce(bool_or(not d.closed and d.funds_withdrawn), false)
    into v_lost, v_open
  from public.disputes d
  where d.payment_intent_id = v_order.stripe_payment_intent_id
     or (v_payment.charge_id is not null and d.charge_id = v_payment.charge_id);
  v_status := case
    when coalesce(v_payment.fully_refunded, false) or v_lost then 'refunded'
    when v_open then 'disputed'
    else 'paid'
  end;
  if v_status <> v_order.status
     or coalesce(v_payment.amount_refunded, 0) <> v_order.amount_refunded then
    update public.orders set status = v_status,
      amount_refunded = coalesce(v_payment.amount_refunded, 0), updated_at = now()
    where id = p_order
    returning * into v_order;
  end if;
  return v_order;
end
$$;

-- Records a refund object (from a charge's refund list, a refund event, or our own refund call)
-- under the payment's row; returns the payment intent it belongs to.
create or replace function billing.record_refund(p_refund jsonb, p_pi text) returns text
language plpgsql set search_path = ''
as $$
declare
  v_pi text := coalesce(p_pi, p_refund ->> 'payment_intent_id',
    (select payment_intent_id from public.payments where charge_id = p_refund ->> 'charge_id' limit 1));
begin
  if p_refund ->> 'id' is null or v_pi is null then
    return v_pi;
  end if;
  insert into public.payments as p (payment_intent_id, charge_id, currency)
  values (v_pi, p_refund ->> 'charge_id', p_refund ->> 'currency')
  on conflict (payment_intent_id) do update
    set charge_id = coalesce(p.charge_id, excluded.charge_id), updated_at = now();
  insert into public.refunds as r (id, payment_intent_id, charge_id, amount, currency, status, reason)
  values (p_refund ->> 'id', v_pi, p_refund ->> 'charge_id',
          coalesce((p_refund ->> 'amount')::bigint, 0), p_refund ->> 'currency',
          coalesce(p_refund ->> 'status', 'succeeded'), p_refund ->> 'reason')
  on conflict (id) do update set
    payment_intent_id = coalesce(r.payment_intent_id, excluded.payment_intent_id),
    charge_id = coalesce(r.charge_id, excluded.charge_id),
    -- failed and canceled are final; otherwise the newer report wins
    status = case when r.status in ('failed', 'canceled') then r.status else excluded.status end,
    updated_at = now();
  return v_pi;
end
$$;

-- charge.refunded: the charge's cumulative amount_refunded (the highest seen) and the refunds it
-- lists.
create or replace function billing.apply_charge(p_event_id text, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_pi text := p_effect ->> 'payment_intent_id';
  v_refund jsonb;
  v_payment public.payments;
  v_before text;
  v_order public.orders;
begin
  if v_pi is null then
    v_pi := (select payment_intent_id from public.payments where charge_id = p_effect ->> 'charge_id' limit 1);
  end if;
  if v_pi is null then
    return jsonb_build_object('outcome', 'unmatched',
      'detail', 'charge without a payment intent we know');
  end if;
  insert into public.payments as p (payment_intent_id, charge_id, amount, charge_amount_refunded, currency)
  values (v_pi, p_effect ->> 'charge_id', (p_effect ->> 'amount')::bigint,
          coalesce((p_effect ->> 'amount_refunded')::bigint, 0), p_effect ->> 'currency')
  on conflict (payment_intent_id) do update set
    charge_id = coalesce(excluded.charge_id, p.charge_id),
    amount = coalesce(excluded.amount, p.amount),
    charge_amount_refunded = greatest(p.charge_amount_refunded, excluded.charge_amount_refunded),
    currency = coalesce(excluded.currency, p.currency),
    updated_at = now();
  for v_refund in select * from jsonb_array_elements(coalesce(p_effect -> 'refunds', '[]')) loop
    perform billing.record_refund(v_refund || jsonb_build_object('charge_id', p_effect ->> 'charge_id'), v_pi);
  end loop;
  v_payment := billing.refresh_payment(v_pi);

  select status into v_before from public.orders where stripe_payment_intent_id = v_pi;
  v_order := billing.settle_payment(v_pi);
  if v_order.id is null then
    return jsonb_build_object('outcome', 'ignored', 'refunded', true,
      'detail', 'no order paid with this payment intent (yet): kept for when it is');
  end if;
  insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
  values (p_event_id, v_order.user_id,
          case when v_payment.fully_refunded then 'order_refunded' else 'order_partially_refunded' end,
          v_order.id, v_payment.amount_refunded, v_payment.currency, v_payment.charge_id);
  return jsonb_build_object('outcome', 'applied', 'refunded', true,
    'detail', case when v_payment.fully_refunded then 'order refunded' else 'partial refund, order kept' end
      || ' (was ' || coalesce(v_before, 'unknown') || ', now ' || v_order.status || ')',
    'order_id', v_order.id, 'user_id', v_order.user_id);
end
$$;

-- I3: the refund a duplicate still needs, with the attempt to make it under (one more than the
-- refunds of its payment that failed or were canceled: their idempotency keys are spent).
create or replace function billing.refund_due(p_order public.orders) returns jsonb
language sql stable set search_path = ''
as $$
  select case when p_order.duplicate_of is not null and p_order.refund_id is null
      and p_order.status = 'paid' and p_order.stripe_payment_intent_id is not null
      and exists (select 1 from public.orders o
                  where o.id = p_order.duplicate_of and o.status in ('paid', 'disputed'))
    then jsonb_build_object('order_id', p_order.id,
      'payment_intent_id', p_order.stripe_payment_intent_id,
      'amount', p_order.amount_total, 'currency', p_order.currency,
      'attempt', 1 + (select count(*) from public.refunds r
                      where r.payment_intent_id = p_order.stripe_payment_intent_id
                        and r.status in ('failed', 'canceled')))
  end
$$;

-- charge.refund.updated / refund.updated / refund.failed: a refund changed. One that failed or
-- was canceled gives the money back: the order reads paid again; if it was a duplicate's
-- refund, the duplicate is due again; if the user bought again meanwhile, this payment is now
-- the duplicate (I3).
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
begin
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
  if v_before is distinct from v_order.status then
    insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
    values (p_event_id, v_order.user_id,
            case when v_order.status = 'refunded' then 'order_refunded' else 'refund_reversed' end,
            v_order.id, v_payment.amount_refunded, v_payment.currency, p_effect ->> 'id');
  end if;
  return jsonb_build_object('outcome', 'applied', 'refunded', p_effect ->> 'status' in ('succeeded', 'pending'),
    'detail', 'refund ' || coalesce(p_effect ->> 'status', 'unknown') || ', order ' || v_order.status,
    'order_id', v_order.id, 'user_id', v_order.user_id,
    'duplicate_payment', v_owner is not null, 'refund', billing.refund_due(v_order));
end
$$;

-- charge.dispute.created / funds_withdrawn / closed. An inquiry (warning_*) withdraws nothing;
-- a chargeback withdraws the amount when it opens.
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
  return jsonb_build_object('outcome', 'applied', 'dispute', v_dispute.status,
    'funds_withdrawn', v_dispute.funds_withdrawn and not v_dispute.closed,
    'detail', v_kind || ', order ' || v_order.status,
    'order_id', v_order.id, 'user_id', v_order.user_id);
end
$$;

-- A refund of a duplicate made by the webhook (`p_refund`: the refund object as Stripe answered
-- it). The refund is recorded with its status: only a succeeded one has moved money (pending ones
-- count as on their way); `charge.refunded` and refund events settle the rest.
drop function public.record_duplicate_refund(uuid, text, bigint, text, text);
create function public.record_duplicate_refund(p_order uuid, p_refund jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_order public.orders;
begin
  select * into v_order from public.orders where id = p_order;
  if v_order.id is null or v_order.stripe_payment_intent_id is null then
    return jsonb_build_object('recorded', false);
  end if;
  perform billing.record_refund(
    p_refund || jsonb_build_object('payment_intent_id', v_order.stripe_payment_intent_id),
    v_order.stripe_payment_intent_id);
  perform billing.refresh_payment(v_order.stripe_payment_intent_id);
  -- A refund that failed at once leaves the duplicate due (the webhook tries the next key).
  if p_refund ->> 'status' in ('failed', 'canceled') then
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

-- The sessions at Stripe of the user's superseded orders that are not yet known to be expired.
create or replace function billing.expiries_due(p_user uuid, p_product text) returns jsonb
language sql stable set search_path = ''
as $$
  select coalesce(jsonb_agg(stripe_checkout_session_id), '[]'::jsonb)
  from public.orders
  where user_id = p_user and product = p_product and session_expire_pending
    and stripe_checkout_session_id is not null
$$;

-- Stripe confirmed these sessions cannot be paid any more (expired now, or found complete or
-- expired): forget the expiries they were waiting for.
create or replace function public.checkout_sessions_expired(p_session_ids text[])
returns jsonb
language sql set search_path = ''
as $$
  with done as (
    update public.orders set session_expire_pending = false, updated_at = now()
    where stripe_checkout_session_id = any (p_session_ids) and session_expire_pending
    returning id
  )
  select jsonb_build_object('confirmed', (select count(*) from done))
$$;

-- Pays an order (locked by the caller): as before, and the sessions of the orders it closes are
-- remembered until their expiry at Stripe is confirmed.
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
  with closed as (
    update public.orders set status = 'expired', closed_reason = 'superseded',
      session_claimed_until = null,
      session_expire_pending = stripe_checkout_session_id is not null, updated_at = now()
    where user_id = v_order.user_id and product = v_order.product and status = 'pending'
      and id <> v_order.id
    returning id
  )
  insert into public.payment_audit (event_id, user_id, kind, order_id)
  select p_event_id, v_order.user_id, 'order_superseded', id from closed;
  v_expire := billing.expiries_due(v_order.user_id, v_order.product);

  v_order := billing.settle_order(v_order.id);
  perform billing.sync_entitlement(v_order.user_id, v_order.product);

  v_delay_ms := (extract(epoch from (v_order.paid_at - v_order.session_created_at)) * 1000)::bigint;
  return jsonb_build_object('outcome', 'applied', 'detail', 'order ' || v_order.status,
    'order_id', v_order.id, 'user_id', v_order.user_id, 'sync_delay_ms', v_delay_ms,
    'duplicate_payment', v_owner is not null, 'refund', billing.refund_due(v_order),
    'expire_sessions', v_expire);
end
$$;

-- The first look at a paid session without an order (I5): nothing about the event is recorded
-- yet, but clicks of its user see a payment in flight while the webhook asks Stripe (I2).
create or replace function billing.begin_verification(p_effect jsonb) returns void
language plpgsql set search_path = ''
as $$
declare
  v_user uuid := billing.user_if_known(p_effect ->> 'user_id');
begin
  if v_user is null then
    return;
  end if;
  insert into internal.verifications (session_id, user_id, product, until)
  values (p_effect ->> 'session_id', v_user, coalesce(p_effect ->> 'product', 'full_report'),
          now() + interval '30 seconds')
  on conflict (session_id) do update set until = excluded.until;
end
$$;

-- The entry point: as before, with refund events, and the verification marker (I2 while I5).
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
    -- A redelivery retries what the first delivery could not finish: a duplicate's refund, the
    -- expiry of closed orders' sessions. A delivery that raced the first one may have marked a
    -- verification after the first one cleared it: clear it again.
    if p_effect ->> 'kind' = 'checkout_session' then
      delete from internal.verifications where session_id = p_effect ->> 'session_id';
      v_order := billing.order_of_session(p_effect);
      if v_order.id is not null then
        v_result := v_result || jsonb_build_object('order_id', v_order.id,
          'refund', billing.refund_due(v_order),
          'expire_sessions', billing.expiries_due(v_order.user_id, v_order.product));
      end if;
    end if;
    return v_result;
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

-- Start or resume checkout: as before, and
--   processing also while a paid session of the user's is being verified at Stripe (I2);
--   expire_first {sessions} before a new order when superseded sessions are not yet known to be
--     expired (I1): the caller expires them, confirms (checkout_sessions_expired) and asks again;
--   the lease names its holder (p_claim): the same claim resumes it.
drop function public.checkout_begin(uuid, text, text, integer, integer, integer, integer);
create function public.checkout_begin(
  p_user uuid, p_product text, p_email text, p_claim uuid, p_limit integer, p_window_s integer,
  p_lease_s integer, p_session_ttl_s integer)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_retry integer;
  v_order public.orders;
  v_expire jsonb;
begin
  v_retry := internal.rate_limit_hit(p_user, 'checkout', p_limit, p_window_s);
  if v_retry > 0 then
    return jsonb_build_object('state', 'rate_limited', 'retry_after', v_retry);
  end if;
  if not exists (select 1 from auth.users where id = p_user) then
    return jsonb_build_object('state', 'unknown_user');
  end if;

  perform billing.lock_purchase(p_user, p_product);
  select * into v_order from public.orders
  where user_id = p_user and product = p_product and status in ('paid', 'disputed')
  order by (status = 'paid') desc, paid_at
  limit 1;
  if v_order.id is not null then
    return jsonb_build_object('state', case when v_order.status = 'paid' then 'already_paid' else 'disputed' end,
      'order', billing.order_json(v_order));
  end if;

  select * into v_order from public.orders
  where user_id = p_user and product = p_product and status in ('pending', 'processing')
  for update;
  if v_order.id is null then
    if exists (select 1 from internal.verifications
               where user_id = p_user and product = p_product and until > now()) then
      return jsonb_build_object('state', 'verifying');
    end if;
    v_expire := billing.expiries_due(p_user, p_product);
    if jsonb_array_length(v_expire) > 0 then
      return jsonb_build_object('state', 'expire_first', 'sessions', v_expire);
    end if;
    insert into public.orders (user_id, product, customer_email, checkout_expires_at)
    values (p_user, p_product, p_email,
            -- a minute inside Stripe's 24 hours, whatever the clocks say
            now() + make_interval(secs => least(p_session_ttl_s, 86340)))
    returning * into v_order;
  end if;

  if v_order.status = 'processing' then
    return jsonb_build_object('state', 'processing', 'order', billing.order_json(v_order));
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

-- checkout.session.expired also confirms an expiry the webhook or checkout asked for.
create or replace function billing.confirm_expired(p_effect jsonb) returns void
language sql set search_path = ''
as $$
  update public.orders set session_expire_pending = false
  where stripe_checkout_session_id = p_effect ->> 'session_id' and session_expire_pending
    and p_effect ->> 'transition' = 'expired'
$$;

create or replace function public.checkout_reconcile(p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_result jsonb;
  v_order public.orders;
begin
  if billing.session_needs_verification(p_effect) then
    return jsonb_build_object('outcome', 'unmatched', 'detail', 'no order for this session');
  end if;
  perform billing.confirm_expired(p_effect);
  v_result := billing.apply_checkout_session(null, p_effect);
  v_order := billing.order_of_session(p_effect);
  return v_result || jsonb_build_object('order', billing.order_json(v_order));
end
$$;

-- checkout.session.* through the webhook: confirm expiries, then as before.
create or replace function billing.apply_checkout_session_confirmed(p_event_id text, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
begin
  perform billing.confirm_expired(p_effect);
  return billing.apply_checkout_session(p_event_id, p_effect);
end
$$;

-- Which function applies an effect.
create or replace function billing.dispatch(p_event_id text, p_created timestamptz, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
begin
  return case p_effect ->> 'kind'
    when 'checkout_session' then billing.apply_checkout_session_confirmed(p_event_id, p_effect)
    when 'subscription' then billing.apply_subscription(p_event_id, p_created, p_effect)
    when 'invoice' then billing.apply_invoice_owned(p_event_id, p_created, p_effect)
    when 'charge' then billing.apply_charge(p_event_id, p_effect)
    when 'refund' then billing.apply_refund(p_event_id, p_effect)
    when 'dispute' then billing.apply_dispute(p_event_id, p_effect)
    else jsonb_build_object('outcome', 'ignored', 'detail', 'event type not handled')
  end;
end
$$;

-- The audit knows refunds that were reversed (failed or canceled after charge.refunded).
alter table public.payment_audit drop constraint payment_audit_kind_check;
alter table public.payment_audit add constraint payment_audit_kind_check check (kind in (
  'order_paid', 'order_processing', 'order_payment_failed', 'order_expired',
  'duplicate_payment', 'invoice_paid', 'invoice_payment_failed',
  'order_refunded', 'order_partially_refunded', 'dispute_opened', 'dispute_won', 'dispute_lost',
  'duplicate_refunded', 'order_superseded', 'order_retired', 'session_unverified',
  'refund_reversed'
));

-- Payment health: a duplicate counts as refunded once its money is back (the order reads
-- refunded), not when the refund was asked for.
create or replace function public.payment_health(p_days integer default 7)
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
  duplicates as (
    select o.status, o.refund_id from audit a join public.orders o on o.id = a.order_id
    where a.kind = 'duplicate_payment'
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
    'duplicate_payments', (select count(*) from duplicates),
    'duplicate_refunds', (select count(*) from duplicates where refund_id is not null),
    'duplicates_unrefunded', (select count(*) from duplicates where status <> 'refunded'),
    'unverified_sessions', (select count(*) from audit where kind = 'session_unverified')
  )
$$;

revoke all on all functions in schema billing from public, anon, authenticated;
grant execute on all functions in schema billing to service_role;
revoke all on function
  public.checkout_begin(uuid, text, text, uuid, integer, integer, integer, integer),
  public.record_duplicate_refund(uuid, jsonb),
  public.checkout_sessions_expired(text[])
from public, anon, authenticated;
grant execute on function
  public.checkout_begin(uuid, text, text, uuid, integer, integer, integer, integer),
  public.record_duplicate_refund(uuid, jsonb),
  public.checkout_sessions_expired(text[])
to service_role;
