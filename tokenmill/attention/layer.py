"""The attention module model code calls: self.attn(q, k, v, attn_metadata)."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata
from tokenmill.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    """Applies rotary embedding, writes this step's K/V into the layer's paged cache and attends over it.

    The runner binds `kv_cache` (K and V tensors in the backend's kv_cache_shape) before the first
    forward. A backend that fuses rotary into its K/V write (triton) gets q/k un-rotated.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.backend = backend
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """q: [T, num_heads, head_dim], k/v: [T, num_kv_heads, head_dim] before rotary (views of the
        fused projection are fine) -> [T, num_heads * head_dim]."""
        q, k, v = self.rotate(q, k, v, cos_sin)
        return self.attend(q, k, v, meta, cos_sin)

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-token part (pure tensor ops, no metadata: compilable): rotary on q/k, unless the
        backend fuses it into its K/V write, in which case q/k/v pass through untouched."""
        if self.backend.fuses_rotary:
            return q, k, v
        q, k = RotaryEmbedding.apply(cos_sin, q, k)
        return q, k, v.contiguous()

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Writes this step's K/V into the paged cache and attends over it; q/k/v come from rotate().
        Always eager: it follows per-step Python plans in `meta`."""
        if self.kv_cache is None:
            raise RuntimeError("Attention.kv_cache is not bound; the model runner binds it before execution")
        dtype = q.dtype
        if self.backend.fuses_rotary:
            # May return q/k/v in another dtype (the CPU backend runs 16-bit models' attention in float32).
            q, k, v = self.backend.rotary_and_write_kv(q, k, v, cos_sin, self.kv_cache, meta)
        else:
            self.backend.write_kv(k, v, self.kv_cache, meta)
        out = self.backend.forward(q, k, v, self.kv_cache, meta, self.scale)
        return out.reshape(out.shape[0], -1).to(dtype)
