"""Chat templates rendered as transformers renders them, so prompts match the HF oracle byte for byte.

The environment is the one transformers 5 gives a tokenizer's chat template (see its
`utils/chat_template_utils.py`): a sandboxed, immutable jinja2 environment with trim_blocks and
lstrip_blocks, the loopcontrols extension, a `{% generation %}` block (rendered as its body), a `tojson`
filter that does not escape HTML or non-ASCII, and the globals `raise_exception`, `strftime_now`,
`dict` and `namespace` (which rejects underscore names). Every value a template sees is rebuilt from
plain JSON types first (`plain_template_data`), messages drop keys whose value is None, and a message's
reasoning is visible under each of its names.

Imported only when a chat template is rendered: jinja2 stays off the start-up path.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

Conversation = list[dict[str, Any]]

# Names a message's reasoning goes by; templates read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it renders its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore attributes (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja2.utils.Namespace's signature trick: self in args
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes on a namespace ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def select_template(templates: str | dict[str, str] | None, chat_template: str | None, tools: Any) -> str:
    """The template source to use: a named one, the tool-use one when tools are given, else the default."""
    if isinstance(templates, dict):
        if chat_template is not None and chat_template in templates:
            return templates[chat_template]
        if chat_template is not None:
            return chat_template
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise ValueError(f"this tokenizer has several chat templates and no default; pick one of {sorted(templates)}")
    if chat_template is not None:
        return chat_template
    if templates is None:
        raise ValueError("this tokenizer has no chat template (tokenizer.chat_template is not set)")
    return templates


def plain_template_data(value: Any) -> Any:
    """`value` rebuilt from JSON types; anything else becomes an inert "<TypeName>" placeholder.

    Chat inputs may hold rich objects whose methods the sandbox does not know to be unsafe.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(item) for item in value)
    if _is_numpy_scalar(value):  # np.bool_(False) must not become a truthy placeholder
        return plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _is_numpy_scalar(value: Any) -> bool:
    numpy = sys.modules.get("numpy")  # a numpy value implies numpy is imported
    return numpy is not None and isinstance(value, numpy.generic)


def _message_to_dict(message: Any) -> Any:
    """A message object (dict, dataclass, pydantic model) as a dict without the keys whose value is None."""
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        message = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    elif callable(getattr(message, "model_dump", None)):
        message = message.model_dump()
    if not isinstance(message, dict):
        raise TypeError(f"chat messages should be dicts, dataclasses or pydantic models, got {message!r}")
    return {key: value for key, value in message.items() if value is not None}


def _alias_reasoning(chat: Conversation) -> Conversation:
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _tool_schemas(tools: list[Any] | None) -> list[dict] | None:
    if tools is None:
        return None
    schemas = []
    for tool in tools:
        if isinstance(tool, dict):
            schemas.append(tool)
        elif callable(tool):  # a Python function: transformers derives its JSON schema from the docstring
            from transformers.utils import get_json_schema

            schemas.append(get_json_schema(tool))
        else:
            raise TypeError("tools must be JSON schemas (dicts) or functions with type hints and a docstring")
    return schemas


def _tag_final_message(chat: Conversation, field: str, template: str) -> str:
    """Appends the continue tag to the final message's `field` (every copy of it); returns the original text."""
    final = chat[-1].get(field)
    if final is None:
        raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue')
    fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final] if field in _REASONING_FIELDS else [field]
    if not any(f in template for f in fields):
        raise ValueError(f'continue_final_message is set to "{field}" but the chat template does not use that field')
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if "text" in block:
                text = block["text"]
                block["text"] = text + _CONTINUE_TAG
                return text
        raise ValueError("continue_final_message is set but the final message has no text to continue")
    for f in fields:
        chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    return final


def _cut_at_tag(rendered: str, final_text: str) -> str:
    """The rendering up to where the final message's text ends (the template's closing tokens removed)."""
    if final_text.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
        raise ValueError("continue_final_message is set but the chat template changed the final message")
    at = rendered.rindex(_CONTINUE_TAG.strip())
    if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed the message's trailing space


def render_conversation(
    template: str,
    conversation: Any,
    *,
    tools: list[Any] | None = None,
    documents: list[dict] | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    variables: dict[str, Any] | None = None,
) -> str:
    """One conversation rendered by `template`; `variables` (special tokens, extra kwargs) are template globals."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise TypeError("documents must be a list of dicts with 'title' and 'text' keys")
    messages = getattr(conversation, "messages", conversation)
    chat = plain_template_data([_message_to_dict(m) for m in messages])
    chat = _alias_reasoning(chat)
    final_text = None
    if continue_final_message:
        if not chat:
            raise ValueError("continue_final_message is set but the conversation is empty")
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final_text = _tag_final_message(chat, field, template)
    rendered = compile_template(template).render(
        messages=chat,
        tools=plain_template_data(_tool_schemas(tools)),
        documents=plain_template_data(documents),
        add_generation_prompt=add_generation_prompt,
        **plain_template_data(variables or {}),
    )
    return rendered if final_text is None else _cut_at_tag(rendered, final_text)
