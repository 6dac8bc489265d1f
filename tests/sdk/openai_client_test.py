"""The official `openai` Python package against the locally running chat function."""
import os
import sys

import openai
from openai import OpenAI

BASE = os.environ["CHAT_BASE_URL"]
client = OpenAI(base_url=BASE, api_key=os.environ["CHAT_TOKEN"], max_retries=0, timeout=60)
failures = []
checks = []


def check(name, condition, detail=""):
    checks.append(name)
    print(("ok   " if condition else "FAIL ") + name + (f": {detail}" if detail and not condition else ""))
    if not condition:
        failures.append(name)


raw = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "hello sdk"}])
completion = raw.parse()
check("non-streamed answer is a chat.completion", completion.object == "chat.completion")
check("non-streamed content from the upstream", completion.choices[0].message.content == "echo: hello sdk",
      completion.choices[0].message.content)
check("source header says llm", raw.headers.get("x-chat-source") == "llm", raw.headers.get("x-chat-source"))
check("usage is parsed", completion.usage is not None and completion.usage.total_tokens == 8)

stream = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "stream please"}], stream=True,
    stream_options={"include_usage": True})
pieces, usage = [], None
for chunk in stream:
    if chunk.choices:
        pieces.append(chunk.choices[0].delta.content or "")
    if chunk.usage:
        usage = chunk.usage
text = "".join(pieces).strip()
check("streamed content from the upstream", text == "echo: stream please", text)
check("streamed usage chunk", usage is not None and usage.completion_tokens == 3)

fallback = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "FAIL: how much is the full report?"}])
check("upstream failure falls back to rules", fallback.headers.get("x-chat-source") == "rules",
      fallback.headers.get("x-chat-source"))
check("rules answer is well formed", "one-time purchase" in fallback.parse().choices[0].message.content)

stream = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "FAIL 你好"}], stream=True)
text = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
check("streamed rules answer (Chinese)", "您好" in text, text)

backup = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "FALLBACK please"}])
answered = backup.parse()
check("an overloaded first model hands over to the fallback model",
      backup.headers.get("x-chat-source") == "fallback" and answered.model == "sdk-backup",
      f"{backup.headers.get('x-chat-source')} {answered.model}")
check("the fallback says why", backup.headers.get("x-chat-fallback-reason") == "upstream_5xx",
      backup.headers.get("x-chat-fallback-reason"))
check("the fallback's answer", answered.choices[0].message.content == "echo: FALLBACK please",
      answered.choices[0].message.content)

policy, state = raw.headers.get("ratelimit-policy", ""), raw.headers.get("ratelimit", "")
check("answers carry RateLimit-Policy", '"requests";q=20;w=60' in policy and '"tokens";q=12000' in policy, policy)
check("answers carry RateLimit", state.startswith('"requests";r=') and '"tokens";r=' in state, state)
check("charged what the upstream reported", raw.headers.get("x-chat-tokens-charged") == "8",
      raw.headers.get("x-chat-tokens-charged"))

# The budget is 12,000 tokens (scripts/sdk-test), the completion cap 100. 12,300 bytes: the worst
# case alone passes the whole budget, which no wait fixes: a 400 that says what it would cost.
framing = 0
try:
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "完" * 4100}])
    check("a conversation that can never fit is a 400", False)
except openai.BadRequestError as e:
    body = e.body if isinstance(e.body, dict) else {}
    check("a conversation that can never fit is a 400",
          e.status_code == 400 and e.code == "conversation_exceeds_budget" and body.get("quota") == 12000
          and "retry-after" not in e.response.headers, str(e))
    # What the request costs beyond its own bytes: the system prompt, the framing, the cap.
    framing = int(body.get("requested", 0)) - 4100 * 3

try:
    # Exactly the whole budget: it would fit an empty day, but today has spent some of it.
    filler = "a" * (12000 - framing)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": filler}])
    check("a request over the budget is a 429", False)
except openai.RateLimitError as e:
    body = e.body if isinstance(e.body, dict) else {}
    check("a request over the budget is a 429",
          e.status_code == 429 and e.code == "token_budget_exceeded" and body.get("limit") == "tokens", str(e))
    check("the 429 has Retry-After", int(e.response.headers.get("retry-after", "0")) >= 1,
          e.response.headers.get("retry-after"))

try:
    client.chat.completions.create(model="not-allowed", messages=[{"role": "user", "content": "x"}])
    check("unknown model is a 400", False)
except openai.BadRequestError as e:
    check("unknown model is a 400", e.status_code == 400 and e.code == "model_not_allowed", str(e))

try:
    OpenAI(base_url=BASE, api_key="not-a-token", max_retries=0).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    check("bad token is a 401", False)
except openai.AuthenticationError as e:
    check("bad token is a 401", e.status_code == 401)

print(f"{len(checks) - len(failures)} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
