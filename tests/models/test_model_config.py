"""HFConfig (config.json read without transformers) against transformers' AutoConfig on the same files.

Every attribute HFConfig has must equal transformers' (in particular the ones the model code reads),
for the default model, the tiny checkpoints, and hand-written config.json files that leave values to
the defaults or use transformers-4 keys (rope_theta, rope_scaling, torch_dtype).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from tokenmill.loader.model_config import MODEL_DEFAULTS, HFConfig

# What tokenmill reads from a model config (models/llama.py, layers/rotary.py, engine/core.py,
# engine/llm_engine.py, models/registry.py, loader/hf.py).
READ_ATTRIBUTES = (
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "attention_bias",
    "mlp_bias", "tie_word_embeddings", "max_position_embeddings", "sliding_window", "use_sliding_window",
    "rope_parameters", "rope_theta", "bos_token_id", "eos_token_id", "pad_token_id",
)
_MISSING = object()


def _reference(path: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def assert_same_config(ours: HFConfig, ref: Any) -> None:
    for name, value in ours.to_dict().items():
        assert getattr(ref, name, _MISSING) == value, name
    for name in READ_ATTRIBUTES:
        if name == "rope_theta":  # transformers 5 moved it into rope_parameters
            continue
        assert getattr(ours, name, _MISSING) == getattr(ref, name, _MISSING), name
    from tokenmill.layers.rotary import rope_parameters

    assert rope_parameters(ours) == rope_parameters(ref)


@pytest.mark.parametrize("source", ["default", "llama", "qwen2", "mistral"])
def test_checkpoint_configs_match(source: str, default_loaded: Any, tiny_checkpoint: Any) -> None:
    path = Path(default_loaded.tokenizer.name_or_path) if source == "default" else tiny_checkpoint(source)
    ours = HFConfig.from_json_file(path / "config.json")
    ref = _reference(path)
    assert_same_config(ours, ref)
    rebuilt = {k: v for k, v in ours.to_hf_config().to_dict().items() if k != "_name_or_path"}
    assert rebuilt == {k: v for k, v in ref.to_dict().items() if k != "_name_or_path"}


def test_default_tables_match_transformers() -> None:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    for model_type, cls in (("llama", LlamaConfig), ("mistral", MistralConfig), ("qwen2", Qwen2Config)):
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, value in MODEL_DEFAULTS[model_type].items():
            assert fields[name] == value, (model_type, name)
        for name in READ_ATTRIBUTES:
            if name in fields and name not in ("model_type",):
                assert name in MODEL_DEFAULTS[model_type], (model_type, name)


CONFIGS = [
    {"model_type": "llama"},
    {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
     "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
     "torch_dtype": "bfloat16", "tie_word_embeddings": True, "eos_token_id": [1, 2]},
    {"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}, "max_position_embeddings": 4096,
     "head_dim": 32, "num_key_value_heads": 2, "dtype": "float16"},
    {"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0}, "max_position_embeddings": 4096},
    {"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "partial_rotary_factor": 0.5},
    {"model_type": "mistral"},
    {"model_type": "mistral", "sliding_window": None, "rope_theta": 1e6, "head_dim": 128, "hidden_size": 5120},
    {"model_type": "qwen2"},
    {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 1024, "max_window_layers": 2,
     "num_hidden_layers": 4, "rope_theta": 1e6, "attention_bias": True, "some_unknown_key": [1, {"a": 2}]},
    {"model_type": "qwen2", "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}, "head_dim": 96},
]


@pytest.mark.parametrize("raw", CONFIGS, ids=lambda raw: json.dumps(raw, sort_keys=True)[:60])
def test_sparse_and_legacy_config_json(raw: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = HFConfig.from_json_file(tmp_path / "config.json")
    assert_same_config(ours, _reference(tmp_path))


def test_unknown_model_type_keeps_its_keys(tmp_path: Path) -> None:
    raw = {"architectures": ["FooForCausalLM"], "model_type": "foo", "hidden_size": 8, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = HFConfig.from_json_file(tmp_path / "config.json")
    assert (ours.architectures, ours.hidden_size, ours.tie_word_embeddings) == (["FooForCausalLM"], 8, True)
    assert getattr(ours, "num_attention_heads", None) is None


def test_bad_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        HFConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        HFConfig.from_json_file(tmp_path / "config.json")
