"""LiteLLM against a running nanoinfer cluster, as an application that
routes through LiteLLM to an OpenAI-compatible server calls it.

Run by tests/openai.rs (real etcd, workers and coordinator):
    python tests/litellm_client.py BASE_URL MODEL
with the API key in OPENAI_API_KEY. Each check prints one line; the first
failure raises, so the exit status is non-zero and the message says which.
"""

import json
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list
import litellm  # noqa: E402

BASE, MODEL = sys.argv[1], sys.argv[2]
KEY = os.environ.get("OPENAI_API_KEY", "none")
ARGS = dict(model=f"openai/{MODEL}", api_base=BASE, api_key=KEY, temperature=0)


def check(name, ok, detail=""):
    if not ok:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok  {name}", flush=True)


ASK = [{"role": "user", "content": "What is the capital of France?"}]
r = litellm.completion(messages=ASK, max_tokens=20, **ARGS)
text = r.choices[0].message.content
check("completion: an answer and usage", bool(text) and r.usage.prompt_tokens > 0
      and r.usage.completion_tokens > 0, r)
print(f"    {text!r}")

chunks = list(litellm.completion(messages=ASK, max_tokens=20, stream=True, **ARGS))
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("completion, streamed: the same text", streamed == text, (streamed, text))

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
r = litellm.completion(messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
                       max_tokens=100, **ARGS)
calls = r.choices[0].message.tool_calls
check("tools: the call comes back parsed",
      r.choices[0].finish_reason == "tool_calls" and calls and calls[0].function.name == "get_weather"
      and isinstance(json.loads(calls[0].function.arguments)["city"], str), r)

history = ASK_WEATHER + [
    {"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
    {"role": "tool", "tool_call_id": calls[0].id, "content": "18 degrees celsius and sunny"}]
r = litellm.completion(messages=history, tools=[WEATHER], tool_choice="none", max_tokens=60, **ARGS)
check("tools: a round trip to an answer in words", "18" in (r.choices[0].message.content or ""), r)

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                           "country": {"type": "string", "maxLength": 40}},
          "required": ["city", "country"], "additionalProperties": False}
r = litellm.completion(messages=[{"role": "user", "content": "Name a city and its country."}],
                       response_format={"type": "json_schema", "json_schema": {
                           "name": "place", "schema": SCHEMA, "strict": True}},
                       max_tokens=60, **ARGS)
place = json.loads(r.choices[0].message.content)
check("response_format json_schema: the answer validates",
      set(place) == {"city", "country"}, r.choices[0].message.content)

try:
    litellm.completion(messages=ASK, max_tokens=5, **{**ARGS, "model": "openai/no-such-model"})
    raise AssertionError("an unknown model was accepted")
except litellm.NotFoundError as err:
    check("an unknown model is LiteLLM's NotFoundError", "model" in str(err), err)
