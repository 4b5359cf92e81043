"""The byte-length bound on a prompt's token count (entrypoints/prompt_limits.py) on small tokenizers built here:
sound where it exists (never more tokens promised than the tokenizer makes), absent where none is sound."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from tokenmill.entrypoints.prompt_limits import text_too_long, token_bound

CORPUS = ["hello world, hello tokens", "    indented code() {}", "naïve café 日本語 🙂", "aaaaaaaaaaaaaaaaaaaaaaaa"] * 20
PIECES = ["hello", " world", "    ", "\n", "é", "日本", "🙂", "\x04", "a" * 30, "<|special|>", "zq", "\U00050000"]


def _byte_level(keep_alphabet: bool = True) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if keep_alphabet else []
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(["<|special|>"])
    return tok


def _byte_fallback() -> Tokenizer:
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for word in ("▁hello", "▁world", "hel", "lo", "▁", "h", "e", "l", "o", "w", "r", "d"):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token=None))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return tok


def _wrapped(backend: Tokenizer) -> Any:
    return SimpleNamespace(backend_tokenizer=backend)


def _assert_sound(backend: Tokenizer, seed: int = 0) -> None:
    bound = token_bound(_wrapped(backend))
    assert bound is not None
    rng = random.Random(seed)
    for _ in range(300):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 60)))
        assert bound.min_tokens(text) <= len(backend.encode(text, add_special_tokens=False).ids), repr(text)


def test_byte_level_bpe_bound_is_sound() -> None:
    _assert_sound(_byte_level())


def test_byte_level_bpe_with_missing_bytes_does_not_count_them() -> None:
    tok = _byte_level(keep_alphabet=False)  # only the corpus's bytes: "\x04" and most of 🙂's bytes are dropped
    bound = token_bound(_wrapped(tok))
    assert bound is not None and b"\x04" in bound.dropped
    assert bound.min_tokens("\x04" * 1000) == 0 == len(tok.encode("\x04" * 1000).ids)
    _assert_sound(tok, seed=1)


def test_byte_fallback_bpe_bound_is_sound() -> None:
    _assert_sound(_byte_fallback())


@pytest.mark.parametrize("make", [
    lambda: Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")),  # one [UNK] for a whole word
    lambda: Tokenizer(models.BPE({"a": 0, "<unk>": 1}, [], unk_token="<unk>", fuse_unk=True)),
])
def test_no_bound_where_one_token_can_stand_for_any_text(make: Any) -> None:
    assert token_bound(_wrapped(make())) is None


def test_no_bound_behind_a_normalizer_that_may_shorten_text() -> None:
    tok = _byte_level()
    tok.normalizer = normalizers.NFKC()
    assert token_bound(_wrapped(tok)) is None
    tok.normalizer = normalizers.Replace("  ", " ")  # shortens
    assert token_bound(_wrapped(tok)) is None
    assert token_bound(SimpleNamespace()) is None  # not a tokenizers-backed tokenizer


def test_too_long_only_past_the_bound() -> None:
    bound = token_bound(_wrapped(_byte_level()))
    assert bound is not None
    limit = (32 - 1) * bound.max_bytes  # the longest text that might still have fewer than 32 tokens
    assert text_too_long("a" * limit, bound, 32) is None
    message = text_too_long("a" * (limit + 1), bound, 32)
    assert message is not None and "maximum context length is 32 tokens" in message
    assert text_too_long("a" * 10**6, None, 32) is None  # no bound: tokenize and count instead
