"""tokenmill: serve open-weight LLMs as fast as the hardware allows."""

import os

# OpenMP threads that finish a parallel region spin before they sleep: libgomp's default, 300000 pause
# instructions, keeps a core busy for milliseconds after every engine step (a pause is ~140 cycles on recent
# Xeons), while the engine's Python work and the server's event loop want that core. 10000 (~0.5 ms) still covers
# the waits inside a step. Measured on the 2-core AMX Xeon, batch-1 serving: p99 TTFT 85 -> 63 ms, W1 unchanged.
# Read when libgomp loads (with torch), so set before that; a user's own setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.params import StructuredOutputsParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name: str) -> object:
    # LLM pulls in torch and the model code; import it on first use so `import tokenmill` stays light.
    if name == "LLM":
        from tokenmill.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
