"""The decoder projections the CPU quantizers (int8_cpu.py, int4_cpu.py) and the float32 packer
(layers/panel_linear.py) replace: the projection slots of the causal-LM interface (models/interface.py)."""

from __future__ import annotations

from tokenmill.layers.linear import Linear
from tokenmill.models.interface import PROJECTIONS, CausalLM, Projection

QUANTIZED_PROJECTIONS = PROJECTIONS


def float_projections(model: CausalLM) -> list[tuple[str, Projection]]:
    """(label "layers.<i>.<name>", slot) of every decoder projection that is a float Linear, listed before any is
    replaced."""
    return [(f"layers.{i}.{slot.name}", slot)
            for i, part in enumerate(model.decoder_layers())
            for slot in part.projections if isinstance(slot.module, Linear)]
