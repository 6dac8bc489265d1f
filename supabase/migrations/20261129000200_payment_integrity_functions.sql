-- Payment integrity, functions half. Each invariant of docs/payments.md is enforced here:
--   I1 one payable session      checkout_begin never retires an order; attach only to an open
--                               order; a payment closes the user's other open orders and names
--                               their sessions for the caller to expire at Stripe.
--   I2 paid means paid          checkout_begin and every payment of a user and product take
--                               billing.lock_purchase, so a click waits for a payment in flight.
--   I3 exactly once             a payment for a product the user owns is marked duplicate_of and
--                               handed to the caller to refund (billing.refund_due).
--   I4 entitlement follows money billing.settle_order + billing.sync_entitlement after every
--                               payment, refund and dispute, whatever order they arrive in.
--   I5 verified fulfilment      a paid session without an order needs the caller's verification.
--   I6 newest state wins        (created, rank) ordering of subscription events.
--   I7 owners applied backwards billing.link_customer.
--   I8 no 5xx from races        upserts and `on conflict` wherever two events can meet.
--
-- Lock order, the same in every function, so that two writers never wait on each other in a
-- cycle: the purchase lock (user, product) -> the customer lock -> the payment's row in
-- `payments` (it stands for the payment intent: a payment, its refunds and its disputes meet
-- there) -> order rows -> the entitlement row.

-- I2: serializes everything that decides whether a user owns a product. Transaction-scoped, so
-- it is safe behind a transaction pooler; taken before any order row lock, always.
create or replace function billing.lock_purchase(p_user uuid, p_product text) returns void
language sql set search_path = ''
as $$
  select pg_advisory_xact_lock(hashtextextended('purchase/' || p_user::text || '/' || p_product, 0))
$$;

-- I7: serializes what reads or writes a customer's owner: mapping the customer to a user, and
-- storing its subscriptions and invoices. Without it an invoice stored while its customer is
-- being mapped would keep no owner (each transaction misses the other's uncommitted row).
create or replace function billing.lock_customer(p_customer text) returns void
language sql set search_path = ''
as $$
  select pg_advisory_xact_lock(hashtextextended('customer/' || coalesce(p_customer, ''), 0))
$$;

-- I4: an order that took money is paid, refunded (fully refunded, or a dispute lost) or disputed
-- (a dispute open), from what Stripe reported about its payment intent.
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
  select coalesce(bool_or(d.status = 'lost'), false), coalesce(bool_or(not d.closed), false)
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

-- I4: the product is unlocked exactly while one of the user's orders for it stands paid. The
-- entitlement row is locked before the orders are read, so of two transactions that change the
-- user's orders at once, the one that commits last computes from what the other committed.
create or replace function billing.sync_entitlement(p_user uuid, p_product text) returns boolean
language plpgsql set search_path = ''
as $$
declare
  v_source uuid;
begin
  insert into public.entitlements (user_id, product, active, source)
  values (p_user, p_product, false, 'none')
  on conflict (user_id, product) do nothing;
  perform 1 from public.entitlements where user_id = p_user and product = p_product for update;
  select id into v_source from public.orders
  where user_id = p_user and product = p_product and status = 'paid'
  order by paid_at nulls last, id
  limit 1;
  update public.entitlements
    set active = v_source is not null, source = coalesce(v_source::text, source), updated_at = now()
  where user_id = p_user and product = p_product
    and (active is distinct from (v_source is not null)
         or (v_source is not null and source is distinct from v_source::text));
  return v_source is not null;
end
$$;

-- I3: the refund this order still needs, or null: a duplicate payment, not refunded yet, while
-- the order it duplicates still stands (if that one was refunded meanwhile, this one is the
-- purchase and is kept).
create or replace function billing.refund_due(p_order public.orders) returns jsonb
language sql stable set search_path = ''
as $$
  select case when p_order.duplicate_of is not null and p_order.refund_id is null
      and p_order.status = 'paid' and p_order.stripe_payment_intent_id is not null
      and exists (select 1 from public.orders o
                  where o.id = p_order.duplicate_of and o.status in ('paid', 'disputed'))
    then jsonb_build_object('order_id', p_order.id,
      'payment_intent_id', p_order.stripe_payment_intent_id,
      'amount', p_order.amount_total, 'currency', p_order.currency)
  end
$$;

-- I7: a customer's user is known from now on; subscriptions and invoices that arrived before
-- get their owner, and the subscription entitlement follows their status, in this transaction.
create or replace function billing.link_customer(p_customer text, p_user uuid) returns uuid
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
  -- The first mapping stands: a customer belongs to one user.
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

-- The subscription entitlement: active while any subscription of the user is live (row locked
-- first, as in billing.sync_entitlement).
create or replace function billing.sync_subscription_entitlement(p_user uuid) returns void
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
  order by last_event_created desc, id limit 1;
  select id into v_any from public.subscriptions
  where user_id = p_user order by last_event_created desc, id limit 1;
  update public.entitlements
    set active = v_live is not null, source = coalesce(v_live, v_any, source), updated_at = now()
  where user_id = p_user and product = 'subscription'
    and (active is distinct from (v_live is not null)
         or source is distinct from coalesce(v_live, v_any, source));
end
$$;

-- The order a checkout session event is about: ours by session id, else by our own metadata
-- (a session created for an order but not attached yet). Null for sessions we did not create.
create or replace function billing.order_of_session(p_effect jsonb) returns public.orders
language plpgsql stable set search_path = ''
as $$
declare
  v_order public.orders;
  v_user uuid := billing.user_if_known(p_effect ->> 'user_id');
begin
  select * into v_order from public.orders
  where stripe_checkout_session_id = p_effect ->> 'session_id';
  if v_order.id is null and p_effect ->> 'order_id'
       ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
    select * into v_order from public.orders
    where id = (p_effect ->> 'order_id')::uuid
      and (v_user is null or user_id = v_user)
      and (stripe_checkout_session_id is null
           or stripe_checkout_session_id = p_effect ->> 'session_id');
  end if;
  return v_order;
end
$$;

-- True when a checkout session event pays for a session that matches no order of ours: the
-- caller must read its line items at Stripe first (I5).
create or replace function billing.session_needs_verification(p_effect jsonb) returns boolean
language sql stable set search_path = ''
as $$
  select p_effect ->> 'kind' = 'checkout_session'
    and p_effect ->> 'mode' = 'payment'
    and p_effect -> 'verification' is null
    and (p_effect ->> 'transition' = 'async_payment_succeeded'
         or (p_effect ->> 'transition' = 'completed'
             and p_effect ->> 'payment_status' in ('paid', 'no_payment_required')))
    and (billing.order_of_session(p_effect)).id is null
$$;

-- A payment intent to store on an order: one payment intent pays one order (a unique index), so
-- one already stored on another order is not stored again (I8: never a unique violation).
create or replace function billing.payment_intent_for(p_order uuid, p_pi text) returns text
language sql stable set search_path = ''
as $$
  select case when p_pi is not null and not exists (
      select 1 from public.orders where stripe_payment_intent_id = p_pi and id <> p_order)
    then p_pi end
$$;

-- Pays an order (locked by the caller): I3 duplicates, I1 the user's other open orders closed,
-- I4 settled against refunds and disputes already reported, entitlement synced.
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
  -- The payment's row first (lock order): a refund or dispute of this payment being applied
  -- right now commits before we read it in billing.settle_order, or waits for us.
  if v_pi is not null then
    insert into public.payments as p (payment_intent_id, amount, currency)
    values (v_pi, (p_effect ->> 'amount_total')::bigint, p_effect ->> 'currency')
    on conflict (payment_intent_id) do update
      set amount = coalesce(p.amount, excluded.amount),
          currency = coalesce(p.currency, excluded.currency), updated_at = now();
  end if;
  select * into v_order from public.orders where id = p_order for update;
  if v_order.paid_at is not null then
    return jsonb_build_object('outcome', 'applied', 'detail', 'order already paid',
      'order_id', v_order.id, 'user_id', v_order.user_id, 'refund', billing.refund_due(v_order));
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

  -- The user owns the product now: their other pending orders close, and the caller expires
  -- those sessions at Stripe. (An order in `processing` has money in flight: it stays.)
  with closed as (
    update public.orders set status = 'expired', closed_reason = 'superseded',
      session_claimed_until = null, updated_at = now()
    where user_id = v_order.user_id and product = v_order.product and status = 'pending'
      and id <> v_order.id
    returning id, stripe_checkout_session_id
  ), audited as (
    insert into public.payment_audit (event_id, user_id, kind, order_id)
    select p_event_id, v_order.user_id, 'order_superseded', id from closed
  )
  select coalesce(jsonb_agg(stripe_checkout_session_id)
                  filter (where stripe_checkout_session_id is not null), '[]'::jsonb)
    into v_expire from closed;

  v_order := billing.settle_order(v_order.id);
  perform billing.sync_entitlement(v_order.user_id, v_order.product);

  v_delay_ms := (extract(epoch from (v_order.paid_at - v_order.session_created_at)) * 1000)::bigint;
  return jsonb_build_object('outcome', 'applied', 'detail', 'order ' || v_order.status,
    'order_id', v_order.id, 'user_id', v_order.user_id, 'sync_delay_ms', v_delay_ms,
    'duplicate_payment', v_owner is not null, 'refund', billing.refund_due(v_order),
    'expire_sessions', v_expire);
end
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
  v_verification text := p_effect -> 'verification' ->> 'status';
  v_audit_kind text;
begin
  if p_effect ->> 'mode' is distinct from 'payment' then
    perform billing.link_customer(v_customer, v_user);
    return jsonb_build_object(
      'outcome', case when v_user is not null and v_customer is not null then 'applied' else 'ignored' end,
      'detail', 'mode ' || coalesce(p_effect ->> 'mode', 'unknown') || ' is tracked by subscription events');
  end if;

  v_pays := v_transition = 'async_payment_succeeded'
    or (v_transition = 'completed' and p_effect ->> 'payment_status' in ('paid', 'no_payment_required'));
  v_order := billing.order_of_session(p_effect);

  if v_order.id is null then
    if not v_pays then
      return jsonb_build_object('outcome', 'unmatched',
        'detail', 'no order for this session');
    end if;
    -- I5: a paid session we did not create an order for (a Payment Link, the old app) is granted
    -- only when the caller found our product in its line items at Stripe.
    if v_verification is distinct from 'verified' or v_user is null then
      insert into public.payment_audit (event_id, user_id, kind, amount, currency, reference)
      values (p_event_id, v_user, 'session_unverified', (p_effect ->> 'amount_total')::bigint,
              p_effect ->> 'currency', v_session);
      return jsonb_build_object('outcome', 'unmatched', 'unverified', true,
        'detail', 'paid session without an order, not granted: '
          || case when v_user is null then 'no known user in it'
                  else coalesce(p_effect -> 'verification' ->> 'detail', 'not verified') end);
    end if;
    perform billing.lock_purchase(v_user, v_product);
    insert into public.orders (user_id, product, status, stripe_checkout_session_id)
    values (v_user, v_product, 'paid', v_session)
    on conflict (stripe_checkout_session_id) do nothing;
    select * into v_order from public.orders where stripe_checkout_session_id = v_session;
  else
    perform billing.lock_purchase(v_order.user_id, v_order.product);
  end if;

  perform billing.link_customer(v_customer, v_order.user_id);
  if v_pays then
    return billing.pay_order(p_event_id, v_order.id, p_effect);
  end if;

  -- The remaining transitions only move an open order forward, and only for its current session.
  select * into v_order from public.orders where id = v_order.id for update;
  if v_order.stripe_checkout_session_id is distinct from v_session
     and v_order.stripe_checkout_session_id is not null then
    return jsonb_build_object('outcome', 'stale', 'detail', 'order has moved to another session',
      'order_id', v_order.id);
  end if;

  if v_transition = 'completed' and v_order.status = 'pending' then
    update public.orders set status = 'processing', updated_at = now(), session_claimed_until = null,
      stripe_checkout_session_id = coalesce(stripe_checkout_session_id, v_session),
      stripe_payment_intent_id = coalesce(stripe_payment_intent_id,
        billing.payment_intent_for(v_order.id, p_effect ->> 'payment_intent_id'))
    where id = v_order.id;
    v_audit_kind := 'order_processing';
  elsif v_transition = 'async_payment_failed' and v_order.status in ('pending', 'processing') then
    update public.orders set status = 'failed', updated_at = now(), session_claimed_until = null
    where id = v_order.id;
    v_audit_kind := 'order_payment_failed';
  elsif v_transition = 'expired' and v_order.status = 'pending' then
    update public.orders set status = 'expired', closed_reason = 'session_expired',
      updated_at = now(), session_claimed_until = null
    where id = v_order.id;
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

-- The order paid with a payment intent, settled (I4). Callers hold the payment's row, so an
-- order being paid with it right now is visible here once we have that row.
create or replace function billing.settle_payment(p_payment_intent text)
returns public.orders
language plpgsql set search_path = ''
as $$
declare
  v_order public.orders;
begin
  select * into v_order from public.orders where stripe_payment_intent_id = p_payment_intent;
  if v_order.id is null then
    return v_order;
  end if;
  v_order := billing.settle_order(v_order.id);
  perform billing.sync_entitlement(v_order.user_id, v_order.product);
  return v_order;
end
$$;

-- charge.refunded: full or partial, cumulative on the charge (amount_refunded only grows).
create or replace function billing.apply_charge(p_event_id text, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_pi text := p_effect ->> 'payment_intent_id';
  v_payment public.payments;
  v_before text;
  v_order public.orders;
begin
  if v_pi is null then
    return jsonb_build_object('outcome', 'ignored', 'detail', 'charge without a payment intent');
  end if;
  insert into public.payments as p (payment_intent_id, charge_id, amount, amount_refunded, currency, fully_refunded)
  values (v_pi, p_effect ->> 'charge_id', (p_effect ->> 'amount')::bigint,
          coalesce((p_effect ->> 'amount_refunded')::bigint, 0), p_effect ->> 'currency',
          coalesce((p_effect ->> 'refunded')::boolean, false))
  on conflict (payment_intent_id) do update set
    charge_id = coalesce(excluded.charge_id, p.charge_id),
    amount = coalesce(excluded.amount, p.amount),
    amount_refunded = greatest(p.amount_refunded, excluded.amount_refunded),
    currency = coalesce(excluded.currency, p.currency),
    fully_refunded = p.fully_refunded or excluded.fully_refunded,
    updated_at = now()
  returning * into v_payment;
  -- Stripe sets `refunded` only when fully refunded; the amounts say the same.
  if not v_payment.fully_refunded and v_payment.amount > 0
     and v_payment.amount_refunded >= v_payment.amount then
    update public.payments set fully_refunded = true where payment_intent_id = v_pi
    returning * into v_payment;
  end if;

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

-- charge.dispute.created / closed. Stripe withdraws the money when a dispute opens: the product
-- is suspended; won (or an inquiry closed) restores it, lost keeps it revoked.
create or replace function billing.apply_dispute(p_event_id text, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_dispute public.disputes;
  v_closed boolean := p_effect ->> 'transition' = 'closed'
    or p_effect ->> 'status' in ('won', 'lost', 'warning_closed');
  v_pi text;
  v_order public.orders;
  v_kind text;
begin
  insert into public.disputes as d (id, payment_intent_id, charge_id, status, reason, amount,
                                    currency, closed, closed_at)
  values (p_effect ->> 'id', p_effect ->> 'payment_intent_id', p_effect ->> 'charge_id',
          p_effect ->> 'status', p_effect ->> 'reason', (p_effect ->> 'amount')::bigint,
          p_effect ->> 'currency', v_closed, case when v_closed then now() end)
  on conflict (id) do update set
    payment_intent_id = coalesce(d.payment_intent_id, excluded.payment_intent_id),
    charge_id = coalesce(d.charge_id, excluded.charge_id),
    status = case when d.closed and not excluded.closed then d.status else excluded.status end,
    closed = d.closed or excluded.closed,
    closed_at = coalesce(d.closed_at, excluded.closed_at),
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
    'detail', v_kind || ', order ' || v_order.status,
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
  v_rank smallint := case p_effect ->> 'transition'
    when 'created' then 0 when 'deleted' then 2 else 1 end;
begin
  perform billing.lock_customer(p_effect ->> 'customer_id');
  -- The app puts user_id in the subscription's metadata when it creates one: that maps the
  -- customer for this and every later event (I7).
  v_user := coalesce(
    billing.link_customer(p_effect ->> 'customer_id', billing.user_if_known(p_effect ->> 'user_id')),
    (select user_id from public.stripe_customers where stripe_customer_id = p_effect ->> 'customer_id'));

  -- I6, newest state wins: an event applies if it is not older than the state applied, by
  -- (created, rank) so that within one second created < updated < deleted; a canceled
  -- subscription stays canceled (Stripe never reactivates one).
  insert into public.subscriptions as s (
    id, user_id, stripe_customer_id, status, price_id, current_period_start, current_period_end,
    cancel_at_period_end, cancel_at, canceled_at, ended_at, last_event_created, last_event_rank,
    last_event_id)
  values (
    p_effect ->> 'id', v_user, p_effect ->> 'customer_id', p_effect ->> 'status',
    p_effect ->> 'price_id',
    billing.unix_ts(p_effect -> 'current_period_start'),
    billing.unix_ts(p_effect -> 'current_period_end'),
    coalesce((p_effect ->> 'cancel_at_period_end')::boolean, false),
    billing.unix_ts(p_effect -> 'cancel_at'),
    billing.unix_ts(p_effect -> 'canceled_at'),
    billing.unix_ts(p_effect -> 'ended_at'),
    p_created, v_rank, p_event_id)
  on conflict (id) do update set
    user_id = coalesce(s.user_id, excluded.user_id),
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
    last_event_rank = excluded.last_event_rank,
    last_event_id = excluded.last_event_id,
    updated_at = now()
  where (s.last_event_created, s.last_event_rank) <= (excluded.last_event_created, excluded.last_event_rank)
    and not (s.status = 'canceled' and excluded.status <> 'canceled')
  returning * into v_row;

  if v_row.id is null then
    -- Still learn the owner from an old event.
    update public.subscriptions set user_id = v_user
    where id = p_effect ->> 'id' and user_id is null and v_user is not null;
    if found then
      perform billing.sync_subscription_entitlement(v_user);
    end if;
    return jsonb_build_object('outcome', 'stale',
      'detail', 'a newer state of this subscription is already applied');
  end if;

  perform billing.sync_subscription_entitlement(v_row.user_id);
  return jsonb_build_object('outcome', 'applied', 'detail', 'subscription ' || v_row.status,
    'user_id', v_row.user_id);
end
$$;

-- invoice.paid / invoice.payment_succeeded / invoice.payment_failed, under the customer lock
-- (I7), otherwise as in 20261125000200_apply_stripe_event.sql.
create or replace function billing.apply_invoice_owned(p_event_id text, p_created timestamptz, p_effect jsonb)
returns jsonb
language plpgsql set search_path = ''
as $$
begin
  perform billing.lock_customer(coalesce(p_effect ->> 'customer_id',
    (select stripe_customer_id from public.subscriptions where id = p_effect ->> 'subscription_id')));
  return billing.apply_invoice(p_event_id, p_created, p_effect);
end
$$;

-- checkout.session.*, customer.subscription.*, invoice.*, charge.refunded, charge.dispute.*:
-- the one entry point. A paid session without an order of ours answers `needs_verification`
-- without recording anything: the caller reads its line items at Stripe and calls again with
-- `verification` in the effect (I5).
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

  -- Claim the id first. A concurrent delivery of the same event waits here for this transaction
  -- and then finds the conflict; if this one fails, the other goes on and applies it.
  if not exists (select 1 from public.stripe_events where id = v_id)
     and billing.session_needs_verification(p_effect) then
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
    -- A redelivery retries what the first delivery could not finish: the duplicate's refund.
    if p_effect ->> 'kind' = 'checkout_session' then
      v_order := billing.order_of_session(p_effect);
      if v_order.id is not null then
        v_result := v_result || jsonb_build_object('order_id', v_order.id,
          'refund', billing.refund_due(v_order));
      end if;
    end if;
    return v_result;
  end if;

  v_result := case p_effect ->> 'kind'
    when 'checkout_session' then billing.apply_checkout_session(v_id, p_effect)
    when 'subscription' then billing.apply_subscription(v_id, v_created, p_effect)
    when 'invoice' then billing.apply_invoice_owned(v_id, v_created, p_effect)
    when 'charge' then billing.apply_charge(v_id, p_effect)
    when 'dispute' then billing.apply_dispute(v_id, p_effect)
    else jsonb_build_object('outcome', 'ignored', 'detail', 'event type not handled')
  end;

  update public.stripe_events
     set outcome = v_result ->> 'outcome', detail = v_result ->> 'detail', processed_at = now()
   where id = v_id;
  return v_result;
end
$$;

-- I3: a duplicate payment was refunded at Stripe (by the webhook, with the key
-- `refund-duplicate-<payment intent>`). The order reads refunded once Stripe's amounts say so;
-- charge.refunded confirms it either way.
create or replace function public.record_duplicate_refund(
  p_order uuid, p_refund_id text, p_amount bigint, p_currency text, p_status text)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_order public.orders;
begin
  select * into v_order from public.orders where id = p_order;
  if v_order.id is null then
    return jsonb_build_object('recorded', false);
  end if;
  if p_status in ('succeeded', 'pending') and v_order.stripe_payment_intent_id is not null then
    insert into public.payments as p (payment_intent_id, amount, amount_refunded, currency, fully_refunded)
    values (v_order.stripe_payment_intent_id, v_order.amount_total, p_amount, p_currency,
            p_amount >= coalesce(v_order.amount_total, p_amount))
    on conflict (payment_intent_id) do update set
      amount_refunded = greatest(p.amount_refunded, excluded.amount_refunded),
      fully_refunded = p.fully_refunded
        or greatest(p.amount_refunded, excluded.amount_refunded) >= coalesce(p.amount, excluded.amount),
      updated_at = now();
  end if;
  update public.orders set refund_id = p_refund_id, updated_at = now()
  where id = p_order and refund_id is null;
  insert into public.payment_audit (user_id, kind, order_id, amount, currency, reference)
  values (v_order.user_id, 'duplicate_refunded', v_order.id, p_amount, p_currency, p_refund_id)
  on conflict do nothing;
  v_order := billing.settle_order(p_order);
  perform billing.sync_entitlement(v_order.user_id, v_order.product);
  return jsonb_build_object('recorded', true, 'order', billing.order_json(v_order));
end
$$;

-- Start or resume checkout. Answers one of these states:
--   rate_limited {retry_after}   unknown_user   already_paid {order}   disputed {order}
--   processing {order}           open_session {order}   (pending order with a session)
--   create_session {order}       (this caller holds the lease: create the session)
--   in_progress {order, retry_ms} (another caller holds the lease: wait, ask again)
-- The caller creates the session with parameters taken from the order only (I9): its e-mail
-- and expires_at are fixed when the order opens. Nothing here retires an order by age (I1); the
-- lease holder retires one whose Stripe create can never succeed (checkout_retire_order).
-- p_limit null skips the rate limit (a caller asking again while waiting).
drop function public.checkout_begin(uuid, text, integer, integer, integer, integer);
create function public.checkout_begin(
  p_user uuid, p_product text, p_email text, p_limit integer, p_window_s integer,
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

  -- I2: a payment being applied holds this lock; its commit is visible once we have it.
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
    insert into public.orders (user_id, product, customer_email, checkout_expires_at)
    values (p_user, p_product, p_email, now() + make_interval(secs => p_session_ttl_s))
    returning * into v_order;
  end if;

  if v_order.status = 'processing' then
    return jsonb_build_object('state', 'processing', 'order', billing.order_json(v_order));
  end if;
  if v_order.stripe_checkout_session_id is not null then
    return jsonb_build_object('state', 'open_session', 'order', billing.order_json(v_order));
  end if;
  if v_order.session_claimed_until is null or v_order.session_claimed_until < now() then
    update public.orders set session_claimed_until = now() + make_interval(secs => p_lease_s)
    where id = v_order.id
    returning * into v_order;
    return jsonb_build_object('state', 'create_session', 'order', billing.order_json(v_order));
  end if;
  return jsonb_build_object('state', 'in_progress', 'order', billing.order_json(v_order),
    'retry_ms', greatest(50, least(1000,
      (extract(epoch from (v_order.session_claimed_until - now())) * 1000)::integer)));
end
$$;

-- The order as the checkout function reads it, with its create parameters.
create or replace function billing.order_json(p_order public.orders) returns jsonb
language sql stable set search_path = ''
as $$
  select jsonb_build_object(
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
    'amount_refunded', p_order.amount_refunded)
$$;

-- Stores the created session on its order and releases the lease, only while the order is
-- still open and has no other session (I1). Otherwise `attached` is false and the caller
-- expires the session at Stripe instead of handing it out.
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
    checkout_expires_at = coalesce(to_timestamp(p_expires_at), checkout_expires_at),
    session_created_at = coalesce(to_timestamp(p_session_created), now()),
    session_claimed_until = null,
    updated_at = now()
  where id = p_order and status = 'pending'
    and (stripe_checkout_session_id is null or stripe_checkout_session_id = p_session_id)
  returning * into v_order;
  if v_order.id is null then
    select * into v_order from public.orders where id = p_order;
    return jsonb_build_object('attached', false, 'order', billing.order_json(v_order));
  end if;
  return jsonb_build_object('attached', true, 'order', billing.order_json(v_order));
end
$$;

-- The lease holder found that this order's Stripe create can never succeed (an
-- idempotency_error, an error replayed for its key, expires_at no longer acceptable): the order
-- closes so that the next begin opens a fresh one (I9). No session exists under its key.
create or replace function public.checkout_retire_order(p_order uuid, p_reason text)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_order public.orders;
begin
  update public.orders set status = 'expired', closed_reason = 'retired',
    session_claimed_until = null, updated_at = now()
  where id = p_order and status = 'pending' and stripe_checkout_session_id is null
  returning * into v_order;
  if v_order.id is null then
    return jsonb_build_object('retired', false);
  end if;
  insert into public.payment_audit (user_id, kind, order_id, reference)
  values (v_order.user_id, 'order_retired', v_order.id, left(p_reason, 200));
  return jsonb_build_object('retired', true);
end
$$;

-- Applies what Stripe reports about a session (the webhook may be late): the same code path as
-- the webhook's checkout events, without an event. Answers the order as it stands after.
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
  v_result := billing.apply_checkout_session(null, p_effect);
  v_order := billing.order_of_session(p_effect);
  return v_result || jsonb_build_object('order', billing.order_json(v_order));
end
$$;

-- Payment health over the last p_days days, for on-call (see docs/operations.md):
--   payment_success_rate   paid (incl. later refunded/disputed) orders / orders with an outcome
--   webhook_success_rate   events applied, ignored or stale / events recorded
--   order_sync_delay_ms    p50/p95 of checkout session created -> order paid
--   duplicate_payments     second payments for a product the user owned (should be 0)
--   duplicate_refunds      of those, refunded automatically; duplicates_unrefunded must be 0
--   refund_rate            orders refunded / orders paid; dispute_rate likewise
--   unverified_sessions    paid sessions without an order that were not granted
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
    'duplicates_unrefunded', (select count(*) from audit d where d.kind = 'duplicate_payment'
        and not exists (select 1 from public.payment_audit r
                        where r.kind = 'duplicate_refunded' and r.order_id = d.order_id)),
    'unverified_sessions', (select count(*) from audit where kind = 'session_unverified')
  )
$$;

revoke all on all functions in schema billing from public, anon, authenticated;
grant execute on all functions in schema billing to service_role;
revoke all on function
  public.checkout_begin(uuid, text, text, integer, integer, integer, integer),
  public.checkout_retire_order(uuid, text),
  public.record_duplicate_refund(uuid, text, bigint, text, text)
from public, anon, authenticated;
grant execute on function
  public.checkout_begin(uuid, text, text, integer, integer, integer, integer),
  public.checkout_retire_order(uuid, text),
  public.record_duplicate_refund(uuid, text, bigint, text, text)
to service_role;
