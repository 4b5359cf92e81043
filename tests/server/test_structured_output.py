"""Structured output through the official `openai` client against a live server on the default model:
response_format (json_schema, json_object), the client's parse() with a pydantic model, tools with tool_choice
"required" / a named function (streaming too), vLLM's guided_* fields on both endpoints, and the 400s."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.server.conftest import MODEL_NAME, LiveServer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                                 "unit": {"enum": ["C", "F"]}},
                                "required": ["city", "unit"]}},
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                                    "required": ["zone"]}},
}
ASK = [{"role": "user", "content": "Describe a person living in a big city, as JSON."}]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=24)
    age: int = pydantic.Field(ge=0, le=120)


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=120)


def test_response_format_json_schema(client: openai.OpenAI, server: LiveServer) -> None:
    result = client.chat.completions.create(
        model=MODEL_NAME, messages=ASK, max_tokens=80, temperature=0, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    for choice in result.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    server.wait_idle()


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    parse = client.chat.completions.parse if hasattr(client.chat.completions, "parse") \
        else client.beta.chat.completions.parse
    result = parse(model=MODEL_NAME, messages=ASK, max_tokens=60, temperature=0.7, seed=3, response_format=Person)
    parsed = result.choices[0].message.parsed
    assert isinstance(parsed, Person) and 0 <= parsed.age <= 120


def test_json_object_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=60, temperature=0,
                                            response_format={"type": "json_object"}, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if chunks[-1].choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


def test_tool_choice_named_function(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=60,
        temperature=0, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_tool_choice_required_streams_a_tool_call_delta(client: openai.OpenAI) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "What time is it in Berlin?"}], max_tokens=120,
        temperature=0, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, stream=True)
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].function.arguments), schemas[calls[0].function.name])
    assert not any(c.choices[0].delta.content for c in chunks)


def test_tool_choice_none_is_plain_text(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=8, temperature=0,
                                            tools=[WEATHER], tool_choice="none")
    assert result.choices[0].message.content and not result.choices[0].message.tool_calls


def test_guided_fields_through_extra_body(client: openai.OpenAI) -> None:
    choice = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Yes or no?"}],
                                            max_tokens=10, temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].message.content in ("yes", "no") and choice.choices[0].finish_reason == "stop"
    regex = r"[A-Z]{2}-\d{3}"
    completion = client.completions.create(model=MODEL_NAME, prompt="A licence plate: ", max_tokens=12, temperature=0,
                                           extra_body={"guided_regex": regex})
    assert re.fullmatch(regex, completion.choices[0].text) and completion.choices[0].finish_reason == "stop"
    newer = client.completions.create(model=MODEL_NAME, prompt="Colour:", max_tokens=12, temperature=0.9, seed=1,
                                      extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert newer.choices[0].text in ("red", "green", "blue")
    grammar = 'root ::= "(" digit+ ")"\ndigit ::= [0-9]'
    ebnf = client.completions.create(model=MODEL_NAME, prompt="Numbers:", max_tokens=8, temperature=0,
                                     extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"\(\d+\)", ebnf.choices[0].text) or ebnf.choices[0].finish_reason == "length"


def _error(server: LiveServer, route: str, payload: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(server.v1 + route, json={"model": MODEL_NAME, **payload}, headers=server.headers())
    assert response.status_code == 400, response.text
    return response.json()["error"]


@pytest.mark.parametrize(("route", "payload", "param"), [
    ("/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, "response_format.json_schema"),
    ("/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("/chat/completions", {"response_format": {"type": "yaml"}}, "response_format"),
    ("/chat/completions", {"tools": [WEATHER]}, "tool_choice"),
    ("/chat/completions", {"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
    ("/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/chat/completions", {"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ("/chat/completions", {"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_regex"),
    ("/completions", {"guided_regex": "a(b"}, "guided_regex"),
    ("/completions", {"guided_grammar": "root ::= "}, "guided_grammar"),
    ("/completions", {"guided_choice": []}, "guided_choice"),
    ("/completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ("/completions", {"structured_outputs": {"jsonn": {}}}, "structured_outputs"),
    ("/completions", {"guided_json": {"type": "object"}, "min_tokens": 2}, "min_tokens"),
])
def test_invalid_constraints_are_400_naming_the_field(server: LiveServer, route: str, payload: dict[str, Any],
                                                      param: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]} if route == "/chat/completions" else {"prompt": "hi"}
    error = _error(server, route, {**body, **payload})
    assert error["param"] == param, error
    server.wait_idle()
