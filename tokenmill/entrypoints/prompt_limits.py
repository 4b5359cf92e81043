"""A prompt's token count bounded from its byte length alone, so text that cannot fit the context is refused
before it is tokenized (tokenizing megabytes takes seconds).

The bound: when no token stands for more than L bytes, a text of B bytes (less those the vocabulary drops) has at
least ceil(B / L) tokens. L comes from the tokenizer's vocabulary; where the pipeline could make one
token stand for an unbounded stretch of text (an unknown-word token, a normalizer that shrinks text) there is no
sound bound and token_bound() returns None: such prompts are tokenized and counted as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Normalizers that never shorten the text (the tokens then cover at least the input's bytes).
_GROWING_NORMALIZERS = ("Prepend", "Replace")


def _replace_grows(spec: dict[str, Any]) -> bool:
    pattern = spec.get("pattern", {}).get("String")
    return pattern is not None and len(str(spec.get("content", "")).encode()) >= len(pattern.encode())


def _normalizer_never_shrinks(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_normalizer_never_shrinks(part) for part in spec.get("normalizers", []))
    if kind == "Replace":
        return _replace_grows(spec)
    return kind in _GROWING_NORMALIZERS


def _has_byte_level(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return False
    if spec.get("type") == "Sequence":
        return any(_has_byte_level(part) for part in spec.get("pretokenizers", []))
    return spec.get("type") == "ByteLevel"


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> vocabulary character map (each byte-level vocabulary character stands for one byte)."""
    from tokenizers.pre_tokenizers import ByteLevel

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    assert set(chars.values()) == set(ByteLevel.alphabet())  # the map tokenizers uses
    return chars


@dataclass(frozen=True)
class TokenBound:
    """No token stands for more than `max_bytes` bytes of UTF-8 text; the bytes in `dropped` (absent from a
    byte-level vocabulary) get no token at all."""

    max_bytes: int
    dropped: bytes = b""

    def min_tokens(self, text: str) -> int:
        """A lower bound on the number of tokens of `text` (special tokens added by the tokenizer excluded)."""
        data = text.encode("utf-8", errors="surrogatepass")
        covered = len(data.translate(None, self.dropped)) if self.dropped else len(data)
        return -(-covered // self.max_bytes)


def token_bound(tokenizer: Any) -> TokenBound | None:
    """How many bytes of input text one token can stand for, or None where no sound bound exists.

    Sound for BPE over bytes: byte-level BPE (each vocabulary character stands for one byte; a byte missing from
    the vocabulary is dropped) or BPE with byte fallback for every byte (an unknown character becomes its bytes'
    tokens), behind a normalizer that never shortens the text. Added (special) tokens count with their content's
    UTF-8 length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not _normalizer_never_shrinks(spec.get("normalizer")):
        return None
    vocab = backend.get_vocab(with_added_tokens=False)
    dropped = b""
    if _has_byte_level(spec.get("pre_tokenizer")):
        longest = max(len(token) for token in vocab)  # one character per byte
        dropped = bytes(b for b, char in _byte_level_chars().items() if char not in vocab)
    elif model.get("byte_fallback") and all(f"<0x{b:02X}>" in vocab for b in range(256)):
        longest = max(len(token.encode("utf-8")) for token in vocab)  # "▁" (3 bytes) stands for " ": an overestimate
    else:
        return None
    added = [len(token.content.encode("utf-8")) for token in backend.get_added_tokens_decoder().values()]
    return TokenBound(max([longest, *added]), dropped)


def text_too_long(text: str, bound: TokenBound | None, max_model_len: int) -> str | None:
    """Why `text` cannot fit the context whatever its tokenization, or None when it might.

    Invariant: a text refused here has at least max_model_len tokens (check_params would refuse it after
    tokenizing), so nothing valid is ever refused."""
    if bound is None or 4 * len(text) <= (max_model_len - 1) * bound.max_bytes:
        return None  # at most 4 UTF-8 bytes a character: too short to be refused, no need to encode it
    num_tokens = bound.min_tokens(text)
    if num_tokens < max_model_len:
        return None
    return (f"This model's maximum context length is {max_model_len} tokens. However, your prompt has at least "
            f"{num_tokens} tokens ({len(text)} characters; no token of this model stands for more than "
            f"{bound.max_bytes} bytes). Please reduce the length of the prompt.")
