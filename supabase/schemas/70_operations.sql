-- Operations: the schema version for preflight, and payment health for on-call
-- (docs/operations.md).

create function public.schema_status()
returns jsonb
language plpgsql stable security definer set search_path = ''
as $$
declare
  v_latest text;
  v_count integer;
begin
  if to_regclass('supabase_migrations.schema_migrations') is null then
    return jsonb_build_object('latest', null, 'count', 0);
  end if;
  execute 'select max(version), count(*)::int from supabase_migrations.schema_migrations'
    into v_latest, v_count;
  return jsonb_build_object('latest', v_latest, 'count', v_count);
end
$$;

-- Payment health over the last p_days days, for on-call (see docs/operations.md):
--   payment_success_rate   orders that took money / orders with an outcome
--   webhook_success_rate   events applied, ignored or stale / events recorded
--   order_sync_delay_ms    p50/p95 of checkout session created -> order paid
--   duplicate_payments     second payments for a product the user owned; duplicate_refunds: of
--                          those, refunded by the webhook
--   duplicates_unrefunded  second payments whose money the merchant still holds now, all time
--                          (0 after a reconciler run, unless a refund waits for the customer or
--                          Stripe refused it: then a person looks, runbook)
--   refund_rate, dispute_rate  orders refunded / disputed, over orders that took money
--   unverified_sessions    paid sessions of other channels that did not sell the product
--   reconciler             the last run: when it finished, what it repaired, its error
create function public.payment_health(p_days integer default 7)
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
    'duplicates_unrefunded', (select count(*) from billing.decisions where duplicate),
    'unverified_sessions', (select count(*) from audit where kind = 'session_unverified'),
    'reconciler', (select jsonb_build_object('finished_at', r.finished_at, 'repaired', r.repaired,
        'events', r.events, 'error', r.error)
      from internal.reconciler_runs r where r.finished_at is not null
      order by r.finished_at desc limit 1)
  )
$$;

revoke all on function public.schema_status(), public.payment_health(integer) from public, anon, authenticated;
grant execute on function public.schema_status(), public.payment_health(integer) to service_role;
