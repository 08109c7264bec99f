"""Tool calls with the official `openai` Python package against a running queen.

Run by test-harness/tests/openai_tools.rs with a python that has `openai` installed:

    python openai_tools.py BASE_URL API_KEY MODEL

MODEL is a small model (SmolLM2): `tool_choice` required or a named function constrains its
answer to a valid call, so the checks hold whatever it would have written freely. Every check
raises (exit status 1) when the queen answers differently from what an OpenAI client expects;
the last line is `all checks passed`.
"""

import json
import sys

import openai

base_url, api_key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def check(what, condition, detail=""):
    if not condition:
        raise AssertionError(f"{what}: {detail}")
    print(f"ok: {what}")


def valid_weather_arguments(arguments):
    args = json.loads(arguments)
    return (
        isinstance(args, dict)
        and set(args) == {"city", "unit"}
        and isinstance(args["city"], str)
        and args["unit"] in ("celsius", "fahrenheit")
    )


# A round trip: the named function is called, its result goes back, the model answers.
first = client.chat.completions.create(
    model=model,
    messages=QUESTION,
    tools=[WEATHER, TIME],
    tool_choice={"type": "function", "function": {"name": "get_weather"}},
    max_tokens=64,
    temperature=0,
)
choice = first.choices[0]
check("a call ends with finish_reason tool_calls", choice.finish_reason == "tool_calls", first)
calls = choice.message.tool_calls
check("one call", calls is not None and len(calls) == 1, choice.message)
call = calls[0]
check("the call has an OpenAI id", call.id.startswith("call_"), call)
check("the call is a function call", call.type == "function", call)
check("the named function is called", call.function.name == "get_weather", call)
check(
    "the arguments are JSON valid for the parameters",
    valid_weather_arguments(call.function.arguments),
    call.function.arguments,
)
check("no content beside the call", not choice.message.content, choice.message)

conversation = QUESTION + [
    choice.message.model_dump(exclude_none=True),
    {"role": "tool", "tool_call_id": call.id, "content": "18 degrees celsius and sunny"},
]
final = client.chat.completions.create(
    model=model,
    messages=conversation,
    tools=[WEATHER, TIME],
    tool_choice="none",
    max_tokens=32,
    temperature=0,
)
answer = final.choices[0]
check("the final answer is text", isinstance(answer.message.content, str) and answer.message.content.strip(), answer)
check("the final answer calls nothing", not answer.message.tool_calls, answer)
check("the final answer stops normally", answer.finish_reason in ("stop", "length"), answer)
# The call and its result are in the prompt: it is longer than the question's alone by at
# least their text.
alone = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1)
check(
    "the call and its result reached the prompt",
    final.usage.prompt_tokens >= alone.usage.prompt_tokens + 15,
    (alone.usage, final.usage),
)

# Streaming with `required`: the call arrives as delta.tool_calls and assembles.
chunks = list(
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=64,
        temperature=0,
        stream=True,
    )
)
assembled = {}
content = ""
finish = None
for chunk in chunks:
    if not chunk.choices:
        continue
    delta = chunk.choices[0].delta
    content += delta.content or ""
    for piece in delta.tool_calls or []:
        entry = assembled.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
        if piece.id is not None:
            check("a call's id comes once", entry["id"] is None, chunks)
            entry["id"] = piece.id
        if piece.function is not None:
            if piece.function.name is not None:
                entry["name"] = piece.function.name
            entry["arguments"] += piece.function.arguments or ""
    if chunk.choices[0].finish_reason is not None:
        finish = chunk.choices[0].finish_reason
check("a streamed call ends with tool_calls", finish == "tool_calls", chunks)
check("the call markup is never content", content == "", content)
check("one streamed call, index 0", list(assembled) == [0], assembled)
streamed = assembled[0]
check("the streamed call has an id", (streamed["id"] or "").startswith("call_"), streamed)
check("an offered function is called", streamed["name"] in ("get_weather", "get_time"), streamed)
parsed = json.loads(streamed["arguments"])
if streamed["name"] == "get_time":
    check("the streamed arguments match get_time", set(parsed) == {"zone"} and isinstance(parsed["zone"], str), parsed)
else:
    check("the streamed arguments match get_weather", valid_weather_arguments(streamed["arguments"]), parsed)

# Refusals are 400s that name the parameter.
def refused(param, **request):
    try:
        client.chat.completions.create(model=model, max_tokens=4, **request)
    except openai.BadRequestError as err:
        check(f"refused: {param}", err.status_code == 400 and err.body.get("param") == param, err.body)
        return
    raise AssertionError(f"{param}: accepted")


refused(
    "tool_choice",
    messages=QUESTION,
    tools=[WEATHER],
    tool_choice={"type": "function", "function": {"name": "get_stock_price"}},
)
refused(
    "messages[2].tool_call_id",
    messages=QUESTION
    + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        ]},
        {"role": "tool", "content": "18 C"},
    ],
)
refused("tools[0].function.name", messages=QUESTION, tools=[{"type": "function", "function": {"name": "get weather"}}])

print("all checks passed")
