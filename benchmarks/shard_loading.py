"""Memory of loading one tensor-parallel rank's share of a checkpoint: for TP = 1 .. N, a fresh process builds rank r's
model from an HF checkpoint (safetensors) and loads its weights, and reports its peak resident memory (VmHWM), its
anonymous memory after loading (RssAnon: what the process itself allocated; mapped checkpoint pages are RssFile)
and the bytes of the parameters it holds. By default the checkpoint is the default model saved in bfloat16 and
loaded in float32: the cast is where reading whole tensors would cost most.

    .venv/bin/python benchmarks/shard_loading.py [--tp 2] [--checkpoint-dtype bfloat16] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tokenmill.bench.results import write_json_report
from tokenmill.worker.capabilities import detect_capabilities

CHILD = r"""
import json, sys, torch
from tokenmill.attention.backend import get_attention_backend
from tokenmill.distributed.communicator import Communicator
from tokenmill.loader import load_model
from tokenmill.models.registry import resolve_model_class
from tokenmill.worker.device import default_dtype

path, dtype, rank, world = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
loaded = load_model(path, dtype=dtype)
with torch.device("cpu"), default_dtype(dtype):
    model = resolve_model_class(loaded.hf_config)(loaded.hf_config, get_attention_backend("torch", use_c_kernels=False),
                                                  2048, dtype, torch.device("cpu"), tp=Communicator(rank, world))
model.load_weights(loaded.state_dict)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
kib = lambda key: int(status[key].split()[0])
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"vm_hwm_mib": kib("VmHWM") / 1024, "rss_anon_mib": kib("RssAnon") / 1024,
                  "rss_file_mib": kib("RssFile") / 1024, "param_mib": params / 2**20}))
"""


def _checkpoint(dtype_name: str, out_dir: Path) -> Path:
    """The default model as an HF directory whose floating tensors are stored in dtype_name."""
    import torch
    from safetensors.torch import save_file

    from tokenmill.loader import default_model_path, load_model
    from tokenmill.loader.cache import gguf_entry, resolve_cache_dir

    gguf = default_model_path()
    loaded = load_model(gguf, dtype=getattr(torch, dtype_name))  # converts the GGUF into the cache once
    entry = gguf_entry(gguf, resolve_cache_dir(None))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (entry / name).is_file():
            (out_dir / name).write_bytes((entry / name).read_bytes())
    save_file({k: v.contiguous() for k, v in loaded.state_dict.items()}, out_dir / "model.safetensors")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--checkpoint-dtype", default="bfloat16")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    print(f"machine: {detect_capabilities().summary()}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="tokenmill-shards-") as tmp:
        path = _checkpoint(args.checkpoint_dtype, Path(tmp))
        for world in sorted({1, args.tp}):
            for rank in range(world):
                out = subprocess.run([sys.executable, "-c", CHILD, str(path), args.dtype, str(rank), str(world)],
                                     check=True, capture_output=True, text=True).stdout
                results[f"tp{world}-rank{rank}"] = json.loads(out.strip().splitlines()[-1])
                print(f"TP={world} rank {rank}: {results[f'tp{world}-rank{rank}']}", flush=True)
    print(f"\n{args.checkpoint_dtype} checkpoint loaded in {args.dtype}\n")
    print("| rank | parameters MiB | peak RSS (VmHWM) MiB | anonymous after load MiB | checkpoint pages MiB |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['param_mib']:.0f} | {r['vm_hwm_mib']:.0f} | {r['rss_anon_mib']:.0f} | "
              f"{r['rss_file_mib']:.0f} |")
    path = write_json_report({"args": vars(args), "results": results}, "shard-loading", args.output_json)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
