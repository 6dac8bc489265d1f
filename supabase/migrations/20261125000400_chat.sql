-- Chat: per-user answer cache and token accounting. Admission (rate limit + cache lookup) is one
-- call and one round trip; recording an answer (cache + usage) is another.

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

-- Rate limit and cache lookup together. Answers:
--   {state: rate_limited, retry_after} | {state: hit, response} | {state: miss} | {state: unknown_user}
create or replace function public.chat_admit(p_user uuid, p_cache_key text, p_limit integer, p_window_s integer)
returns jsonb
language plpgsql set search_path = ''
as $$
declare
  v_retry integer;
  v_response jsonb;
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
  return jsonb_build_object('state', 'miss');
end
$$;

-- Records an answer: caches it (when p_cache_ttl_s > 0) and adds the day's usage.
create or replace function public.chat_record(
  p_user uuid, p_cache_key text, p_response jsonb, p_cache_ttl_s integer,
  p_llm boolean, p_prompt_tokens integer, p_completion_tokens integer)
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
  insert into public.chat_usage as u (user_id, day, requests, llm_answers, prompt_tokens, completion_tokens)
  values (p_user, current_date, 1, case when p_llm then 1 else 0 end,
          coalesce(p_prompt_tokens, 0), coalesce(p_completion_tokens, 0))
  on conflict (user_id, day) do update set
    requests = u.requests + 1,
    llm_answers = u.llm_answers + excluded.llm_answers,
    prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = u.completion_tokens + excluded.completion_tokens;
  return jsonb_build_object('recorded', true);
end
$$;

revoke all on function
  public.chat_admit(uuid, text, integer, integer),
  public.chat_record(uuid, text, jsonb, integer, boolean, integer, integer)
from public, anon, authenticated;
grant execute on function
  public.chat_admit(uuid, text, integer, integer),
  public.chat_record(uuid, text, jsonb, integer, boolean, integer, integer)
to service_role;
