"""--speculative-config: vLLM's JSON interface, parsed and validated.

  {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": N, "prompt_lookup_min": M}
  {"method": "draft_model", "model": PATH, "num_speculative_tokens": K, "quantization": "int4"}

The draft model may be the target's own checkpoint in a cheaper form (for example int4 drafting for the float32
model); its vocabulary must be the target's. Drafts are the draft's greedy tokens, and verification samples every
drafted position from the target's own distribution (spec/verify.py), so the output is the target's whatever the
draft guesses.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model")
QUANTIZATIONS = ("none", "int8", "int4")
# Speculation is off for steps with more decoding requests than this (the governor, spec/governor.py). On the AMX
# Xeon, float32 SmolLM2-135M with its int4 self-draft (K = 4): 4 requests decoding together ran at 1.10x plain
# decoding (148 against 135 tok/s), 1 request at 1.9x; a step of many requests is no longer bound by streaming the
# weights once, so its verification rows cost nearly what tokens cost. (Between 5 and 63 is unmeasured.)
DEFAULT_DISABLE_BY_BATCH_SIZE = 4


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4  # ngram: longest suffix looked up in the request's earlier tokens
    prompt_lookup_min: int = 1  # ngram: shortest
    model: str | None = None  # draft_model: checkpoint path, HF id, or "default" (the embedded model)
    quantization: str = "none"  # draft_model: how its weights are quantized (int4, int8 or none)
    # Speculation is off in steps where more requests are decoding than this (the governor).
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE
    # A request whose recent acceptance rate falls below this gets fewer guesses (down to 1), and more again
    # when they are accepted (the governor).
    min_acceptance_rate: float = 0.3

    def is_self_draft(self, target_model: str | None) -> bool:
        """Whether the draft is the target's own checkpoint (`target_model`: the target's path, None for the
        embedded default), perhaps in a cheaper form: it then shares the target's K/V cache (spec/draft_model.py)."""
        if self.method != "draft_model" or self.model is None:
            return False
        if self.model == "default" or target_model is None:
            return self.model == "default" and target_model is None
        return os.path.realpath(self.model) == os.path.realpath(target_model)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {', '.join(METHODS)}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f"speculative_config num_speculative_tokens must be an integer in [1, 16], got {k!r}")
        if self.method == "ngram":
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
                raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                                 f"{lo!r} and {hi!r}")
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config method 'draft_model' needs \"model\": the draft's checkpoint")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"speculative_config quantization must be one of {', '.join(QUANTIZATIONS)}, got "
                             f"{self.quantization!r}")
        if not isinstance(self.disable_by_batch_size, int) or self.disable_by_batch_size < 1:
            raise ValueError("speculative_config disable_by_batch_size must be an integer >= 1, got "
                             f"{self.disable_by_batch_size!r}")
        if not 0.0 <= self.min_acceptance_rate <= 1.0:
            raise ValueError(f"speculative_config min_acceptance_rate must be in [0, 1], got {self.min_acceptance_rate}")


def parse_speculative_config(value: str | dict[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
    """--speculative-config's JSON text, or a dict (LLM(speculative_config=...)), as a SpeculativeConfig."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"speculative_config must be a JSON object, got {value!r}")  # noqa: TRY004
    known = {f.name for f in fields(SpeculativeConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"speculative_config has unknown keys {unknown}; known: {sorted(known)}")
    if "method" not in value or "num_speculative_tokens" not in value:
        raise ValueError("speculative_config needs \"method\" and \"num_speculative_tokens\"")
    return SpeculativeConfig(**value)
