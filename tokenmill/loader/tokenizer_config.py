"""What a tokenizer directory says beyond tokenizer.json, read as transformers 5 reads it.

- tokenizer_config.json: special tokens (bos/eos/unk/sep/pad/cls/mask, other `*_token` keys, extra or
  additional special tokens), `added_tokens_decoder`, `split_special_tokens`,
  `clean_up_tokenization_spaces`, `model_max_length`, `chat_template`. transformers drops
  `add_bos_token`/`add_eos_token` when a tokenizer.json exists (its post-processor decides), and so
  does this;
- chat_template.jinja and additional_chat_templates/*.jinja, which win over the config's template
  (chat_template.json belongs to multimodal processors; tokenizers ignore it);
- the legacy special_tokens_map.json and added_tokens.json, only when the config has no
  added_tokens_decoder.

`apply_settings` then prepares a `tokenizers.Tokenizer` as transformers' TokenizersBackend
constructor does. Imports neither transformers nor jinja2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tokenizers

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order (all_special_tokens follows it).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
_NO_MAX_LENGTH = int(1e30)


@dataclass
class TokenizerSettings:
    """Invariant: `special_tokens` holds every named special token attribute (value None when unset):
    the standard seven, then model-specific `*_token` names, in transformers' order."""

    special_tokens: dict[str, Any]
    extra_special_tokens: list[Any] = field(default_factory=list)
    added_tokens: dict[int, Any] = field(default_factory=dict)  # id -> AddedToken the files declare
    chat_template: str | dict[str, str] | None = None
    clean_up_tokenization_spaces: bool = False
    clean_up_for_bpe: bool = False  # transformers skips the clean-up for BPE models unless forced
    split_special_tokens: bool = False
    model_max_length: int = _NO_MAX_LENGTH
    config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json as read


def read_settings(tokenizer_dir: Path) -> TokenizerSettings:
    raw = _read_json(tokenizer_dir / CONFIG_FILE) or {}
    config = dict(raw)
    for key in ("tokenizer_class", "init_inputs", "add_bos_token", "add_eos_token"):
        config.pop(key, None)
    if "additional_special_tokens" in config and not config.get("extra_special_tokens"):
        config["extra_special_tokens"] = config.pop("additional_special_tokens")
    added_tokens = _declared_added_tokens(tokenizer_dir, config)
    by_content = {str(tok): tok for tok in added_tokens.values()}
    special = {name: _token_value(config.get(name)) for name in NAMED_SPECIAL_TOKENS}
    special = {name: by_content.get(str(tok), tok) if tok is not None else None for name, tok in special.items()}
    special.update(_model_specific_tokens(config))
    extra = config.get("extra_special_tokens")
    return TokenizerSettings(
        special_tokens=special,
        extra_special_tokens=[_token_value(t) for t in extra] if isinstance(extra, (list, tuple)) else [],
        added_tokens=added_tokens,
        chat_template=_read_chat_template(tokenizer_dir, config.get("chat_template")),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        clean_up_for_bpe=bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")),
        split_special_tokens=bool(config.get("split_special_tokens", False)),
        model_max_length=int(config.get("model_max_length") or _NO_MAX_LENGTH),
        config=raw,
    )


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def _as_added_token(value: dict[str, Any], **overrides: Any) -> tokenizers.AddedToken:
    from tokenizers import AddedToken

    fields = {k: value[k] for k in _ADDED_TOKEN_FIELDS if k in value}
    return AddedToken(**{**fields, **overrides})


def _token_value(value: Any) -> Any:
    """A special token as configured: a string, or an AddedToken given as a dict."""
    if isinstance(value, dict) and "content" in value:
        return _as_added_token(value)
    return value


def _model_specific_tokens(config: dict[str, Any]) -> dict[str, Any]:
    """Other `*_token` string keys (e.g. image_token) and a dict of extra special tokens are named tokens too."""
    tokens = {
        key: _token_value(value) for key, value in config.items()
        if key.endswith("_token") and key not in NAMED_SPECIAL_TOKENS
        and (isinstance(value, str) or (isinstance(value, dict) and "content" in value))
    }
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        tokens.update({k: _token_value(v) for k, v in extra.items()})
        config["extra_special_tokens"] = []
    return tokens


def _declared_added_tokens(tokenizer_dir: Path, config: dict[str, Any]) -> dict[int, Any]:
    """The config's added_tokens_decoder; without one, the legacy files (which may also set special tokens)."""
    if "added_tokens_decoder" in config:
        return {int(i): _as_added_token(tok) for i, tok in config["added_tokens_decoder"].items()}
    _merge_special_tokens_map(tokenizer_dir, config)
    tokens: dict[int, Any] = {}
    legacy = _read_json(tokenizer_dir / ADDED_TOKENS_FILE)
    if legacy:
        named = {str(_token_value(config[k])) for k in NAMED_SPECIAL_TOKENS if config.get(k)}
        named |= {str(_token_value(t)) for t in config.get("extra_special_tokens") or []}
        for content, token_id in legacy.items():
            special = content in named
            tokens[int(token_id)] = _as_added_token(
                {"content": content, "rstrip": False, "lstrip": False, "normalized": not special, "special": special}
            )
    for entry in (_read_json(tokenizer_dir / TOKENIZER_FILE) or {}).get("added_tokens", []):
        tokens[int(entry["id"])] = _as_added_token(entry)
    return tokens


def _merge_special_tokens_map(tokenizer_dir: Path, config: dict[str, Any]) -> None:
    """special_tokens_map.json overrides the config's special tokens (its dict tokens are special)."""
    for key, value in (_read_json(tokenizer_dir / SPECIAL_TOKENS_MAP_FILE) or {}).items():
        if isinstance(value, dict) and key != "extra_special_tokens":
            value = _as_added_token(value, special=True)
        elif key == "extra_special_tokens" and isinstance(value, list):
            merged = list(config.get("extra_special_tokens") or [])
            for tok in value:
                tok = _as_added_token(tok, special=True) if isinstance(tok, dict) else tok
                if tok not in merged:
                    merged.append(tok)
            value = merged
        config[key] = value


def _read_chat_template(tokenizer_dir: Path, configured: Any) -> str | dict[str, str] | None:
    """chat_template.jinja (as "default") and additional_chat_templates/*.jinja, else the config's entry."""
    templates: dict[str, str] = {}
    if (tokenizer_dir / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (tokenizer_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    extra_dir = tokenizer_dir / CHAT_TEMPLATE_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if list(templates) == ["default"]:
        return templates["default"]
    if templates:
        return templates
    if isinstance(configured, (list, tuple)):  # [{"name": ..., "template": ...}, ...]
        return {entry["name"]: entry["template"] for entry in configured}
    return configured


def apply_settings(backend: tokenizers.Tokenizer, settings: TokenizerSettings) -> None:
    """Prepare `backend` as transformers' TokenizersBackend constructor does: no truncation or padding,
    the declared added tokens registered again (a no-op for tokens tokenizer.json already has in the
    same form), special tokens missing from the vocabulary added, special-token splitting as configured."""
    from tokenizers import AddedToken

    backend.no_truncation()
    backend.no_padding()
    # transformers compares the declared tokens' reprs with the backend's token *ids*, so it always
    # re-adds every declared token; re-adding a token that differs only in its flags updates them.
    to_add = [tok for _, tok in sorted(settings.added_tokens.items())]
    known = {tok.content for tok in backend.get_added_tokens_decoder().values()} | {str(t) for t in to_add}
    for value in [*settings.special_tokens.values(), *settings.extra_special_tokens]:
        if value is not None and str(value) not in known and value not in to_add:
            to_add.append(value)
    named = {str(t) for t in settings.special_tokens.values() if t}
    tokens = []
    for tok in to_add:
        if isinstance(tok, str):
            tok = AddedToken(tok, special=True)
        elif not tok.special and str(tok) in named:
            tok.special = True
        tokens.append(tok)
    if tokens:
        backend.add_tokens(tokens)
    backend.encode_special_tokens = settings.split_special_tokens


