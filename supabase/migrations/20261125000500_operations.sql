-- Operations: the schema version for the preflight check, and payment health for on-call.

-- The newest migration recorded (Supabase CLI bookkeeping, also kept by scripts/db-migrate).
create or replace function public.schema_status()
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

-- Payment health over the last p_days days:
--   payment_success_rate   paid orders / orders that reached an outcome (paid, failed, expired
--                          after a session was created)
--   webhook_success_rate   events applied, ignored or duplicate-free / events recorded; events
--                          answered non-2xx never reach the table, see the Errors metric for those
--   order_sync_delay_ms    p50/p95 of checkout session created -> order paid
--   duplicate_payments     second paid orders for the same user and product (must be 0)
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
  delays as (
    select extract(epoch from (paid_at - session_created_at)) * 1000 as ms
    from orders where status = 'paid' and paid_at is not null and session_created_at is not null
  )
  select jsonb_build_object(
    'days', p_days,
    'orders_paid', (select count(*) from orders where status = 'paid'),
    'orders_failed', (select count(*) from orders where status = 'failed'),
    'orders_expired', (select count(*) from orders where status = 'expired'),
    'orders_open', (select count(*) from orders where status in ('pending', 'processing')),
    'payment_success_rate', (select round(count(*) filter (where status = 'paid')::numeric
        / nullif(count(*) filter (where status in ('paid', 'failed', 'expired')), 0), 4) from orders),
    'webhook_events', (select count(*) from events),
    'webhook_success_rate', (select round(count(*) filter (where outcome in ('applied', 'ignored', 'stale'))::numeric
        / nullif(count(*), 0), 4) from events),
    'webhook_unmatched', (select count(*) from events where outcome = 'unmatched'),
    'order_sync_delay_ms_p50', (select round(percentile_cont(0.5) within group (order by ms)::numeric) from delays),
    'order_sync_delay_ms_p95', (select round(percentile_cont(0.95) within group (order by ms)::numeric) from delays),
    'duplicate_payments', (select count(*) from public.payment_audit a, window_start w
        where a.kind = 'duplicate_payment' and a.created_at >= w.t)
  )
$$;

revoke all on function public.schema_status(), public.payment_health(integer) from public, anon, authenticated;
grant execute on function public.schema_status(), public.payment_health(integer) to service_role;
