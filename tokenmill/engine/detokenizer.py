"""Incremental detokenization of one generated sequence, with stop strings.

Decoding rule
-------------
``output_text`` is the text the output tokens add to the prompt::

    decode(prompt_ids + output_ids)[len(decode(prompt_ids)):]

with ``decode = tokenizer.decode(..., skip_special_tokens=params.skip_special_tokens)`` and no
``clean_up_tokenization_spaces`` (transformers skips that clean-up for BPE tokenizers anyway; it
rewrites text the model produced and cannot be applied incrementally). For byte-level BPE tokenizers
(GPT-2, Llama 3, Qwen2, SmolLM2) this is simply ``decode(output_ids)`` unless the prompt ends in the
middle of a UTF-8 character. For SentencePiece-style tokenizers the prompt context keeps the leading
space of the first output token, as HF's "full decode minus prompt decode" does.

Only a short tail of the prompt is used as context: the last ``_MIN_CONTEXT`` tokens, extended (up to
``_MAX_CONTEXT``) until its decoded text does not start with U+FFFD, i.e. until it starts on a
character boundary; failing that, the whole prompt. Either way the rule above holds exactly.

How
---
The prefix-offset scheme (as in TGI/vLLM): keep a small window of token ids, starting at the last
point where the decoded text ended on a complete character. Each step decodes only that window and
appends the part beyond the window's already-known text. Trailing U+FFFD (an incomplete UTF-8
character split across tokens) is withheld until the character completes; the text before it is
emitted right away. Characters still pending when the sequence finishes (tokens that never form a
valid character) are flushed, as U+FFFD, by ``get_next_output_text(finished=True, ...)``, so the
finished ``output_text`` equals the full decode (those flushed characters are not stop-checked).

Stop strings
------------
Checked on the text each ``update`` adds (including matches that start in earlier text, so stop
strings spanning tokens are found), once ``num_output_tokens >= params.min_tokens``. If several
match, the one completed first in the text stream wins (smallest end; on a tie, the longest), so
the result does not depend on how tokens are grouped into updates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tokenizers

from tokenmill.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"
_MIN_CONTEXT = 5  # prompt tokens used as decoding context (at least)
_MAX_CONTEXT = 32  # how far to look back for a character boundary before using the whole prompt


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text, step by step."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self._decode = make_window_decoder(
            tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens
        )
        self._stops: list[str] = list(params.stop or [])
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        # Characters withheld from streamed output so a partial stop string is never emitted.
        self._holdback = 0
        if self._stops and not self._include_stop:
            self._holdback = max(len(s) for s in self._stops) - 1

        # The window: token ids from the last clean boundary on. Tokens before _read_offset are
        # context whose text (_prefix_text) is not part of the new output; _num_window_chars counts
        # characters after _prefix_text already appended to the output text.
        self._window_ids, self._prefix_text = self._pick_context(list(prompt_token_ids))
        self._read_offset = len(self._window_ids)
        self._num_window_chars = 0

        self._text = ""
        self._num_chars_sent = 0
        self._stop_str: str | None = None
        self._flushed = False

    @property
    def output_text(self) -> str:
        return self._text

    @property
    def stop_str(self) -> str | None:
        """The stop string that ended the sequence, if any."""
        return self._stop_str

    def update(self, new_token_ids: Sequence[int], num_output_tokens: int) -> str | None:
        """Appends newly generated tokens; returns the matched stop string, else None."""
        if self._stop_str is not None or self._flushed or not new_token_ids:
            return None
        self._window_ids.extend(new_token_ids)
        new_text = self._decode_window()
        if not new_text:
            return None
        self._text += new_text
        if self._stops and num_output_tokens >= self._min_tokens:
            return self._check_stop(len(new_text))
        return None

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to hand out now: all of it (cumulative) or only what is new since the last call."""
        if finished:
            self._flush()
        end = len(self._text)
        if not finished and self._stop_str is None:
            end = max(0, end - self._holdback)
        if not delta:
            return self._text[:end]
        if end <= self._num_chars_sent:
            return ""
        text = self._text[self._num_chars_sent:end]
        self._num_chars_sent = end
        return text

    def _pick_context(self, prompt_ids: list[int]) -> tuple[list[int], str]:
        """A prompt suffix that starts on a character boundary, and its text."""
        n = len(prompt_ids)
        for k in range(min(_MIN_CONTEXT, n), min(_MAX_CONTEXT, n) + 1):
            context = prompt_ids[n - k:]
            text = self._decode(context)
            if k == n or (text and text[0] != _REPLACEMENT_CHAR):
                return context, text
        return prompt_ids, self._decode(prompt_ids)

    def _decode_window(self) -> str:
        """Decodes the window; returns the newly completed text and advances the window."""
        text = self._decode(self._window_ids)
        complete = not text.endswith(_REPLACEMENT_CHAR)
        end = len(text) if complete else len(text.rstrip(_REPLACEMENT_CHAR))
        start = len(self._prefix_text) + self._num_window_chars
        new_text = text[start:end] if end > start else ""
        if complete:
            # The tokens read since the last boundary become the next window's context.
            del self._window_ids[:self._read_offset]
            self._prefix_text = self._decode(self._window_ids)
            self._read_offset = len(self._window_ids)
            self._num_window_chars = 0
        else:
            self._num_window_chars += len(new_text)
        return new_text

    def _flush(self) -> None:
        """Appends characters still pending at the end (U+FFFD of never-completed bytes)."""
        if self._flushed or self._stop_str is not None:
            return
        self._flushed = True
        text = self._decode(self._window_ids)
        start = len(self._prefix_text) + self._num_window_chars
        if len(text) > start:
            self._text += text[start:]

    def _check_stop(self, num_new_chars: int) -> str | None:
        """Finds the first stop string completed in the new text; truncates the output there."""
        text = self._text
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        if best is None:
            return None
        end, start, stop = best
        self._text = text[:end] if self._include_stop else text[:start]
        self._stop_str = stop
        return stop


def decode_token(tokenizer: Any, token_id: int) -> str:
    """The text of a single token, for Logprob.decoded_token (U+FFFD for a partial character)."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token is None:
        return ""
    return tokenizer.convert_tokens_to_string([token])


def make_window_decoder(
    tokenizer: Any, skip_special_tokens: bool, spaces_between_special_tokens: bool
) -> Callable[[list[int]], str]:
    """A function decoding a list of token ids the way ``tokenizer.decode`` does (no clean-up).

    Fast tokenizers call the Rust decoder directly (like ``tokenizer.decode``, they ignore
    ``spaces_between_special_tokens``). Other tokenizers decode runs of ordinary tokens with
    ``convert_tokens_to_string`` and join them with the added tokens, separated by a space when
    ``spaces_between_special_tokens``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        def decode_fast(ids: list[int]) -> str:
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)

        return decode_fast
    return _SlowDecoder(tokenizer, skip_special_tokens, spaces_between_special_tokens)


class _SlowDecoder:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool, spaces_between_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_ids = set(tokenizer.all_special_ids) if skip_special_tokens else set()
        self.added_tokens = set(tokenizer.get_added_vocab())
        self.separator = " " if spaces_between_special_tokens else ""

    def __call__(self, ids: list[int]) -> str:
        parts: list[str] = []
        run: list[str] = []
        for token_id, token in zip(ids, self.tokenizer.convert_ids_to_tokens(ids)):
            if token is None or token_id in self.skip_ids:
                continue
            if token in self.added_tokens:
                if run:
                    parts.append(self.tokenizer.convert_tokens_to_string(run))
                    run = []
                parts.append(token)
            else:
                run.append(token)
        if run:
            parts.append(self.tokenizer.convert_tokens_to_string(run))
        return self.separator.join(parts)
