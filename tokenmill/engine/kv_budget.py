"""Memory budget -> number of KV blocks, and the capacity line printed at start-up."""

from __future__ import annotations

import logging

import torch

from tokenmill.config import CacheConfig

logger = logging.getLogger("tokenmill")


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # no way to tell: assume a modest 4 GiB


def num_kv_blocks(cache_config: CacheConfig, bytes_per_block: int, device: torch.device) -> int:
    if cache_config.num_blocks is not None:
        return cache_config.num_blocks
    budget = cache_config.kv_cache_memory
    if budget is None:
        budget = int(available_memory_bytes(device) * cache_config.kv_cache_memory_fraction)
    num_blocks = budget // bytes_per_block
    if num_blocks < 2:
        raise ValueError(
            f"KV cache budget of {budget} bytes holds fewer than 2 blocks of {bytes_per_block} bytes; "
            "raise kv_cache_memory or kv_cache_memory_fraction"
        )
    return int(num_blocks)


def describe_capacity(num_blocks: int, block_size: int, bytes_per_block: int, max_model_len: int) -> str:
    tokens = num_blocks * block_size
    return (
        f"KV cache: {num_blocks} blocks x {block_size} tokens = {tokens} tokens "
        f"({num_blocks * bytes_per_block / (1 << 20):.0f} MiB); "
        f"{tokens / max_model_len:.2f} concurrent sequences at the full context of {max_model_len} tokens"
    )
