"""A model's config.json as a plain attribute object, read without importing transformers.

`save_pretrained` leaves out every value equal to its config class's default, so a config.json alone
does not say e.g. a Mistral model's `sliding_window` or a Llama model's `rms_norm_eps` when they are the
defaults. `HFConfig` fills those defaults for the model types tokenmill runs (llama, mistral, qwen2)
and derives what transformers 5 derives (`head_dim`, `num_key_value_heads`, Qwen2's `sliding_window`
and `layer_types`, `rope_parameters` from the legacy `rope_theta`/`rope_scaling` keys, `dtype`), so
every attribute the model code reads equals the one on `AutoConfig.from_pretrained(dir)`
(tests/models/test_model_config.py checks this against transformers). Other keys of config.json
become attributes as they are. Unknown model types get no defaults (the model registry rejects them).

`to_hf_config()` builds the transformers config (importing transformers) for the HF baseline and tests.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_DEFAULT_ROPE_THETA = 10000.0
# Rope types whose parameters carry the pretraining context length.
_ROPE_TYPES_WITH_ORIGINAL_LEN = ("llama3", "yarn", "longrope")

# The defaults of transformers 5's LlamaConfig / MistralConfig / Qwen2Config fields (None = derived
# below). tests/models/test_model_config.py compares these tables with the installed classes.
_COMMON_DEFAULTS: dict[str, Any] = {
    "architectures": None, "dtype": None, "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-6,
    "use_cache": True, "tie_word_embeddings": False, "rope_parameters": None, "attention_dropout": 0.0,
    "pad_token_id": None, "num_key_value_heads": None,
}
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        **_COMMON_DEFAULTS, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
        "bos_token_id": 1, "eos_token_id": 2, "pretraining_tp": 1, "attention_bias": False, "mlp_bias": False,
        "head_dim": None,
    },
    "mistral": {
        **_COMMON_DEFAULTS, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": 4096,
        "head_dim": None,
    },
    "qwen2": {
        **_COMMON_DEFAULTS, "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
        "max_window_layers": 28, "layer_types": None, "bos_token_id": None, "eos_token_id": None,
    },
}


class HFConfig:
    """config.json with the defaults of its model type filled in; attributes as on a transformers config.

    Invariant: attributes are exactly the public keys of `to_dict()`; a key absent from both config.json
    and the defaults is absent here too (so `getattr(config, name, default)` behaves as on transformers').
    """

    def __init__(self, values: dict[str, Any], raw: dict[str, Any]) -> None:
        self.__dict__.update(values)
        self._raw = raw  # config.json as read, for to_hf_config()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HFConfig:
        if not isinstance(raw, dict):
            raise TypeError(f"a model config must be a JSON object, got {type(raw).__name__}")
        return cls(resolve_config(copy.deepcopy(raw)), copy.deepcopy(raw))

    @classmethod
    def from_json_file(cls, path: str | Path) -> HFConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        try:
            return cls.from_dict(raw)
        except TypeError as exc:  # the file holds the wrong kind of value somewhere
            raise ValueError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def to_hf_config(self) -> PretrainedConfig:
        """The transformers config of the same config.json (what AutoConfig.from_pretrained builds)."""
        from transformers import PretrainedConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        raw = copy.deepcopy(self._raw)
        model_type = raw.get("model_type")
        if model_type in CONFIG_MAPPING:
            return CONFIG_MAPPING[model_type].from_dict(raw)
        return PretrainedConfig.from_dict(raw)

    def __repr__(self) -> str:
        return f"HFConfig({json.dumps(self.to_dict(), default=str, sort_keys=True)})"


def resolve_config(raw: dict[str, Any]) -> dict[str, Any]:
    """config.json values over the model type's defaults, with transformers' derived fields."""
    model_type = raw.get("model_type", "")
    defaults = MODEL_DEFAULTS.get(model_type)
    values = {"model_type": model_type, **(defaults or {}), **raw}
    values["dtype"] = _resolve_dtype(values.pop("torch_dtype", None), values.get("dtype"))
    if defaults is None:
        return values
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if "head_dim" in defaults and values["head_dim"] is None:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    if model_type == "qwen2":
        _resolve_qwen2_sliding_window(values)
    _standardize_rope(values)
    return values


def _resolve_dtype(torch_dtype: Any, dtype: Any) -> Any:
    """`dtype` (else the legacy `torch_dtype`), a torch.dtype when it names one."""
    value = dtype if dtype is not None else torch_dtype
    if isinstance(value, str):
        import torch

        found = getattr(torch, value, None)
        if isinstance(found, torch.dtype):
            return found
    return value


def _resolve_qwen2_sliding_window(values: dict[str, Any]) -> None:
    """Qwen2Config: the window only counts with use_sliding_window; layers past max_window_layers slide."""
    if not values["use_sliding_window"]:
        values["sliding_window"] = None
    if values["layer_types"] is None:
        sliding = values["sliding_window"] is not None
        values["layer_types"] = [
            "sliding_attention" if sliding and i >= values["max_window_layers"] else "full_attention"
            for i in range(values["num_hidden_layers"])
        ]


def _standardize_rope(values: dict[str, Any]) -> None:
    """transformers 5's rope_parameters: the legacy rope_scaling wins, rope_theta and partial_rotary_factor
    move inside (they are not attributes afterwards), rope_type defaults to "default" (or the legacy
    "type"), and scaled types get original_max_position_embeddings (default max_position_embeddings)."""
    rope = values.pop("rope_scaling", None) or values.get("rope_parameters") or {}
    theta = values.pop("rope_theta", _DEFAULT_ROPE_THETA)
    partial = values.pop("partial_rotary_factor", None)
    layer_types = values.get("layer_types") or ()
    nested = [key for key in rope if key in layer_types]
    for params in [rope[key] for key in nested] or [rope]:
        if params is None:
            continue
        params.setdefault("rope_type", params.get("type", "default"))
        params.setdefault("rope_theta", theta)
        if partial is not None:
            params.setdefault("partial_rotary_factor", partial)
        if params["rope_type"] in _ROPE_TYPES_WITH_ORIGINAL_LEN:
            params.setdefault("original_max_position_embeddings", values["max_position_embeddings"])
    values["rope_parameters"] = rope
