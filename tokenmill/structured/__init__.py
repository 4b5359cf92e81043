"""Structured output: constrained decoding with xgrammar (JSON schemas, JSON objects, regular expressions, choices,
EBNF grammars; the server's tools with tool_choice "required" or a named function build on the JSON schemas).

params.py    StructuredOutputsParams (SamplingParams.structured_outputs), plain data
grammar.py   params -> xgrammar Grammar (validation, lazily importing xgrammar); the vocabulary for xgrammar
compiler.py  compile once per constraint, on a thread, cached
manager.py   the engine side: per-request matchers, each step's masks
bitmask.py   the masks' layout and their application to logits (torch only: the worker's side)
"""

from tokenmill.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
