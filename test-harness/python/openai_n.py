"""`n` choices through the official `openai` Python package against a running queen.

Run by test-harness/tests/openai_n.rs with a python that has `openai` installed:

    python openai_n.py BASE_URL API_KEY MODEL

Every check raises (exit status 1) when the queen answers differently from what an OpenAI
client expects; the last line is `all checks passed`.
"""

import sys

import openai

base_url, api_key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
MESSAGES = [{"role": "user", "content": "Write a line of a poem."}]


def check(what, condition, detail=""):
    if not condition:
        raise AssertionError(f"{what}: {detail}")
    print(f"ok: {what}")


def ask(n, seed):
    return client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=seed, n=n
    )


three = ask(3, 42)
check("three choices", len(three.choices) == 3, three)
check("indexes 0..2", [c.index for c in three.choices] == [0, 1, 2], three)
texts = [c.message.content for c in three.choices]
check("the choices differ", len(set(texts)) == 3, texts)
check("each has its finish_reason", all(c.finish_reason == "length" for c in three.choices), three)
check("usage sums the choices", three.usage.completion_tokens == 30, three.usage)
check(
    "usage counts the prompt once",
    three.usage.prompt_tokens == ask(1, 42).usage.prompt_tokens,
    three.usage,
)
again = ask(3, 42)
check("the same seed gives the same choices", [c.message.content for c in again.choices] == texts,
      (texts, again))

# Streamed: two choices assembled from their chunks by index.
chunks = list(
    client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=42, n=2,
        stream=True, stream_options={"include_usage": True},
    )
)
streamed = ["", ""]
reasons = [None, None]
for chunk in chunks:
    for choice in chunk.choices:
        streamed[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            reasons[choice.index] = choice.finish_reason
check("streamed choices equal the whole ones", streamed == texts[:2], (streamed, texts))
check("each streamed choice finishes", reasons == ["length", "length"], reasons)
check("one usage chunk, last", chunks[-1].usage.completion_tokens == 20, chunks[-1])

# Completions.
completion = client.completions.create(
    model=model, prompt="The sea", max_tokens=5, temperature=1.0, seed=5, n=2
)
check("completion choices", [c.index for c in completion.choices] == [0, 1], completion)

try:
    ask(9, 1)
    raise AssertionError("n=9 was accepted")
except openai.BadRequestError as err:
    check("n=9 is BadRequestError naming n", err.body.get("param") == "n", err.body)

print("all checks passed")
