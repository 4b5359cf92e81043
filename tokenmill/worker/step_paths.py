"""Whole-step fast paths: implementations that run an entire step in place of the model's layer-by-layer
forward, behind one interface the model runner asks in order (the first that can run a step runs it).

  worker/cuda_graphs.py   DecodeCudaGraphs: replays a captured CUDA graph for decode steps (GPU, triton)
  worker/c_step.py        CStepForward: the one-call C forward of a step (CPU; kernels/cpu/step_forward.c),
                          for the step sizes the execution plan timed it faster at

Both return exactly what the model's forward would (the final hidden states of the step's rows); the
model itself knows nothing of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from tokenmill.engine.step_timer import NULL_TIMER, AnyStepTimer
from tokenmill.worker.request_states import StepRequest


class WholeStepPath(Protocol):
    def can_run(self, scheduled: Sequence[StepRequest]) -> bool:
        """True when this path takes the step (its requests and their new tokens)."""

    def run(self, scheduled: Sequence[StepRequest], timer: AnyStepTimer = NULL_TIMER,
            rows: Sequence[int] | None = None) -> torch.Tensor:
        """The step's final hidden states [num_tokens, hidden_size], as the model's forward returns them; its time
        goes to the timer's "prepare_inputs" and "forward" sections (engine/step_timer.py). rows: None, or the rows
        (ascending) the caller reads from the result; a path may leave the others undefined."""
