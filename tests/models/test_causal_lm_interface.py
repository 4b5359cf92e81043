"""The causal-LM interface (models/interface.py): every model class provides it consistently, and no code outside
models/ reaches into an architecture's module attributes."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

import pytest

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.models.interface import PROJECTIONS, CausalLM

# Module attributes of the Llama family that only models/ may name.
ARCHITECTURE_ATTRIBUTES = {"layers", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm",
                           "embed_tokens", "lm_head", "qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
PACKAGE = Path(__file__).resolve().parents[2] / "tokenmill"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_models_provide_the_interface(tiny_checkpoint, arch: str) -> None:
    config = EngineConfig.from_kwargs(model=str(tiny_checkpoint(arch)), dtype="float32", num_blocks=8)
    model = LLMEngine(config).core.model
    assert isinstance(model, CausalLM)
    parts = model.decoder_layers()
    assert len(parts) == model.config.num_hidden_layers
    assert [part.attention for part in parts] == model.attention_layers
    modules = set(map(id, model.modules()))
    for part in parts:
        assert tuple(slot.name for slot in part.projections) == PROJECTIONS
        assert all(id(slot.module) in modules for slot in part.projections)
        assert part.q_size == model.config.num_attention_heads * part.attention.head_dim
        assert part.kv_size == model.config.num_key_value_heads * part.attention.head_dim
    # The plan may have packed the vocabulary projection (a PanelLinear has no plain weight): its width is the vocabulary.
    assert model.vocab_projection.out_features == model.config.vocab_size


def _attribute_names(source: str) -> set[str]:
    """Names that follow a "." in the code (strings, comments and import statements' module paths excluded)."""
    names, previous, statement_start = set(), None, None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            previous, statement_start = None, None
            continue
        if token.type in (tokenize.NL, tokenize.COMMENT):
            continue
        if statement_start is None:
            statement_start = token.string
        if token.type == tokenize.NAME and previous is not None and previous.string == "." \
                and statement_start not in ("from", "import"):
            names.add(token.string)
        previous = token
    return names


def test_no_code_outside_models_names_architecture_attributes() -> None:
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "models":
            continue
        found = _attribute_names(path.read_text()) & ARCHITECTURE_ATTRIBUTES
        if found:
            offenders[str(relative)] = sorted(found)
    assert not offenders, f"use the causal-LM interface (models/interface.py) instead: {offenders}"
