"""Reference attention over the paged KV cache in plain PyTorch (the CPU backend).

Decode rows (one query per request) are batched into one padded attention call; requests with
several query rows (prefill chunks, prefill over a cached prefix) run one attention call each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.attention.backend import AttentionMetadata


class TorchAttentionBackend:
    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> None:
        k_cache, v_cache = kv_cache
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, meta.slot_mapping, key)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, meta.slot_mapping, value)

    def forward(
        self, query: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        out = torch.empty_like(query)
        decode_reqs = [i for i, q in enumerate(meta.query_lens_list) if q == 1]
        if decode_reqs:
            self._decode(query, kv_cache, meta, scale, decode_reqs, out)
        starts = meta.query_start_loc.tolist()
        for i, q_len in enumerate(meta.query_lens_list):
            if q_len > 1:
                rows = slice(starts[i], starts[i] + q_len)
                out[rows] = self._extend_one(query[rows], kv_cache, meta, scale, i)
        return out

    @staticmethod
    def _gather_context(
        cache: torch.Tensor, block_table: torch.Tensor, num_blocks: int
    ) -> torch.Tensor:
        """[num_blocks * block_size, kv_heads, head_dim] of the given table rows (last dims of cache)."""
        blocks = cache.index_select(0, block_table[..., :num_blocks].reshape(-1))
        return blocks.reshape(*block_table.shape[:-1], -1, *cache.shape[2:])

    def _extend_one(
        self, query: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
        scale: float, i: int,
    ) -> torch.Tensor:
        seq_len = meta.seq_lens_list[i]
        q_len = query.shape[0]
        num_blocks = -(-seq_len // meta.block_size)
        table = meta.block_tables[i]
        k = self._gather_context(kv_cache[0], table, num_blocks)[:seq_len]
        v = self._gather_context(kv_cache[1], table, num_blocks)[:seq_len]
        # Query row j sits at position seq_len - q_len + j and may see keys at positions <= that.
        q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
        mask = torch.arange(seq_len).unsqueeze(0) <= q_pos
        attn = F.scaled_dot_product_attention(
            query.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, scale=scale, enable_gqa=True,
        )
        return attn.transpose(0, 1)

    def _decode(
        self, query: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
        scale: float, req_idx: list[int], out: torch.Tensor,
    ) -> None:
        idx = torch.tensor(req_idx)
        rows = meta.query_start_loc[idx]
        seq_lens = meta.seq_lens[idx]
        max_len = max(meta.seq_lens_list[i] for i in req_idx)
        num_blocks = -(-max_len // meta.block_size)
        tables = meta.block_tables[idx]
        k = self._gather_context(kv_cache[0], tables, num_blocks)  # [B, S, Hkv, D]
        v = self._gather_context(kv_cache[1], tables, num_blocks)
        mask = torch.arange(k.shape[1]).unsqueeze(0) < seq_lens.unsqueeze(1)  # [B, S]
        q = query[rows].unsqueeze(2)  # [B, H, 1, D]
        attn = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True,
        )
        out[rows] = attn.squeeze(2)
