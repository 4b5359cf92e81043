"""Whether the KV block pool keeps requests' blocks together as it turns over: one engine runs the W1 workload
(64 prompts of 256 random tokens, 128 output tokens, ignore_eos) again and again, each run with prompts of its own;
per run its time and how many of a finished request's blocks sit right next to (id +-1) the block before them.

The decode attention kernels stream a request's blocks one after another; blocks scattered over the pool read slower
than neighbouring ones. A pool that hands out the blocks freed last first scatters them more with every turn; this
shows whether the times drift with it. Prefix caching off by default (its hashed blocks follow LRU order instead).

    .venv/bin/python benchmarks/kv_fragmentation.py --runs 5 [--prefix-caching]
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

from tokenmill import LLM, SamplingParams
from tokenmill.bench.results import write_json_report
from tokenmill.bench.throughput import make_workload
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request


def record_block_tables(kv: KVCacheManager, tables: list[list[int]]) -> None:
    """Wraps kv.free (on the instance) so that every freed request's block table is appended to `tables`."""
    inner = kv.free

    def free(request: Request) -> None:
        tables.append(kv.get_block_ids(request.req_id))
        inner(request)

    kv.free = free  # type: ignore[method-assign]


def neighbour_share(tables: list[list[int]]) -> float:
    """The share of blocks (after each table's first) whose id is the previous block's +-1."""
    pairs = [pair for table in tables for pair in itertools.pairwise(table)]
    return sum(abs(b - a) == 1 for a, b in pairs) / max(len(pairs), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prefix-caching", action="store_true")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    llm = LLM(enable_prefix_caching=args.prefix_caching)
    engine = llm.engine
    tables: list[list[int]] = []
    record_block_tables(engine.core.scheduler.kv_cache_manager, tables)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    special = set(getattr(llm.tokenizer, "all_special_ids", []) or []) | set(engine.eos_token_ids)
    runs: list[dict[str, Any]] = []
    for run in range(args.runs):
        prompts = make_workload(args.num_prompts, args.input_len, args.output_len, engine.vocab_size, run,
                                special_ids=special).prompts
        tables.clear()
        start = time.perf_counter()
        llm.generate(prompts, [params] * len(prompts), use_tqdm=False)
        seconds = time.perf_counter() - start
        runs.append({"seconds": seconds, "neighbour_share": neighbour_share(tables),
                     "output_tok_s": args.num_prompts * args.output_len / seconds})
        print(f"run {run}: {seconds:.2f} s ({runs[-1]['output_tok_s']:.0f} output tok/s), "
              f"{runs[-1]['neighbour_share']:.0%} of blocks next to the one before", flush=True)
    path = write_json_report({"benchmark": "kv_fragmentation", "args": vars(args), "runs": runs},
                             "kv-fragmentation", args.output_json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
