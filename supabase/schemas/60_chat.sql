-- Chat: the per-user answer cache, token accounting and budgets. Admission (rate limit, cache,
-- budget) is one call and one round trip; recording an answer (cache and usage) is another.

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

-- Chat spend per UTC day over the last p_days days (today included), newest first:
--   users / anonymous_users     users with at least one recorded LLM answer that day
--   llm_answers                 answers recorded (cache and rule answers cost nothing, not counted)
--   prompt_tokens, completion_tokens, anonymous_tokens (the anonymous users' share)
--   max_user_tokens, p95_user_tokens   the heaviest user, and the 95th percentile, against the budget
--   estimated_answers           answers whose tokens were estimated (the upstream reported no usage)
--   users_at_budget             users whose day reached p_budget (pass CHAT_DAILY_TOKEN_BUDGET)
create or replace function public.chat_health(p_days integer default 7, p_budget bigint default null)
returns jsonb
language sql stable set search_path = ''
as $$
  select jsonb_build_object(
    'days', p_days,
    'per_day', coalesce(jsonb_agg(to_jsonb(d) order by d.day desc), '[]'::jsonb))
  from (
    select u.day,
      count(*) as users,
      count(*) filter (where u.anonymous) as anonymous_users,
      sum(u.llm_answers) as llm_answers,
      sum(u.prompt_tokens) as prompt_tokens,
      sum(u.completion_tokens) as completion_tokens,
      coalesce(sum(u.prompt_tokens + u.completion_tokens) filter (where u.anonymous), 0)
        as anonymous_tokens,
      max(u.prompt_tokens + u.completion_tokens) as max_user_tokens,
      round(percentile_cont(0.95) within group (order by u.prompt_tokens + u.completion_tokens)::numeric)
        as p95_user_tokens,
      sum(u.estimated_answers) as estimated_answers,
      case when p_budget > 0 then
        count(*) filter (where u.prompt_tokens + u.completion_tokens >= p_budget) end as users_at_budget
    from public.chat_usage u
    where u.day > (now() at time zone 'utc')::date - p_days
    group by u.day
  ) d
$$;

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
