"""StructuredOutputsParams: what a request's output must match (vLLM's name and fields). Plain Python: it travels
inside SamplingParams to data-parallel replicas and tensor-parallel ranks (pickled), and imports no xgrammar."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one kind is set:
    - json: a JSON schema (a dict, or its JSON text); the output is one JSON value that validates against it;
    - regex: the output matches the regular expression, whole;
    - choice: the output is one of these strings, exactly;
    - grammar: an EBNF grammar (xgrammar's dialect, GBNF-like, start rule `root`);
    - json_object: True: the output is one JSON object (any keys).
    `strict` (json only): properties the schema does not declare are never generated (xgrammar's strict mode,
    OpenAI's `strict: true`); with False they may be, where the schema allows them.
    JSON output is compact (no whitespace outside strings): a model cannot pad it with spaces forever."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(KINDS)}; "
                             f"got {', '.join(set_kinds) or 'none'}.")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    parsed = json.loads(self.json)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {exc}.") from None
            else:
                parsed = self.json
            if not isinstance(parsed, (dict, bool)):
                raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got {parsed!r}.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}.")
        if self.choice is not None and (
            not isinstance(self.choice, list) or not self.choice or not all(isinstance(c, str) for c in self.choice)
        ):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}.")
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured_outputs.json_object must be true, got {self.json_object!r}.")
        if not isinstance(self.strict, bool):
            raise ValueError(f"structured_outputs.strict must be a boolean, got {self.strict!r}.")  # noqa: TRY004

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str, bool]:
        """What the compiled grammar depends on: the cache key. A schema's text is normalized but its keys keep their
        order (properties are generated in the order the schema lists them)."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json":
            value = json.loads(value) if isinstance(value, str) else value
            text = json.dumps(value, ensure_ascii=False)
        elif kind == "choice":
            text = json.dumps(value, ensure_ascii=False)
        else:
            text = "" if kind == "json_object" else value
        return kind, text, self.strict if kind == "json" else True
