"""worker/huge_pages.py: the weight arena keeps every value, view and tie; the KV buffers are zero."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenmill import LLM, SamplingParams
from tokenmill.worker import huge_pages
from tokenmill.worker.huge_pages import HUGE_PAGE, prefaulted_zeros, weight_arena


class _Holder(nn.Module):
    def __init__(self, shared: nn.Parameter) -> None:
        super().__init__()
        self.proj = nn.Linear(24, 40)
        self.tied = shared  # the same Parameter object as another module's
        self.register_buffer("table", torch.arange(96, dtype=torch.int16).reshape(8, 12))
        self.packed = torch.randn(3, 5, 7)  # a plain tensor attribute, as packed panels are
        self.parts = (self.packed[1], [torch.ones(4, dtype=torch.int8)])  # views and nested containers


def test_weight_arena_moves_every_tensor_and_keeps_values_views_and_ties() -> None:
    torch.manual_seed(0)
    first = nn.Linear(16, 24)
    model = nn.Sequential(first, _Holder(first.weight))
    holder = model[1]
    distinct = {t.data_ptr(): t.numel() * t.element_size() for t in (*model.parameters(), holder.table, holder.packed)}
    before = {name: t.clone() for name, t in model.state_dict().items()}
    packed, view_of_packed = holder.packed.clone(), holder.parts[0].clone()
    x = torch.randn(5, 16)
    expected = holder.proj(first(x))

    moved, _ = weight_arena(model)

    assert moved >= sum(distinct.values())  # the tied weight once
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(holder.packed, packed) and torch.equal(holder.parts[0], view_of_packed)
    assert torch.equal(holder.proj(first(x)), expected)
    assert holder.tied is first.weight and isinstance(first.weight, nn.Parameter)
    # one arena: the view still aliases its base, and everything lies within one storage
    assert holder.parts[0].data_ptr() == holder.packed.data_ptr() + 35 * 4
    storages = {t.untyped_storage().data_ptr() for t in (first.weight, holder.table, holder.packed, holder.parts[1][0])}
    assert len(storages) == 1 and next(iter(storages)) % HUGE_PAGE == 0
    holder.packed.add_(1)  # writes through the view too
    assert torch.equal(holder.parts[0], view_of_packed + 1)


@pytest.mark.parametrize("huge", [True, False])
@pytest.mark.parametrize("size", [3 * HUGE_PAGE + 5, 20 * HUGE_PAGE + 4097])  # the second is probed (> 8 pages)
def test_prefaulted_zeros_is_zero(huge: bool, size: int) -> None:
    buf, _ = prefaulted_zeros(size, huge)
    assert buf.dtype == torch.uint8 and buf.numel() == size and int(buf.count_nonzero()) == 0
    if huge:
        assert buf.data_ptr() % HUGE_PAGE == 0


@pytest.mark.parametrize("slow", [True, False])
def test_slow_huge_pages_leave_the_kv_cache_in_small_pages(slow: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first buffer's probe decides for the process: pages slower to map than SLOW_HUGE_PAGE_S -> 4 KiB pages."""
    monkeypatch.setattr(huge_pages, "_huge_pages_slow", None)
    monkeypatch.setattr(huge_pages, "SLOW_HUGE_PAGE_S", 0.0 if slow else 1e9)
    first, advised = prefaulted_zeros(10 * HUGE_PAGE, True)
    assert int(first.count_nonzero()) == 0
    if huge_pages._huge_pages_slow is None:  # huge pages refused here (no THP): nothing to probe
        assert not advised
        return
    assert huge_pages._huge_pages_slow is slow and advised is not slow
    _, again = prefaulted_zeros(10 * HUGE_PAGE, True)  # decided once: not probed again
    assert again is not slow


def test_engine_outputs_identical_with_and_without_huge_pages(tiny_checkpoint) -> None:
    path = str(tiny_checkpoint("llama"))
    prompts = [[5, 9, 13, 200, 7], list(range(3, 40))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    # One kernel family for both: each setting has its own execution plan, whose timings could pick other kernels.
    outs = [LLM(model=path, kv_cache_memory=16 << 20, huge_pages=huge, dtype="float32", kernels="c")
            .generate(prompts, params, use_tqdm=False) for huge in (True, False)]
    for a, b in zip(*outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [{t: lp.logprob for t, lp in pos.items()} for pos in a.outputs[0].logprobs] == \
               [{t: lp.logprob for t, lp in pos.items()} for pos in b.outputs[0].logprobs]
