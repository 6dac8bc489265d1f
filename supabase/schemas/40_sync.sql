-- Applying what Stripe says: the one entry point for facts (public.record_stripe_facts), the
-- settlement of a user's purchase from them (billing.settle), and the reconciler's bookkeeping.
-- The webhook, checkout and the reconciler read the objects from Stripe first, then call
-- record_stripe_facts once; it answers what is due at Stripe now (refunds, expiries), which the
-- caller does and reports with its next call.
--
-- The entry points run with `jit = off`: they touch one user's rows, and the planner's estimates
-- for the SQL functions they call (opaque to it) made PostgreSQL JIT-compile a 2 ms statement for
-- 590 ms (measured with auto_explain).

-- The audit kind of an order's move from one state to another (null: nothing to record).
create function billing.audit_kind(p_old text, p_new text) returns text
language sql immutable set search_path = ''
as $$
  select case
    when p_old = p_new then null
    when p_new = 'paid' and p_old = 'refunded' then 'refund_reversed'
    when p_new = 'paid' and p_old = 'disputed' then 'dispute_won'
    when p_new = 'refunded' and p_old = 'disputed' then 'dispute_lost'
    when p_new = 'refunded' then 'order_refunded'
    when p_new = 'disputed' then 'dispute_opened'
    when p_new = 'processing' then 'order_processing'
    when p_new = 'failed' then 'order_payment_failed'
    when p_new = 'expired' and p_old in ('pending', 'processing') then 'order_expired'
  end
$$;

-- Settles a user's purchase of a product from the facts, under its purchase lock (the caller's):
-- every order's state, the entitlement, the audit of what changed. Answers what is due at Stripe.
create function billing.settle(p_user uuid, p_product text, p_event_id text) returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_row record;
  v_order public.orders;
  v_kind text;
  v_first_paid boolean;
  v_delays jsonb := '[]'::jsonb;
  v_duplicates integer;
  v_own record;
begin
  -- A purchase through another channel gets an order of its own: the audit, the entitlement and
  -- the status page name it.
  insert into public.orders (user_id, product, stripe_checkout_session_id, closed_reason,
                             session_created_at)
  select s.user_id, s.product, s.id, 'completed', s.created_at
  from public.stripe_sessions s
  where s.user_id = p_user and s.product = p_product and s.order_id is null
    and s.status = 'complete' and s.mode = 'payment'
    and not exists (select 1 from public.orders o where o.stripe_checkout_session_id = s.id)
  order by s.id
  on conflict do nothing;

  -- A session of ours that an instance made and died before attaching belongs to its order (the
  -- order's idempotency key gives no other).
  update public.orders o set stripe_checkout_session_id = s.id, checkout_url = s.url,
    checkout_expires_at = s.expires_at, session_created_at = s.created_at,
    session_claimed_until = null, updated_at = now()
  from public.stripe_sessions s
  where s.order_id = o.id and o.user_id = p_user and o.product = p_product
    and o.closed_reason is null and o.stripe_checkout_session_id is null;

  for v_row in
    select o.id, o.status as old_status, o.closed_reason as old_closed,
      o.stripe_payment_intent_id as old_pi, o.amount_total as old_total,
      o.amount_refunded as old_refunded, o.paid_at, n.*
    from public.orders o cross join lateral billing.order_decision(o) n
    where o.user_id = p_user and o.product = p_product
    order by o.id
  loop
    v_first_paid := v_row.paid_at is null and v_row.status in ('paid', 'refunded', 'disputed');
    if not v_first_paid
       and (v_row.old_status, v_row.old_closed, v_row.old_pi, v_row.old_total, v_row.old_refunded)
           is not distinct from (v_row.status, v_row.closed_reason,
             coalesce(v_row.payment_intent_id, v_row.old_pi), v_row.amount_total, v_row.amount_refunded)
    then
      continue;
    end if;
    update public.orders set status = v_row.status, closed_reason = v_row.closed_reason,
      stripe_payment_intent_id = coalesce(v_row.payment_intent_id, stripe_payment_intent_id),
      amount_total = v_row.amount_total, currency = v_row.currency,
      amount_refunded = v_row.amount_refunded,
      stripe_customer_id = coalesce(v_row.customer_id, stripe_customer_id),
      paid_at = case when v_first_paid then clock_timestamp() else paid_at end,
      session_claimed_until = case when v_row.closed_reason is null then session_claimed_until end,
      updated_at = now()
    where id = v_row.id
    returning * into v_order;
    if v_first_paid then
      insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
      values (p_event_id, p_user, 'order_paid', v_order.id, v_order.amount_total, v_order.currency,
              v_order.stripe_payment_intent_id)
      on conflict do nothing;
      if v_order.session_created_at is not null then
        v_delays := v_delays || to_jsonb((extract(epoch from (v_order.paid_at
          - v_order.session_created_at)) * 1000)::bigint);
      end if;
    end if;
    v_kind := case
      when v_first_paid and v_row.status = 'paid' then null
      when v_first_paid and v_row.status = 'refunded' then 'order_refunded'
      when v_first_paid and v_row.status = 'disputed' then 'dispute_opened'
      when v_row.old_status = v_row.status and v_row.status = 'paid'
           and v_row.old_refunded <> v_row.amount_refunded then 'order_partially_refunded'
      else billing.audit_kind(v_row.old_status, v_row.status) end;
    if v_kind is not null then
      insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
      values (p_event_id, p_user, v_kind, v_order.id,
              case when v_kind like '%refund%' then v_order.amount_refunded else v_order.amount_total end,
              v_order.currency, v_order.stripe_payment_intent_id);
    end if;
  end loop;

  -- The entitlement follows the purchase that stands (row locked before it is read and written).
  select * into v_own from billing.ownership(p_user, p_product);
  insert into public.entitlements (user_id, product, active, source)
  values (p_user, p_product, false, 'none')
  on conflict (user_id, product) do nothing;
  perform 1 from public.entitlements where user_id = p_user and product = p_product for update;
  update public.entitlements
    set active = v_own.owns, source = coalesce(v_own.standing_order::text, source), updated_at = now()
  where user_id = p_user and product = p_product
    and (active is distinct from v_own.owns
         or (v_own.owns and source is distinct from v_own.standing_order::text));

  -- Second payments for a product the user owns, and the refunds of them that moved money back.
  insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
  select p_event_id, p_user, 'duplicate_payment', o.id, o.amount_total, o.currency,
         d.payment_intent_id
  from billing.decisions d join public.orders o on o.id = d.order_id
  where d.user_id = p_user and d.product = p_product and d.duplicate
  on conflict do nothing;
  get diagnostics v_duplicates = row_count;
  insert into public.payment_audit (event_id, user_id, kind, order_id, amount, currency, reference)
  select p_event_id, p_user, 'duplicate_refunded', o.id, r.amount, r.currency, r.id
  from public.stripe_refunds r join public.orders o on o.stripe_payment_intent_id = r.payment_intent_id
  where o.user_id = p_user and o.product = p_product and r.by_webhook
    and r.status in ('succeeded', 'pending')
  order by r.id
  on conflict do nothing;

  return jsonb_build_object('owns', v_own.owns, 'sync_delays_ms', v_delays,
    'duplicates', v_duplicates,
    'refunds', (select coalesce(jsonb_agg(jsonb_build_object('order_id', d.order_id,
          'payment_intent_id', d.payment_intent_id, 'attempt', coalesce(a.attempt, 1),
          -- The payment that stands: read again before the refund, since it may have been
          -- given back since its last read.
          'standing', (select s.payment_intent_id from billing.decisions s
                       where s.user_id = p_user and s.product = p_product and s.stands))
          order by d.made_at, d.session_id), '[]')
        from billing.decisions d
        left join internal.stripe_actions a on a.kind = 'refund' and a.object_id = d.payment_intent_id
        where d.user_id = p_user and d.product = p_product and d.refund_due),
    'expiries', billing.expiries_json(p_user, p_product));
end
$$;

-- The sessions due for expiry, with the idempotency key's number to use for each.
create function billing.expiries_json(p_user uuid, p_product text) returns jsonb
language sql stable set search_path = ''
as $$
  select coalesce(jsonb_agg(jsonb_build_object('session_id', e.id,
           'attempt', coalesce(a.attempt, 1)) order by e.id), '[]')
  from billing.expiries_due(p_user, p_product) e(id)
  left join internal.stripe_actions a on a.kind = 'expire' and a.object_id = e.id
$$;

-- The (user, product) purchases the facts concern, as they will be stored: the sessions' buyers
-- and the buyers of the sessions that name the payments.
create function billing.purchases_touched(p_facts jsonb)
returns table (user_id uuid, product text)
language sql stable rows 2 set search_path = ''
as $$
  with sessions as (
    select b.user_id, b.product
    from jsonb_array_elements(coalesce(p_facts -> 'sessions', '[]')) f
    cross join lateral billing.session_buyer(f.value, coalesce((f.value ->> 'sells_product')::boolean,
      (select s.sells_product from public.stripe_sessions s where s.id = f.value ->> 'id'))) b
  ), intents as (
    select f.value ->> 'id' as pi from jsonb_array_elements(coalesce(p_facts -> 'payments', '[]')) f
    union select f.value ->> 'payment_intent_id' from jsonb_array_elements(coalesce(p_facts -> 'refunds', '[]')) f
    union select f.value ->> 'payment_intent_id' from jsonb_array_elements(coalesce(p_facts -> 'disputes', '[]')) f
  )
  select distinct t.user_id, t.product from (
    select user_id, product from sessions
    union all
    select s.user_id, s.product from public.stripe_sessions s join intents i on i.pi = s.payment_intent_id
  ) t
  where t.user_id is not null and t.product is not null
  order by 1, 2
$$;

-- Stores what Stripe's API answered, in one transaction:
--   p_event    the webhook's event ({id, type, created, livemode, api_version, received_at_ms}),
--              claimed in the ledger (a redelivery is a `duplicate`; its reads are stored all
--              the same: they are newer); null for checkout's and the reconciler's reads;
--   p_payload  the event as received (the audit trail);
--   p_facts    {read_at_ms, sessions, payments, refunds, disputes, subscriptions, invoices}: the
--              objects read at read_at_ms, and `missing` when Stripe did not know the object;
--              null for an event of a type the app does not act on (recorded `ignored`);
--   p_actions  [{kind, object_id, attempt, error}]: calls to Stripe that failed since the last
--              call: their idempotency keys are spent.
-- Takes the purchase lock of every (user, product) the facts concern, stores each object unless a
-- newer read of it is there, settles those purchases, and answers what is due at Stripe now.
create function public.record_stripe_facts(p_event jsonb, p_payload jsonb, p_facts jsonb,
                                           p_actions jsonb)
returns jsonb
language plpgsql set search_path = '' set jit = off
as $$
declare
  v_event text := p_event ->> 'id';
  v_read timestamptz := to_timestamp(coalesce((p_facts ->> 'read_at_ms')::double precision,
                                              extract(epoch from clock_timestamp()) * 1000) / 1000);
  v_duplicate boolean := false;
  v_pair record;
  v_pi text;
  v_action record;
  v_touched jsonb;
  v_settled jsonb;
  v_changed integer := 0;
  v_refunds jsonb := '[]'::jsonb;
  v_expiries jsonb := '[]'::jsonb;
  v_delays jsonb := '[]'::jsonb;
  v_duplicates integer := 0;
  v_pairs integer := 0;
  v_other integer := 0;
  v_unverified boolean := false;
  v_outcome text;
  v_detail text;
begin
  if v_event is not null then
    insert into public.stripe_events (id, type, api_version, created, livemode, payload, outcome,
                                      received_at)
    values (v_event, p_event ->> 'type', p_event ->> 'api_version',
            billing.unix_ts((p_event ->> 'created')::bigint),
            coalesce((p_event ->> 'livemode')::boolean, false), coalesce(p_payload, '{}'), 'applied',
            coalesce(to_timestamp((p_event ->> 'received_at_ms')::double precision / 1000), now()))
    on conflict (id) do nothing;
    v_duplicate := not found;
  end if;

  -- The payments these facts name, locked (in id order) before the purchases are computed: a
  -- session naming one of them that another transaction is storing is committed by then, so its
  -- purchase is among them.
  for v_pi in
    select distinct x.pi from (
      select f.value ->> 'id' as pi from jsonb_array_elements(coalesce(p_facts -> 'payments', '[]')) f
      union all select f.value ->> 'payment_intent_id' from jsonb_array_elements(coalesce(p_facts -> 'sessions', '[]')) f
      union all select f.value ->> 'payment_intent_id' from jsonb_array_elements(coalesce(p_facts -> 'refunds', '[]')) f
      union all select f.value ->> 'payment_intent_id' from jsonb_array_elements(coalesce(p_facts -> 'disputes', '[]')) f
    ) x where x.pi is not null order by 1
  loop
    perform billing.lock_payment(v_pi);
  end loop;
  -- The purchases these facts concern, locked (in one order) before anything is written, as
  -- checkout locks one before it reads.
  select coalesce(jsonb_agg(to_jsonb(t)), '[]') into v_touched from billing.purchases_touched(p_facts) t;
  for v_pair in select * from jsonb_to_recordset(v_touched) as t(user_id uuid, product text) loop
    perform billing.lock_purchase(v_pair.user_id, v_pair.product);
  end loop;

  v_changed := billing.store_sessions(coalesce(p_facts -> 'sessions', '[]'), v_read)
    + billing.store_payments(coalesce(p_facts -> 'payments', '[]'), v_read)
    + billing.store_refunds(coalesce(p_facts -> 'refunds', '[]'), v_read)
    + billing.store_disputes(coalesce(p_facts -> 'disputes', '[]'), v_read);
  v_other := billing.store_subscriptions(coalesce(p_facts -> 'subscriptions', '[]'), v_read)
    + billing.store_invoices(coalesce(p_facts -> 'invoices', '[]'), v_read,
                             case when not v_duplicate then v_event end);
  v_changed := v_changed + v_other;
  delete from internal.verifications
  where session_id in (select f.value ->> 'id'
                       from jsonb_array_elements(coalesce(p_facts -> 'sessions', '[]')) f);

  -- A paid session of another channel whose line items do not hold the product, for a user we
  -- know: audited once, nothing granted (I5).
  insert into public.payment_audit (event_id, user_id, kind, amount, currency, reference)
  select case when not v_duplicate then v_event end, billing.user_if_known(f.value ->> 'client_reference_id'),
    'session_unverified', (f.value ->> 'amount_total')::bigint, f.value ->> 'currency', s.id
  from jsonb_array_elements(coalesce(p_facts -> 'sessions', '[]')) f
  join public.stripe_sessions s on s.id = f.value ->> 'id'
  where s.order_id is null and s.mode = 'payment' and s.status = 'complete'
    and s.sells_product is false
    and not exists (select 1 from public.payment_audit a
                    where a.kind = 'session_unverified' and a.reference = s.id);
  v_unverified := found;

  for v_action in select * from jsonb_to_recordset(coalesce(p_actions, '[]'))
      as a(kind text, object_id text, attempt integer, error text) loop
    insert into internal.stripe_actions as s (kind, object_id, attempt, tries, last_error, last_tried_at)
    values (v_action.kind, v_action.object_id,
            case when v_action.error is null then v_action.attempt else v_action.attempt + 1 end,
            1, v_action.error, now())
    on conflict (kind, object_id) do update set
      attempt = greatest(s.attempt, excluded.attempt), tries = s.tries + 1,
      last_error = excluded.last_error, last_tried_at = excluded.last_tried_at;
  end loop;

  for v_pair in select * from jsonb_to_recordset(v_touched) as t(user_id uuid, product text) loop
    v_pairs := v_pairs + 1;
    v_settled := billing.settle(v_pair.user_id, v_pair.product,
                                case when not v_duplicate then v_event end);
    v_refunds := v_refunds || (v_settled -> 'refunds');
    v_expiries := v_expiries || (v_settled -> 'expiries');
    v_delays := v_delays || (v_settled -> 'sync_delays_ms');
    v_duplicates := v_duplicates + (v_settled ->> 'duplicates')::integer;
  end loop;

  if p_event ->> 'type' = 'invoice.payment_failed' and not v_duplicate then
    insert into public.payment_audit (event_id, user_id, kind, invoice_id, amount, currency)
    select v_event, i.user_id, 'invoice_payment_failed', i.id, i.amount_due, i.currency
    from public.invoices i
    where i.id in (select f.value ->> 'id' from jsonb_array_elements(coalesce(p_facts -> 'invoices', '[]')) f);
  end if;

  -- Applied: the facts concern a purchase or a subscription of a user we know, or a payment
  -- whose purchase is not known yet (Stripe does not order events). Unmatched: Stripe does not
  -- know the object, or only sessions that concern nobody we know (or sell something else).
  v_outcome := case
    when v_duplicate then 'duplicate'
    when p_facts is null then 'ignored'
    when p_facts ->> 'missing' is not null then 'unmatched'
    when v_pairs > 0
      or jsonb_array_length(coalesce(p_facts -> 'subscriptions', '[]'))
         + jsonb_array_length(coalesce(p_facts -> 'invoices', '[]')) > 0
      or exists (select 1 from public.stripe_sessions s
                 where s.user_id is not null and s.mode is distinct from 'payment'
                   and s.id in (select f.value ->> 'id'
                                from jsonb_array_elements(coalesce(p_facts -> 'sessions', '[]')) f))
      then 'applied'
    when jsonb_array_length(coalesce(p_facts -> 'sessions', '[]')) = 0
         and jsonb_array_length(coalesce(p_facts -> 'payments', '[]')) > 0 then 'applied'
    else 'unmatched' end;
  v_detail := case when v_outcome = 'ignored' then 'event type not handled'
                   when p_facts ->> 'missing' is not null then left(p_facts ->> 'missing', 500)
                   when v_outcome = 'unmatched' then 'the objects concern no purchase of a user we know'
                   else v_changed || ' changed, ' || v_pairs || ' purchase(s) settled' end;
  if v_event is not null and not v_duplicate then
    update public.stripe_events set outcome = v_outcome, detail = v_detail, processed_at = now()
    where id = v_event;
  end if;
  return jsonb_build_object('outcome', v_outcome, 'detail', v_detail, 'changed', v_changed,
    'refunds', v_refunds, 'expiries', v_expiries, 'sync_delays_ms', v_delays,
    'duplicates', v_duplicates, 'unverified', v_unverified);
end
$$;

-- The first look at a paid session of another channel: while the webhook reads its line items at
-- Stripe, its buyer's clicks see a payment in flight (I2). Answers the verdict already stored,
-- if any (then the line items need not be read again).
create function public.stripe_sync_begin(p_session_id text, p_user text) returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_user uuid := billing.user_if_known(p_user);
begin
  if v_user is not null then
    insert into internal.verifications (session_id, user_id, product, until)
    values (p_session_id, v_user, 'full_report', now() + interval '30 seconds')
    on conflict (session_id) do update set until = excluded.until;
  end if;
  return jsonb_build_object('sells_product',
    (select s.sells_product from public.stripe_sessions s where s.id = p_session_id));
end
$$;

-- The reconciler's runs: where each one started listing undelivered events, how far it listed
-- them all (`listed_through`: every event created before it was applied), what it repaired.
create table internal.reconciler_runs (
  id bigint generated always as identity primary key,
  started_at timestamptz not null default now(),
  since timestamptz not null,
  listed_through timestamptz,
  finished_at timestamptz,
  events integer not null default 0,
  repaired integer not null default 0,
  error text
);
alter table internal.reconciler_runs enable row level security;
grant all on internal.reconciler_runs to service_role;

-- Starts a reconciler run: where to list undelivered events from (p_since, else 10 minutes before
-- the furthest any run listed through, 3 days back for the first run, never past Stripe's 30
-- days), and what to read again, at most p_limit of each, the most pressing and then the least
-- recently read first (so that runs move through more than p_limit): sessions of ours Stripe may
-- still let someone pay, or never read; payments due for a refund, never read, in flight, or
-- with a refund waiting for the customer. `sessions_due` and `payments_due` count them all.
create function public.reconcile_begin(p_since_s bigint, p_limit integer) returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_since timestamptz := greatest(coalesce(billing.unix_ts(p_since_s),
    (select max(listed_through) - interval '10 minutes' from internal.reconciler_runs),
    now() - interval '3 days'), now() - interval '30 days');
  v_run bigint;
begin
  insert into internal.reconciler_runs (since) values (v_since) returning id into v_run;
  return (
    with sessions as (
      select s.id, s.read_at from public.stripe_sessions s
      where s.order_id is not null and s.status = 'open'
      union
      select o.stripe_checkout_session_id, null from public.orders o
      where o.stripe_checkout_session_id is not null
        and not exists (select 1 from public.stripe_sessions s where s.id = o.stripe_checkout_session_id)
        and o.status in ('pending', 'processing')
    ), payments as (
      select x.pi, min(x.rank) as rank, min(p.read_at) as read_at
      from (
        select d.payment_intent_id as pi, case when d.refund_due then 0 else 2 end as rank
        from billing.decisions d
        where d.payment_intent_id is not null and (d.money = 'in_flight' or d.refund_due)
        union all
        select s.payment_intent_id, 1 from public.stripe_sessions s
        where s.status = 'complete' and s.payment_intent_id is not null
          and not exists (select 1 from public.stripe_payments p where p.id = s.payment_intent_id)
        union all
        select p.id, 1 from public.stripe_payments p where p.read_at = 'epoch'
        union all
        select r.payment_intent_id, 2 from public.stripe_refunds r where r.status = 'requires_action'
      ) x
      left join public.stripe_payments p on p.id = x.pi
      group by x.pi
    )
    select jsonb_build_object('run', v_run, 'since', floor(extract(epoch from v_since))::bigint,
      'sessions', (select coalesce(jsonb_agg(t.id), '[]') from (
          select id from sessions order by read_at nulls first, id limit p_limit) t),
      'sessions_due', (select count(*) from sessions),
      'payments', (select coalesce(jsonb_agg(t.pi), '[]') from (
          select pi from payments order by rank, read_at nulls first, pi limit p_limit) t),
      'payments_due', (select count(*) from payments)));
end
$$;

-- Of the events a reconciler run listed (a JSON array of ids), those not in the ledger: an event
-- applied before (by the webhook or a run cut short) is not read at Stripe again.
create function public.stripe_events_unknown(p_ids jsonb) returns jsonb
language sql stable set search_path = ''
as $$
  select coalesce(jsonb_agg(x.id order by x.n), '[]')
  from jsonb_array_elements_text(p_ids) with ordinality as x(id, n)
  where not exists (select 1 from public.stripe_events e where e.id = x.id)
$$;

-- Ends a reconciler run: what it did, and how far it listed every undelivered event (Unix
-- seconds; null when it listed nothing through to the end of a slice).
create function public.reconcile_finish(p_run bigint, p_events integer, p_repaired integer,
                                        p_error text, p_listed_through_s bigint)
returns jsonb
language sql set search_path = ''
as $$
  update internal.reconciler_runs set finished_at = now(), events = p_events,
    repaired = p_repaired, error = p_error, listed_through = billing.unix_ts(p_listed_through_s)
  where id = p_run
  returning jsonb_build_object('run', id, 'finished', true)
$$;

revoke all on all functions in schema billing from public, anon, authenticated;
grant execute on all functions in schema billing to service_role;
revoke all on function
  public.record_stripe_facts(jsonb, jsonb, jsonb, jsonb),
  public.stripe_sync_begin(text, text),
  public.reconcile_begin(bigint, integer),
  public.stripe_events_unknown(jsonb),
  public.reconcile_finish(bigint, integer, integer, text, bigint)
from public, anon, authenticated;
grant execute on function
  public.record_stripe_facts(jsonb, jsonb, jsonb, jsonb),
  public.stripe_sync_begin(text, text),
  public.reconcile_begin(bigint, integer),
  public.stripe_events_unknown(jsonb),
  public.reconcile_finish(bigint, integer, integer, text, bigint)
to service_role;
