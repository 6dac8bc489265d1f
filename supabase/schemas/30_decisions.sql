-- Decisions: pure functions of the facts in 20_facts.sql (and of the orders' own checkout state).
-- Given the same facts they give the same answer, whatever order the facts arrived in; nothing
-- here writes. billing.settle (40_sync.sql) keeps their answers on the orders and entitlements,
-- under the purchase lock; tests/it/decisions.rs checks them against a reference model over
-- generated facts.

-- A payment's money, from its payment intent, latest charge and disputes:
--   held       the merchant has it: succeeded, not refunded in full, no chargeback open or lost
--   refunded   all of it went back (the charge's `refunded`), or a chargeback took it (lost)
--   disputed   a chargeback holds it while the dispute is open (Stripe withdrew the amount;
--              an inquiry, `warning_*`, withdraws nothing)
--   in_flight  paid by a delayed method that has not settled
--   unpaid     failed or canceled
create function billing.money(p public.stripe_payments) returns text
language sql stable set search_path = ''
as $$
  select case
    when p.status = 'succeeded' then case
      when p.refunded or exists (select 1 from public.stripe_disputes d
                                 where d.payment_intent_id = p.id and d.status = 'lost')
        then 'refunded'
      when exists (select 1 from public.stripe_disputes d
                   where d.payment_intent_id = p.id and d.status in ('needs_response', 'under_review'))
        then 'disputed'
      else 'held' end
    when p.status in ('canceled', 'requires_payment_method') then 'unpaid'
    else 'in_flight'
  end
$$;

-- Every purchase of a product: a completed payment-mode session of ours, or one of another channel
-- whose line items hold the product, with its buyer and its money. A session whose payment has not
-- been read counts by its own payment status, made at an unknown time (last): it never outranks a
-- payment that was read, and is never due for a refund.
create view billing.purchases as
select s.user_id, s.product, s.id as session_id, coalesce(s.order_id, o.id) as order_id,
  s.payment_intent_id, p.id is not null as payment_read,
  case when p.id is not null then billing.money(p)
       when s.payment_status in ('paid', 'no_payment_required') then 'held'
       else 'in_flight' end as money,
  case when s.payment_intent_id is null then s.created_at
       else coalesce(p.created_at, 'infinity') end as made_at
from public.stripe_sessions s
left join public.stripe_payments p on p.id = s.payment_intent_id
left join public.orders o on o.stripe_checkout_session_id = s.id
where s.status = 'complete' and s.mode = 'payment' and s.user_id is not null
  and s.product is not null;

-- Which purchase stands, and which are due for a refund: of a user's held purchases of a product
-- the earliest made stands (ties by session id, byte order); every other held one is a duplicate, due for a
-- refund once its payment was read, unless a refund of it is waiting for the customer
-- (requires_action).
create view billing.decisions as
select r.user_id, r.product, r.session_id, r.order_id, r.payment_intent_id, r.money, r.made_at,
  r.money = 'held' and r.held_rank = 1 as stands,
  r.money = 'held' and r.held_rank > 1 as duplicate,
  r.money = 'held' and r.held_rank > 1 and r.payment_read
    and not exists (select 1 from public.stripe_refunds f
                    where f.payment_intent_id = r.payment_intent_id
                      and f.status = 'requires_action') as refund_due
from (
  select pu.*, row_number() over (partition by pu.user_id, pu.product
    order by pu.money = 'held' desc, pu.made_at, pu.session_id collate "C") as held_rank
  from billing.purchases pu
) r;

-- What a user has of a product: owns it (a purchase stands), has a payment in flight (or a paid
-- session of another channel being read now), has one under a chargeback; and the orders behind.
create function billing.ownership(p_user uuid, p_product text)
returns table (owns boolean, in_flight boolean, disputed boolean, standing_order uuid,
               flight_order uuid, disputed_order uuid)
language sql stable rows 1 set search_path = ''
as $$
  select coalesce(bool_or(d.money = 'held'), false),
    coalesce(bool_or(d.money = 'in_flight'), false)
      or exists (select 1 from internal.verifications v
                 where v.user_id = p_user and v.product = p_product and v.until > now()),
    coalesce(bool_or(d.money = 'disputed'), false),
    (array_agg(d.order_id) filter (where d.stands))[1],
    (array_agg(d.order_id order by d.made_at) filter (where d.money = 'in_flight'))[1],
    (array_agg(d.order_id order by d.made_at) filter (where d.money = 'disputed'))[1]
  from billing.decisions d
  where d.user_id = p_user and d.product = p_product
$$;

-- Sessions of ours that Stripe (as last read) still lets someone pay and nobody should: the user
-- owns the product or has a payment in flight, or the session is not its open order's. (A session
-- of an open order that has none attached is that order's: billing.settle attaches it.)
create function billing.expiries_due(p_user uuid, p_product text) returns setof text
language sql stable rows 2 set search_path = ''
as $$
  select s.id from public.stripe_sessions s
  join public.orders o on o.id = s.order_id
  cross join billing.ownership(p_user, p_product) w
  where o.user_id = p_user and o.product = p_product and s.status = 'open'
    and (w.owns or w.in_flight or o.closed_reason is not null
         or o.stripe_checkout_session_id <> s.id)
  order by s.id
$$;

-- An order's state from its session and that session's payment: paid, processing, refunded,
-- disputed or failed by its payment's money; else expired (its session expired, or the order
-- closed without a payment) or pending.
create function billing.order_decision(p_order public.orders)
returns table (status text, closed_reason text, payment_intent_id text, amount_total bigint,
               currency text, amount_refunded bigint, customer_id text)
language sql stable rows 1 set search_path = ''
as $$
  select
    case d.money when 'held' then 'paid' when 'in_flight' then 'processing'
      when 'refunded' then 'refunded' when 'disputed' then 'disputed' when 'unpaid' then 'failed'
      else case when s.status = 'expired' or p_order.closed_reason is not null then 'expired'
                else 'pending' end
    end,
    case when p_order.closed_reason is not null then p_order.closed_reason
         when s.status = 'complete' then 'completed'
         when s.status = 'expired' then 'expired' end,
    s.payment_intent_id, coalesce(p.amount, s.amount_total, p_order.amount_total),
    coalesce(p.currency, s.currency, p_order.currency), coalesce(p.amount_refunded, 0),
    coalesce(s.customer_id, p.customer_id)
  from (select 1) one
  left join public.stripe_sessions s on s.id = p_order.stripe_checkout_session_id
  left join billing.purchases d on d.session_id = s.id
  left join public.stripe_payments p on p.id = s.payment_intent_id
$$;

-- The functions that read these run as their caller, the service role; nobody else reads them.
revoke all on billing.purchases, billing.decisions from public, anon, authenticated;
grant select on billing.purchases, billing.decisions to service_role;
