"""The decoder projections the CPU quantizers (int8_cpu.py, int4_cpu.py) replace, and where they sit."""

from __future__ import annotations

from torch import nn

from tokenmill.layers.linear import Linear

QUANTIZED_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def projection_linears(model: nn.Module) -> list[tuple[str, nn.Module, str, Linear]]:
    """(parent's name, parent, attribute, Linear) of every float Linear named in QUANTIZED_PROJECTIONS,
    listed before any is replaced."""
    names = set(QUANTIZED_PROJECTIONS)
    return [(parent_name, parent, name, child)
            for parent_name, parent in model.named_modules()
            for name, child in parent.named_children() if name in names and isinstance(child, Linear)]
