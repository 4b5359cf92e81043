"""SmoothQuant-style outlier migration for W8A8, folded into the weights (no runtime cost).

LLM activations carry a few input channels far larger than the rest; quantizing them per token to
int8 wastes the range on those channels. For a projection y = W x we pick per-input-channel factors
s and use y = (W diag(s)) (x / s): activation outliers shrink, the weight absorbs them. Here x / s is
never computed at runtime: the 1/s is folded into whatever produces x:
  qkv_proj     input = input_layernorm(h)        -> RMSNorm weight / s
  gate_up_proj input = post_attention_layernorm  -> RMSNorm weight / s
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
def input_channel_maxima(model: nn.Module, token_ids: Sequence[int], block_size: int = 16) -> dict[str, torch.Tensor]:
    """Runs one prefill of `token_ids` and returns, per projection module name, max |input| per channel.
    Binds a temporary KV cache to the attention layers and restores their previous binding afterwards."""
    maxima: dict[str, torch.Tensor] = {}
    hooks = []

    def record(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            channel_max = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            maxima[name] = torch.maximum(maxima[name], channel_max) if name in maxima else channel_max
        return hook

    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            hooks.append(module.register_forward_pre_hook(record(name)))
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
    w_max = weight.detach().float().abs().amax(dim=0).clamp_min(1e-5)
    s = act_max.clamp_min(1e-5).pow(ALPHA) / w_max.pow(1.0 - ALPHA)
    return s.clamp(1e-2, 1e2)


@torch.no_grad()
def smooth_model(model: nn.Module, maxima: dict[str, torch.Tensor]) -> None:
    """Folds smoothing factors into the fp32 weights; the model computes the same function."""
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        prefix = f"layers.{i}."
        # qkv_proj: input is input_layernorm's output.
        s = _factors(maxima[prefix + "self_attn.qkv_proj"], attn.qkv_proj.weight)
        layer.input_layernorm.weight.div_(s)
        attn.qkv_proj.weight.mul_(s)
        # gate_up_proj: input is post_attention_layernorm's output.
        s = _factors(maxima[prefix + "mlp.gate_up_proj"], mlp.gate_up_proj.weight)
        layer.post_attention_layernorm.weight.div_(s)
        mlp.gate_up_proj.weight.mul_(s)
        # o_proj: input channel (head h, dim d) is V channel (kv head of h, d); one factor per KV channel.
        group = attn.num_heads // attn.num_kv_heads
        per_q = _factors(maxima[prefix + "self_attn.o_proj"], attn.o_proj.weight)
        per_kv = per_q.view(attn.num_kv_heads, group, attn.head_dim).amax(dim=1)  # [Hkv, D]
        v_rows = slice(attn.q_size + attn.kv_size, attn.q_size + 2 * attn.kv_size)
        attn.qkv_proj.weight[v_rows].div_(per_kv.reshape(-1, 1))
        if attn.qkv_proj.bias is not None:
            attn.qkv_proj.bias[v_rows].div_(per_kv.reshape(-1))
        attn.o_proj.weight.mul_(per_kv.unsqueeze(1).expand(-1, group, -1).reshape(-1))
        # down_proj: input is silu(gate) * up; scale the up rows.
        inter = mlp.down_proj.weight.shape[1]
        s = _factors(maxima[prefix + "mlp.down_proj"], mlp.down_proj.weight)
        mlp.gate_up_proj.weight[inter:].div_(s.unsqueeze(1))
        if mlp.gate_up_proj.bias is not None:
            mlp.gate_up_proj.bias[inter:].div_(s)
        mlp.down_proj.weight.mul_(s)
