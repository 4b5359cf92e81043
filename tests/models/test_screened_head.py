"""The int8 screen in front of a greedy vocabulary projection (layers/screened_head.py): the same ids and values as
the projection's own argmax, ties and the last panel's padding included, and the same greedy text in an engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.kernels.cpu.bf16_gemm import bf16_panels_available
from tokenmill.kernels.cpu.int8_screen import int8_screen, int8_screen_available, pack_screen_weight
from tokenmill.layers.panel_linear import Bf16PanelLinear, PanelLinear
from tokenmill.layers.screened_head import SCREEN_KERNEL, ScreenedGreedyHead, screen_bounds
from tokenmill.worker import cpu_load

pytestmark = pytest.mark.skipif(not (int8_screen_available() and bf16_panels_available()), reason="no C compiler")

VOCAB, HIDDEN = 1000, 64  # 1000 = 62.5 panels: the last one half padding


def _heads(weight: torch.Tensor) -> dict[str, PanelLinear | Bf16PanelLinear]:
    return {"f32": PanelLinear(weight, None), "bf16": Bf16PanelLinear(weight, None, out_dtype=torch.float32)}


def _own_argmax(head: PanelLinear | Bf16PanelLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection's own greedy ids and values (its fused argmax, or argmax over its logits: the first maximum)."""
    if isinstance(head, Bf16PanelLinear):
        values = torch.empty(x.shape[0])
        return head.greedy_ids(x, values), values
    best, ids = head(x).max(dim=1)
    return ids, best


@pytest.mark.parametrize("kind", ["f32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 9, 20])
def test_the_screen_gives_the_projections_own_ids(kind: str, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5
    head = _heads(weight)[kind]
    screen = ScreenedGreedyHead(head, weight)
    for scale in (0.1, 1.0, 4.0):  # flat logits (many panels pass) to peaked ones (a few)
        for _ in range(5):
            ids = torch.randint(0, VOCAB, (rows,), generator=gen)
            x = weight[ids] * scale + torch.randn(rows, HIDDEN, generator=gen)
            want_ids, want_values = _own_argmax(head, x)
            values = torch.empty(rows)
            assert torch.equal(screen.greedy_ids(x, values), want_ids)
            assert torch.equal(values, want_values)


@pytest.mark.parametrize("kind", ["f32", "bf16"])
def test_ties_keep_the_lowest_id_and_padding_never_wins(kind: str) -> None:
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.1
    weight[512] = weight[37] = torch.randn(HIDDEN, generator=gen)  # equal channels in different panels
    weight[VOCAB - 1] = -weight[37]  # the last, half-padded panel: padding channels score 0
    head = _heads(weight)[kind]
    screen = ScreenedGreedyHead(head, weight)
    x = torch.stack([weight[37] * 3, -weight[37] * 3])  # the tie at 37 / 512; then every real channel negative-ish
    want_ids, _ = _own_argmax(head, x)
    got = screen.greedy_ids(x)
    assert got[0] == 37 and torch.equal(got, want_ids)
    assert int(got[1]) < VOCAB


def test_the_largest_logits_panel_always_passes() -> None:
    """Over rows whose best two logits are close, the winner's panel is among those the screen keeps, and a row with
    one standout channel keeps few panels."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen)
    panels, scales = pack_screen_weight(weight)
    bounds = screen_bounds(scales, HIDDEN)
    x = torch.randn(64, HIDDEN, generator=gen)
    exact = (x.double() @ weight.double().t()).argmax(dim=1)
    for row, best in zip(x, exact.tolist()):
        passed = int8_screen(row.unsqueeze(0), panels, scales, bounds, VOCAB, False)
        assert best // 16 in passed.tolist()
    peaked = weight[5:6] * 10
    assert len(int8_screen(peaked, panels, scales, bounds, VOCAB, False)) <= 3


def test_non_finite_rows_fall_back_to_the_whole_projection() -> None:
    weight = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(1))
    head = _heads(weight)["f32"]
    x = torch.full((1, HIDDEN), float("nan"))
    assert ScreenedGreedyHead(head, weight).greedy_ids(x).shape == (1,)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_engine_with_the_screen_writes_the_same_greedy_text(tiny_checkpoint: Any, tmp_path: Path, dtype: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan times the screen against the head's own argmax (greedy_head) where the head is a panel product for
    every timed row count (the C family: noise cannot hand a bucket to torch here); forced in for every decode batch,
    the screen changes no token of greedy decoding."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_load, "sample", lambda: None)
    path = str(tiny_checkpoint("llama"))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (1, 9, 40, 17, 5)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm = LLM(dtype=dtype, model=path, block_size=8, kv_cache_memory=16 << 20, kernels="c")
    plan = llm.engine.core.plan
    assert {c.rows for c in plan.choices if c.operation == "greedy_head"} == {1, 4, 16}
    model = llm.engine.core.worker.runner.model
    model.greedy_screen = None
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    head = model._fused_greedy_head(1) or model.logits_head
    model.greedy_screen = (64, ScreenedGreedyHead(head, model.vocab_projection.weight if dtype == "bfloat16"
                                                  else head.unpacked_weight()))
    calls = []
    screen = model.greedy_screen[1]
    original = screen.greedy_ids
    monkeypatch.setattr(screen, "greedy_ids", lambda x, values=None: calls.append(len(x)) or original(x, values))
    screened = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert screened == plain and calls and max(calls) == len(prompts)
    assert SCREEN_KERNEL in {k for c in plan.choices if c.operation == "greedy_head" for k in c.seconds}


def test_the_plan_times_the_screen_for_the_rows_the_head_routes_to_one_panel_module(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A vocabulary projection planned as panels at 1 row and another kernel from 2 rows on (as noise or the machine
    may split it) still gets the screen timed at 1 row, and only there; one with panels everywhere at every bucket."""
    from tokenmill.layers.linear import Linear
    from tokenmill.layers.planned_linear import PlannedLinear
    from tokenmill.worker.plan import GREEDY_BUCKETS, ExecutionPlan
    from tokenmill.worker.planner import _plan_greedy_head

    monkeypatch.setattr(cpu_load, "sample", lambda: None)
    weight = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(2))
    panels = _heads(weight)["f32"]
    plain = Linear(HIDDEN, VOCAB, bias=False)
    split = PlannedLinear([(1, panels), (64, plain)], ["c_f32_panels", "torch_fp32"])
    for head, want in ((split, {1}), (PlannedLinear([(64, panels)], ["c_f32_panels"]), set(GREEDY_BUCKETS))):
        plan = ExecutionPlan(key="test", machine="test")
        model = torch.nn.Module()
        model.greedy_screen = None
        _plan_greedy_head(model, plan, "c", head, weight)
        assert {c.rows for c in plan.for_operation("greedy_head")} == want
        if model.greedy_screen is not None:  # where the screen won, it stands in front of the panel module
            assert model.greedy_screen[0] in want and model.greedy_screen[1].head is panels
