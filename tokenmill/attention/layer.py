"""The attention module model code calls: self.attn(q, k, v, attn_metadata)."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata


class Attention(nn.Module):
    """Writes this step's K/V into the layer's paged cache and attends over it.

    The runner binds `kv_cache` (K and V tensors of [num_blocks, block_size, num_kv_heads, head_dim])
    before the first forward.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.backend = backend
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, num_heads, head_dim], k/v: [T, num_kv_heads, head_dim] -> [T, num_heads * head_dim]."""
        if self.kv_cache is None:
            raise RuntimeError("Attention.kv_cache is not bound; the model runner binds it before execution")
        self.backend.write_kv(k, v, self.kv_cache, meta)
        out = self.backend.forward(q, k, v, self.kv_cache, meta, self.scale)
        return out.reshape(out.shape[0], -1)
