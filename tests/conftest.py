"""Shared fixtures: the embedded default model and tiny random HF checkpoints of each architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.kernels.triton_mode import select_interpreter_if_no_cuda
from tests.models.utils import tiny_variant

# Before any test module is collected: triton's first import must already be in interpreted mode.
select_interpreter_if_no_cuda()


@pytest.fixture(scope="session")
def default_loaded() -> Any:
    from tokenmill.loader import load_model

    return load_model(None)


@pytest.fixture(scope="session")
def default_tokenizer_dir(default_loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("default-tokenizer")
    default_loaded.tokenizer.save_pretrained(path)
    return path


def _tiny_config(arch: str, vocab_size: int) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        cfg.architectures = ["LlamaForCausalLM"]
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
        cfg.architectures = ["Qwen2ForCausalLM"]
    elif arch == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
        cfg.architectures = ["MistralForCausalLM"]
    else:
        raise ValueError(arch)
    return cfg


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, default_tokenizer_dir: Path, default_loaded: Any):
    """Factory: arch name -> directory of a tiny random checkpoint (+ the default model's tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(1234)
            cfg = _tiny_config(arch, default_loaded.hf_config.vocab_size)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            # Larger-than-default init spreads the logits so greedy picks are not near-ties.
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() > 1:
                        p.normal_(0, 0.1)
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(path)
            AutoTokenizer.from_pretrained(default_tokenizer_dir).save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make


@pytest.fixture(scope="session")
def head64_checkpoint(tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose heads have 64 dims (2 query heads, 1 KV head), the AMX attention's shape; the tiny
    checkpoints' have 16."""
    return tiny_variant(tiny_checkpoint("llama"), tmp_path_factory, "head64-llama", 6, hidden_size=128,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=64)
