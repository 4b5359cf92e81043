"""Structured output on the OpenAI routes: request fields -> StructuredOutputsParams, and tool calls.

Request fields (at most one constraint per request; each error names its field, HTTP 400):
- response_format: {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}};
  `strict: true` never generates properties the schema does not declare (OpenAI's strict mode), otherwise they may
  appear where the schema allows them. The schema itself is enforced either way.
- vLLM's guided_json, guided_regex, guided_choice, guided_grammar (EBNF), and their newer form structured_outputs:
  {"json" | "regex" | "choice" | "grammar" | "json_object": ...}.
- chat only: tools with tool_choice "required" (the output is a JSON array of one or more {"name", "parameters"}
  calls to the given functions, vLLM's shape) or {"type": "function", "function": {"name": ...}} (the output is that
  function's arguments); "none" ignores the tools. "auto" (the model decides between text and calls) needs a parser
  of the model's own tool-call format and is rejected.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from tokenmill.entrypoints.openai.inputs import RequestError
from tokenmill.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    SamplingFields,
    ToolCall,
)
from tokenmill.structured.grammar import validate
from tokenmill.structured.params import KINDS, StructuredOutputsParams

_GUIDED = (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
           ("guided_grammar", "grammar"))


def _params(field: str, **kwargs: Any) -> StructuredOutputsParams:
    """StructuredOutputsParams(**kwargs), checked all the way to a grammar; errors name `field`."""
    try:
        params = StructuredOutputsParams(**kwargs)
        validate(params)
    except ValueError as exc:
        message = str(exc) if field == "structured_outputs" else re.sub(r"^structured_outputs(\.\w+)?", field, str(exc))
        raise RequestError(message, field) from None
    return params


def _from_response_format(body: SamplingFields) -> StructuredOutputsParams | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return _params("response_format", json_object=True)
    if fmt.type != "json_schema":
        raise RequestError(f"response_format type must be text, json_object or json_schema, got {fmt.type!r}",
                           "response_format")
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise RequestError("response_format json_schema needs json_schema.schema", "response_format.json_schema")
    return _params("response_format.json_schema", json=fmt.json_schema.json_schema,
                   strict=bool(fmt.json_schema.strict))


def _from_structured_outputs(value: dict[str, Any]) -> StructuredOutputsParams:
    unknown = sorted(set(value) - {*KINDS, "strict"})
    if unknown:
        raise RequestError(f"structured_outputs has unknown fields {unknown}; it takes {', '.join(KINDS)}",
                           "structured_outputs")
    given = {k: v for k, v in value.items() if v is not None}
    return _params("structured_outputs", **given)


def structured_outputs_of(body: SamplingFields) -> StructuredOutputsParams | None:
    """The request's output constraint from response_format, guided_* or structured_outputs (at most one)."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    from_format = _from_response_format(body)
    if from_format is not None:
        found.append(("response_format", from_format))
    for field, kind in _GUIDED:
        value = getattr(body, field)
        if value is not None:
            found.append((field, _params(field, **{kind: value})))
    if body.structured_outputs is not None:
        found.append(("structured_outputs", _from_structured_outputs(body.structured_outputs)))
    if len(found) > 1:
        names = [name for name, _ in found]
        raise RequestError(f"only one output constraint may be given, got {', '.join(names)}", names[1])
    return found[0][1] if found else None


# -- tools -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolPlan:
    """How a chat request's output becomes tool calls: `name` set: the output is that function's arguments;
    None: the output is a JSON array of {"name", "parameters"} objects (tool_choice "required")."""

    name: str | None
    constraint: StructuredOutputsParams


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Function name -> its parameters schema, with each tool checked."""
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise RequestError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., '
                               '"parameters": ...}}', "tools")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"tools[{i}].function needs a name", "tools")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema (an object)", "tools")
        functions[name] = parameters
    return functions


def tool_plan(body: ChatCompletionRequest) -> ToolPlan | None:
    """The tool-call plan of a chat request, or None when its output is plain text (no tools, or tool_choice
    "none")."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise RequestError("tool_choice needs tools", "tool_choice")
        return None
    functions = _functions(body.tools)
    if choice == "none":
        return None
    if choice is None or choice == "auto":
        raise RequestError('tool_choice "auto" is not supported (it needs a parser of the model\'s own tool-call '
                           'format): use "required", a named function, or "none"', "tool_choice")
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
                  "required": ["name", "parameters"]} for name, schema in functions.items()]
        schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        if body.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan(None, _params("tools", json=schema))
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type", "function") != "function" or not isinstance(name, str):
        raise RequestError('tool_choice must be "none", "required" or {"type": "function", "function": {"name": ...}}',
                           "tool_choice")
    if name not in functions:
        raise RequestError(f"tool_choice names function {name!r}, which is not among the tools", "tool_choice")
    return ToolPlan(name, _params("tools", json=functions[name]))


def chat_constraint(body: ChatCompletionRequest) -> tuple[ToolPlan | None, StructuredOutputsParams | None]:
    """A chat request's tool plan and output constraint (the plan's, or its response_format / guided_* one)."""
    plan = tool_plan(body)
    constraint = structured_outputs_of(body)
    if plan is None:
        return None, constraint
    if constraint is not None:
        raise RequestError("tool calls (tool_choice required or a named function) cannot be combined with another "
                           "output constraint (response_format, guided_*, structured_outputs)", "tool_choice")
    return plan, plan.constraint


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls_of(plan: ToolPlan, text: str) -> list[ToolCall] | None:
    """The calls in a finished output, or None when it is not a complete call (cut by max_tokens)."""
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None
    if plan.name is not None:  # the text is the named function's arguments
        return [ToolCall(id=new_call_id(), function=FunctionCall(name=plan.name, arguments=text))]
    if not isinstance(calls, list) or not all(isinstance(c, dict) and "name" in c for c in calls):
        return None
    return [ToolCall(id=new_call_id(), function=FunctionCall(
        name=c["name"], arguments=json.dumps(c.get("parameters", {}), ensure_ascii=False))) for c in calls]


def delta_tool_calls(calls: list[ToolCall]) -> list[DeltaToolCall]:
    """Whole calls as one streaming delta."""
    return [DeltaToolCall(index=i, id=c.id, type="function",
                          function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments))
            for i, c in enumerate(calls)]
