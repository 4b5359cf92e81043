"""A tensor-parallel rank reads only its share of each stored tensor (loader/hf.py CheckpointTensors.raw) and casts
only that, and what it keeps is exactly its share of the whole model's weights."""

from __future__ import annotations

import torch

from tokenmill.attention.backend import get_attention_backend
from tokenmill.distributed.communicator import Communicator
from tokenmill.loader import load_model
from tokenmill.loader.hf import CheckpointTensors
from tokenmill.models.registry import resolve_model_class
from tokenmill.worker.device import default_dtype


class _WholeReads(CheckpointTensors):
    """Records every tensor read whole (cast in full) through []."""

    def __init__(self, tensors: CheckpointTensors) -> None:
        super().__init__({name: tensors.raw(name) for name in tensors}, tensors.dtype)
        self.whole: list[str] = []

    def __getitem__(self, name: str) -> torch.Tensor:
        self.whole.append(name)
        return super().__getitem__(name)


def _model(loaded, rank: int, world: int) -> torch.nn.Module:
    with torch.device("cpu"), default_dtype(torch.bfloat16):
        return resolve_model_class(loaded.hf_config)(
            loaded.hf_config, get_attention_backend("torch", use_c_kernels=False), 64, torch.bfloat16,
            torch.device("cpu"), tp=Communicator(rank, world))


def test_a_rank_casts_only_its_share(tiny_checkpoint) -> None:
    loaded = load_model(tiny_checkpoint("qwen2"), dtype=torch.bfloat16)  # stored in float32: cast as read
    assert isinstance(loaded.state_dict, CheckpointTensors)
    assert loaded.state_dict.raw("model.norm.weight").dtype == torch.float32
    assert loaded.state_dict["model.norm.weight"].dtype == torch.bfloat16
    whole = _model(loaded, 0, 1)
    whole.load_weights(loaded.state_dict)
    spy = _WholeReads(loaded.state_dict)
    rank1 = _model(loaded, 1, 2)
    rank1.load_weights(spy)
    assert spy.whole == []
    v0, v1 = rank1.vocab
    assert v0 > 0 and torch.equal(rank1.embed_tokens.weight, whole.embed_tokens.weight[v0:v1])
    c0, c1 = rank1.layers[0].mlp.channels
    inter = whole.config.intermediate_size
    gate_up = whole.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(rank1.layers[0].mlp.gate_up_proj.weight,
                       torch.cat([gate_up[c0:c1], gate_up[inter + c0:inter + c1]]))
    assert torch.equal(rank1.layers[0].mlp.down_proj.weight, whole.layers[0].mlp.down_proj.weight[:, c0:c1])
    assert torch.equal(rank1.norm.weight, whole.norm.weight)
