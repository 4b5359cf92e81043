"""Load an HF model directory: config.json, *.safetensors (single or sharded), tokenizer, generation config.

The GGUF loader converts into this same layout and loads its cache entries through here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.loader.model_config import HFConfig
from tokenmill.loader.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INDEX_FILE = "model.safetensors.index.json"
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Names an HF decoder checkpoint may carry under its base model, without the "model." prefix.
_BASE_MODEL_PREFIXES = ("embed_tokens.", "layers.", "norm.")


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors under HF names, memory-mapped in the dtype they are stored in. Read through [] a tensor
    comes whole, floating point cast to `dtype`, contiguous; raw() gives the stored tensor, so that a caller keeping
    only part of it (a tensor-parallel rank's shard) reads, and casts, only that part. Nothing is cached: each []
    casts anew."""

    def __init__(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self._tensors = tensors
        self.dtype = dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        return _cast(self._tensors[name], self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def raw(self, name: str) -> torch.Tensor:
        return self._tensors[name]


@dataclass
class LoadedModel:
    hf_config: HFConfig  # `hf_config.to_hf_config()` is the transformers config
    state_dict: Mapping[str, torch.Tensor]  # CheckpointTensors (empty when loaded without weights)
    tokenizer: Tokenizer | PreTrainedTokenizerBase  # transformers' only for directories without tokenizer.json
    generation_config: dict[str, Any]
    source: str


def load_hf_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    tokenizer: str | Path | None = None,
    source: str | None = None,
    weights: bool = True,
) -> LoadedModel:
    """Load an HF directory; `tokenizer` overrides where the tokenizer comes from, `source` the recorded path;
    without `weights` the state dict stays empty."""
    model_dir = Path(path)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} has no config.json: an HF model directory needs config.json and *.safetensors "
            "weights (or pass a .gguf file)"
        )
    hf_config = load_hf_config(model_dir)
    return LoadedModel(
        hf_config=hf_config,
        state_dict=load_state_dict(model_dir, dtype, tie_word_embeddings=_is_tied(hf_config)) if weights
        else CheckpointTensors({}, dtype),
        tokenizer=load_tokenizer(tokenizer if tokenizer is not None else model_dir),
        generation_config=load_generation_config(model_dir, hf_config),
        source=source if source is not None else str(model_dir),
    )


def load_hf_config(model_dir: Path) -> HFConfig:
    """config.json with its model type's defaults filled in (see model_config.py); no transformers import.

    An unknown architecture still loads; the model registry decides whether it can run.
    """
    return HFConfig.from_json_file(model_dir / "config.json")


def _is_tied(hf_config: HFConfig) -> bool:
    return bool(getattr(hf_config, "tie_word_embeddings", False))


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt*"))
        hint = f" (found {found}: re-save the model with safetensors)" if found else ""
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}{hint}")
    return files


def load_state_dict(model_dir: Path, dtype: torch.dtype, tie_word_embeddings: bool) -> CheckpointTensors:
    """All tensors of all shards under HF names, floating ones cast to `dtype` as they are read."""
    from safetensors.torch import load_file

    state_dict: dict[str, torch.Tensor] = {}
    for file in weight_files(model_dir):
        for name, tensor in load_file(file).items():  # memory-mapped until touched
            if name in state_dict:
                raise ValueError(f"tensor {name!r} appears in more than one weight file of {model_dir}")
            state_dict[name] = tensor
    return CheckpointTensors(normalize_names(state_dict, tie_word_embeddings), dtype)


def normalize_names(state_dict: dict[str, torch.Tensor], tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """HF ForCausalLM naming: drop rotary buffers, add a missing "model." prefix, drop a tied lm_head."""
    out = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    if not any(k.startswith("model.") for k in out) and any(k.startswith(_BASE_MODEL_PREFIXES) for k in out):
        out = {(f"model.{k}" if k.startswith(_BASE_MODEL_PREFIXES) else k): v for k, v in out.items()}
    if tie_word_embeddings and "model.embed_tokens.weight" in out:
        out.pop("lm_head.weight", None)
    return out


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def load_generation_config(model_dir: Path, hf_config: HFConfig) -> dict[str, Any]:
    """generation_config.json as a dict (eos_token_id always a list); without one, the config's token ids."""
    path = model_dir / "generation_config.json"
    if path.is_file():
        generation_config = json.loads(path.read_text())
        generation_config.pop("transformers_version", None)
        generation_config.pop("_from_model_config", None)
    else:
        generation_config = {k: getattr(hf_config, k, None) for k in _TOKEN_ID_KEYS}
        generation_config = {k: v for k, v in generation_config.items() if v is not None}
    eos = generation_config.get("eos_token_id")
    if eos is not None and not isinstance(eos, list):
        generation_config["eos_token_id"] = [eos]
    return generation_config
