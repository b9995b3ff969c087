"""The official OpenAI Python client against a running nanoinfer cluster.

Run by tests/openai.rs (real etcd, workers and coordinator):
    python tests/openai_client.py BASE_URL MODEL
with the API key in OPENAI_API_KEY. Each check prints one line; the first
failure raises, so the exit status is non-zero and the message says which.
"""

import sys

import openai
from openai import OpenAI

BASE, MODEL = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=BASE, max_retries=0, timeout=120)
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def check(name, ok, detail=""):
    if not ok:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok  {name}")


# Models: the name the workers registered.
ids = [m.id for m in client.models.list()]
check("models.list names the served model", MODEL in ids, ids)

# Chat, whole and streamed, greedy: the same answer both ways.
r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40)
answer = r.choices[0].message.content
check("chat answers the question", "Paris" in answer, repr(answer))
check("chat response shape",
      r.object == "chat.completion" and r.model == MODEL and r.choices[0].message.role == "assistant"
      and r.choices[0].finish_reason == "stop" and r.id.startswith("chatcmpl-"), r)
check("chat usage", r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 0
      and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage)

chunks = list(client.chat.completions.create(
    model=MODEL, messages=QUESTION, temperature=0, max_tokens=40, stream=True,
    stream_options={"include_usage": True}))
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("streamed chat equals the whole answer", streamed == answer, (streamed, answer))
check("the first chunk carries the role", chunks[0].choices[0].delta.role == "assistant", chunks[0])
finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
check("one finish_reason, stop", finals == ["stop"], finals)
check("include_usage: a last chunk with usage and no choices",
      chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens,
      chunks[-1])
check("usage only on the last chunk", all(c.usage is None for c in chunks[:-1]))

# max_tokens and finish_reason length.
r = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Write a long story about a dragon."}],
    temperature=0, max_tokens=5)
check("max_tokens bounds the answer",
      r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5, r)

# stop: cut where the unstopped greedy answer has the stop text.
long = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "List the days of the week."}],
    temperature=0, max_tokens=60).choices[0].message.content
stop = long[12:16]
check("a stop text exists in the answer", len(long) > 20 and stop.strip(), repr(long))
r = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "List the days of the week."}],
    temperature=0, max_tokens=60, stop=[stop])
check("stop ends the text before the stop sequence",
      r.choices[0].message.content == long[:long.index(stop)] and r.choices[0].finish_reason == "stop",
      (stop, r.choices[0].message.content, long))

# seed: the same seed gives the same text; other seeds another.
def sampled(seed):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a fun fact."}],
        temperature=1.0, max_tokens=20, seed=seed).choices[0].message.content

a, b = sampled(42), sampled(42)
check("same seed, same text", a == b, (a, b))
others = {sampled(s) for s in (43, 44, 45)}
check("other seeds, other texts", any(o != a for o in others), others)

# Completions, whole and streamed, and echo.
c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
check("completion", c.object == "text_completion" and c.choices[0].text and c.usage.completion_tokens > 0, c)
parts = list(client.completions.create(
    model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
check("streamed completion equals the whole one",
      "".join(p.choices[0].text for p in parts) == c.choices[0].text, parts)
e = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                              echo=True)
check("echo puts the prompt first", e.choices[0].text == "The capital of France is" + c.choices[0].text, e)

# n = 3: three choices, each with its own index, usage over all of them.
r = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
    temperature=1.0, max_tokens=8, n=3, seed=7)
check("n=3 gives three choices", sorted(ch.index for ch in r.choices) == [0, 1, 2], r.choices)
check("n=3 usage counts every choice", r.usage.completion_tokens >= 3, r.usage)

# logprobs with top_logprobs (greedy: the chosen token is the most likely).
r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=6,
                                   logprobs=True, top_logprobs=3)
content = r.choices[0].logprobs.content
check("logprobs: one entry per token", len(content) == r.usage.completion_tokens, content)
check("logprobs are log-probabilities", all(t.logprob <= 0 for t in content), content)
check("top_logprobs: three alternatives, most likely first, the greedy pick on top",
      all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
          and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4 for t in content), content)
check("logprob tokens spell the answer",
      "".join(t.token for t in content) == r.choices[0].message.content, content)

# models.retrieve, and logit_bias as the client sends it (best_of too).
check("models.retrieve finds the model", client.models.retrieve(MODEL).id == MODEL)
r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3,
                              temperature=0, best_of=1, logit_bias={"0": -100})
check("completions take best_of=1 and logit_bias", r.choices[0].text != "", r)

# The Responses API: the same answer as chat, whole and streamed.
resp = client.responses.create(model=MODEL, input=QUESTION[0]["content"], temperature=0,
                               max_output_tokens=40)
check("responses answers the question", "Paris" in resp.output_text, resp)
check("responses shape and usage",
      resp.object == "response" and resp.status == "completed" and resp.id.startswith("resp_")
      and resp.usage.input_tokens > 10 and resp.usage.output_tokens > 0, resp)
events = list(client.responses.create(model=MODEL, input=QUESTION[0]["content"], temperature=0,
                                      max_output_tokens=40, stream=True))
kinds = [e.type for e in events]
deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
check("streamed responses: typed events in order, deltas spell the answer",
      kinds[0] == "response.created" and kinds[-1] == "response.completed"
      and deltas == resp.output_text and events[-1].response.output_text == resp.output_text,
      (kinds, deltas))
r = client.responses.create(model=MODEL, instructions="Answer in one word.",
                            input=[{"role": "user", "content": "Name a colour."}], max_output_tokens=2)
check("responses: max_output_tokens cuts it short, status incomplete",
      r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens", r)

# Errors: a bad parameter names it; an unknown model is 404 model_not_found.
try:
    client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=-1)
    raise AssertionError("temperature -1 was accepted")
except openai.BadRequestError as err:
    check("a bad parameter is 400 naming it", err.status_code == 400 and "temperature" in str(err)
          and err.body.get("param") == "temperature", err.body)
try:
    client.chat.completions.create(model="no-such-model", messages=QUESTION)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as err:
    check("an unknown model is 404 model_not_found", err.code == "model_not_found", err.body)
try:
    OpenAI(base_url=BASE, api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as err:
    check("a wrong key is 401", err.status_code == 401, err.body)

print("all checks passed")
