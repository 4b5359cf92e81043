"""HF-parity helpers (the vLLM rules): greedy outputs identical; top-k logprobs close. And tiny checkpoint variants."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

TokensText = tuple[list[int], str]
# Per generated position: {token_id: logprob} for the top-k plus the chosen token.
TokensLogprobs = tuple[list[int], list[dict[int, float]]]


def check_outputs_equal(
    *, outputs_0: Sequence[TokensText], outputs_1: Sequence[TokensText], name_0: str, name_1: str
) -> None:
    assert len(outputs_0) == len(outputs_1)
    for i, ((ids_0, text_0), (ids_1, text_1)) in enumerate(zip(outputs_0, outputs_1)):
        msg = f"prompt {i}:\n{name_0}: {ids_0} {text_0!r}\n{name_1}: {ids_1} {text_1!r}"
        assert ids_0 == ids_1, msg
        assert text_0 == text_1, msg


def check_logprobs_close(
    *, outputs_0: Sequence[TokensLogprobs], outputs_1: Sequence[TokensLogprobs], name_0: str, name_1: str
) -> None:
    """Sequences may diverge only where both picks sit in each other's top-k; comparison stops there."""
    assert len(outputs_0) == len(outputs_1)
    for i, ((ids_0, lps_0), (ids_1, lps_1)) in enumerate(zip(outputs_0, outputs_1)):
        for pos, (tok_0, tok_1) in enumerate(zip(ids_0, ids_1)):
            if tok_0 == tok_1:
                continue
            msg = f"prompt {i} position {pos}: {name_0} picked {tok_0}, {name_1} picked {tok_1}"
            assert tok_0 in lps_1[pos], msg + f" (not in {name_1}'s top: {lps_1[pos]})"
            assert tok_1 in lps_0[pos], msg + f" (not in {name_0}'s top: {lps_0[pos]})"
            break


def check_matches_hf(expected: Sequence[tuple[list[int], str, list[dict[int, float]]]], outputs: Sequence,
                     name: str, abs_tol: float = 1e-4) -> None:
    """tokenmill CompletionOutputs (with logprobs) against hf_greedy's results: greedy ids and text
    equal, top-k logprobs close, and logprob values within abs_tol position by position while the
    sequences agree."""
    check_outputs_equal(
        outputs_0=[(ids, text) for ids, text, _ in expected],
        outputs_1=[(o.token_ids, o.text) for o in outputs], name_0="hf", name_1=name,
    )
    ours = [(o.token_ids, [{t: lp.logprob for t, lp in pos.items()} for pos in o.logprobs]) for o in outputs]
    check_logprobs_close(outputs_0=[(ids, top) for ids, _, top in expected], outputs_1=ours, name_0="hf", name_1=name)
    for (_, _, top), (_, our_top) in zip(expected, ours):
        for ref_pos, our_pos in zip(top, our_top):
            for token_id, value in ref_pos.items():
                if token_id in our_pos:
                    assert our_pos[token_id] == pytest.approx(value, abs=abs_tol), (name, token_id)


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, tokenizer: object, prompts: Sequence[list[int]], max_tokens: int,
              num_logprobs: int = 0) -> list[tuple[list[int], str, list[dict[int, float]]]]:
    """Greedy decoding with the HF model's own forward and KV cache, one prompt at a time (no
    padding), never stopping at EOS (tokenmill's ignore_eos; HF generate's min_new_tokens would
    instead mask EOS). Returns ids, text and, per position, the top logprobs plus the chosen token."""
    results = []
    for prompt in prompts:
        out = model(torch.tensor([prompt]), use_cache=True)
        ids: list[int] = []
        top: list[dict[int, float]] = []
        for _ in range(max_tokens):
            logits = out.logits[0, -1].float()
            token = int(logits.argmax())
            ids.append(token)
            if num_logprobs:
                lp = torch.log_softmax(logits, dim=-1)
                vals, idx = lp.topk(num_logprobs)
                entry = dict(zip(idx.tolist(), vals.tolist()))
                entry[token] = lp[token].item()
                top.append(entry)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        results.append((ids, tokenizer.decode(ids, skip_special_tokens=True), top))
    return results


def tiny_variant(base: Path, tmp_path_factory: pytest.TempPathFactory, name: str, seed: int,
                 random_biases: bool = False, **changes: Any) -> Path:
    """A checkpoint of base's config with `changes` applied, its weight matrices (and with random_biases its biases)
    drawn from N(0, 0.1) under torch seed `seed` (spread logits, so greedy picks are not near-ties), saved with base's
    tokenizer in a new temporary folder `name`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(base)
    for key, value in changes.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.dim() > 1 or (random_biases and param_name.endswith(".bias")):
                param.normal_(0, 0.1)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


def pin_int4_kernel(monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    """Engines built from here on plan their int4 projections with the one candidate `kernel` (c_int4: the W4A16 C
    kernel, dequantized float32 products past its rows; c_int4_bf16: the bf16 route at every row count), so that a
    test sees one route whatever this machine's timings; those plans are neither read from nor written to the
    cache."""
    from tokenmill.quant.int4_cpu import Int4GroupLinear
    from tokenmill.worker import planner

    every = planner._projection_candidates

    def pinned(module: torch.nn.Module, panels_ok: bool, model_dtype: torch.dtype) -> dict[str, Any]:
        candidates = every(module, panels_ok, model_dtype)
        return {kernel: candidates[kernel]} if isinstance(module, Int4GroupLinear) else candidates

    monkeypatch.setattr(planner, "_projection_candidates", pinned)
    monkeypatch.setattr(planner, "load_plan", lambda *args: None)
    monkeypatch.setattr(planner, "save_plan", lambda *args: None)
