"""The float32 panel GEMM (kernels/cpu/f32_gemm.c, f32_panels.h) and its layers (layers/panel_linear.py):
the panel layout, the product against float64 at every tile shape, each row's result independent of its
batch, tied embedding rows read back from the panels, and the model packing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu.f32_gemm import f32_panels_available, pack_panels, panels_linear, weight_rows_from_panels
from tokenmill.layers.panel_linear import PanelEmbedding, PanelLinear

pytestmark = pytest.mark.skipif(not f32_panels_available(), reason="C kernels not built (no compiler)")


def _close_to_float64(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Within float32 rounding of a k-term sum: k * eps * sum |x_i w_i| per output, bounded loosely."""
    exact = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    scale = x.double().abs() @ w.double().abs().t() + (0 if bias is None else bias.double().abs())
    bound = x.shape[1] * 2.0**-24 * scale + 1e-30
    assert torch.all((got.double() - exact).abs() <= bound), float(((got.double() - exact).abs() / bound).max())


def test_panel_layout() -> None:
    w = torch.randn(37, 5)
    panels = pack_panels(w)
    assert panels.shape == (3, 5, 16)
    for c in range(37):
        assert torch.equal(panels[c // 16, :, c % 16], w[c])
    assert torch.all(panels[2, :, 5:] == 0)  # channels 37..47 are padding


@pytest.mark.parametrize("n,k", [(16, 64), (37, 96), (3, 5), (960, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_product_at_every_tile_shape(n: int, k: int, bias: bool) -> None:
    """1..13 rows: full 6-row tiles and every remainder; n % 16 != 0: a partial last panel."""
    gen = torch.Generator().manual_seed(n * k)
    w, x = torch.randn(n, k, generator=gen), torch.randn(13, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    panels = pack_panels(w)
    for rows in range(1, 14):
        _close_to_float64(panels_linear(x[:rows], panels, n, b), x[:rows], w, b)


def test_rows_do_not_depend_on_their_batch() -> None:
    """Bitwise: a row alone, in a tile of 6, in a remainder, and past a row chunk (k = 4096 makes the
    chunk 12 rows, so 50 rows span five chunks)."""
    for n, k in ((40, 96), (33, 4096)):
        gen = torch.Generator().manual_seed(k)
        w, x = torch.randn(n, k, generator=gen), torch.randn(50, k, generator=gen)
        panels = pack_panels(w)
        alone = torch.cat([panels_linear(x[i : i + 1], panels, n) for i in range(50)])
        for rows in (1, 5, 6, 7, 13, 50):
            assert torch.equal(panels_linear(x[:rows], panels, n), alone[:rows]), (n, k, rows)
        assert torch.equal(panels_linear(x[17:29], panels, n), alone[17:29])


def test_strided_rows_and_empty_input() -> None:
    w, wide = torch.randn(20, 24), torch.randn(9, 40)
    x = wide[:, 8:32]  # rows 40 apart, columns contiguous
    _close_to_float64(panels_linear(x, pack_panels(w), 20), x, w, None)
    assert panels_linear(torch.empty(0, 24), pack_panels(w), 20).shape == (0, 20)


def test_panel_rows_read_the_weight_back() -> None:
    w = torch.randn(50, 12)
    panels = pack_panels(w)
    ids = torch.tensor([[0, 49, 17], [16, 15, 31]])
    assert torch.equal(weight_rows_from_panels(panels, ids, 50), w[ids])
    with pytest.raises(ValueError, match="ids"):
        weight_rows_from_panels(panels, torch.tensor([50]), 50)
    with pytest.raises(ValueError, match="ids"):
        weight_rows_from_panels(panels, torch.tensor([-1]), 50)


def test_bad_inputs() -> None:
    w = torch.randn(20, 24)
    panels = pack_panels(w)
    with pytest.raises(ValueError, match="x"):
        panels_linear(torch.randn(3, 24).double(), panels, 20)
    with pytest.raises(ValueError, match="x"):
        panels_linear(torch.randn(24, 3).t(), panels, 20)  # columns strided
    with pytest.raises(ValueError, match="panels"):
        panels_linear(torch.randn(3, 23), panels, 20)  # k does not chain
    with pytest.raises(ValueError, match="panels"):
        panels_linear(torch.randn(3, 24), panels, 40)  # n beyond the panels
    with pytest.raises(ValueError, match="bias"):
        panels_linear(torch.randn(3, 24), panels, 20, torch.randn(19))
    with pytest.raises(ValueError, match="weight"):
        pack_panels(w.half())


def test_panel_linear_layer() -> None:
    w, b = torch.randn(30, 24), torch.randn(30)
    layer = PanelLinear(w, b)
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert tuple(layer(x).shape) == (2, 5, 30)
    assert torch.equal(layer.unpacked_weight(), w)


def test_model_packing(tiny_checkpoint: Any) -> None:
    """With the C kernel family forced, the engine packs every float32 projection and the (untied) lm_head;
    panel_gemm=False keeps the plain layers. A tied table is stored once: the embedding reads its rows from
    the lm_head's panels."""
    from tokenmill import LLM
    from tokenmill.layers.linear import Embedding, Linear
    from tokenmill.layers.panel_linear import pack_float32_model

    path = str(tiny_checkpoint("llama"))
    plain = LLM(dtype="float32", model=path, kv_cache_memory=16 << 20, panel_gemm=False).engine.core.model
    packed = LLM(dtype="float32", model=path, kv_cache_memory=16 << 20, kernels="c").engine.core.model
    assert type(plain.layers[0].mlp.down_proj) is Linear and not any(isinstance(m, PanelLinear) for m in plain.modules())
    layer = packed.layers[0]
    assert all(isinstance(m, PanelLinear) for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                     layer.mlp.gate_up_proj, layer.mlp.down_proj))
    assert type(packed.embed_tokens) is Embedding and packed.logits_head is packed.lm_head
    hidden = torch.randn(3, packed.config.hidden_size)
    torch.testing.assert_close(packed.compute_logits(hidden), plain.compute_logits(hidden), rtol=1e-5, atol=1e-5)

    plain.lm_head.weight = plain.embed_tokens.weight  # tie them, as SmolLM2 does
    plain.logits_head = None  # the plan's torch head (a PlannedLinear where buckets chose different torch calls)
    table = plain.embed_tokens.weight.detach().clone()
    assert pack_float32_model(plain) == 9  # 2 layers x 4 projections + lm_head
    assert isinstance(plain.embed_tokens, PanelEmbedding) and plain.embed_tokens.head is plain.lm_head
    ids = torch.arange(plain.config.vocab_size).reshape(2, -1)
    assert torch.equal(plain.embed_tokens(ids), table[ids])
    torch.testing.assert_close(plain.compute_logits(hidden), hidden @ table.t(), rtol=1e-5, atol=1e-5)
