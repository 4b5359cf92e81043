"""StructuredOutputsParams -> xgrammar Grammar (validation) and the tokenizer's vocabulary as xgrammar sees it.

xgrammar is imported here, lazily, and only when a request asks for structured output: a machine without it still
serves everything else, and such a request gets a ValueError (HTTP 400) that says what is missing.
"""

from __future__ import annotations

import functools
import json
import re
from typing import TYPE_CHECKING, Any

from tokenmill.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar

XGRAMMAR_REQUIREMENT = "xgrammar>=0.1.20"
# xgrammar's errors start with its C++ log prefix: "[14:46:58] /project/cpp/grammar_parser.cc:820: ".
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] [^:]+:\d+: ")


class StructuredOutputUnavailable(ValueError):
    """Structured output was asked for on a machine without xgrammar."""


def import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise StructuredOutputUnavailable(
            "structured output (response_format json_object/json_schema, tools, guided_*, structured_outputs) needs "
            f"the xgrammar package, which is not installed on this server: pip install '{XGRAMMAR_REQUIREMENT}'"
        ) from None
    return xgrammar


def validate(params: StructuredOutputsParams) -> None:
    """Raises ValueError ("structured_outputs.<kind>: ...") when the constraint cannot be turned into a grammar."""
    grammar_of_key(params.key)


@functools.lru_cache(maxsize=256)
def grammar_of_key(key: tuple[str, str, bool]) -> xgrammar.Grammar:
    """The grammar of StructuredOutputsParams.key (cached: a request validated at the door is not parsed again when
    its grammar compiles). Grammars are immutable, so the cached ones are shared freely."""
    xgr = import_xgrammar()
    kind, text, strict = key
    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=strict)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(text)
        if kind == "choice":
            # EBNF string literals take JSON's escapes, so each choice is its JSON string.
            literals = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(text))
            return xgr.Grammar.from_ebnf(f"root ::= {literals}")
        return xgr.Grammar.from_ebnf(text)
    except (RuntimeError, ValueError, TypeError) as exc:
        message = _LOG_PREFIX.sub("", str(exc).strip())
        what = {"json": "invalid JSON schema", "regex": "invalid regular expression",
                "grammar": "invalid EBNF grammar"}.get(kind, "invalid constraint")
        raise ValueError(f"structured_outputs.{kind}: {what}: {message}") from None


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> xgrammar.TokenizerInfo:
    """The vocabulary xgrammar matches tokens against, `vocab_size` wide (the model's logits, which may be wider
    than the tokenizer). `tokenizer` is tokenmill's Tokenizer or a transformers fast tokenizer (both have
    get_vocab, added_tokens_decoder and backend_tokenizer).

    Special tokens (<|im_start|> ...) get an empty string, which xgrammar takes as "never part of the grammar": an
    output that the detokenizer renders without its special tokens is the text the grammar accepted. The stop tokens
    stay allowed where the grammar may end."""
    xgr = import_xgrammar()
    encoded = [""] * vocab_size
    for token, token_id in tokenizer.get_vocab().items():
        if 0 <= token_id < vocab_size:
            encoded[token_id] = token
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False) and 0 <= token_id < vocab_size:
            encoded[token_id] = ""
    detect = getattr(xgr.TokenizerInfo, "_detect_metadata_from_hf", None)
    if detect is not None:
        metadata = detect(tokenizer.backend_tokenizer.to_str())
        vocab_type, add_prefix_space = metadata["vocab_type"], metadata["add_prefix_space"]
    else:  # xgrammar without the helper: let its public constructor detect the same two facts
        from transformers import PreTrainedTokenizerFast

        info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer))
        vocab_type, add_prefix_space = info.vocab_type, info.add_prefix_space
    return xgr.TokenizerInfo(encoded, vocab_type=vocab_type, vocab_size=vocab_size,
                             stop_token_ids=sorted(stop_token_ids), add_prefix_space=add_prefix_space)
