"""What this machine can do, detected once: the CPU's identity and ISA flags, cores, caches, and what torch's
oneDNN uses (AMX tiles for bf16 and int8 products where the CPU has them).

The execution plan (worker/plan.py) keys its cache on this and times candidates on it; `--dtype auto`
reads `native_bf16` from it. Nothing here decides a kernel: it only describes the machine.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

# The flags that change which kernel is fastest, in the order reports print them.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class MachineCapabilities:
    cpu_model: str
    flags: tuple[str, ...]  # the ISA_FLAGS this CPU has
    num_cores: int  # logical CPUs this process may run on
    num_threads: int  # torch's intra-op threads
    l2_kib: int
    l3_kib: int
    torch_version: str
    onednn_amx: bool  # torch's oneDNN runs bf16/int8 products on AMX tiles here

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def native_bf16(self) -> bool:
        """The CPU multiplies bf16 in hardware (AMX-BF16 tiles or AVX512-BF16 dot products)."""
        return self.has("amx_bf16") or self.has("avx512_bf16")

    @property
    def fast_int8(self) -> str:
        """The best int8 dot-product unit: amx, vnni (AVX-512 or AVX VNNI), avx2 (vpmaddubsw) or none."""
        if self.has("amx_int8") and self.onednn_amx:
            return "amx"
        if self.has("avx512_vnni") or self.has("avx_vnni"):
            return "vnni"
        return "avx2" if self.has("avx2") else "none"

    def summary(self) -> str:
        """One line for start-up logs and benchmark reports."""
        flags = " ".join(self.flags) or "none of " + "/".join(ISA_FLAGS)
        return (f"{self.cpu_model}; {self.num_cores} cores, {self.num_threads} torch threads, L2 {self.l2_kib} KiB, "
                f"L3 {self.l3_kib} KiB; flags: {flags}; oneDNN AMX: {'yes' if self.onednn_amx else 'no'}; "
                f"torch {self.torch_version}")

    def cache_key(self) -> str:
        """What a plan measured on this machine depends on (threads included: timings scale with them)."""
        return f"{self.cpu_model}|{','.join(self.flags)}|{self.num_threads}t|torch {self.torch_version}"


def _cpuinfo() -> tuple[str, set[str]]:
    path = Path("/proc/cpuinfo")
    model, flags = platform.processor() or platform.machine(), set()
    if not path.is_file():
        return model, flags
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def _cache_kib(level: int) -> int:
    """Size of CPU 0's cache of this level (sysfs), 0 when unknown."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(root.glob("index*")) if root.is_dir() else []:
        try:
            if int((index / "level").read_text()) == level and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip()
                return int(size[:-1]) * (1024 if size.endswith("M") else 1) if size[-1] in "KM" else int(size) // 1024
        except (OSError, ValueError):
            continue
    return 0


def _onednn_amx() -> bool:
    """oneDNN picks AMX tiles when the CPU has them and the kernel grants this process the tile state
    (torch asks for it in _init_amx)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() and torch._C._cpu._init_amx())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def _detect(num_threads: int) -> MachineCapabilities:
    model, flags = _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return MachineCapabilities(
        cpu_model=model, flags=tuple(f for f in ISA_FLAGS if f in flags), num_cores=cores, num_threads=num_threads,
        l2_kib=_cache_kib(2), l3_kib=_cache_kib(3), torch_version=torch.__version__, onednn_amx=_onednn_amx(),
    )


def detect_capabilities() -> MachineCapabilities:
    """This machine, at torch's current thread count (cached per thread count)."""
    return _detect(torch.get_num_threads())
