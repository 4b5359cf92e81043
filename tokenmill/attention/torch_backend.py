"""Reference attention over the paged KV cache in plain PyTorch (the CPU backend).

Decode rows (one query per request) are batched into one padded attention over the gathered
contexts; requests with several query rows (prefill chunks, prefill over a cached prefix) run one
causal attention each. A request whose whole context arrives in this step attends to this step's
K/V directly instead of reading them back from the cache.
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
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        if meta.is_pure_decode:
            return self._decode(query, kv_cache, meta, scale, list(range(meta.num_reqs)))
        out = torch.empty_like(query)
        starts = meta.query_start_loc.tolist()
        decode_reqs = [i for i, q in enumerate(meta.query_lens_list) if q == 1]
        if decode_reqs:
            rows = meta.query_start_loc[torch.tensor(decode_reqs)]
            out[rows] = self._decode(query[rows], kv_cache, meta, scale, decode_reqs)
        for i, q_len in enumerate(meta.query_lens_list):
            if q_len == 1:
                continue
            rows = slice(starts[i], starts[i] + q_len)
            if meta.seq_lens_list[i] == q_len:  # no cached prefix: this step holds the whole context
                out[rows] = _causal(query[rows], key[rows], value[rows], scale)
            else:
                out[rows] = self._extend_over_prefix(query[rows], kv_cache, meta, scale, i)
        return out

    def _extend_over_prefix(
        self, query: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
        scale: float, i: int,
    ) -> torch.Tensor:
        seq_len, q_len = meta.seq_lens_list[i], query.shape[0]
        table = meta.block_tables[i : i + 1]
        k = _gather(kv_cache[0], table, seq_len)[0, :seq_len]
        v = _gather(kv_cache[1], table, seq_len)[0, :seq_len]
        # Query row j sits at position seq_len - q_len + j and sees keys at positions <= that.
        mask = torch.arange(seq_len).unsqueeze(0) <= torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
        attn = F.scaled_dot_product_attention(
            query.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale,
            enable_gqa=True,
        )
        return attn.transpose(0, 1)

    def _decode(
        self, query: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
        scale: float, req_idx: list[int],
    ) -> torch.Tensor:
        """query: [B, H, D], one row per request in req_idx -> [B, H, D]."""
        idx = torch.tensor(req_idx)
        max_len = max(meta.seq_lens_list[i] for i in req_idx)
        tables = meta.block_tables[idx]
        k = _gather(kv_cache[0], tables, max_len)  # [B, S, Hkv, D]
        v = _gather(kv_cache[1], tables, max_len)
        batch, num_heads, head_dim = query.shape
        num_kv_heads = k.shape[2]
        q = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
        scores = torch.matmul(q, k.permute(0, 2, 3, 1)) * scale  # [B, Hkv, G, S]
        invalid = torch.arange(k.shape[1]).unsqueeze(0) >= meta.seq_lens[idx].unsqueeze(1)  # [B, S]
        scores.masked_fill_(invalid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, v.permute(0, 2, 1, 3))  # [B, Hkv, G, D]
        return out.reshape(batch, num_heads, head_dim)


def _gather(cache: torch.Tensor, tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """The first ceil(max_len / block_size) blocks of each table row: [R, nblocks * block_size, Hkv, D]."""
    num_blocks = -(-max_len // cache.shape[1])
    blocks = cache.index_select(0, tables[:, :num_blocks].reshape(-1))
    return blocks.view(tables.shape[0], num_blocks * cache.shape[1], *cache.shape[2:])


def _causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    attn = F.scaled_dot_product_attention(
        query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), is_causal=True, scale=scale,
        enable_gqa=True,
    )
    return attn.transpose(0, 1)
