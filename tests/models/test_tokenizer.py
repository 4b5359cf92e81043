"""tokenmill's Tokenizer against transformers' AutoTokenizer (the oracle) on the same directories.

Directories: the default model's cache entry, its save_pretrained copy, a tiny checkpoint's, a tiny
GGUF's converted tokenizer (another vocabulary), and variants of the default one written the way older
transformers versions wrote them (added_tokens_decoder, AddedToken dicts, special_tokens_map.json,
added_tokens.json, the chat template inside tokenizer_config.json, a special token missing from the
vocabulary, split_special_tokens, clean_up_tokenization_spaces, add_bos_token).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tokenmill.loader.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "Hello world!",
    "",
    " ",
    "  leading spaces\n\ttabs and 12345 digits  ",
    "\n\nnew\nlines\r\n",
    "ünïcödé 日本語 中文字符 한국어 🤗🎉👩‍👩‍👧 é",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "text<|im_end|>glued<|im_start|> and <|im_end |> almost",
    "def f(x):\n    return x**2  # comment",
    "Don't stop , please . It 's n't ok ?",
    "\u00a0non-breaking\u2003spaces\u200b and ☃",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue? 🌌"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name a physicist."}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}],
]


def _copy_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst


def _edit_config(path: Path, **changes: Any) -> dict[str, Any]:
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return config


def _added_token_dict(content: str, legacy: bool = True) -> dict[str, Any]:
    entry = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
             "special": True}
    return {"__type": "AddedToken", **entry} if legacy else entry


def _added_tokens_decoder(path: Path) -> dict[str, dict[str, Any]]:
    """tokenizer.json's added tokens as transformers 4 listed them in tokenizer_config.json."""
    added = json.loads((path / "tokenizer.json").read_text())["added_tokens"]
    return {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}


def _make_variant(kind: str, src: Path, dst: Path) -> Path:
    path = _copy_tokenizer(src, dst)
    template = (path / "chat_template.jinja").read_text()
    if kind == "v4-config":  # transformers 4: added_tokens_decoder, AddedToken dicts, template in the config
        (path / "chat_template.jinja").unlink()
        _edit_config(
            path, chat_template=template, add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=True,
            tokenizer_class="GPT2Tokenizer", bos_token=_added_token_dict("<|im_start|>"),
            added_tokens_decoder=_added_tokens_decoder(path),
            additional_special_tokens=["<|im_start|>", "<|im_end|>"], backend=None,
        )
    elif kind == "legacy-files":  # special_tokens_map.json + added_tokens.json, no added_tokens_decoder
        _edit_config(path, eos_token="<|endoftext|>", backend=None)
        (path / "special_tokens_map.json").write_text(json.dumps(
            {"eos_token": _added_token_dict("<|im_end|>", legacy=False), "pad_token": "<|endoftext|>",
             "additional_special_tokens": ["<|im_start|>"]}))
        (path / "added_tokens.json").write_text(json.dumps({"<|im_start|>": 1, "<extra_tok>": 49152}))
    elif kind == "new-special-token":  # a pad token the vocabulary lacks, a model-specific named token
        _edit_config(path, pad_token="<pad>", image_token="<image>", split_special_tokens=False)
    elif kind == "split-special-tokens":
        _edit_config(path, split_special_tokens=True, clean_up_tokenization_spaces=True,
                     clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    else:
        raise ValueError(kind)
    return path


@pytest.fixture(scope="module")
def tiny_gguf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level vocabulary of its own (tests/models/test_loader.py's tiny GGUF), converted once."""
    from tests.models.test_loader import write_tiny_gguf
    from tokenmill.loader import load_model

    tmp = tmp_path_factory.mktemp("tiny-gguf")
    write_tiny_gguf(tmp / "tiny.gguf")
    loaded = load_model(str(tmp / "tiny.gguf"), cache_dir=str(tmp / "cache"))
    return Path(loaded.tokenizer.name_or_path)


DIRS = ["default-cache", "default-saved", "tiny-llama", "tiny-gguf", "v4-config", "legacy-files",
        "new-special-token", "split-special-tokens"]


@pytest.fixture(scope="module", params=DIRS)
def tokenizer_dir(request: pytest.FixtureRequest, default_loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    kind = request.param
    cache_dir = Path(default_loaded.tokenizer.name_or_path)
    if kind == "default-cache":
        return cache_dir
    if kind == "default-saved":
        return request.getfixturevalue("default_tokenizer_dir")
    if kind == "tiny-llama":
        return request.getfixturevalue("tiny_checkpoint")("llama")
    if kind == "tiny-gguf":
        return request.getfixturevalue("tiny_gguf_tokenizer_dir")
    return _make_variant(kind, cache_dir, tmp_path_factory.mktemp(kind) / "tok")


@pytest.fixture(scope="module")
def pair(tokenizer_dir: Path) -> tuple[Tokenizer, Any]:
    from transformers import AutoTokenizer

    ours = load_tokenizer(tokenizer_dir)
    assert isinstance(ours, Tokenizer)
    return ours, AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def test_encode_matches(pair: tuple[Tokenizer, Any]) -> None:
    ours, ref = pair
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special), text
        assert ours(text).input_ids == ref(text).input_ids, text
        assert ours.tokenize(text) == ref.tokenize(text), text
    assert ours(TEXTS).input_ids == ref(TEXTS).input_ids


def test_decode_matches(pair: tuple[Tokenizer, Any]) -> None:
    ours, ref = pair
    sequences = [ref.encode(t) for t in TEXTS] + [ref.encode(t, add_special_tokens=False) for t in TEXTS]
    specials = sorted(set(ref.all_special_ids) | set(ref.get_added_vocab().values()))
    ordinary = [i % len(ref) for i in (5, 100, 1000)]
    sequences.append(specials + ordinary + specials[::-1])  # special ids among ordinary ones
    sequences.append([ref.encode("日本", add_special_tokens=False)[0]])  # possibly part of a character
    for ids in sequences:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
        assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == ref.convert_ids_to_tokens(
            ids, skip_special_tokens=True)
        tokens = ref.convert_ids_to_tokens(ids)
        assert ours.convert_tokens_to_string(tokens) == ref.convert_tokens_to_string(tokens)
        assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.decode(sequences[:3]) == ref.decode(sequences[:3])
    assert ours.convert_ids_to_tokens(7) == ref.convert_ids_to_tokens(7)


def test_special_tokens_and_vocabulary_match(pair: tuple[Tokenizer, Any]) -> None:
    ours, ref = pair
    assert ours.is_fast and ref.is_fast
    for name in ("bos", "eos", "unk", "pad", "sep", "cls", "mask"):
        assert getattr(ours, f"{name}_token") == getattr(ref, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(ref, f"{name}_token_id"), name
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.all_special_tokens == ref.all_special_tokens
    assert ours.all_special_ids == ref.all_special_ids
    assert ours.get_added_vocab() == ref.get_added_vocab()
    assert {i: str(t) for i, t in ours.added_tokens_decoder.items()} == {
        i: str(t) for i, t in ref.added_tokens_decoder.items()}
    assert (len(ours), ours.vocab_size) == (len(ref), ref.vocab_size)
    assert ours.get_vocab() == ref.get_vocab()
    assert ours.chat_template == ref.chat_template
    assert ours.clean_up_tokenization_spaces == ref.clean_up_tokenization_spaces


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches(pair: tuple[Tokenizer, Any], add_generation_prompt: bool) -> None:
    ours, ref = pair
    for chat in CONVERSATIONS:
        kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        rendered = ours.apply_chat_template(chat, **kwargs)
        assert rendered == ref.apply_chat_template(chat, **kwargs)
        ids = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, return_dict=False)
        assert ids == ref.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, return_dict=False)
        assert ids == ours.encode(rendered, add_special_tokens=False)
    assert ours.apply_chat_template(CONVERSATIONS, tokenize=False) == ref.apply_chat_template(
        CONVERSATIONS, tokenize=False)


def test_save_pretrained_round_trips(pair: tuple[Tokenizer, Any], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ours, _ = pair
    ours.save_pretrained(tmp_path)
    for again in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)):
        assert again.chat_template == ours.chat_template
        assert again.special_tokens_map == ours.special_tokens_map
        assert again.get_added_vocab() == ours.get_added_vocab()
        for text in TEXTS:
            assert again.encode(text) == ours.encode(text), text


# --------------------------------------------------------------------------------------------------
# The chat-template environment, on templates that use each of its features.
# --------------------------------------------------------------------------------------------------

FEATURE_TEMPLATE = """\
{%- set ns = namespace(count=0, seen=dict(a=1)) -%}
{{ bos_token }}{% if tools %}TOOLS:{{ tools | tojson(indent=2) }}{% endif %}
{% for m in messages %}
  {% if m['role'] == 'skip' %}{% continue %}{% endif %}
  {% set ns.count = ns.count + 1 %}
  [{{ loop.index }}:{{ m['role'] }}] {{ m.get('content') | tojson }} {{ m.get('reasoning_content', '-') }}
  {% if m['role'] == 'stop' %}{% break %}{% endif %}
{% endfor %}
{% generation %}count={{ ns.count }} {{ dict.fromkeys(['x', 'y']) | tojson }}{% endgeneration %}
{{ documents | tojson }} {{ custom_var | default('none') }} {{ strftime_now('%Y') | length }} {{ eos_token }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

FEATURE_CHATS = [
    [{"role": "user", "content": "héllo \"quoted\" <b>html</b> & 日本"}, {"role": "skip", "content": "x"},
     {"role": "assistant", "content": None, "reasoning": "thought"}, {"role": "stop", "content": "s"},
     {"role": "user", "content": "after stop"}],
    [{"role": "user", "content": [{"type": "text", "text": "block"}], "tool_calls": None}],
]


@pytest.fixture(scope="module")
def default_pair(default_loaded: Any) -> tuple[Tokenizer, Any]:
    from transformers import AutoTokenizer

    path = Path(default_loaded.tokenizer.name_or_path)
    return load_tokenizer(path), AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.mark.parametrize("chat", FEATURE_CHATS)
@pytest.mark.parametrize("extra", [{}, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                                        "documents": [{"title": "t", "text": "ü"}], "custom_var": 3}])
def test_template_features_match(default_pair: tuple[Tokenizer, Any], chat: list[dict], extra: dict) -> None:
    ours, ref = default_pair
    for add_generation_prompt in (True, False):
        kwargs = dict(chat_template=FEATURE_TEMPLATE, tokenize=False, add_generation_prompt=add_generation_prompt,
                      **extra)
        assert ours.apply_chat_template(chat, **kwargs) == ref.apply_chat_template(chat, **kwargs)


def test_continue_final_message_matches(default_pair: tuple[Tokenizer, Any]) -> None:
    ours, ref = default_pair
    chat = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi, I am "}]
    kwargs = {"tokenize": False, "continue_final_message": True}
    assert ours.apply_chat_template(chat, **kwargs) == ref.apply_chat_template(chat, **kwargs)


def test_template_errors(default_pair: tuple[Tokenizer, Any]) -> None:
    import jinja2

    ours, _ = default_pair
    chat = [{"role": "user", "content": "x"}]
    with pytest.raises(jinja2.TemplateError, match="no system role"):
        ours.apply_chat_template(chat, chat_template="{{ raise_exception('no system role') }}", tokenize=False)
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(chat, chat_template="{% set ns = namespace(_x=1) %}", tokenize=False)
    with pytest.raises(jinja2.exceptions.SecurityError):  # the sandbox: no reaching Python internals
        ours.apply_chat_template(chat, chat_template="{{ messages.__class__.__mro__ }}", tokenize=False)
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([], tokenize=False)
    with pytest.raises(ValueError, match="not supported"):
        ours.apply_chat_template(chat, padding=True)
    no_template = Tokenizer(ours.backend_tokenizer, ours._settings)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        no_template.apply_chat_template(chat, tokenize=False)
