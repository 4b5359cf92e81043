"""SmoothQuant-style outlier migration for W8A8, folded into the weights (no runtime cost).

LLM activations carry a few input channels far larger than the rest; quantizing them per token to
int8 wastes the range on those channels. For a projection y = W x we pick per-input-channel factors
s and use y = (W diag(s)) (x / s): activation outliers shrink, the weight absorbs them. Here x / s is
never computed at runtime: the 1/s is folded into whatever produces x:
  qkv_proj     input = input norm(h)             -> RMSNorm weight / s
  gate_up_proj input = post-attention norm(h)    -> RMSNorm weight / s
  o_proj       input = attention output, a mix of V rows -> V rows of qkv_proj (and bias) / s, with s
               shared by the query heads of one KV head (GQA)
  down_proj    input = silu(gate) * up           -> up rows of gate_up_proj (and bias) / s
s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha), with max|x_j| measured by running the fp32 model
once over a calibration text. alpha = 0.5 for the scheme of quant/int8_cpu.py (pair-budget weights,
per-token asymmetric 8-bit activations, Hadamard-rotated down_proj input, which is rotated after this
smoothing), measured on the default model as mean KL(fp32 || int8) over the parity texts:
  rotated down_proj:   0.4 -> 0.0074, 0.5 -> 0.0060, 0.6 -> 0.0067
  unrotated:           0.35 -> 0.016, 0.5 -> 0.0095, 0.6 -> 0.010, 0.7 -> 0.015, no smoothing -> 0.040
and 0.4 / 0.6 / 0.7 for one projection type at a time (others 0.5) gained nothing beyond noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.models.interface import CausalLM
from tokenmill.quant.projections import float_projections

# A short, varied calibration text: prose, a list, code and numbers.
CALIBRATION_TEXT = """The history of computing is a story of people who wanted machines to do arithmetic for them.
In 1837 Charles Babbage described the Analytical Engine; a century later, Alan Turing asked what it
means for a machine to compute at all. Today a phone holds more memory than every computer of 1970.

Ingredients: 2 cups of flour, 1 teaspoon of salt, 3 eggs, and 250 ml of milk. Whisk, rest 30 minutes.

def mean(values):
    total = sum(values)
    return total / len(values) if values else 0.0

Q: What is the capital of Japan? A: Tokyo. Q: How many legs does a spider have? A: Eight.
"Please summarize the following paragraph in one sentence," she wrote, and pressed Enter."""

ALPHA = 0.5


def _prefill_metadata(num_tokens: int, block_size: int) -> AttentionMetadata:
    num_blocks = -(-num_tokens // block_size)
    return AttentionMetadata(
        num_tokens=num_tokens, block_size=block_size,
        query_start_loc=torch.tensor([0, num_tokens]), seq_lens=torch.tensor([num_tokens]),
        block_tables=torch.arange(num_blocks).unsqueeze(0), slot_mapping=torch.arange(num_tokens),
        query_lens_list=[num_tokens], seq_lens_list=[num_tokens],
    )


@torch.inference_mode()
def input_channel_maxima(model: CausalLM, token_ids: Sequence[int], block_size: int = 16) -> dict[str, torch.Tensor]:
    """Runs one prefill of `token_ids` and returns, per projection ("layers.<i>.<name>"), max |input| per channel.
    Binds a temporary KV cache to the attention layers and restores their previous binding afterwards."""
    maxima: dict[str, torch.Tensor] = {}
    hooks = []

    def record(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            channel_max = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            maxima[name] = torch.maximum(maxima[name], channel_max) if name in maxima else channel_max
        return hook

    for label, slot in float_projections(model):
        hooks.append(slot.module.register_forward_pre_hook(record(label)))
    layers = model.attention_layers
    num_tokens = len(token_ids)
    meta = _prefill_metadata(num_tokens, block_size)
    shape = layers[0].backend.kv_cache_shape(-(-num_tokens // block_size), block_size,
                                             layers[0].num_kv_heads, layers[0].head_dim)
    param = next(model.parameters())
    saved = [layer.kv_cache for layer in layers]
    try:
        for layer in layers:
            layer.kv_cache = (torch.zeros(shape, dtype=param.dtype), torch.zeros(shape, dtype=param.dtype))
        ids = torch.tensor(list(token_ids), dtype=torch.int64)
        model(ids, torch.arange(num_tokens), meta)
    finally:
        for hook in hooks:
            hook.remove()
        for layer, cache in zip(layers, saved):
            layer.kv_cache = cache
    return maxima


def _factors(act_max: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per input channel of `weight`; 1 for a channel whose weights are all zero: nothing reads it, and its factor
    must not scale the channels it shares one with (o_proj's factors are shared per KV head: an unused channel's
    would be the clamp, 100, for the whole group; tensor-parallel pad head slots once were such channels)."""
    w_max = weight.detach().float().abs().amax(dim=0)
    s = act_max.clamp_min(1e-5).pow(ALPHA) / w_max.clamp_min(1e-5).pow(1.0 - ALPHA)
    return torch.where(w_max > 0, s.clamp(1e-2, 1e2), torch.ones_like(s))


@torch.no_grad()
def smooth_model(model: CausalLM, maxima: dict[str, torch.Tensor]) -> None:
    """Folds smoothing factors into the fp32 weights; the model computes the same function."""
    for i, part in enumerate(model.decoder_layers()):
        qkv, o, gate_up, down = (slot.module for slot in part.projections)
        prefix = f"layers.{i}."
        # qkv_proj: input is the input norm's output.
        s = _factors(maxima[prefix + "qkv_proj"], qkv.weight)
        part.input_norm.weight.div_(s)
        qkv.weight.mul_(s)
        # gate_up_proj: input is the post-attention norm's output.
        s = _factors(maxima[prefix + "gate_up_proj"], gate_up.weight)
        part.post_attention_norm.weight.div_(s)
        gate_up.weight.mul_(s)
        # o_proj: input channel (head h, dim d) is V channel (kv head of h, d); one factor per KV channel.
        attn = part.attention
        group = attn.num_heads // attn.num_kv_heads
        per_q = _factors(maxima[prefix + "o_proj"], o.weight)
        per_kv = per_q.view(attn.num_kv_heads, group, attn.head_dim).amax(dim=1)  # [Hkv, D]
        v_rows = slice(part.q_size + part.kv_size, part.q_size + 2 * part.kv_size)
        qkv.weight[v_rows].div_(per_kv.reshape(-1, 1))
        if qkv.bias is not None:
            qkv.bias[v_rows].div_(per_kv.reshape(-1))
        o.weight.mul_(per_kv.unsqueeze(1).expand(-1, group, -1).reshape(-1))
        # down_proj: input is silu(gate) * up; scale the up rows.
        inter = down.weight.shape[1]
        s = _factors(maxima[prefix + "down_proj"], down.weight)
        gate_up.weight[inter:].div_(s.unsqueeze(1))
        if gate_up.bias is not None:
            gate_up.bias[inter:].div_(s)
        down.weight.mul_(s)
