"""Model loading: HF directories and GGUF files -> LoadedModel (config, HF-named state dict, tokenizer).

    load_model(None)                 the embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF)
    load_model("path/to/hf_dir")     config.json + *.safetensors (+ index.json when sharded)
    load_model("path/to/model.gguf") llama-family GGUF, converted once into the cache, then memory-mapped

transformers is imported only to convert a GGUF file into the cache (its first load) and for a tokenizer
directory without tokenizer.json; a warm load reads config.json (model_config.py) and the tokenizer
(tokenizer.py) itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tokenmill.loader.cache import default_cache_dir
from tokenmill.loader.default_model import INSTALL_HINT, default_model_path
from tokenmill.loader.hf import LoadedModel, load_hf_model
from tokenmill.loader.tokenizer import load_tokenizer

__all__ = [
    "INSTALL_HINT",
    "LoadedModel",
    "default_cache_dir",
    "default_model_path",
    "load_model",
    "load_tokenizer",
]


def load_model(
    path: str | os.PathLike[str] | None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | None = None,
    *,
    tokenizer: str | os.PathLike[str] | None = None,
    weights: bool = True,
) -> LoadedModel:
    """Load weights, config, tokenizer and generation defaults.

    path: None (the embedded default GGUF), an HF model directory, or a .gguf file.
    dtype: dtype of the floating-point tensors in `state_dict`.
    cache_dir: where converted GGUF models are kept (default `$XDG_CACHE_HOME/tokenmill` or
        `~/.cache/tokenmill`).
    tokenizer: a directory holding the tokenizer to use instead of the model's own.
    weights: False leaves `state_dict` empty (config, tokenizer and generation defaults only).
    """
    from tokenmill.loader.gguf import load_gguf_model

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    model_path = Path(default_model_path() if path is None else os.fspath(path)).expanduser()
    if not model_path.exists():
        raise FileNotFoundError(f"model path {model_path} does not exist (expected an HF directory or a .gguf file)")
    if model_path.is_dir():
        return load_hf_model(model_path, dtype, tokenizer=tokenizer, weights=weights)
    if model_path.suffix.lower() == ".gguf":
        return load_gguf_model(model_path, dtype, cache_dir=cache_dir, tokenizer=tokenizer, weights=weights)
    raise ValueError(f"cannot load {model_path}: expected an HF model directory or a .gguf file")
