-- Chat: the per-user answer cache, token accounting, reservations and budgets, the request
-- window. Admission (rate limit, cache, reservation) is one call and one round trip; settling an
-- answer (cache, usage, the reservation replaced by the charge) is another; each further upstream
-- attempt extends the reservation first (issue 21; docs/api.md has the bound).

create table public.chat_cache (
  user_id uuid not null references auth.users (id) on delete cascade,
  key text not null,
  response jsonb not null,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null,
  primary key (user_id, key)
);
create index chat_cache_expires on public.chat_cache (expires_at);

create table public.chat_usage (
  user_id uuid not null references auth.users (id) on delete cascade,
  day date not null,
  requests integer not null default 0,
  llm_answers integer not null default 0,
  prompt_tokens bigint not null default 0,
  completion_tokens bigint not null default 0,
  estimated_answers integer not null default 0,
  anonymous boolean not null default false,
  unsettled_tokens bigint not null default 0,
  unsettled_requests integer not null default 0,
  fallback_answers integer not null default 0,
  upstream_attempts integer not null default 0,
  failed_attempts integer not null default 0,
  primary key (user_id, day)
);

alter table public.chat_cache enable row level security;
alter table public.chat_usage enable row level security;
-- Users may see their own usage; the cache is the service's business only.
create policy "own chat usage" on public.chat_usage
  for select to authenticated using (user_id = (select auth.uid()));
revoke all on public.chat_cache, public.chat_usage from anon, authenticated;
grant select on public.chat_usage to authenticated;
grant all on public.chat_cache, public.chat_usage to service_role;
comment on column public.chat_usage.estimated_answers is
  'LLM answers whose tokens were estimated because the upstream reported no usage';
comment on column public.chat_usage.anonymous is
  'the user was signed in anonymously (Supabase is_anonymous) at the last recorded answer';

-- The open reservations. Settled ones are deleted; expired ones are swept into chat_usage.
create table public.chat_reservations (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  day date not null,
  tokens bigint not null check (tokens >= 0),
  attempts integer not null default 1,
  created_at timestamptz not null,
  expires_at timestamptz not null
);
create index chat_reservations_user_day on public.chat_reservations (user_id, day);
comment on table public.chat_reservations is
  'tokens reserved by chat requests in flight: counted against their day''s budget until settled';

comment on column public.chat_usage.unsettled_tokens is
  'reservations never settled (the instance died or the settlement failed): spent in full';
comment on column public.chat_usage.upstream_attempts is
  'calls that reached the LLM upstream (primary and fallback model, retries included)';
comment on column public.chat_usage.failed_attempts is
  'of those, the ones that failed (charged their prompt, and what they streamed before the cut)';

alter table public.chat_reservations enable row level security;
revoke all on public.chat_reservations from anon, authenticated;
grant all on public.chat_reservations to service_role;

-- The requests admitted per user in the last window.
create table internal.chat_requests (
  user_id uuid not null,
  at timestamptz not null
);
create index chat_requests_user_at on internal.chat_requests (user_id, at);
-- How many of a user's rows are in internal.chat_requests (kept under chat_lock).
create table internal.chat_request_counts (
  user_id uuid primary key,
  admitted integer not null check (admitted >= 0)
);
alter table internal.chat_requests enable row level security;
alter table internal.chat_request_counts enable row level security;
grant all on internal.chat_requests, internal.chat_request_counts to service_role;


-- Rate limit, cache lookup and budget together. Answers:
--   {state: rate_limited, retry_after} | {state: unknown_user} | {state: hit, response}
--   | {state: budget_exceeded, retry_after, used, budget} | {state: miss}
-- A cache hit is served even over budget: it costs no tokens. p_token_budget null or 0: no budget.
create function public.chat_admit(
  p_user uuid, p_cache_key text, p_limit integer, p_window_s integer,
  p_token_budget bigint default null)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_retry integer;
  v_response jsonb;
  v_used bigint;
  v_now timestamp := now() at time zone 'utc';
begin
  v_retry := internal.rate_limit_hit(p_user, 'chat', p_limit, p_window_s);
  if v_retry > 0 then
    return jsonb_build_object('state', 'rate_limited', 'retry_after', v_retry);
  end if;
  if not exists (select 1 from auth.users where id = p_user) then
    return jsonb_build_object('state', 'unknown_user');
  end if;
  if p_cache_key is not null then
    select response into v_response from public.chat_cache
    where user_id = p_user and key = p_cache_key and expires_at > now();
    if v_response is not null then
      return jsonb_build_object('state', 'hit', 'response', v_response);
    end if;
  end if;
  if p_token_budget > 0 then
    select u.prompt_tokens + u.completion_tokens into v_used from public.chat_usage u
    where u.user_id = p_user and u.day = v_now::date;
    if coalesce(v_used, 0) >= p_token_budget then
      return jsonb_build_object(
        'state', 'budget_exceeded',
        'retry_after', greatest(1, ceil(extract(epoch from
          (date_trunc('day', v_now) + interval '1 day' - v_now)))::integer),
        'used', v_used,
        'budget', p_token_budget);
    end if;
  end if;
  return jsonb_build_object('state', 'miss');
end
$$;

-- Records an answer: caches it (when p_cache_ttl_s > 0) and adds the UTC day's usage.
create function public.chat_record(
  p_user uuid, p_cache_key text, p_response jsonb, p_cache_ttl_s integer,
  p_llm boolean, p_prompt_tokens integer, p_completion_tokens integer,
  p_usage_estimated boolean default false, p_anonymous boolean default false)
returns jsonb
language plpgsql set search_path = ''
as $$
begin
  if p_cache_key is not null and p_cache_ttl_s > 0 and p_response is not null then
    insert into public.chat_cache (user_id, key, response, expires_at)
    values (p_user, p_cache_key, p_response, now() + make_interval(secs => p_cache_ttl_s))
    on conflict (user_id, key) do update
      set response = excluded.response, created_at = now(), expires_at = excluded.expires_at;
    -- Keep the table small: drop a few expired rows of this user on each write.
    delete from public.chat_cache
    where user_id = p_user and expires_at < now() - interval '1 hour';
  end if;
  insert into public.chat_usage as u (user_id, day, requests, llm_answers, prompt_tokens,
                                      completion_tokens, estimated_answers, anonymous)
  values (p_user, (now() at time zone 'utc')::date, 1, case when p_llm then 1 else 0 end,
          coalesce(p_prompt_tokens, 0), coalesce(p_completion_tokens, 0),
          case when p_llm and p_usage_estimated then 1 else 0 end, coalesce(p_anonymous, false))
  on conflict (user_id, day) do update set
    requests = u.requests + 1,
    llm_answers = u.llm_answers + excluded.llm_answers,
    prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = u.completion_tokens + excluded.completion_tokens,
    estimated_answers = u.estimated_answers + excluded.estimated_answers,
    anonymous = excluded.anonymous;
  return jsonb_build_object('recorded', true);
end
$$;

-- One lock per user for everything that must see a user's limits and budget as one: the
-- request window, admission's reservation, an extension. Transaction-scoped: safe behind a
-- transaction pooler.
create or replace function internal.chat_lock(p_user uuid)
returns void
language plpgsql set search_path = ''
as $$
begin
  perform pg_advisory_xact_lock(hashtextextended('chat/' || p_user::text, 0));
end
$$;

-- Counts one request against an exact sliding window of p_window_s seconds, under the caller's
-- chat_lock: admitted when fewer than p_limit requests were admitted in (now - window, now].
-- Refused requests are not counted, so a client retrying while limited does not push its own
-- reset back. Answers {allowed, limit, window_s, remaining, reset_s, retry_after}
-- reset_s: seconds until the oldest counted request leaves the window (one more unit frees up);
-- retry_after: 0 when admitted, else seconds until a request would be.
create or replace function internal.chat_rate_take(
  p_user uuid, p_limit integer, p_window_s integer, p_now timestamptz)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_since timestamptz := p_now - make_interval(secs => p_window_s);
  v_left integer;
  v_count integer;
  v_oldest timestamptz;
  v_free_at timestamptz;
begin
  if p_limit is null or p_limit <= 0 then
    return jsonb_build_object('allowed', true);
  end if;
  with gone as (
    delete from internal.chat_requests where user_id = p_user and at <= v_since returning 1)
  select count(*) into v_left from gone;
  insert into internal.chat_request_counts as c (user_id, admitted) values (p_user, 0)
  on conflict (user_id) do update set admitted = greatest(c.admitted - v_left, 0)
  returning admitted into v_count;
  select min(at) into v_oldest from internal.chat_requests where user_id = p_user;
  if v_count < p_limit then
    with counted as (insert into internal.chat_requests (user_id, at) values (p_user, p_now))
    update internal.chat_request_counts set admitted = admitted + 1 where user_id = p_user;
    return jsonb_build_object(
      'allowed', true, 'limit', p_limit, 'window_s', p_window_s,
      'remaining', p_limit - v_count - 1,
      'reset_s', greatest(0, ceil(extract(epoch from
        coalesce(least(v_oldest, p_now), p_now) - v_since)))::integer,
      'retry_after', 0);
  end if;
  -- Full: one more fits when the request p_limit places back from the newest leaves (the
  -- oldest, unless the limit was lowered since).
  v_free_at := v_oldest;
  if v_count > p_limit then
    select at into v_free_at from internal.chat_requests
    where user_id = p_user order by at offset v_count - p_limit limit 1;
  end if;
  return jsonb_build_object(
    'allowed', false, 'limit', p_limit, 'window_s', p_window_s, 'remaining', 0,
    'reset_s', greatest(1, ceil(extract(epoch from v_oldest - v_since)))::integer,
    'retry_after', greatest(1, ceil(extract(epoch from v_free_at - v_since)))::integer);
end
$$;

-- Under the caller's chat_lock: reservations past their expiry (their instance died, or their
-- settlement failed) are swept into unsettled_tokens on their own day, spent in full.
create or replace function internal.chat_sweep(p_user uuid, p_now timestamptz)
returns void
language plpgsql set search_path = ''
as $$
begin
  with gone as (
    delete from public.chat_reservations r
    where r.user_id = p_user and r.expires_at <= p_now
    returning r.day, r.tokens)
  insert into public.chat_usage as u (user_id, day, unsettled_tokens, unsettled_requests)
  select p_user, g.day, sum(g.tokens), count(*) from gone g group by g.day
  on conflict (user_id, day) do update set
    unsettled_tokens = u.unsettled_tokens + excluded.unsettled_tokens,
    unsettled_requests = u.unsettled_requests + excluded.unsettled_requests;
end
$$;

-- The budget's figures for a user's day, read in one statement (one snapshot): spent (settled,
-- and expired in full) and reserved (open reservations). PL/pgSQL rather than SQL: its plan is
-- kept for the session (a SQL function's body is planned on every call: 0.7 ms in pgbench).
create or replace function internal.chat_budget_figures(
  p_user uuid, p_day date, p_budget bigint, p_now timestamptz)
returns jsonb
language plpgsql stable set search_path = ''
as $$
declare
  v_figures jsonb;
begin
  select jsonb_build_object(
    'budget', p_budget,
    'spent', s.spent,
    'reserved', s.reserved,
    'remaining', greatest(0, p_budget - s.spent - s.reserved),
    'reset_s', greatest(1, ceil(extract(epoch from
      ((p_day + 1)::timestamp at time zone 'utc') - p_now)))::integer,
    'next_expiry_s', s.next_expiry_s)
  into v_figures
  from (select
    coalesce((select u.prompt_tokens + u.completion_tokens + u.unsettled_tokens
              from public.chat_usage u where u.user_id = p_user and u.day = p_day), 0) as spent,
    coalesce((select sum(r.tokens) from public.chat_reservations r
              where r.user_id = p_user and r.day = p_day), 0)::bigint as reserved,
    (select greatest(1, ceil(extract(epoch from min(r.expires_at) - p_now)))::integer
       from public.chat_reservations r where r.user_id = p_user and r.day = p_day) as next_expiry_s
  ) s;
  return v_figures;
end
$$;

-- Admission in one round trip: rate limit, user, cache, then (on a miss, with a budget) the
-- reservation of p_reserve tokens for p_hold_s seconds. Answers one of
--   {state: rate_limited, rate}
--   {state: unknown_user}
--   {state: hit, response, rate, budget?}               (free: nothing reserved)
--   {state: budget_exceeded, rate, budget, requested}   (nothing reserved)
--   {state: miss, rate, budget?, reservation?}
-- rate: chat_rate_take's answer; budget: {budget, spent, reserved, remaining, reset_s,
-- next_expiry_s} after the reservation. p_token_budget null or 0: no budget, nothing reserved.
create function public.chat_admit(
  p_user uuid, p_cache_key text, p_limit integer, p_window_s integer,
  p_token_budget bigint, p_reserve bigint, p_hold_s integer, p_now_ms bigint)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_now timestamptz := coalesce(to_timestamp(p_now_ms / 1000.0), now());
  v_day date := (v_now at time zone 'utc')::date;
  v_rate jsonb;
  v_response jsonb;
  v_figures jsonb;
  v_id uuid;
begin
  perform internal.chat_lock(p_user);
  v_rate := internal.chat_rate_take(p_user, p_limit, p_window_s, v_now);
  if not (v_rate ->> 'allowed')::boolean then
    return jsonb_build_object('state', 'rate_limited', 'rate', v_rate);
  end if;
  if not exists (select 1 from auth.users where id = p_user) then
    return jsonb_build_object('state', 'unknown_user');
  end if;
  if p_cache_key is not null then
    select response into v_response from public.chat_cache
    where user_id = p_user and key = p_cache_key and expires_at > v_now;
    if v_response is not null then
      -- Free: nothing reserved; the day's figures only inform the answer's headers.
      return jsonb_build_object('state', 'hit', 'response', v_response, 'rate', v_rate,
        'budget', case when coalesce(p_token_budget > 0, false) then
          internal.chat_budget_figures(p_user, v_day, p_token_budget, v_now) end);
    end if;
  end if;
  if not coalesce(p_token_budget > 0, false) then
    return jsonb_build_object('state', 'miss', 'rate', v_rate);
  end if;
  perform internal.chat_sweep(p_user, v_now);
  v_figures := internal.chat_budget_figures(p_user, v_day, p_token_budget, v_now);
  if (v_figures ->> 'spent')::bigint + (v_figures ->> 'reserved')::bigint
       + greatest(coalesce(p_reserve, 0), 0) > p_token_budget then
    return jsonb_build_object('state', 'budget_exceeded', 'rate', v_rate,
      'budget', v_figures, 'requested', greatest(coalesce(p_reserve, 0), 0));
  end if;
  insert into public.chat_reservations (user_id, day, tokens, created_at, expires_at)
  values (p_user, v_day, greatest(coalesce(p_reserve, 0), 0), v_now,
          v_now + make_interval(secs => greatest(coalesce(p_hold_s, 0), 1)))
  returning id into v_id;
  -- The figures with this reservation in them.
  v_figures := v_figures || jsonb_build_object(
    'reserved', (v_figures ->> 'reserved')::bigint + greatest(coalesce(p_reserve, 0), 0),
    'remaining', (v_figures ->> 'remaining')::bigint - greatest(coalesce(p_reserve, 0), 0),
    'next_expiry_s', least(coalesce((v_figures ->> 'next_expiry_s')::integer, 2147483647),
                           greatest(coalesce(p_hold_s, 0), 1)));
  return jsonb_build_object('state', 'miss', 'rate', v_rate, 'reservation', v_id,
    'budget', v_figures);
end
$$;

-- Before another upstream attempt (a retry, the fallback model): adds p_tokens to an open
-- reservation, under the same rule as admission. Answers
--   {state: extended, tokens} | {state: budget_exceeded, budget, requested} | {state: gone}
-- (gone: the reservation expired and was counted in full; no further attempt is covered).
create function public.chat_extend(
  p_user uuid, p_reservation uuid, p_tokens bigint, p_token_budget bigint, p_now_ms bigint)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_now timestamptz := coalesce(to_timestamp(p_now_ms / 1000.0), now());
  v_row public.chat_reservations;
  v_figures jsonb;
begin
  perform internal.chat_lock(p_user);
  perform internal.chat_sweep(p_user, v_now);
  select * into v_row from public.chat_reservations
  where id = p_reservation and user_id = p_user;
  if v_row.id is null then
    return jsonb_build_object('state', 'gone');
  end if;
  v_figures := internal.chat_budget_figures(p_user, v_row.day, p_token_budget, v_now);
  if coalesce(p_token_budget > 0, false)
     and (v_figures ->> 'spent')::bigint + (v_figures ->> 'reserved')::bigint
         + greatest(p_tokens, 0) > p_token_budget then
    return jsonb_build_object('state', 'budget_exceeded', 'budget', v_figures,
      'requested', greatest(p_tokens, 0));
  end if;
  update public.chat_reservations
  set tokens = tokens + greatest(p_tokens, 0), attempts = attempts + 1
  where id = p_reservation
  returning tokens into v_row.tokens;
  return jsonb_build_object('state', 'extended', 'tokens', v_row.tokens);
end
$$;

-- Settles a request: caches the answer (when p_response is given), releases the reservation and
-- adds what was really charged to the reservation's day (today when there was none). p_source:
-- llm | fallback | rules (rules after failed attempts still pay for them). A reservation already
-- swept (expired, counted in full) is not charged again. Answers {settled, day}.
create function public.chat_settle(
  p_user uuid, p_reservation uuid, p_cache_key text, p_response jsonb, p_cache_ttl_s integer,
  p_source text, p_prompt_tokens bigint, p_completion_tokens bigint, p_attempts integer,
  p_failed_attempts integer, p_usage_estimated boolean, p_anonymous boolean, p_now_ms bigint)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_now timestamptz := coalesce(to_timestamp(p_now_ms / 1000.0), now());
  v_day date := (v_now at time zone 'utc')::date;
  v_charged boolean := true;
begin
  if p_cache_key is not null and p_cache_ttl_s > 0 and p_response is not null then
    insert into public.chat_cache (user_id, key, response, created_at, expires_at)
    values (p_user, p_cache_key, p_response, v_now, v_now + make_interval(secs => p_cache_ttl_s))
    on conflict (user_id, key) do update
      set response = excluded.response, created_at = excluded.created_at,
          expires_at = excluded.expires_at;
    delete from public.chat_cache
    where user_id = p_user and expires_at < v_now - interval '1 hour';
  end if;
  if p_reservation is not null then
    -- No budget lock: this transaction swaps a reservation for a charge no larger, and
    -- admission reads both in one statement (one snapshot), so it sees neither or both.
    delete from public.chat_reservations
    where id = p_reservation and user_id = p_user
    returning day into v_day;
    if not found then
      -- Expired and swept: it was counted in full already.
      v_charged := false;
      v_day := (v_now at time zone 'utc')::date;
    end if;
  end if;
  insert into public.chat_usage as u (user_id, day, requests, llm_answers, fallback_answers,
    prompt_tokens, completion_tokens, estimated_answers, anonymous, upstream_attempts,
    failed_attempts)
  values (p_user, v_day, 1,
    case when p_source = 'llm' then 1 else 0 end,
    case when p_source = 'fallback' then 1 else 0 end,
    case when v_charged then greatest(coalesce(p_prompt_tokens, 0), 0) else 0 end,
    case when v_charged then greatest(coalesce(p_completion_tokens, 0), 0) else 0 end,
    case when coalesce(p_usage_estimated, false) then 1 else 0 end,
    coalesce(p_anonymous, false),
    greatest(coalesce(p_attempts, 0), 0),
    greatest(coalesce(p_failed_attempts, 0), 0))
  on conflict (user_id, day) do update set
    requests = u.requests + 1,
    llm_answers = u.llm_answers + excluded.llm_answers,
    fallback_answers = u.fallback_answers + excluded.fallback_answers,
    prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = u.completion_tokens + excluded.completion_tokens,
    estimated_answers = u.estimated_answers + excluded.estimated_answers,
    anonymous = excluded.anonymous,
    upstream_attempts = u.upstream_attempts + excluded.upstream_attempts,
    failed_attempts = u.failed_attempts + excluded.failed_attempts;
  return jsonb_build_object('settled', v_charged, 'day', v_day);
end
$$;

-- Chat spend per UTC day over the last p_days days (today included), newest first:
--   users / anonymous_users     users who spent tokens or got an answer recorded that day
--   llm_answers, fallback_answers   answers of the primary and of the fallback model
--   upstream_attempts, failed_attempts   calls that reached the upstream, and the failed ones
--   prompt_tokens, completion_tokens   charged (every attempt; estimates included)
--   unsettled_tokens            reservations never settled, counted in full (open ones past
--                               their expiry included); unsettled_requests how many
--   in_flight_tokens            reserved by requests still open
--   spent_tokens                prompt + completion + unsettled: what budgets count
--   anonymous_tokens            the anonymous users' share of spent_tokens
--   max_user_tokens, p95_user_tokens   the heaviest user, and the 95th percentile, against the budget
--   estimated_answers           requests whose charge includes an estimate (no usage reported)
--   users_at_budget             users whose spend reached p_budget (pass CHAT_DAILY_TOKEN_BUDGET)
create or replace function public.chat_health(p_days integer default 7, p_budget bigint default null)
returns jsonb
language sql stable set search_path = ''
as $$
  with reservations as (
    select r.user_id, r.day,
      coalesce(sum(r.tokens) filter (where r.expires_at > now()), 0) as in_flight,
      coalesce(sum(r.tokens) filter (where r.expires_at <= now()), 0) as expired,
      count(*) filter (where r.expires_at <= now()) as expired_requests
    from public.chat_reservations r
    group by r.user_id, r.day),
  per_user as (
    select coalesce(u.user_id, o.user_id) as user_id, coalesce(u.day, o.day) as day,
      coalesce(u.anonymous, false) as anonymous,
      coalesce(u.llm_answers, 0) as llm_answers,
      coalesce(u.fallback_answers, 0) as fallback_answers,
      coalesce(u.upstream_attempts, 0) as upstream_attempts,
      coalesce(u.failed_attempts, 0) as failed_attempts,
      coalesce(u.prompt_tokens, 0) as prompt_tokens,
      coalesce(u.completion_tokens, 0) as completion_tokens,
      coalesce(u.unsettled_tokens, 0) + coalesce(o.expired, 0) as unsettled_tokens,
      coalesce(u.unsettled_requests, 0) + coalesce(o.expired_requests, 0) as unsettled_requests,
      coalesce(o.in_flight, 0) as in_flight_tokens,
      coalesce(u.estimated_answers, 0) as estimated_answers,
      coalesce(u.requests, 0) as requests
    from public.chat_usage u
    full join reservations o on o.user_id = u.user_id and o.day = u.day),
  spend as (
    select p.*, p.prompt_tokens + p.completion_tokens + p.unsettled_tokens as spent
    from per_user p
    where p.day > (now() at time zone 'utc')::date - p_days)
  select jsonb_build_object(
    'days', p_days,
    'per_day', coalesce(jsonb_agg(to_jsonb(d) order by d.day desc), '[]'::jsonb))
  from (
    select s.day,
      count(*) filter (where s.spent > 0 or s.requests > 0 or s.in_flight_tokens > 0) as users,
      count(*) filter (where s.anonymous and (s.spent > 0 or s.requests > 0)) as anonymous_users,
      sum(s.llm_answers) as llm_answers,
      sum(s.fallback_answers) as fallback_answers,
      sum(s.upstream_attempts) as upstream_attempts,
      sum(s.failed_attempts) as failed_attempts,
      sum(s.prompt_tokens) as prompt_tokens,
      sum(s.completion_tokens) as completion_tokens,
      sum(s.unsettled_tokens) as unsettled_tokens,
      sum(s.unsettled_requests) as unsettled_requests,
      sum(s.in_flight_tokens) as in_flight_tokens,
      sum(s.spent) as spent_tokens,
      coalesce(sum(s.spent) filter (where s.anonymous), 0) as anonymous_tokens,
      max(s.spent) as max_user_tokens,
      round(percentile_cont(0.95) within group (order by s.spent)::numeric) as p95_user_tokens,
      sum(s.estimated_answers) as estimated_answers,
      case when p_budget > 0 then count(*) filter (where s.spent >= p_budget) end as users_at_budget
    from spend s
    where s.spent > 0 or s.requests > 0 or s.in_flight_tokens > 0
    group by s.day
  ) d
$$;

-- The previous build's admission and recording stay for a rollback (issue 21 is additive).
revoke all on function
  public.chat_admit(uuid, text, integer, integer, bigint),
  public.chat_record(uuid, text, jsonb, integer, boolean, integer, integer, boolean, boolean),
  public.chat_health(integer, bigint)
from public, anon, authenticated;
grant execute on function
  public.chat_admit(uuid, text, integer, integer, bigint),
  public.chat_record(uuid, text, jsonb, integer, boolean, integer, integer, boolean, boolean),
  public.chat_health(integer, bigint)
to service_role;

revoke all on function
  internal.chat_lock(uuid),
  internal.chat_rate_take(uuid, integer, integer, timestamptz),
  internal.chat_sweep(uuid, timestamptz),
  internal.chat_budget_figures(uuid, date, bigint, timestamptz),
  public.chat_admit(uuid, text, integer, integer, bigint, bigint, integer, bigint),
  public.chat_extend(uuid, uuid, bigint, bigint, bigint),
  public.chat_settle(uuid, uuid, text, jsonb, integer, text, bigint, bigint, integer, integer,
                     boolean, boolean, bigint)
from public, anon, authenticated;
grant execute on function
  internal.chat_lock(uuid),
  internal.chat_rate_take(uuid, integer, integer, timestamptz),
  internal.chat_sweep(uuid, timestamptz),
  internal.chat_budget_figures(uuid, date, bigint, timestamptz),
  public.chat_admit(uuid, text, integer, integer, bigint, bigint, integer, bigint),
  public.chat_extend(uuid, uuid, bigint, bigint, bigint),
  public.chat_settle(uuid, uuid, text, jsonb, integer, text, bigint, bigint, integer, integer,
                     boolean, boolean, bigint)
to service_role;
