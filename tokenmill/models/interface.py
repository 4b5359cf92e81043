"""The causal-LM interface: all that code outside models/ (the worker, the planner, the C forward, compile, the
quantizers) may know of a model. A model class in models/registry.py provides it; code outside models/ never names
an architecture's module attributes (`layers`, `self_attn`, `mlp`, `lm_head`, ...).

A decoder layer is seen as its parts (DecoderLayerParts): the paged attention, the two norms, and the four
projection slots (Projection: where the module sits, so a quantizer or the planner can replace it). The vocabulary
projection is `vocab_projection`; `logits_head`, when set, replaces it in compute_logits (a quantized or packed
product); use_packed_vocab_projection() installs a packed one that also stands for the (tied) embedding table.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.layer import Attention
from tokenmill.distributed.communicator import Communicator
from tokenmill.layers.rotary import RotaryEmbedding

# The projections of a decoder layer, in the order they run.
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class Projection:
    """One projection slot of a decoder layer: `name` is one of PROJECTIONS, the module is parent.<attribute>."""

    name: str
    parent: nn.Module
    attribute: str

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.attribute)

    def replace(self, module: nn.Module) -> None:
        setattr(self.parent, self.attribute, module)


@dataclass(frozen=True)
class DecoderLayerParts:
    """One decoder layer: norm -> qkv -> attention -> o -> (+residual) norm -> gate_up -> silu*mul -> down.

    The qkv output is [q (q_size) | k (kv_size) | v (kv_size)] with heads of attention.head_dim; gate_up's is
    [gate | up], each down's input width."""

    layer: nn.Module  # the layer itself: its pre_attention / post_attention halves (worker/compile.py)
    attention: Attention  # num_heads, num_kv_heads, head_dim, scale, backend, kv_cache
    input_norm: nn.Module  # RMSNorm before qkv (weight, eps)
    post_attention_norm: nn.Module  # RMSNorm before gate_up
    projections: tuple[Projection, ...]  # in PROJECTIONS order
    # Per KV head, (i, n): under tensor parallelism this rank attends only share i of n of a step's rows of that head's
    # group and leaves the group's other rows zero (distributed/sharding.py); (0, 1) everywhere otherwise.
    row_shares: tuple[tuple[int, int], ...] = ()

    def projection(self, name: str) -> Projection:
        return self.projections[PROJECTIONS.index(name)]

    @property
    def q_size(self) -> int:
        return self.attention.num_heads * self.attention.head_dim

    @property
    def kv_size(self) -> int:
        return self.attention.num_kv_heads * self.attention.head_dim


@runtime_checkable
class CausalLM(Protocol):
    config: Any  # the checkpoint's config (hidden_size, vocab_size, ...)
    tp: Communicator  # this rank's group (SINGLE without tensor parallelism)
    rotary: RotaryEmbedding
    logits_head: nn.Module | None  # replaces vocab_projection in compute_logits when set
    # (max rows, module with greedy_ids): greedy_token_ids of up to that many rows through it (the execution plan's
    # int8 screen, layers/screened_head.py: the same ids as compute_logits' argmax), when set
    greedy_screen: tuple[int, nn.Module] | None

    def decoder_layers(self) -> list[DecoderLayerParts]: ...

    @property
    def attention_layers(self) -> list[Attention]: ...

    @property
    def final_norm(self) -> nn.Module: ...

    @property
    def vocab_projection(self) -> nn.Module: ...

    def use_packed_vocab_projection(self, head: nn.Module,
                                    embedding_from: Callable[[nn.Module], nn.Module]) -> None: ...

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor: ...

    def first_layers(self, n: int) -> AbstractContextManager[None]:
        """While open, forward runs the first n decoder layers only (the execution plan times steps on a part of
        the depth); every layer again on exit."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None: ...

    def greedy_token_ids(self, hidden: torch.Tensor) -> torch.Tensor | None: ...
