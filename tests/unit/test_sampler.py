"""Sampler: processors against transformers, seeds, filters, distributions, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.sampler import (
    Sampler,
    SamplingMetadata,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    compute_logprobs,
)

CPU = torch.device("cpu")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
V = 64


def make_request(
    params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None, eos: int | None = None
) -> Request:
    return Request(
        req_id="r",
        prompt_token_ids=prompt if prompt is not None else [1, 2, 3],
        sampling_params=params,
        eos_token_id=eos,
        output_token_ids=list(output or []),
    )


def metadata(requests: list[Request], vocab: int = V, seed: int | None = 0, device=CPU) -> SamplingMetadata:
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    return SamplingMetadata.from_requests(requests, vocab, torch.device(device), gen)


def run(requests: list[Request], logits: torch.Tensor, seed: int | None = 0):
    """Sample on the device the logits live on."""
    return Sampler()(logits, metadata(requests, logits.shape[1], seed, logits.device))


def counts_of(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab)


# ---------------------------------------------------------------- seeds


def _generate(
    target: Request, others: list[Request], row: int, step_logits: list[torch.Tensor], seed: int, device: str = "cpu"
) -> list[int]:
    """Sample len(step_logits) tokens for `target` placed at `row` among `others`, appending each token."""
    out = []
    for step, target_logits in enumerate(step_logits):
        batch = others[:row] + [target] + others[row:]
        logits = torch.randn(len(batch), V, generator=torch.Generator().manual_seed(seed + step))
        logits[row] = target_logits
        logits = logits.to(device)
        tok = run(batch, logits, seed=seed + 100 * step).sampled_token_ids[row]
        target.append_output_token_ids([tok])
        for other in others:
            other.append_output_token_ids([int(logits.argmax(-1)[0])])
        out.append(tok)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_reproducible_across_batch_composition_and_row(device: str):
    step_logits = [0.5 * torch.randn(V, generator=torch.Generator().manual_seed(1000 + s)) for s in range(6)]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=50)
    alone = _generate(make_request(params), [], 0, step_logits, seed=1, device=device)
    others = [
        make_request(SamplingParams(temperature=0.0)),
        make_request(SamplingParams(temperature=1.3)),
        make_request(SamplingParams(temperature=0.7, top_k=5, seed=99)),
        make_request(SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, logprobs=2)),
    ]
    batched = _generate(make_request(params), others, 3, step_logits, seed=7, device=device)
    assert alone == batched
    at_front = _generate(make_request(params), others[:2], 0, step_logits, seed=11, device=device)
    assert alone == at_front
    # A different seed gives a different sequence (over 6 near-uniform draws).
    other_seed = _generate(make_request(params.clone(seed=4321)), [], 0, step_logits, seed=1, device=device)
    assert other_seed != alone


def test_seeded_draw_is_stateless_after_recompute():
    """The draw for output token i depends only on (seed, i): a preempted, recomputed request repeats it."""
    params = SamplingParams(temperature=1.0, seed=5)
    logits = torch.zeros(1, V)
    first = [run([make_request(params, output=[7] * i)], logits).sampled_token_ids[0] for i in range(8)]
    again = [run([make_request(params, output=[9] * i)], logits, seed=i).sampled_token_ids[0] for i in range(8)]
    assert first == again
    assert len(set(first)) > 1  # different steps draw different noise


def test_unseeded_rows_use_global_generator():
    params = SamplingParams(temperature=1.0)
    logits = torch.zeros(64, V)
    reqs = [make_request(params) for _ in range(64)]
    a = run(reqs, logits, seed=3).sampled_token_ids
    b = run(reqs, logits, seed=3).sampled_token_ids
    c = run(reqs, logits, seed=4).sampled_token_ids
    assert a == b and a != c


# ---------------------------------------------------------------- filters: allowed sets


def _allowed_hf(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    x = TemperatureLogitsWarper(p.temperature)(None, logits.clone().unsqueeze(0))
    if p.top_k:
        x = TopKLogitsWarper(p.top_k, filter_value=-math.inf)(None, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p, filter_value=-math.inf)(None, x)
    if p.min_p > 0.0:
        x = MinPLogitsWarper(p.min_p, filter_value=-math.inf)(None, x)
    return set(torch.nonzero(~torch.isinf(x[0])).flatten().tolist())


@pytest.mark.parametrize("seeded", [False, True])
def test_filters_never_leave_allowed_set_and_cover_it(seeded: bool):
    logits = torch.linspace(2.0, -2.0, 24)
    param_sets = [
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=0.8, top_p=0.6),
        SamplingParams(temperature=1.2, min_p=0.3),
        SamplingParams(temperature=1.0, top_k=8, top_p=0.7, min_p=0.1),
    ]
    rows = 2000
    reqs = [make_request(param_sets[i % 4].clone(seed=i if seeded else None)) for i in range(rows)]
    tokens = run(reqs, logits.repeat(rows, 1)).sampled_token_ids
    for k, p in enumerate(param_sets):
        allowed = _allowed_hf(logits, p)
        assert 1 < len(allowed) < 24
        got = set(tokens[k::4])
        assert got <= allowed, (p, got - allowed)
        assert got == allowed, (p, allowed - got)


def _chi_square(tokens: list[int], expected_probs: torch.Tensor) -> float:
    observed = counts_of(tokens, expected_probs.numel()).double()
    expected = expected_probs.double() * len(tokens)
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_temperature_distribution_matches_softmax(temperature: float, seeded: bool):
    logits = torch.tensor([1.5, 1.0, 0.5, 0.0, -0.3, -0.6, -1.0, 0.2])
    rows = 4000
    params = [SamplingParams(temperature=temperature, seed=i if seeded else None) for i in range(rows)]
    tokens = run([make_request(p) for p in params], logits.repeat(rows, 1), seed=17).sampled_token_ids
    # 7 degrees of freedom: P(chi2 > 29) ~ 1.4e-4.
    assert _chi_square(tokens, torch.softmax(logits / temperature, -1)) < 29.0


# ---------------------------------------------------------------- processors vs transformers


def test_repetition_penalty_matches_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g) * 3
    ids = torch.randint(0, V, (4, 12), generator=g)
    penalties = [1.3, 0.7, 1.0, 2.0]
    reqs = [
        make_request(SamplingParams(repetition_penalty=pen), prompt=ids[i, :7].tolist(), output=ids[i, 7:].tolist())
        for i, pen in enumerate(penalties)
    ]
    ours = logits.clone()
    apply_penalties(ours, metadata(reqs))
    for i, pen in enumerate(penalties):
        ref = RepetitionPenaltyLogitsProcessor(pen)(ids[i : i + 1], logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i], ref[0], rtol=0, atol=0)


@pytest.mark.parametrize("num_candidates", [256, 8])  # 8: the nucleus often needs the full-vocab fallback
@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (10, 0.5), (1, 0.3), (0, 0.999), (20, 0.9)])
def test_top_k_top_p_masks_match_transformers(top_k: int, top_p: float, num_candidates: int):
    g = torch.Generator().manual_seed(top_k * 7 + int(top_p * 100))
    logits = torch.randn(6, V, generator=g) * 2
    logits[0, :3] = logits[0, 3]  # ties
    vals, idx = logits[1].topk(6)
    logits[1, idx[5]] = vals[4]  # a tie at the k-th value (both survive top-k=5)
    params = [SamplingParams(top_k=top_k, top_p=top_p) for _ in range(6)]
    params[4] = SamplingParams(top_p=0.6)  # differently-configured rows in the same batch
    params[5] = SamplingParams(top_k=3)
    md = metadata([make_request(p) for p in params])
    ours = logits.clone()
    apply_top_k_top_p(ours, md.top_k, md.top_p, num_candidates=num_candidates)
    for i, p in enumerate(params):
        assert torch.equal(torch.isinf(ours[i]), ~_allowed_mask(logits[i], p)), (i, p)


def test_top_p_boundary_and_ties():
    # Probabilities 0.5, 0.25, 0.125, 0.125: like HF, the nucleus stops as soon as its mass reaches p.
    logits = torch.tensor([[math.log(4), math.log(2), 0.0, 0.0, -math.inf]])
    # At p = 0.76 the third token is needed and the fourth, tied with it, survives too (HF: 3 kept).
    for top_p, kept in ((0.5, 1), (0.75, 2), (0.76, 4), (1.0, 4)):
        md = metadata([make_request(SamplingParams(top_p=top_p))], vocab=5)
        ours = logits.clone()
        if md.top_p is not None:
            apply_top_k_top_p(ours, md.top_k, md.top_p)
        ref = TopPLogitsWarper(top_p, filter_value=-math.inf)(None, logits.clone()) if top_p < 1 else logits
        assert int((~torch.isinf(ours)).sum()) == kept, top_p
        if kept < 4:
            assert torch.equal(torch.isinf(ours), torch.isinf(ref)), top_p
    # Four equal probabilities, p = 0.5: HF keeps two of the tied tokens (by sort order); we keep all four.
    ties = torch.tensor([[0.0, 0.0, 0.0, 0.0, -math.inf]])
    md = metadata([make_request(SamplingParams(top_p=0.5))], vocab=5)
    apply_top_k_top_p(ties, md.top_k, md.top_p)
    assert int((~torch.isinf(ties)).sum()) == 4


def _allowed_mask(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    mask = torch.zeros(logits.numel(), dtype=torch.bool)
    mask[list(_allowed_hf(logits, p))] = True
    return mask


def test_min_p_matches_transformers():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, V, generator=g) * 2
    min_ps = [0.05, 0.1, 0.5, 1.0, 0.0]
    probs = logits.softmax(-1)
    apply_min_p(probs, torch.tensor(min_ps))
    for i, m in enumerate(min_ps):
        ref = MinPLogitsWarper(m, filter_value=-math.inf)(None, logits[i : i + 1].clone())
        assert torch.equal(probs[i] == 0, torch.isinf(ref[0])), m


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(1))
    p0 = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    p1 = SamplingParams(frequency_penalty=-1.0)
    reqs = [make_request(p0, prompt=[3, 3, 4], output=[1, 1, 1, 2, 5]), make_request(p1, prompt=[1], output=[7, 7])]
    ours = logits.clone()
    apply_penalties(ours, metadata(reqs))
    expected = logits.clone()
    for tok, count in {1: 3, 2: 1, 5: 1}.items():
        expected[0, tok] -= 0.5 * count + 0.25
    expected[1, 7] += 2.0  # prompt tokens (3, 4; 1) are not penalized
    torch.testing.assert_close(ours, expected)


def test_logit_bias_is_added_and_out_of_vocab_ignored():
    logits = torch.zeros(2, V)
    reqs = [make_request(SamplingParams(logit_bias={5: 3.0, 9: -100.0, V + 10: 1.0})), make_request(SamplingParams())]
    ours = logits.clone()
    apply_penalties(ours, metadata(reqs))
    expected = logits.clone()
    expected[0, 5], expected[0, 9] = 3.0, -100.0
    torch.testing.assert_close(ours, expected)
    greedy = run([make_request(SamplingParams(temperature=0.0, logit_bias={11: 0.5}))], logits[:1])
    assert greedy.sampled_token_ids == [11]


def test_min_tokens_masks_stop_tokens_until_reached():
    params = SamplingParams(min_tokens=3, stop_token_ids=[10], all_stop_token_ids={20})
    ignore = params.clone(ignore_eos=True)
    reqs = [
        make_request(params, output=[1, 2], eos=30),  # 2 < 3: masked
        make_request(params, output=[1, 2, 3], eos=30),  # reached: nothing masked
        make_request(ignore, output=[], eos=30),  # ignore_eos: only stop_token_ids
    ]
    x = torch.zeros(3, V)
    apply_penalties(x, metadata(reqs))
    masked = [set(torch.nonzero(torch.isinf(row)).flatten().tolist()) for row in x]
    assert masked == [{10, 20, 30}, set(), {10}]
    # Sampling never picks a masked token even when it dominates.
    logits = torch.zeros(200, V)
    logits[:, [10, 20, 30]] = 50.0
    out = run([make_request(params.clone(seed=i), output=[1], eos=30) for i in range(200)], logits)
    assert not set(out.sampled_token_ids) & {10, 20, 30}


def test_greedy_is_argmax_after_penalties_and_ignores_seed():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, V, generator=g)
    reqs = [make_request(SamplingParams(temperature=0.0, seed=s)) for s in (1, 2, 3)]
    assert run(reqs, logits).sampled_token_ids == logits.argmax(-1).tolist()
    top = int(logits[0].argmax())
    penalized = make_request(SamplingParams(temperature=0.0, repetition_penalty=1e6), output=[top])
    expected = logits[0].clone()
    expected[top] = expected[top] / 1e6 if expected[top] > 0 else expected[top] * 1e6
    assert run([penalized], logits[:1]).sampled_token_ids == [int(expected.argmax())]


def test_bf16_logits_are_accepted():
    logits = torch.randn(2, V).to(torch.bfloat16)
    out = run([make_request(SamplingParams(temperature=0.0, logprobs=1))] * 2, logits)
    assert out.sampled_token_ids == logits.float().argmax(-1).tolist()


# ---------------------------------------------------------------- logprobs


def test_compute_logprobs_values_ranks_and_content():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(9))
    logits[1, [3, 4, 5]] = 10.0  # a three-way tie at the top
    ref = torch.log_softmax(logits, -1)
    token_ids = [int(ref[0].argmin()), 4, int(ref[2].argmax()), 0]
    result = compute_logprobs(logits, token_ids, 3)
    for i, entry in enumerate(result):
        top = ref[i].topk(3).indices.tolist()
        assert set(entry) == set(top) | {token_ids[i]}
        for tok, lp in entry.items():
            assert lp.logprob == pytest.approx(float(ref[i, tok]), abs=1e-6)
            assert lp.rank == 1 + int((ref[i] > ref[i, tok]).sum())
            assert lp.decoded_token is None
    assert result[0][token_ids[0]].rank == V
    assert [result[1][t].rank for t in (3, 4, 5)] == [1, 1, 1]
    assert len(result[2]) == 3
    only_sampled = compute_logprobs(logits, torch.tensor(token_ids), 0)
    assert [list(e) for e in only_sampled] == [[t] for t in token_ids]


def test_compute_logprobs_many_rows_like_a_prompt():
    logits = torch.randn(1100, V, generator=torch.Generator().manual_seed(10))  # spans several row chunks
    next_ids = torch.randint(0, V, (1100,), generator=torch.Generator().manual_seed(11))
    result = compute_logprobs(logits, next_ids, 2)
    ref = torch.log_softmax(logits, -1)
    assert len(result) == 1100
    for i in (0, 511, 512, 1023, 1024, 1099):
        tok = int(next_ids[i])
        assert set(result[i]) == set(ref[i].topk(2).indices.tolist()) | {tok}
        assert result[i][tok].logprob == pytest.approx(float(ref[i, tok]), abs=1e-6)
        assert result[i][tok].rank == 1 + int((ref[i] > ref[i, tok]).sum())


def test_sampler_logprobs_are_raw_and_per_row():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(4))
    reqs = [
        make_request(SamplingParams(temperature=0.5, logit_bias={0: 50.0}, logprobs=2, seed=1)),
        make_request(SamplingParams(temperature=0.0)),
        make_request(SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=2.0), output=[1, 2]),
    ]
    out = run(reqs, logits)
    ref = torch.log_softmax(logits, -1)
    assert out.sampled_token_ids[0] == 0  # the bias dominates sampling
    assert out.logprobs[1] is None
    for row, n in ((0, 2), (2, 5)):
        entry = out.logprobs[row]
        assert set(entry) == set(ref[row].topk(n).indices.tolist()) | {out.sampled_token_ids[row]}
        for tok, lp in entry.items():
            assert lp.logprob == pytest.approx(float(ref[row, tok]), abs=1e-6)


# ---------------------------------------------------------------- mixed batch


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_in_one_call(device: str):
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(6, V, generator=g)
    greedy = make_request(SamplingParams(temperature=0.0, frequency_penalty=1.0), output=[5, 5])
    seeded = make_request(SamplingParams(temperature=0.8, top_k=10, seed=42, logprobs=1), output=[1])
    sampled = make_request(SamplingParams(temperature=1.0, top_p=0.5))
    penal = make_request(SamplingParams(temperature=0.7, repetition_penalty=1.2, presence_penalty=0.3, min_p=0.1))
    min_tok = make_request(SamplingParams(min_tokens=2, stop_token_ids=[7]), eos=8)
    plain_greedy = make_request(SamplingParams(temperature=0.0))
    batch = [greedy, seeded, sampled, penal, min_tok, plain_greedy]
    logits[4, [7, 8]] = 40.0
    out = run(batch, logits.to(device))
    assert len(out.sampled_token_ids) == 6 and all(0 <= t < V for t in out.sampled_token_ids)
    expected_greedy = logits[0].clone()
    expected_greedy[5] -= 2.0
    assert out.sampled_token_ids[0] == int(expected_greedy.argmax())
    assert out.sampled_token_ids[5] == int(logits[5].argmax())
    assert out.sampled_token_ids[1] == run([seeded], logits[1:2].to(device), seed=123).sampled_token_ids[0]
    assert out.sampled_token_ids[1] in logits[1].topk(10).indices.tolist()
    assert out.sampled_token_ids[2] in _allowed_hf(logits[2], sampled.sampling_params)
    assert out.sampled_token_ids[4] not in (7, 8)
    assert [lp is None for lp in out.logprobs] == [True, False, True, True, True, True]


def test_empty_batch():
    out = run([], torch.zeros(0, V))
    assert out.sampled_token_ids == [] and out.logprobs == []
