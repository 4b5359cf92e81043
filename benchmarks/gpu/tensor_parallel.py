"""The GPU check's tensor-parallel section: TP = 2 must give TP = 1's greedy tokens on a tiny random Llama in
float32. Over NCCL where the machine has two GPUs or more (one per rank), over gloo in the CPU dry run; with one GPU
there is nothing to split (NCCL needs a GPU per rank) and TP = 1 is what the other sections run.

The checkpoint is written to a temporary directory with a word-level tokenizer (the device machine has no model to
borrow one from): the ranks are processes that load it from disk.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.workloads import TINY_64, build_hf_model

MAX_TOKENS = 12


def _save_checkpoint(out_dir: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = build_hf_model(TINY_64, torch.float32, torch.device("cpu"), init_std=0.1)
    hf.config.bos_token_id, hf.config.eos_token_id = 1, 2
    hf.save_pretrained(out_dir)
    vocab = {f"t{i}": i for i in range(TINY_64["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return out_dir


def _greedy(model: str, device: str, tp: int, prompts: list[list[int]]) -> list[list[int]]:
    from tokenmill import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(model=model, device=device, dtype="float32", tensor_parallel_size=tp, max_model_len=256,
             kv_cache_memory=32 << 20) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def tensor_parallel_check(device: torch.device) -> dict[str, Any]:
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and gpus < 2:
        return {"passed": None, "skipped": f"{gpus} GPU: NCCL needs one GPU per rank; TP = 1 runs in the other "
                                           "sections"}
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(10, TINY_64["vocab_size"] - 10, (n,), generator=gen).tolist() for n in (3, 17, 40)]
    with tempfile.TemporaryDirectory(prefix="tokenmill-tp-") as tmp:
        model = str(_save_checkpoint(Path(tmp)))
        one = _greedy(model, device.type, 1, prompts)
        start = time.perf_counter()
        two = _greedy(model, device.type, 2, prompts)
        seconds = time.perf_counter() - start
    return {"backend": "nccl" if device.type == "cuda" else "gloo", "passed": one == two,
            "tp2_seconds_with_startup": seconds}
