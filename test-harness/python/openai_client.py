"""The official `openai` Python package against a running queen.

Run by test-harness/tests/openai.rs with a python that has `openai` installed:

    python openai_client.py BASE_URL API_KEY MODEL

BASE_URL is the queen's URL with `/v1`. Every check raises (exit status 1) when the queen
answers differently from what an OpenAI client expects; the last line is `all checks passed`.
"""

import sys

import openai

base_url, api_key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
QUESTION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name the capital of France."},
]


def check(what, condition, detail=""):
    if not condition:
        raise AssertionError(f"{what}: {detail}")
    print(f"ok: {what}")


# Models.
listed = [m.id for m in client.models.list()]
check("the model is listed", model in listed, listed)
check("the model can be retrieved", client.models.retrieve(model).id == model)

# Chat, not streaming.
chat = client.chat.completions.create(
    model=model, messages=QUESTION, max_tokens=24, temperature=0
)
answer = chat.choices[0].message.content
check("chat object", chat.object == "chat.completion", chat)
check("chat role", chat.choices[0].message.role == "assistant", chat)
check("chat answer", "Paris" in answer, answer)
check("chat finish_reason", chat.choices[0].finish_reason in ("stop", "length"), chat)
usage = chat.usage
check("chat usage", usage.prompt_tokens > 0 and usage.completion_tokens > 0, usage)
check(
    "chat usage total",
    usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
    usage,
)

# Chat, streaming, with usage: the same greedy answer, chunk by chunk.
chunks = list(
    client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
)
check("first chunk has the role", chunks[0].choices[0].delta.role == "assistant", chunks[0])
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("streamed chat equals the whole answer", streamed == answer, (streamed, answer))
finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
check("one finish_reason", finish == [chat.choices[0].finish_reason], finish)
check("usage chunk last", chunks[-1].choices == [] and chunks[-1].usage is not None, chunks[-1])
check("streamed usage", chunks[-1].usage.completion_tokens == usage.completion_tokens, chunks[-1])

# Completions, streaming and not.
PROMPT = "The capital of France is"
completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
text = completion.choices[0].text
check("completion object", completion.object == "text_completion", completion)
check("completion text", "Paris" in text, text)
check("completion usage", completion.usage.completion_tokens <= 12, completion.usage)
pieces = list(
    client.completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True
    )
)
check(
    "streamed completion equals the whole text",
    "".join(p.choices[0].text for p in pieces if p.choices) == text,
    pieces,
)

# max_tokens and stop.
short = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0)
check("max_tokens ends with length", short.choices[0].finish_reason == "length", short)
check("max_tokens counts", short.usage.completion_tokens == 2, short.usage)
stopped = client.completions.create(
    model=model, prompt=PROMPT, max_tokens=12, temperature=0, stop=["Paris"]
)
check("stop ends with stop", stopped.choices[0].finish_reason == "stop", stopped)
check(
    "stop cuts before the stop sequence",
    stopped.choices[0].text == text[: text.index("Paris")],
    (stopped.choices[0].text, text),
)

# Log-probabilities: the SDK parses OpenAI's shapes; greedy picks the most likely token.
scored = client.chat.completions.create(
    model=model, messages=QUESTION, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
)
content = scored.choices[0].logprobs.content
check("chat logprobs, one per token", len(content) == scored.usage.completion_tokens
      or len(content) == scored.usage.completion_tokens - 1, (len(content), scored.usage))
check("chat logprobs are log-probabilities", all(t.logprob <= 0 for t in content), content)
check("chat top_logprobs has 3", all(len(t.top_logprobs) == 3 for t in content), content)
check("greedy token is the top one", all(t.token == t.top_logprobs[0].token
      and abs(t.logprob - t.top_logprobs[0].logprob) < 1e-6 for t in content), content)


def own_bytes(t):
    """Byte-level BPE: a whole token's bytes are its text; part of a character has bytes that
    are not UTF-8 alone, and its text is U+FFFD."""
    try:
        return bytes(t.bytes).decode() == t.token
    except UnicodeDecodeError:
        return t.token == "\ufffd"


check("bytes are the token's own", all(own_bytes(t) for t in content), content)
check("the logprobs' tokens spell the answer", "".join(t.token for t in content)
      .startswith(scored.choices[0].message.content[:8]), (content, scored.choices[0].message))
streamed_scores = [
    t
    for c in client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=3, stream=True,
    )
    if c.choices and c.choices[0].logprobs
    for t in c.choices[0].logprobs.content
]
check("streamed chat logprobs equal the whole answer's",
      [(t.token, round(t.logprob, 4)) for t in streamed_scores]
      == [(t.token, round(t.logprob, 4)) for t in content], (streamed_scores, content))
legacy = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
lp = legacy.choices[0].logprobs
check("completion logprobs lists", len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
      == len(lp.text_offset) > 0, lp)
check("completion top_logprobs are dicts of 2", all(isinstance(d, dict) and len(d) == 2
      for d in lp.top_logprobs), lp.top_logprobs)
check("completion text_offset grows", lp.text_offset == sorted(lp.text_offset), lp.text_offset)
streamed_tokens = [
    t
    for c in client.completions.create(
        model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, stream=True
    )
    if c.choices and c.choices[0].logprobs
    for t in c.choices[0].logprobs.tokens
]
check("streamed completion logprobs", streamed_tokens == lp.tokens, (streamed_tokens, lp.tokens))
try:
    client.chat.completions.create(model=model, messages=QUESTION, logprobs=True, top_logprobs=21)
    raise AssertionError("top_logprobs=21 was accepted")
except openai.BadRequestError as err:
    check("top_logprobs=21 is BadRequestError", err.body.get("param") == "top_logprobs", err.body)

# Seed: the same seed with a temperature above 0 gives the same text.
def sampled(seed):
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a short poem about bees."}],
        max_tokens=24,
        temperature=1.0,
        seed=seed,
    )
    return reply.choices[0].message.content


first = sampled(1234)
check("same seed, same text", first == sampled(1234), first)

# Errors.
try:
    openai.OpenAI(base_url=base_url, api_key="wrong-key", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as err:
    check("wrong key is AuthenticationError", err.status_code == 401, err)
try:
    client.chat.completions.create(model="no-such-model", messages=QUESTION)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as err:
    check("unknown model is NotFoundError", err.status_code == 404, err)
try:
    client.chat.completions.create(model=model, messages=QUESTION, n=9)
    raise AssertionError("n=9 was accepted")
except openai.BadRequestError as err:
    check("n=9 is BadRequestError", err.body.get("param") == "n", err.body)

print("all checks passed")
