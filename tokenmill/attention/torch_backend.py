"""Reference attention over the paged KV cache in plain PyTorch (the CPU backend).

Cache layout per layer, for K and for V: [num_kv_heads, num_blocks, block_size, head_dim]
(head-major). Gathering a request's blocks then yields [num_kv_heads, tokens, head_dim] directly in
the layout batched matmuls read, with no transposing copy; on CPU that copy cost as much as the
attention itself.

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
    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_kv_heads, num_blocks, block_size, head_dim)

    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> None:
        for cache, new in zip(kv_cache, (key, value)):
            num_kv_heads, _, _, head_dim = cache.shape
            cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, new.transpose(0, 1))

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        if meta.is_pure_decode:
            return _decode(query, kv_cache, meta.block_tables, meta.seq_lens, max(meta.seq_lens_list), scale)
        out = torch.empty_like(query)
        starts = meta.query_start_loc.tolist()
        decode_reqs = [i for i, q in enumerate(meta.query_lens_list) if q == 1]
        if decode_reqs:
            idx = torch.tensor(decode_reqs)
            rows = meta.query_start_loc[idx]
            max_len = max(meta.seq_lens_list[i] for i in decode_reqs)
            out[rows] = _decode(query[rows], kv_cache, meta.block_tables[idx], meta.seq_lens[idx], max_len, scale)
        for i, q_len in enumerate(meta.query_lens_list):
            if q_len == 1:
                continue
            rows = slice(starts[i], starts[i] + q_len)
            seq_len = meta.seq_lens_list[i]
            if seq_len == q_len:  # no cached prefix: this step holds the whole context
                out[rows] = _causal(query[rows], key[rows].transpose(0, 1), value[rows].transpose(0, 1), scale)
            else:
                k = _gather(kv_cache[0], meta.block_tables[i : i + 1], seq_len)[:, 0, :seq_len]
                v = _gather(kv_cache[1], meta.block_tables[i : i + 1], seq_len)[:, 0, :seq_len]
                out[rows] = _causal(query[rows], k, v, scale)
        return out


def _gather(cache: torch.Tensor, tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """The first ceil(max_len / block_size) blocks of each table row: [Hkv, R, nblocks * block_size, D]."""
    num_kv_heads, _, block_size, head_dim = cache.shape
    num_blocks = -(-max_len // block_size)
    blocks = cache.index_select(1, tables[:, :num_blocks].reshape(-1))
    return blocks.view(num_kv_heads, tables.shape[0], num_blocks * block_size, head_dim)


# Decode requests attended together: their gathered K/V (a few MB) stay in cache between the
# gather and the matmuls that read it; one big gather spills to memory and ran ~1.5x slower.
_DECODE_CHUNK = 8


def _decode(
    query: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], tables: torch.Tensor,
    seq_lens: torch.Tensor, max_len: int, scale: float,
) -> torch.Tensor:
    """One query row per request. query: [B, H, D] -> [B, H, D]."""
    if query.shape[0] <= _DECODE_CHUNK:
        return _decode_chunk(query, kv_cache, tables, seq_lens, max_len, scale)
    out = torch.empty_like(query)
    lens = seq_lens.tolist()
    for i in range(0, query.shape[0], _DECODE_CHUNK):
        rows = slice(i, i + _DECODE_CHUNK)
        out[rows] = _decode_chunk(query[rows], kv_cache, tables[rows], seq_lens[rows], max(lens[rows]), scale)
    return out


def _decode_chunk(
    query: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], tables: torch.Tensor,
    seq_lens: torch.Tensor, max_len: int, scale: float,
) -> torch.Tensor:
    k = _gather(kv_cache[0], tables, max_len)  # [Hkv, B, S, D]
    v = _gather(kv_cache[1], tables, max_len)
    batch, num_heads, head_dim = query.shape
    num_kv_heads = k.shape[0]
    q = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 1)  # [Hkv, B, G, D]
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [Hkv, B, G, S]
    invalid = torch.arange(k.shape[2]).unsqueeze(0) >= seq_lens.unsqueeze(1)  # [B, S]
    scores.masked_fill_(invalid[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, v).transpose(0, 1).reshape(batch, num_heads, head_dim)


def _causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """query: [Tq, H, D]; key/value: [Hkv, Tk, D] ending at the query's last position -> [Tq, H, D]."""
    q_len, seq_len = query.shape[0], key.shape[1]
    q = query.transpose(0, 1)
    if q_len == seq_len:
        attn = F.scaled_dot_product_attention(q, key, value, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # Query row j sits at position seq_len - q_len + j and sees keys at positions <= that.
        mask = torch.arange(seq_len).unsqueeze(0) <= torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
        attn = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
    return attn.transpose(0, 1)
