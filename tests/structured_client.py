"""Structured outputs through the official OpenAI Python client, against a
running nanoinfer cluster.

Run by tests/openai.rs (real etcd, workers and coordinator):
    python tests/structured_client.py BASE_URL MODEL [SAMPLES]
with the API key in OPENAI_API_KEY. Each check prints one line; the first
failure raises, so the exit status is non-zero and the message says which.

The judge of the issue: `chat.completions.parse` with a Pydantic model
(nesting, an enum, an array with maxItems, strings with maxLength) returns
a parsed object; SAMPLES completions (default 200) sampled at temperature
1.0 with max_tokens 300 all parse and validate where they end by EOS, and
at least 90% end by EOS.
"""

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import openai
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field, ValidationError

BASE, MODEL = sys.argv[1], sys.argv[2]
SAMPLES = int(sys.argv[3]) if len(sys.argv) > 3 else 200
client = OpenAI(base_url=BASE, max_retries=0, timeout=300)


def check(name, ok, detail=""):
    if not ok:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok  {name}", flush=True)


Name = Annotated[str, Field(max_length=40)]


class Place(BaseModel):
    # No properties beyond these (what the SDK's parse sends as well).
    model_config = ConfigDict(extra="forbid")
    city: Name
    country: Name


class Trip(BaseModel):
    model_config = ConfigDict(extra="forbid")
    destination: Place
    season: Literal["spring", "summer", "autumn", "winter"]
    activities: list[Name] = Field(max_length=3)
    nights: int


ASK = [{"role": "user", "content": "Plan a short holiday trip. Reply in JSON."}]

# parse: a Pydantic model in, a parsed object out (greedy).
r = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Trip,
                                  temperature=0, max_tokens=300)
trip = r.choices[0].message.parsed
check("parse returns the Pydantic object", isinstance(trip, Trip)
      and r.choices[0].finish_reason == "stop", r)
print(f"    {r.choices[0].message.content}")

# n > 1, sampled: every choice parses.
r = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Trip,
                                  temperature=1.0, max_tokens=300, n=3, seed=5)
check("n=3: every choice is a parsed Trip",
      len(r.choices) == 3 and all(isinstance(c.message.parsed, Trip) for c in r.choices), r)

# Streaming: the deltas join into the same JSON as the whole answer. Each
# comparison sends its request once first, so the whole and the streamed
# one find the same prompt cells in the worker's cache and compute the
# same logits (docs/api.md, Reproducibility).
TRIP_FORMAT = {"type": "json_schema", "json_schema": {
    "name": "trip", "schema": Trip.model_json_schema(), "strict": True}}
for _ in range(2):
    whole = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=300,
                                           response_format=TRIP_FORMAT)
chunks = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=300,
                                        stream=True, response_format=TRIP_FORMAT)
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("streamed structured output equals the whole one and validates",
      streamed == whole.choices[0].message.content and Trip.model_validate_json(streamed),
      (streamed, whole.choices[0].message.content))

# The Responses API: text.format, as responses.parse sends it.
resp = client.responses.parse(model=MODEL, input=ASK[0]["content"], text_format=Trip, temperature=0,
                              max_output_tokens=300)
check("responses.parse returns the Pydantic object", isinstance(resp.output_parsed, Trip), resp)

# LangChain, as an agent framework asks: with_structured_output(Model)
# (its default method sends response_format json_schema).
from langchain_openai import ChatOpenAI  # noqa: E402

llm = ChatOpenAI(base_url=BASE, model=MODEL, temperature=0, max_tokens=300, max_retries=0,
                 api_key=client.api_key)
planned = llm.with_structured_output(Trip).invoke(ASK[0]["content"])
check("LangChain with_structured_output returns the Pydantic object", isinstance(planned, Trip),
      planned)

# json_object: any JSON object.
r = client.chat.completions.create(
    model=MODEL, temperature=0, max_tokens=200, response_format={"type": "json_object"},
    messages=[{"role": "user", "content": "Describe a cat as JSON with a name and an age."}])
text = r.choices[0].message.content
check("json_object output is a JSON object",
      r.choices[0].finish_reason == "stop" and isinstance(json.loads(text), dict), text)

# Completions take response_format too (the SDK passes it in extra_body).
c = client.completions.create(model=MODEL, prompt="A city and its country, as JSON:", max_tokens=100,
                              temperature=0, extra_body={"response_format": {
                                  "type": "json_schema",
                                  "json_schema": {"name": "place", "schema": Place.model_json_schema()}}})
check("completions: the text validates against the schema",
      c.choices[0].finish_reason == "stop" and Place.model_validate_json(c.choices[0].text), c)

# max_tokens that cuts the value: OpenAI's behaviour, finish_reason length
# and the text so far (not valid JSON); the SDK's parse raises for it.
r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=5,
                                   response_format={"type": "json_schema", "json_schema": {
                                       "name": "trip", "schema": Trip.model_json_schema()}})
cut = r.choices[0].message.content
check("max_tokens cuts the JSON: finish_reason length, a prefix of the whole answer",
      r.choices[0].finish_reason == "length" and whole.choices[0].message.content.startswith(cut),
      (cut, whole.choices[0].message.content))
try:
    client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Trip, temperature=0,
                                  max_tokens=5)
    raise AssertionError("parse of a cut answer returned")
except openai.LengthFinishReasonError:
    check("parse of a cut answer raises LengthFinishReasonError", True)

# A keyword the engine cannot enforce is refused, naming response_format.
try:
    client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=10, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"tags": {
                    "type": "array", "items": {"type": "string"}, "uniqueItems": True}}}}})
    raise AssertionError("an unenforceable schema was accepted")
except openai.BadRequestError as err:
    check("an unenforceable schema is 400 naming response_format and the keyword",
          err.body.get("param") == "response_format"
          and "uniqueItems" in err.body.get("message", ""), err.body)

# Tool calling (the generic format: the tools described in a system
# message, the answer constrained to a call of one of them).
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The current time."}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def valid_weather_args(text):
    args = json.loads(text)
    return (set(args) == {"city", "unit"} and isinstance(args["city"], str)
            and len(args["city"]) <= 40 and args["unit"] in ("celsius", "fahrenheit"))


r = client.chat.completions.create(
    model=MODEL, messages=ASK_WEATHER, temperature=0, max_tokens=200, tools=[WEATHER, TIME],
    tool_choice={"type": "function", "function": {"name": "get_weather"}})
calls = r.choices[0].message.tool_calls
check("a named function is called, its arguments valid against its schema",
      r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
      and len(calls) == 1 and calls[0].function.name == "get_weather"
      and calls[0].type == "function" and calls[0].id.startswith("call_")
      and valid_weather_args(calls[0].function.arguments), r)
print(f"    {calls[0].function.name}({calls[0].function.arguments})")

r = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, temperature=1.0, seed=3,
                                   max_tokens=200, tools=[WEATHER, TIME], tool_choice="required",
                                   parallel_tool_calls=False, n=3)
check("required: every choice calls one of the tools (one call: parallel_tool_calls false)",
      all(c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
          and c.message.tool_calls[0].function.name in ("get_weather", "get_time")
          for c in r.choices), r)

# Streamed: id and name first, then argument fragments; reassembled, the
# same call as the whole answer's.
for _ in range(2):
    whole = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, temperature=0,
                                           max_tokens=200, tools=[WEATHER], tool_choice="required")
chunks = list(client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, temperature=0,
                                             max_tokens=200, tools=[WEATHER], tool_choice="required",
                                             stream=True))
parts = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
first = parts[0]
arguments = "".join(p.function.arguments or "" for p in parts)
finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
wcall = whole.choices[0].message.tool_calls[0]
check("a streamed tool call reassembles to the whole one",
      first.id.startswith("call_") and first.type == "function"
      and first.function.name == wcall.function.name and first.index == 0
      and arguments == wcall.function.arguments and finals == ["tool_calls"], (parts, wcall))

# A round trip: the call, the tool's result, then the answer in words.
history = ASK_WEATHER + [
    {"role": "assistant", "content": None, "tool_calls": [wcall.model_dump()]},
    {"role": "tool", "tool_call_id": wcall.id, "content": "18 degrees celsius and sunny"}]
r = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=100,
                                   tools=[WEATHER], tool_choice="none")
answer = r.choices[0].message.content
check("a round trip: the tool's result read, the answer in words",
      r.choices[0].finish_reason == "stop" and "18" in answer and "{" not in answer
      and not r.choices[0].message.tool_calls, r)
print(f"    {answer!r}")
r = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=100,
                                   tools=[WEATHER], parallel_tool_calls=False)
check("auto after a tool's result: an answer or another valid call",
      (r.choices[0].finish_reason == "stop" and r.choices[0].message.content)
      or (r.choices[0].finish_reason == "tool_calls"
          and valid_weather_args(r.choices[0].message.tool_calls[0].function.arguments)), r)

# LangChain's bind_tools, as an agent binds them.
bound = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke(ASK_WEATHER[0]["content"])
check("LangChain bind_tools: the model's tool call comes back parsed",
      len(bound.tool_calls) == 1 and bound.tool_calls[0]["name"] == "get_weather"
      and set(bound.tool_calls[0]["args"]) == {"city", "unit"}, bound)

# The Responses API's function tools, as the Agents SDK sends them: flat
# tool objects, function_call output items, function_call_output input.
RWEATHER = {"type": "function", "name": "get_weather", "strict": True,
            "description": WEATHER["function"]["description"],
            "parameters": WEATHER["function"]["parameters"]}
r = client.responses.create(model=MODEL, input=ASK_WEATHER[0]["content"], tools=[RWEATHER],
                            tool_choice="required", temperature=0, max_output_tokens=200)
rcalls = [o for o in r.output if o.type == "function_call"]
check("responses: a required call is a function_call item, its arguments valid",
      r.status == "completed" and len(rcalls) >= 1 and rcalls[0].name == "get_weather"
      and rcalls[0].call_id.startswith("call_") and valid_weather_args(rcalls[0].arguments), r)
events = list(client.responses.create(model=MODEL, input=ASK_WEATHER[0]["content"],
                                      tools=[RWEATHER], tool_choice="required", temperature=0,
                                      max_output_tokens=200, stream=True))
kinds = [e.type for e in events]
final = [e.response for e in events if e.type == "response.completed"]
scalls = [o for o in final[0].output if o.type == "function_call"] if final else []
check("responses: streamed, the same call, with its arguments events",
      "response.function_call_arguments.done" in kinds and len(scalls) == len(rcalls)
      and scalls[0].arguments == rcalls[0].arguments, kinds)
r = client.responses.create(model=MODEL, tools=[RWEATHER], temperature=0, max_output_tokens=100,
                            tool_choice="none", input=[
                                {"role": "user", "content": ASK_WEATHER[0]["content"]},
                                {"type": "function_call", "call_id": rcalls[0].call_id,
                                 "name": rcalls[0].name, "arguments": rcalls[0].arguments},
                                {"type": "function_call_output", "call_id": rcalls[0].call_id,
                                 "output": "18 degrees celsius and sunny"}])
check("responses: a round trip through function_call_output to an answer in words",
      r.status == "completed" and "18" in r.output_text, r)
print(f"    {r.output_text!r}")

# A tool whose schema the engine cannot enforce is refused, naming tools.
try:
    client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=10, tools=[
        {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}}}])
    raise AssertionError("an unenforceable tool schema was accepted")
except openai.BadRequestError as err:
    check("an unenforceable tool schema is 400 naming tools",
          err.body.get("param") == "tools" and "uniqueItems" in err.body.get("message", ""), err.body)

# The judge: SAMPLES sampled completions, 8 per request (n), temperature
# 1.0, two requests at a time (the cluster has two workers).
def batch(seed, n):
    return client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=1.0, max_tokens=300, n=n, seed=seed,
        response_format={"type": "json_schema", "json_schema": {
            "name": "trip", "schema": Trip.model_json_schema(), "strict": True}}).choices


started = time.monotonic()
sizes = [min(8, SAMPLES - i) for i in range(0, SAMPLES, 8)]
with ThreadPoolExecutor(max_workers=2) as pool:
    choices = [c for cs in pool.map(batch, range(1000, 1000 + len(sizes)), sizes) for c in cs]
ended, valid, cut, invalid = 0, 0, 0, []
for c in choices:
    if c.finish_reason != "stop":
        cut += 1
        continue
    ended += 1
    try:
        Trip.model_validate_json(c.message.content)
        valid += 1
    except ValidationError as e:
        invalid.append((c.message.content, str(e)))
check("the judge got every sample", len(choices) == SAMPLES, len(choices))
print(f"    {SAMPLES} samples in {time.monotonic() - started:.1f} s: {ended} ended by EOS, "
      f"{valid} valid, {cut} cut by max_tokens")
check("every completion that ends by EOS validates", not invalid, invalid[:3])
check("at least 90% end by EOS", ended >= 0.9 * SAMPLES, (ended, SAMPLES))

print("all checks passed")
