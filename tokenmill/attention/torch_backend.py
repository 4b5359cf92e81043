"""Attention over the paged KV cache on the CPU: torch ops (the reference everywhere) and C kernels.

Cache layout per layer, for K and for V: [num_kv_heads, num_blocks, block_size, head_dim]
(head-major). Gathering a request's blocks then yields [num_kv_heads, tokens, head_dim] directly in
the layout batched matmuls read, with no transposing copy; on CPU that copy cost as much as the
attention itself.

The cache holds the compute dtype, float16 under `--kv-cache-dtype float16`, int8 rows with a
per-position scale under `--kv-cache-dtype int8` (kernels/cpu/kv_cache.py; the last dim is then head_dim + 4), or
bfloat16 tiles interleaved in pairs for the bf16 dot products under `--kv-cache-dtype bfloat16` (the default of a
bfloat16 model where the CPU has them; kv_cache.py), read back as the compute dtype; the C kernels convert as they
load (kernels/cpu/kv_cache.h), or multiply bf16 tiles as they lie.

With the C kernels (kernels/cpu/, built on first use when a C compiler is present; float32 compute only),
rotary embedding and the K/V write are one call (rotary_and_write_kv), decode rows (one query per
request) are attended by a kernel that reads each request's blocks in place, and so are the rows of
requests with several query rows (prefill chunks, prefill over a cached prefix), all in one call
(kernels/cpu/prefill_attention.c; ~1.4x torch's fused CPU attention on 256-token float32 prompts on an AVX2
Zen 3). The execution plan may route a prompt whose whole context arrives in the step to torch's fused
attention over the step's own rotated K/V in the model's dtype instead, or, for a bf16 (or int8/int4) model on a CPU
with AMX-BF16 or AVX512-BF16, to our bf16 kernel over the same rows (kernels/cpu/bf16_prompt_attention.c)
(route_prompt_attention; on an AMX Xeon bf16 SDPA ran 1.5-3.5x the C kernel, the AMX kernel 1.5-1.6x SDPA). Without
them, and as their reference (`use_c_kernels=False`), decode rows are batched into one padded
attention over the gathered contexts, and each multi-row request runs one causal attention (torch's
scaled_dot_product_attention); a request whose whole context arrives in this step attends to this
step's K/V directly instead of reading them back from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.kernels.cpu.bf16_prompt_attention import AMX_ATTENTION_MAX_KEYS, bf16_prompt_attention
from tokenmill.kernels.cpu.kv_cache import KV_DTYPES, kv_row_width, kv_values, tiles_as_rows, write_kv_rows
from tokenmill.kernels.cpu.layer_ops import applies as c_applies
from tokenmill.kernels.cpu.layer_ops import layer_ops_available, rotary_write_kv
from tokenmill.kernels.cpu.paged_attention import decode_kernel_available, paged_decode_attention
from tokenmill.kernels.cpu.prefill_attention import paged_prefill_attention, prefill_kernel_available
from tokenmill.layers.rotary import RotaryEmbedding


@dataclass
class _DecodeChunk:
    """Up to _DECODE_CHUNK decode requests attended together; shared by all layers of a step."""

    rows: torch.Tensor  # their query rows in the flat batch
    gather_rows: torch.Tensor  # rows of the cache viewed as [Hkv * num_blocks, block_size * D], head-major
    invalid: torch.Tensor  # [b, S] True past each request's sequence length
    num_reqs: int
    padded_len: int  # S: whole blocks covering the longest sequence


# Decode requests attended together: their gathered K/V (a few MB) stay in cache between the
# gather and the matmuls that read it; one big gather spills to memory and ran ~1.5x slower.
_DECODE_CHUNK = 8


def _decode_chunks(meta: AttentionMetadata, num_kv_heads: int, num_blocks: int, block_size: int) -> list[_DecodeChunk]:
    chunks = meta.scratch.get("decode_chunks")
    if chunks is not None:
        return chunks
    # Similar lengths share a chunk, so little padding is gathered.
    decode_reqs = sorted((i for i, q in enumerate(meta.query_lens_list) if q == 1), key=meta.seq_lens_list.__getitem__)
    head_offsets = torch.arange(num_kv_heads).unsqueeze(1) * num_blocks
    chunks = []
    for start in range(0, len(decode_reqs), _DECODE_CHUNK):
        reqs = torch.tensor(decode_reqs[start : start + _DECODE_CHUNK])
        max_len = max(meta.seq_lens_list[i] for i in decode_reqs[start : start + _DECODE_CHUNK])
        blocks_per_req = -(-max_len // block_size)
        blocks = meta.block_tables[reqs, :blocks_per_req].reshape(1, -1)
        padded_len = blocks_per_req * block_size
        chunks.append(_DecodeChunk(
            rows=meta.query_start_loc[reqs], gather_rows=(head_offsets + blocks).reshape(-1),
            invalid=torch.arange(padded_len).unsqueeze(0) >= meta.seq_lens[reqs].unsqueeze(1),
            num_reqs=len(reqs), padded_len=padded_len,
        ))
    meta.scratch["decode_chunks"] = chunks
    return chunks


@dataclass
class _CDecodePlan:
    """The decode requests of a step, as the C kernel takes them; shared by all layers of a step."""

    rows: torch.Tensor  # [R] their query rows in the flat batch
    seq_lens: torch.Tensor  # [R]
    block_tables: torch.Tensor  # [R, max_blocks], contiguous


def _c_decode_plan(meta: AttentionMetadata) -> _CDecodePlan:
    plan = meta.scratch.get("c_decode")
    if plan is None:
        if meta.is_pure_decode:
            plan = _CDecodePlan(meta.query_start_loc[:-1], meta.seq_lens, meta.block_tables.contiguous())
        else:
            reqs = torch.tensor([i for i, q in enumerate(meta.query_lens_list) if q == 1], dtype=torch.int64)
            plan = _CDecodePlan(
                meta.query_start_loc[reqs], meta.seq_lens[reqs], meta.block_tables[reqs].contiguous())
        meta.scratch["c_decode"] = plan
    return plan


def _per_row_plan(meta: AttentionMetadata) -> _CDecodePlan:
    """Every query row of the step as a decode row of its own: its position's causal context (seq_len = position +
    1) through its request's block table. Deterministic mode attends all rows so (the step's own K/V are in the
    cache before attention runs), so that a row's attention is one fixed computation over its context whether it
    is a decode row, one of a prompt's, of a chunk or of a recomputation after preemption."""
    plan = meta.scratch.get("c_rows")
    if plan is None:
        q_lens = torch.tensor(meta.query_lens_list, dtype=torch.int64)
        req_of_row = torch.repeat_interleave(torch.arange(meta.num_reqs), q_lens)
        offset = torch.arange(meta.num_tokens) - meta.query_start_loc.cpu()[req_of_row]
        first_pos = torch.tensor(meta.seq_lens_list, dtype=torch.int64) - q_lens  # of each request's query rows
        plan = _CDecodePlan(torch.arange(meta.num_tokens), first_pos[req_of_row] + offset + 1,
                            meta.block_tables.cpu()[req_of_row].contiguous())
        meta.scratch["c_rows"] = plan
    return plan


@dataclass
class _CPrefillPlan:
    """The requests with several query rows in a step, for the C prefill kernel; shared by all layers."""

    rows: torch.Tensor  # [R] first query row of each
    query_lens: torch.Tensor  # [R]
    seq_lens: torch.Tensor  # [R]
    block_tables: torch.Tensor  # [R, max_blocks], contiguous


@dataclass
class _PromptSplit:
    """The requests with several query rows in a step, by the kernel that attends them; shared by all layers."""

    # (first row, rows each, prompts) of runs of adjacent whole-context requests of one length routed to torch's
    # fused attention: each run is one batched call.
    sdpa: list[tuple[int, int, int]]
    bf16: tuple[list[int], list[int]]  # (first rows, lengths) of the whole-context requests routed to BF16_KERNEL
    c_plan: _CPrefillPlan | None  # the others, for the C prefill kernel (None: there are none)


def _prompt_split(meta: AttentionMetadata, routes: list[tuple[int, str]]) -> _PromptSplit:
    split = meta.scratch.get("prompt_split")
    if split is None:
        starts = meta.query_start_loc.tolist()
        sdpa, c_reqs, bf16_starts, bf16_lens = [], [], [], []
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list, strict=True)):
            if q_len == 1:
                continue
            kernel = route_kernel(routes, q_len) if q_len == seq_len else C_PREFILL_KERNEL
            if kernel == BF16_KERNEL and q_len > AMX_ATTENTION_MAX_KEYS:  # past the bf16 kernel's longest prompt
                kernel = C_PREFILL_KERNEL
            if kernel == BF16_KERNEL:
                bf16_starts.append(starts[i])
                bf16_lens.append(q_len)
            elif kernel == SDPA_KERNEL:
                if sdpa and sdpa[-1][1] == q_len and sdpa[-1][0] + q_len * sdpa[-1][2] == starts[i]:
                    sdpa[-1] = (sdpa[-1][0], q_len, sdpa[-1][2] + 1)
                else:
                    sdpa.append((starts[i], q_len, 1))
            else:
                c_reqs.append(i)
        c_plan = None
        if c_reqs:
            reqs = torch.tensor(c_reqs, dtype=torch.int64)
            c_plan = _CPrefillPlan(meta.query_start_loc[reqs], torch.tensor(meta.query_lens_list)[reqs],
                                   meta.seq_lens[reqs], meta.block_tables[reqs].contiguous())
        split = meta.scratch["prompt_split"] = _PromptSplit(sdpa, (bf16_starts, bf16_lens), c_plan)
    return split


# The execution plan's kernels for the prompt rows of a request whose whole context is in the step
# (worker/planner.py times them): the C prefill kernel over the paged cache, torch's fused attention over the
# step's own rotated K/V in the model's dtype (oneDNN; AMX tiles for bf16 where the CPU has them), or, for a bf16
# or int8/int4 model (bf16_attention_allowed), our bf16 kernel over the same rows
# (kernels/cpu/bf16_prompt_attention.c: AMX tiles, else AVX512-BF16's vdpbf16ps; the C forward follows this route
# too: max_rows_routed).
C_PREFILL_KERNEL, SDPA_KERNEL, BF16_KERNEL = "c_paged", "torch_sdpa", "c_bf16"


def bf16_attention_allowed(dtype: torch.dtype, quantized: bool) -> bool:
    """Whether prompts may attend in bf16 (BF16_KERNEL: q/k/v and probabilities rounded to bf16): a bf16 model's, and
    an int8/int4 model's (float32 activations, already quantized per token to 8 bits or with 4-bit weights, beside
    which bf16's 2^-9 rounding is small: benchmarks/quant_quality.py); never a float32 model's, whose greedy tokens
    match HF's."""
    return dtype == torch.bfloat16 or quantized


def route_kernel(routes: list[tuple[int, str]], rows: int) -> str:
    """The kernel of the first route whose bound holds rows (the last route's beyond them all); C without routes."""
    for bound, kernel in routes:
        if rows <= bound:
            return kernel
    return routes[-1][1] if routes else C_PREFILL_KERNEL


def max_rows_routed(routes: list[tuple[int, str]], kernel: str, limit: int) -> int:
    """The largest n such that every prompt of 1 .. n rows routes to `kernel` (route_kernel), at most limit: the
    first routes' bound while they name it, limit when they all do, 0 when the first does not."""
    bound = 0
    for route_bound, route in routes:
        if route != kernel:
            return bound
        bound = route_bound
    return limit if routes else 0


def whole_context_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                            dtype: torch.dtype, num_prompts: int = 1) -> torch.Tensor:
    """Causal attention of num_prompts back-to-back prompts of one length, each one's whole context its rows in
    this step, through one call of torch's fused CPU attention in `dtype`. query: [T, H, D], key/value:
    [T, Hkv, D] (rotated), T = num_prompts x length -> [T, H, D] of `dtype`."""
    total, heads, dim = query.shape
    length = total // num_prompts

    def batched(t: torch.Tensor) -> torch.Tensor:  # [prompts, heads, length, dim]
        return t.to(dtype).view(num_prompts, length, t.shape[1], dim).transpose(1, 2)

    attn = F.scaled_dot_product_attention(batched(query), batched(key), batched(value), is_causal=True, scale=scale,
                                          enable_gqa=True)
    return attn.transpose(1, 2).reshape(total, heads, dim)


def _fused_qkv_row_stride(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> int | None:
    """The row stride of the [T, W] buffer whose rows hold q | k | v back to back (the fused projection's
    output, of which query/key/value are [T, heads, D] views), or None when they are not laid out so."""
    num_rows, head_dim = query.shape[0], query.shape[2]
    width = (query.shape[1] + 2 * key.shape[1]) * head_dim
    # A size-1 dim's stride is arbitrary in a view, so a single row is judged by its pointers alone.
    row_stride = width if num_rows == 1 else query.stride(0)
    if num_rows > 1 and not (key.stride(0) == value.stride(0) == row_stride >= width):
        return None
    if any(t.stride(2) != 1 or (t.shape[1] > 1 and t.stride(1) != head_dim) for t in (query, key, value)):
        return None
    elem = query.element_size()
    back_to_back = (key.data_ptr() == query.data_ptr() + query.shape[1] * head_dim * elem
                    and value.data_ptr() == key.data_ptr() + key.shape[1] * head_dim * elem)
    return row_stride if back_to_back else None


class TorchAttentionBackend:
    name = "torch"

    def __init__(self, use_c_kernels: bool = True) -> None:
        """use_c_kernels: use the C kernels where they apply (float32 CPU tensors); without a C
        compiler the torch path runs. False keeps everything in torch (the reference)."""
        self.use_c_kernels = use_c_kernels and decode_kernel_available() and layer_ops_available()
        # The prefill kernel uses AVX2 intrinsics: off on its own where it cannot be built.
        self.use_c_prefill = self.use_c_kernels and prefill_kernel_available()
        # Rotary is fused into the K/V write whenever the C kernels exist; rotary_and_write_kv falls
        # back to torch ops itself for tensors they do not take.
        self.fuses_rotary = self.use_c_kernels
        # The plan's routes (max prompt rows, kernel) for whole-context prompt rows next to the C prefill kernel,
        # and the dtype torch's fused attention runs in (route_prompt_attention); none: the C kernel for all.
        self.prompt_routes: list[tuple[int, str]] = []
        self.sdpa_dtype = torch.float32
        # Deterministic mode (pin_per_row_attention): every row through the decode kernel, one row at a time.
        self.per_row = False

    def pin_per_row_attention(self) -> None:
        """Deterministic mode: every query row attends through the C decode kernel over the cache (_per_row_plan),
        whatever the step holds. ValueError where the C kernels are not built."""
        if not self.use_c_kernels:
            raise ValueError("batch_invariant needs the C attention kernels (a C compiler)")
        self.per_row = True

    def route_prompt_attention(self, routes: list[tuple[int, str]], dtype: torch.dtype, quantized: bool = False
                               ) -> None:
        """Takes the execution plan's choice for whole-context prompt rows (C_PREFILL_KERNEL, SDPA_KERNEL or
        BF16_KERNEL by prompt length); dtype: the model's, which torch's fused attention runs in; quantized: its
        projections are int8 or int4 (bf16_attention_allowed)."""
        unknown = {k for _, k in routes} - {C_PREFILL_KERNEL, SDPA_KERNEL, BF16_KERNEL}
        if unknown:
            raise ValueError(f"unknown prompt attention kernels {sorted(unknown)}")
        if not bf16_attention_allowed(dtype, quantized) and any(k == BF16_KERNEL for _, k in routes):
            raise ValueError(f"{BF16_KERNEL} attends in bf16: it is for a bf16 or an int8/int4 model, not a "
                             f"{dtype} one")
        self.prompt_routes = list(routes)
        self.sdpa_dtype = dtype

    def _upcasts(self, query: torch.Tensor) -> bool:
        """A bfloat16/float16 model's attention runs in the float32 C kernels: the fused q/k/v rows are
        converted once (rotary_and_write_kv), the cache stores a 16-bit or int8 type, and Attention casts
        the output back. Needs the C prefill kernel too, so that forward() never mixes the float32 query
        with the caller's 16-bit key/value in the torch path."""
        return self.use_c_prefill and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] % 8 == 0

    def _uses_c_decode(self, query: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> bool:
        return (self.use_c_kernels and query.device.type == "cpu" and kv_cache[0].dtype in KV_DTYPES
                and query.dtype == torch.float32 and query.shape[-1] % 8 == 0)

    def rotary_and_write_kv(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotates key in place and writes it and value into the cache; returns the rotated query and key and
        the value, float32 where a 16-bit model's attention runs in the float32 C kernels (_upcasts).
        query/key/value: [T, heads, D] views of one fused qkv projection ([T, (H + 2 Hkv) D] rows),
        which is what the C kernel takes; anything else goes through torch ops with the same effect."""
        row_stride = _fused_qkv_row_stride(query, key, value)
        cos, sin = cos_sin
        cache_dtype = kv_cache[0].dtype
        c_takes = (c_applies(cos) and c_applies(sin) and query.device.type == "cpu"
                   and (query.dtype == torch.float32 or self._upcasts(query))
                   and all(t.is_contiguous() and t.device.type == "cpu" for t in kv_cache)
                   and cache_dtype in KV_DTYPES and (cache_dtype == torch.float32 or query.shape[2] % 8 == 0))
        if row_stride is not None and c_takes:
            width = (query.shape[1] + 2 * key.shape[1]) * query.shape[2]
            qkv = query.as_strided((query.shape[0], width), (row_stride, 1))
            if qkv.dtype != torch.float32:  # one conversion of the fused rows; the C kernels then run as for float32
                qkv = qkv.float()
            num_heads, num_kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[2]
            query = rotary_write_kv(qkv, num_heads, num_kv_heads, head_dim, cos, sin, kv_cache, meta.slot_mapping)
            k_start, kv_width = num_heads * head_dim, num_kv_heads * head_dim  # the rotated key is in qkv
            key = qkv[:, k_start : k_start + kv_width].view(-1, num_kv_heads, head_dim)
            value = qkv[:, k_start + kv_width : k_start + 2 * kv_width].view(-1, num_kv_heads, head_dim)
            return query, key, value
        query, rotated_key = RotaryEmbedding.apply(cos_sin, query, key)
        key.copy_(rotated_key)
        self.write_kv(key, value, kv_cache, meta)
        return query, key, value

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype | None = None) -> tuple[int, ...]:
        return (num_kv_heads, num_blocks, block_size, head_dim if dtype is None else kv_row_width(dtype, head_dim))

    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> None:
        for is_value, (cache, new) in enumerate(zip(kv_cache, (key, value))):
            write_kv_rows(cache, meta.slot_mapping, new.transpose(0, 1), bool(is_value))

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        out = torch.empty_like(query)
        num_kv_heads, num_blocks, block_size, _ = kv_cache[0].shape
        if self.per_row:
            if not self._uses_c_decode(query, kv_cache):
                raise ValueError(f"batch_invariant attends float32 queries through the C kernel, got {query.dtype}")
            plan = _per_row_plan(meta)
            paged_decode_attention(out, query.contiguous(), kv_cache, plan.rows, plan.seq_lens, plan.block_tables,
                                   scale)
            return out
        if self._uses_c_decode(query, kv_cache):
            plan = _c_decode_plan(meta)
            if plan.rows.numel():
                paged_decode_attention(out, query.contiguous(), kv_cache, plan.rows, plan.seq_lens,
                                       plan.block_tables, scale)
        else:
            for chunk in _decode_chunks(meta, num_kv_heads, num_blocks, block_size):
                out[chunk.rows] = _decode(query[chunk.rows], kv_cache, chunk, scale)
        if meta.is_pure_decode:
            return out
        if (self.use_c_prefill and self._uses_c_decode(query, kv_cache) and query.stride(1) == query.shape[2]
                and query.stride(2) == 1):
            split = _prompt_split(meta, self.prompt_routes)
            for start, rows, prompts in split.sdpa:
                span = slice(start, start + rows * prompts)
                out[span] = whole_context_attention(query[span], key[span], value[span], scale, self.sdpa_dtype,
                                                    prompts)
            if split.bf16[0]:
                bf16_prompt_attention(out, query, key, value, split.bf16[0], split.bf16[1], scale)
            plan = split.c_plan
            if plan is not None:
                paged_prefill_attention(out, query, kv_cache, plan.rows, plan.query_lens, plan.seq_lens,
                                        plan.block_tables, scale)
            return out
        starts = meta.query_start_loc.tolist()
        for i, q_len in enumerate(meta.query_lens_list):
            if q_len == 1:
                continue
            rows = slice(starts[i], starts[i] + q_len)
            seq_len = meta.seq_lens_list[i]
            if seq_len == q_len:  # no cached prefix: this step holds the whole context
                out[rows] = _causal(query[rows], key[rows].transpose(0, 1), value[rows].transpose(0, 1), scale)
            else:
                k, v = (kv_values(_gather(cache, meta.block_tables[i : i + 1], seq_len, bool(is_value))[:, 0, :seq_len],
                                  query.dtype) for is_value, cache in enumerate(kv_cache))
                out[rows] = _causal(query[rows], k, v, scale)
        return out


def _gather(cache: torch.Tensor, tables: torch.Tensor, max_len: int, is_value: bool) -> torch.Tensor:
    """The first ceil(max_len / block_size) blocks of each table row, as rows: [Hkv, R, nblocks * block_size, row]."""
    num_kv_heads, _, block_size, row_width = cache.shape
    num_blocks = -(-max_len // block_size)
    blocks = tiles_as_rows(cache.index_select(1, tables[:, :num_blocks].reshape(-1)), is_value)
    return blocks.view(num_kv_heads, tables.shape[0], num_blocks * block_size, row_width)


def _decode(
    query: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], chunk: _DecodeChunk, scale: float
) -> torch.Tensor:
    """One query row per request. query: [b, H, D] -> [b, H, D]."""
    num_kv_heads, num_blocks, block_size, row_width = kv_cache[0].shape
    shape = (num_kv_heads, chunk.num_reqs, chunk.padded_len, row_width)
    tiles = (num_kv_heads, chunk.num_reqs, chunk.padded_len // block_size, block_size, row_width)
    k, v = (kv_values(tiles_as_rows(cache.view(num_kv_heads * num_blocks, -1).index_select(0, chunk.gather_rows)
                                    .view(tiles), bool(is_value)).view(shape), query.dtype)
            for is_value, cache in enumerate(kv_cache))
    batch, num_heads, head_dim = query.shape
    q = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 1)  # [Hkv, b, G, D]
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [Hkv, b, G, S]
    scores.masked_fill_(chunk.invalid[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, v).transpose(0, 1).reshape(batch, num_heads, head_dim)


def _causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """query: [Tq, H, D]; key/value: [Hkv, Tk, D] ending at the query's last position -> [Tq, H, D]."""
    q_len, seq_len = query.shape[0], key.shape[1]
    # 4-D inputs take torch's fused CPU kernel; 3-D ones fall back to the ~4x slower math path.
    q, key, value = query.transpose(0, 1).unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    if q_len == seq_len:
        attn = F.scaled_dot_product_attention(q, key, value, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # Query row j sits at position seq_len - q_len + j and sees keys at positions <= that.
        mask = torch.arange(seq_len).unsqueeze(0) <= torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
        attn = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
    return attn[0].transpose(0, 1)
