-- Request limits shared by every instance of every function (checkout and chat).

-- Fixed-window counters.
create table internal.rate_limits (
  user_id uuid not null,
  bucket text not null,
  window_start timestamptz not null,
  hits integer not null,
  primary key (user_id, bucket)
);
alter table internal.rate_limits enable row level security;
grant all on internal.rate_limits to service_role;

-- Counts one hit; returns 0 when allowed, else the seconds until the window resets.
create or replace function internal.rate_limit_hit(p_user uuid, p_bucket text, p_limit integer, p_window_s integer)
returns integer
language plpgsql set search_path = ''
as $$
declare
  v_row internal.rate_limits;
begin
  if p_limit is null or p_limit <= 0 then
    return 0;
  end if;
  insert into internal.rate_limits as r (user_id, bucket, window_start, hits)
  values (p_user, p_bucket, now(), 1)
  on conflict (user_id, bucket) do update set
    hits = case when r.window_start > now() - make_interval(secs => p_window_s) then r.hits + 1 else 1 end,
    window_start = case when r.window_start > now() - make_interval(secs => p_window_s) then r.window_start else now() end
  returning * into v_row;
  if v_row.hits <= p_limit then
    return 0;
  end if;
  return greatest(1, ceil(extract(epoch from (v_row.window_start + make_interval(secs => p_window_s) - now())))::integer);
end
$$;

revoke all on function internal.rate_limit_hit(uuid, text, integer, integer) from public, anon, authenticated;
grant execute on function internal.rate_limit_hit(uuid, text, integer, integer) to service_role;
