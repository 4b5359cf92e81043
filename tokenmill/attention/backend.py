"""The attention interface: metadata describing one flat batch, and the backend protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class AttentionMetadata:
    """Where each request's tokens sit in the flat batch and where its KV lives.

    Request i owns query rows [query_start_loc[i], query_start_loc[i+1]); its queries are the last
    query_lens[i] positions of a context of seq_lens[i] tokens, whose K/V are found through
    block_tables[i] (block b holds positions [b*block_size, (b+1)*block_size)). slot_mapping[t] is the
    flat cache slot (block_id * block_size + offset) where row t's K/V is written.
    """

    num_tokens: int
    block_size: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int64
    seq_lens: torch.Tensor  # [num_reqs] int64
    block_tables: torch.Tensor  # [num_reqs, max_num_blocks] int64, unused entries 0
    slot_mapping: torch.Tensor  # [num_tokens] int64
    # The same facts as Python lists, for backends that split work on the host.
    query_lens_list: list[int]
    seq_lens_list: list[int]
    # Values a backend derives from this metadata once per step and reuses in every layer.
    scratch: dict[str, Any] = field(default_factory=dict)
    # Set while a CUDA graph is captured (to max_model_len): the graph replays with other lengths, so
    # kernels size their launch by this bound and read lengths only from the seq_lens tensor; the
    # host lists then hold the bound too, not real lengths.
    seq_len_bound: int | None = None

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def is_pure_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens_list)


class AttentionBackend(Protocol):
    name: str  # "torch" or "triton"; models pick their fused kernels by it
    # True when the backend rotates q/k itself while writing K/V (rotary_and_write_kv, which returns the
    # q/k/v forward() then gets); Attention hands it un-rotated q/k.
    fuses_rotary: bool
    # True when the backend runs its CPU C kernels (kernels/cpu/); the layers' small ops then take the C kernels
    # too (layers/kernel_choice.py). False on the GPU and under the `--kernels torch` family.
    use_c_kernels: bool

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype | None = None) -> tuple[int, ...]:
        """Shape of one layer's K (and of its V) cache of element type dtype (None: one element per value).
        The backend owns the layout; slot s = block_id * block_size + offset addresses one token's
        [num_kv_heads, head_dim] entry."""

    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> None:
        """Store this step's key/value rows ([num_tokens, num_kv_heads, head_dim]) into the paged cache."""

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        """Causal attention of query rows ([num_tokens, num_heads, head_dim]) over each request's
        context: the cache already holds this step's K/V (key/value, [num_tokens, num_kv_heads,
        head_dim], are passed too so a backend may use them directly). Returns [num_tokens, num_heads, head_dim]."""


def get_attention_backend(name: str, use_c_kernels: bool = True) -> AttentionBackend:
    """use_c_kernels: False keeps the torch backend on torch ops (the `--kernels torch` family)."""
    if name == "torch":
        from tokenmill.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend(use_c_kernels)
    if name == "triton":
        from tokenmill.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; available: 'torch', 'triton'")
