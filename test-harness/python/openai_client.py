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
    {"role": "user", "content": "What is the capital of France?"},
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
    client.chat.completions.create(model=model, messages=QUESTION, n=2)
    raise AssertionError("n=2 was accepted")
except openai.BadRequestError as err:
    check("n=2 is BadRequestError", err.body.get("param") == "n", err.body)

print("all checks passed")
