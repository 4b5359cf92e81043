"""CUDA graphs for decode steps.

A decode step (one new token per request) of B requests launches the same kernels every time, a few
hundred of them; at small B their launch overhead exceeds their run time. At start-up the runner
captures one graph per bucketed batch size; a step of n requests replays the smallest bucket >= n
with the batch padded by rows that read and write nothing (sequence length 0, KV slot -1). Steps
above the largest bucket, and every step with a prefill, run eagerly.

Invariants the captured kernels rely on:
  * inputs live in static device buffers; each replay first copies the step's values into them;
  * attention sizes its launch by seq_len_bound (max_model_len), not by the lengths at capture;
  * padding rows have seq_len 0 (attention reads nothing, outputs 0) and slot -1 (no KV write).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.engine.step_timer import NULL_TIMER, AnyStepTimer
from tokenmill.worker.request_states import StepRequest

LARGEST_SIZE = 256


def capture_sizes(max_num_seqs: int, largest: int = LARGEST_SIZE) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to the first size covering min(max_num_seqs, largest)."""
    limit = min(max_num_seqs, largest)
    sizes: list[int] = []
    for size in (1, 2, 4, 8, *range(16, largest + 1, 16)):
        sizes.append(size)
        if size >= limit:
            break
    return sizes


def padded_size(num_reqs: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size >= num_reqs, or None when the batch is too large for any graph."""
    i = bisect.bisect_left(sizes, num_reqs)
    return sizes[i] if i < len(sizes) else None


def fill_decode_inputs(
    scheduled: Sequence[StepRequest], size: int, block_size: int, ints: np.ndarray, tables: np.ndarray
) -> int:
    """Writes one decode step into host staging arrays; returns the block-table width used.

    ints[0..3, :size] = input ids, positions, sequence lengths, KV slots (rows past len(scheduled) are
    padding: 0, 0, 0, -1); tables[:size * width] = the block tables as [size, width], row-major
    (entries past a request's blocks, and padding rows, are left stale: no kernel reads them).
    """
    n = len(scheduled)
    positions = [s.start_pos for s in scheduled]
    width = max(len(s.block_ids) for s in scheduled)
    ints[0, :n] = [s.state.all_token_ids[p] for s, p in zip(scheduled, positions)]
    ints[1, :n] = positions
    ints[2, :n] = [p + 1 for p in positions]
    ints[3, :n] = [s.block_ids[p // block_size] * block_size + p % block_size for s, p in zip(scheduled, positions)]
    ints[:3, n:size] = 0
    ints[3, n:size] = -1
    for i, s in enumerate(scheduled):
        tables[i * width : i * width + len(s.block_ids)] = s.block_ids
    return width


class DecodeCudaGraphs:
    def __init__(self, model: nn.Module, sizes: Sequence[int], block_size: int, max_model_len: int,
                 device: torch.device) -> None:
        self.model = model
        self.sizes = sorted(sizes)
        self.block_size = block_size
        self.max_model_len = max_model_len
        max_size = self.sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        # Static device inputs: rows input_ids, positions, seq_lens, slot_mapping.
        self.ints = torch.zeros(4, max_size, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(max_size, max_blocks, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(max_size + 1, dtype=torch.int64, device=device)
        self.tables_staging = torch.zeros(max_size * max_blocks, dtype=torch.int64, device=device)
        pinned = device.type == "cuda"  # page-locked staging: the copies to the device run asynchronously
        self.host_ints = torch.zeros(4, max_size, dtype=torch.int64, pin_memory=pinned)
        self.host_tables = torch.zeros(max_size * max_blocks, dtype=torch.int64, pin_memory=pinned)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._pool: object = None
        self.capture_seconds = 0.0

    def _metadata(self, size: int) -> AttentionMetadata:
        bound = self.max_model_len
        return AttentionMetadata(
            num_tokens=size, block_size=self.block_size, query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.ints[2, :size], block_tables=self.block_tables[:size], slot_mapping=self.ints[3, :size],
            query_lens_list=[1] * size, seq_lens_list=[bound] * size, seq_len_bound=bound,
        )

    @torch.inference_mode()
    def capture(self) -> float:
        """Captures every size (largest first, sharing one memory pool); returns the seconds taken."""
        start = time.perf_counter()
        self.ints.zero_()
        self.ints[3].fill_(-1)  # warm-up and capture run on padding rows only: no KV read or written
        for size in reversed(self.sizes):
            self._capture(size)
        if self.ints.is_cuda:
            torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        return self.capture_seconds

    def _capture(self, size: int) -> None:
        ids, positions = self.ints[0, :size], self.ints[1, :size]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles kernels and creates handles outside the capture
            self.model(ids, positions, self._metadata(size))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.outputs[size] = self.model(ids, positions, self._metadata(size))
        self._pool = graph.pool()
        self.graphs[size] = graph

    def _replay(self, size: int) -> None:
        self.graphs[size].replay()

    def can_run(self, scheduled: Sequence[StepRequest]) -> bool:
        return (bool(scheduled) and len(scheduled) <= self.sizes[-1]
                and all(s.num_new_tokens == 1 for s in scheduled))

    def run(self, scheduled: Sequence[StepRequest], timer: AnyStepTimer = NULL_TIMER,
            rows: Sequence[int] | None = None) -> torch.Tensor:
        """Final hidden states [len(scheduled), hidden] of a pure-decode step (valid until the next run; every row,
        whatever `rows` asks); input staging and the replay are one "forward" section of the timer."""
        with timer.section("forward"):
            return self._run(scheduled)

    def _run(self, scheduled: Sequence[StepRequest]) -> torch.Tensor:
        n = len(scheduled)
        size = padded_size(n, self.sizes)
        assert size is not None
        width = fill_decode_inputs(scheduled, size, self.block_size, self.host_ints.numpy(), self.host_tables.numpy())
        self.ints.copy_(self.host_ints, non_blocking=True)
        staged = self.tables_staging[: size * width]
        staged.copy_(self.host_tables[: size * width], non_blocking=True)
        self.block_tables[:size, :width].copy_(staged.view(size, width))
        self._replay(size)
        return self.outputs[size][:n]
