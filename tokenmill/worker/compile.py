"""torch.compile (inductor) of the dense parts of each decoder layer (`compile=True`, `--compile`).

A decoder layer is pre_attention -> paged attention -> post_attention (models/llama.py). The two
dense parts are compiled once each and shared by every layer: they touch only tensors and
parameters, and dynamo lifts the parameters of inlined modules to graph inputs, so layer 7 runs the
graph layer 1 compiled. The paged attention stays eager: it follows per-step Python plans
(`meta.scratch`), which compiled code would either guard on or graph-break around.

Invariants:
  * dim 0 of every activation (the step's token count) is dynamic, so one graph per part serves every
    step of 2+ tokens and a specialised one serves 1-token steps (batch-1 decode): four graphs in
    all, built and warmed up here, at start-up, so serving steps never compile;
  * the first layer (no residual stream yet) runs the same graph as the others with a zero sublayer
    output: 0 + x == x exactly, so its residual stream and norm input are the embeddings, as in eager;
  * compiled and eager parts agree on layouts: activations are contiguous [T, ...] and cos/sin are
    [T, 1, head_dim], exactly as the eager model produces them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("tokenmill")

# Token counts the warm-up runs: the first compiles the dynamic-size graphs (dynamo assumes symbolic
# sizes >= 2), the second the 1-token ones.
_WARMUP_SIZES = (4, 1)
# Graphs are cached per code object and process: every compiled model (tests build several) adds
# four to pre_attention/post_attention's entries, past dynamo's default limit of 8.
_RECOMPILE_LIMIT = 64


def compile_model(model: nn.Module) -> float:
    """Replaces every layer's pre_attention/post_attention with compiled versions, compiles and warms
    them up; returns the seconds that took (also logged)."""
    import torch._dynamo

    parts = model.decoder_layers()
    layers = [part.layer for part in parts]
    backend = parts[0].attention.backend
    if backend.name != "torch":
        raise ValueError(
            f"compile applies to the torch attention backend, not {backend.name!r} (which has its own fused "
            "kernels and CUDA graphs); drop --compile or pass --attention-backend torch"
        )
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    layer_cls = type(layers[0])
    pre = torch.compile(layer_cls.pre_attention, fullgraph=True, dynamic=False)
    post = torch.compile(layer_cls.post_attention, fullgraph=True, dynamic=False)
    for layer in layers:
        # Instance attributes shadow the methods; forward() calls self.pre_attention/post_attention.
        layer.pre_attention = functools.partial(_pre_attention, pre, layer)
        layer.post_attention = functools.partial(post, layer)
    start = time.perf_counter()
    _warm_up(model, layers[0])
    seconds = time.perf_counter() - start
    logger.info("compiled the dense layer parts (torch.compile, inductor) in %.1f s", seconds)
    return seconds


def _pre_attention(
    compiled: Callable[..., Any], layer: nn.Module, cos_sin: tuple[torch.Tensor, torch.Tensor],
    hidden: torch.Tensor, residual: torch.Tensor | None,
) -> Any:
    if residual is None:  # the first layer: the embeddings become the residual stream (see above)
        hidden, residual = torch.zeros_like(hidden), hidden
    return compiled(layer, cos_sin, hidden, residual)


@torch.inference_mode()  # as ModelRunner.execute runs: the graphs guard on it
def _warm_up(model: nn.Module, layer: nn.Module) -> None:
    import torch._dynamo

    param = next(model.parameters())
    hidden_size = int(model.config.hidden_size)
    for num_tokens in _WARMUP_SIZES:
        # The first size compiles with dim 0 as a symbol; 1 token then gets its specialised graphs.
        mark = torch._dynamo.mark_dynamic if num_tokens == _WARMUP_SIZES[0] else _no_mark
        make = functools.partial(torch.randn, num_tokens, hidden_size, dtype=param.dtype, device=param.device)
        hidden, residual = make(), make()
        cos_sin = model.rotary.cos_sin(torch.arange(num_tokens, device=param.device))
        for t in (hidden, residual, *cos_sin):
            mark(t, 0)
        q, _, _, residual = layer.pre_attention(cos_sin, hidden, residual)
        attn_out = q.reshape(num_tokens, -1).clone()  # contiguous [T, H * D], as attention returns it
        for t in (attn_out, residual):
            mark(t, 0)
        layer.post_attention(attn_out, residual)


def _no_mark(tensor: torch.Tensor, dim: int) -> None:
    pass
