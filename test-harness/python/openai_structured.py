"""Structured output with the official `openai` Python package against a running queen.

Run by test-harness/tests/openai_structured.rs with a python that has `openai` (and so
`pydantic`) installed:

    python openai_structured.py BASE_URL API_KEY MODEL

Every check raises (exit status 1) when the answer is not what an OpenAI client expects; the
last line is `all checks passed`.
"""

import json
import sys

import openai
from pydantic import BaseModel

base_url, api_key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)


def check(what, condition, detail=""):
    if not condition:
        raise AssertionError(f"{what}: {detail}")
    print(f"ok: {what}")


class Capital(BaseModel):
    city: str
    country: str


QUESTION = [
    {"role": "system", "content": "You are a helpful assistant. Answer in JSON."},
    {"role": "user", "content": "What is the capital of France?"},
]

# `parse` with a Pydantic model: the SDK sends a strict json_schema and parses the answer
# into the model (it raises when the answer does not validate).
parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
parsed = parse(
    model=model, messages=QUESTION, response_format=Capital, max_tokens=60, temperature=0
)
message = parsed.choices[0].message
check("parse returns the model", isinstance(message.parsed, Capital), parsed)
check("the answer ended by itself", parsed.choices[0].finish_reason == "stop", parsed)
check("the parsed answer is right", "Paris" in message.parsed.city, message.parsed)
check("the content is the JSON", json.loads(message.content) == message.parsed.model_dump(), message)

# Streamed: the chunks' content, joined, is the JSON object.
stream = client.chat.completions.create(
    model=model,
    messages=QUESTION,
    max_tokens=60,
    temperature=0,
    stream=True,
    response_format={
        "type": "json_schema",
        "json_schema": {"name": "Capital", "schema": Capital.model_json_schema(), "strict": True},
    },
)
text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
check("a streamed answer validates", Capital.model_validate_json(text).city == message.parsed.city, text)

# Any JSON object, sampled.
answer = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Describe a cat as JSON."}],
    max_tokens=200,
    temperature=0.7,
    seed=3,
    response_format={"type": "json_object"},
)
content = answer.choices[0].message.content
if answer.choices[0].finish_reason == "stop":
    check("json_object gives an object", isinstance(json.loads(content), dict), content)
else:
    check("json_object starts an object", content.startswith("{"), content)

# The legacy completions endpoint takes it too (as llama-server and vLLM do).
completion = client.completions.create(
    model=model,
    prompt="The capital of Italy, as JSON:",
    max_tokens=60,
    temperature=0,
    extra_body={"response_format": {"type": "json_schema", "json_schema": {
        "name": "Capital", "schema": Capital.model_json_schema()}}},
)
check("a completion validates", Capital.model_validate_json(completion.choices[0].text), completion)

# A schema that does not compile is a 400 that names the problem.
try:
    client.chat.completions.create(
        model=model,
        messages=QUESTION,
        response_format={"type": "json_schema", "json_schema": {
            "name": "Bad", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}},
    )
    raise AssertionError("a malformed schema was accepted")
except openai.BadRequestError as e:
    check("a malformed schema is a 400", e.status_code == 400, e)
    check("the error names the problem", "strin" in str(e.body), e.body)

print("all checks passed")
