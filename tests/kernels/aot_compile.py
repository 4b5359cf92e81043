"""Compiles every Triton kernel for a Hopper GPU (sm_90) without one: Triton's bundled ptxas does the
whole compilation on the CPU. Run as a script (kernels must be defined compiled, not interpreted);
prints one line per kernel variant with its registers and stack bytes (register spills) from the
bundled cuobjdump, and exits non-zero on the first failure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("aot_compile needs TRITON_INTERPRET unset")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tokenmill.kernels.triton import activation, fp8_gemm, paged_attention, rmsnorm, rope_kv

TARGET = GPUTarget("cuda", 90, 32)
INT_ARGS = ("num_splits", "M", "N", "K", "k_per_split")


def _signature(fn: object, pointers: dict[str, str]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in pointers:
            sig[name] = pointers[name]
        elif name.startswith("stride") or name in INT_ARGS:
            sig[name] = "i32"
        elif name.endswith("scale") or name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    return sig


def _aligned(fn: object, signature: dict[str, str]) -> dict[tuple[int, ...], list]:
    """The divisibility-by-16 facts Triton's launcher infers at run time for 16-byte aligned pointers
    and integers that are multiples of 16 (here: every stride but the block table's, and N/K)."""
    names = [n for n, t in signature.items() if t.startswith("*") or (
        t == "i32" and n != "stride_bt" and (n.startswith("stride") or n in ("N", "K", "k_per_split")))]
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


def compile_one(fn: object, pointers: dict[str, str], constexprs: dict[str, object], label: str,
                num_warps: int = 4, num_stages: int = 2) -> None:
    signature = _signature(fn, pointers)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=_aligned(fn, signature))
    kernel = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    print(f"{label}: ok, {kernel.metadata.shared} B shared memory, {_resources(kernel.asm['cubin'])}", flush=True)


def _resources(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return f"{found.group(1)} registers, stack {found.group(2)} B" if found else "resources unknown"


def main() -> None:
    for act, cache in (("bf16", "bf16"), ("bf16", "fp8e4nv"), ("fp32", "fp32")):
        dot = tl.float32 if act == "fp32" else tl.bfloat16
        precision = "ieee" if act == "fp32" else "tf32"
        ptrs = dict(q_ptr=f"*{act}", k_cache_ptr=f"*{cache}", v_cache_ptr=f"*{cache}", block_tables_ptr="*i64",
                    seq_lens_ptr="*i64", query_start_loc_ptr="*i64", items_ptr="*i64", out_ptr=f"*{act}",
                    part_o_ptr="*fp32", part_lse_ptr="*fp32", tile_req_ptr="*i64", tile_start_ptr="*i64")
        for items, split in ((False, False), (True, True)):
            compile_one(paged_attention._decode_kernel, ptrs, dict(
                GROUP=4, BLOCK_G=16, PAGE=16, BLOCK_N=64, HEAD_DIM=128, BLOCK_D=128, HAS_ITEMS=items, SPLIT=split,
                DOT_DTYPE=dot, PRECISION=precision), f"decode {act}/{cache} items={items} split={split}")
        compile_one(paged_attention._decode_reduce_kernel, ptrs, dict(
            HEAD_DIM=128, BLOCK_D=128, BLOCK_S=32, HAS_ITEMS=True), f"decode_reduce {act}")
        block = 32 if act == "fp32" else 64  # TritonAttentionBackend._prefill_blocks
        compile_one(paged_attention._prefill_kernel, ptrs, dict(
            GROUP=4, PAGE=32, BLOCK_M=block, BLOCK_N=block, HEAD_DIM=128, BLOCK_D=128, DOT_DTYPE=dot,
            PRECISION=precision), f"prefill {act}/{cache}", num_warps=8 if act == "fp32" else 4)
        compile_one(rope_kv._rope_kv_kernel, dict(
            q_ptr=f"*{act}", k_ptr=f"*{act}", v_ptr=f"*{act}", cos_ptr=f"*{act}", sin_ptr=f"*{act}", slot_ptr="*i64",
            k_cache_ptr=f"*{cache}", v_cache_ptr=f"*{cache}"), dict(
            NUM_HEADS=32, NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_H=32, BLOCK_KV=8, BLOCK_HALF=64, ROTATE=True,
            FP8=cache == "fp8e4nv"), f"rope_kv {act}/{cache}")
        compile_one(rmsnorm._rmsnorm_kernel, dict(x_ptr=f"*{act}", residual_ptr=f"*{act}", weight_ptr=f"*{act}",
                                                  out_ptr=f"*{act}"),
                    dict(N=4096, BLOCK=4096, HAS_RESIDUAL=True), f"rmsnorm {act}", num_warps=8)
        compile_one(activation._silu_and_mul_kernel, dict(x_ptr=f"*{act}", out_ptr=f"*{act}"),
                    dict(N=14336, BLOCK=2048), f"silu_and_mul {act}")
    compile_one(fp8_gemm._w8a16_kernel, dict(x_ptr="*bf16", w_ptr="*fp8e4nv", scale_ptr="*fp32", out_ptr="*fp32"),
                dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, DOT_DTYPE=tl.bfloat16, PRECISION="tf32"), "w8a16",
                num_stages=4)
    compile_one(fp8_gemm._quantize_rows_kernel, dict(x_ptr="*bf16", out_ptr="*fp8e4nv", scale_ptr="*fp32"),
                dict(K=14336, BLOCK=16384), "quantize_rows_fp8", num_warps=16)


if __name__ == "__main__":
    main()
