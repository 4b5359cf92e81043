"""Load a single-file GGUF of the llama family (Llama, Mistral, SmolLM; Qwen2) as an HF-style model.

First load: read the file with the `gguf` package, dequantize every tensor (gguf.quants), map names to
HF's, undo llama.cpp's rotary row order for q/k, build the transformers config and tokenizer from the
metadata, and save all of it as an HF directory in the cache (see cache.py). Every load then reads
that directory through the HF loader: safetensors are memory-mapped, so a warm load is mostly imports.

Cached dtypes: F32 -> float32, F16 -> float16, BF16 -> bfloat16 (bit-exact, half the space), every
quantized type -> float32 (its exact dequantized value). load_model casts to the requested dtype.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.loader.cache import (
    CACHE_FORMAT_VERSION,
    build_atomically,
    gguf_entry,
    remove_entry,
    resolve_cache_dir,
    write_json,
)
from tokenmill.loader.hf import LoadedModel, load_hf_model
from tokenmill.loader.tokenizer import convert_gguf_tokenizer, load_tokenizer

if TYPE_CHECKING:
    import numpy as np
    from gguf import GGUFReader, ReaderTensor
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

# GGUF general.architecture -> (HF architecture, whether llama.cpp's converter permuted q/k rows).
SUPPORTED_ARCHITECTURES = {"llama": ("LlamaForCausalLM", True), "qwen2": ("Qwen2ForCausalLM", False)}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def load_gguf_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | None = None,
    tokenizer: str | Path | None = None,
    weights: bool = True,
) -> LoadedModel:
    """Load a GGUF through its cache entry, converting it first if this file was never seen (without `weights`
    the state dict stays empty)."""
    path = os.path.abspath(path)
    override = load_tokenizer(tokenizer) if tokenizer is not None else None
    loaded = _load_through_cache(path, dtype, resolve_cache_dir(cache_dir), weights)
    if override is not None:
        loaded.tokenizer = override
    return loaded


def _load_through_cache(path: str, dtype: torch.dtype, cache_root: Path, weights: bool = True) -> LoadedModel:
    entry = gguf_entry(path, cache_root)
    if not entry.is_dir() and not _writable(cache_root):
        logger.warning("cache directory %s is not writable; converting %s without caching", cache_root, path)
        with tempfile.TemporaryDirectory(prefix="tokenmill-") as tmp_dir:
            convert_gguf(path, tmp_dir)  # tensors stay mapped after the directory is removed
            return load_hf_model(tmp_dir, dtype, source=path, weights=weights)
    for attempt in range(2):
        if not entry.is_dir():
            logger.info("converting %s into the cache at %s (once per file)", path, entry)
        build_atomically(entry, lambda out_dir: convert_gguf(path, out_dir))
        try:
            return load_hf_model(entry, dtype, source=path, weights=weights)
        except Exception as exc:  # an entry damaged after publication: rebuild it once
            if attempt:
                raise
            logger.warning("cache entry %s is unreadable (%s); converting again", entry, exc)
            remove_entry(entry)
    raise AssertionError("unreachable")


def _writable(cache_root: Path) -> bool:
    try:
        (cache_root / "gguf").mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(cache_root / "gguf", os.W_OK | os.X_OK)


def convert_gguf(path: str | Path, out_dir: str | Path) -> None:
    """Write the GGUF at `path` into `out_dir` as an HF directory (config, safetensors, tokenizer)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    reader = open_gguf(path)
    metadata = read_metadata(reader)
    arch = check_architecture(metadata, path)
    state_dict = convert_tensors(reader, arch, metadata)
    hf_config = build_config(metadata, arch, state_dict)
    hf_config.save_pretrained(out_dir)
    write_json(out_dir / "generation_config.json", generation_config_from_metadata(metadata))
    save_file(state_dict, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    convert_gguf_tokenizer(path, out_dir)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    write_json(out_dir / "tokenmill.json", {"source": str(path), "format": CACHE_FORMAT_VERSION, "tensor_types": types})


def open_gguf(path: str | Path) -> GGUFReader:
    import gguf
    import numpy as np

    class _PlainArrayReader(gguf.GGUFReader):
        """GGUFReader over a plain ndarray view of its memmap: same bytes, ~3x faster metadata parsing
        (np.memmap's per-slice __array_finalize__ dominates reading 100k vocabulary strings)."""

        @property
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain_data = value.view(np.ndarray)

    try:
        return _PlainArrayReader(path)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every metadata value except the big tokenizer arrays (vocabulary, merges, scores, types)."""
    from gguf import GGUFValueType

    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and field.types and field.types[0] == GGUFValueType.ARRAY:
            metadata[key + ".length"] = len(field.data)
            continue
        metadata[key] = field.contents()
    return metadata


def check_architecture(metadata: dict[str, Any], path: str | Path) -> str:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; tokenmill loads GGUF architectures "
            f"{sorted(SUPPORTED_ARCHITECTURES)} (Llama, Mistral, SmolLM, Qwen2 families)"
        )
    return arch


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        hint = " (llama3-style rope scaling)" if gguf_name == "rope_freqs.weight" else ""
        raise ValueError(f"GGUF tensor {gguf_name!r}{hint} is not supported by tokenmill's llama-family loader")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def convert_tensors(reader: GGUFReader, arch: str, metadata: dict[str, Any]) -> dict[str, torch.Tensor]:
    """All tensors under HF names and shapes, rotary rows in HF order."""
    permuted = SUPPORTED_ARCHITECTURES[arch][1]
    num_heads = int(metadata[f"{arch}.attention.head_count"])
    num_kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", num_heads))
    state_dict: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        value = dequantize_tensor(tensor)
        if permuted and ".self_attn.q_proj." in name:
            value = unpermute_rotary_rows(value, num_heads)
        elif permuted and ".self_attn.k_proj." in name:
            value = unpermute_rotary_rows(value, num_kv_heads)
        state_dict[name] = value.contiguous()
    return state_dict


def dequantize_tensor(tensor: ReaderTensor) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of the HF shape (GGUF lists dimensions innermost first)."""
    import numpy as np
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    raw = np.ascontiguousarray(tensor.data)
    if tensor.tensor_type == QT.F32:
        out = torch.from_numpy(raw.view(np.float32).copy())
    elif tensor.tensor_type == QT.F16:
        out = torch.from_numpy(raw.view(np.float16).copy())
    elif tensor.tensor_type == QT.BF16:
        out = torch.from_numpy(raw.view(np.uint16).copy()).view(torch.bfloat16)
    else:
        try:
            values = dequantize(raw, tensor.tensor_type)
        except NotImplementedError as exc:
            raise ValueError(f"GGUF tensor {tensor.name!r}: {exc}") from exc
        out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return out.reshape(shape)


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: HF -> GGUF wrote, per head, row (half s, index i) to i*2 + s.

    So each head's rows in GGUF are [head_dim/2, 2]-shaped (pairs); transposing them back to
    [2, head_dim/2] restores HF's "first half, second half" layout. Works for weights and biases.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot split {rows} rows into {num_heads} rotary heads")
    head_dim = rows // num_heads
    rest = weight.shape[1:]
    return weight.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def build_config(metadata: dict[str, Any], arch: str, state_dict: dict[str, torch.Tensor]) -> PretrainedConfig:
    """The transformers config (LlamaConfig / Qwen2Config) the GGUF metadata describes."""
    from transformers import LlamaConfig, Qwen2Config

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if isinstance(value, list):
            raise ValueError(f"GGUF {arch}.{key} varies per layer; tokenmill needs one value")
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden_size = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden_size // num_heads))
    rotary_dim = int(get("rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ValueError(f"partial rotary embeddings (rope.dimension_count {rotary_dim} != head_dim {head_dim})")
    kwargs: dict[str, Any] = dict(
        architectures=[SUPPORTED_ARCHITECTURES[arch][0]],
        vocab_size=int(state_dict["model.embed_tokens.weight"].shape[0]),
        hidden_size=hidden_size,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_parameters=rope_parameters(metadata, arch),
        tie_word_embeddings="lm_head.weight" not in state_dict,
        **_special_token_ids(metadata),
    )
    if arch == "qwen2":
        if head_dim == hidden_size // num_heads:  # Qwen2Config has no head_dim field; it derives it
            del kwargs["head_dim"]
        return Qwen2Config(**kwargs)
    return LlamaConfig(attention_bias="model.layers.0.self_attn.q_proj.bias" in state_dict, **kwargs)


def rope_parameters(metadata: dict[str, Any], arch: str) -> dict[str, Any]:
    """transformers-5 `rope_parameters` from the GGUF rope keys (default, linear or yarn)."""
    theta = float(metadata.get(f"{arch}.rope.freq_base", 10000.0))
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = metadata.get(f"{arch}.rope.scaling.factor", metadata.get(f"{arch}.rope.scale_linear"))
    if kind == "none" and factor in (None, 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    if kind in ("none", "linear"):
        return {"rope_type": "linear", "rope_theta": theta, "factor": float(factor)}
    if kind == "yarn":
        params = {"rope_type": "yarn", "rope_theta": theta, "factor": float(factor)}
        original = metadata.get(f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            params["original_max_position_embeddings"] = int(original)
        return params
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (default, linear and yarn are)")


def _special_token_ids(metadata: dict[str, Any]) -> dict[str, int]:
    keys = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "padding", "unk_token_id": "unknown"}
    ids = {hf: metadata.get(f"tokenizer.ggml.{g}_token_id") for hf, g in keys.items()}
    return {k: int(v) for k, v in ids.items() if v is not None}


def generation_config_from_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """bos/pad ids, and every end-of-generation id (eos, end-of-turn, end-of-message) as eos_token_id."""
    ids = _special_token_ids(metadata)
    eos_ids: list[int] = []
    for key in ("eos", "eot", "eom"):
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None and int(value) not in eos_ids:
            eos_ids.append(int(value))
    generation_config: dict[str, Any] = {k: ids[k] for k in ("bos_token_id", "pad_token_id") if k in ids}
    if eos_ids:
        generation_config["eos_token_id"] = eos_ids
    return generation_config
