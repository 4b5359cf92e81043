"""A projection whose kernel depends on the step's row count, as the execution plan (worker/plan.py) chose.

Each route is (max_rows, module): a product of m rows runs the first route with m <= max_rows (the last
route takes every larger m). Every route computes the same y = x W^T + b from the same weights, in its own
layout (e.g. float32 panels for the C GEMM, the plain matrix for torch's); the plan keeps a second layout
only where the timings chose different kernels for different row counts.
"""

from __future__ import annotations

import torch
from torch import nn


class PlannedLinear(nn.Module):
    def __init__(self, routes: list[tuple[int, nn.Module]], kernels: list[str]) -> None:
        super().__init__()
        if not routes or len(routes) != len(kernels):
            raise ValueError("PlannedLinear needs one kernel name per route, and at least one route")
        self.max_rows = [m for m, _ in routes]
        self.impls = nn.ModuleList(module for _, module in routes)
        self.kernels = kernels
        first = self.impls[0]
        self.in_features, self.out_features = first.in_features, first.out_features

    def impl_of(self, kind: type) -> nn.Module | None:
        """The route module of this class, if one route holds it (the C forward reads its weights)."""
        return next((m for m in self.impls if isinstance(m, kind)), None)

    def route(self, rows: int) -> nn.Module:
        """The module that multiplies `rows` rows."""
        return next((impl for max_rows, impl in zip(self.max_rows, self.impls) if rows <= max_rows), self.impls[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.route(x.numel() // self.in_features)(x)

    def extra_repr(self) -> str:
        bounds = [f"<={m}: {k}" for m, k in zip(self.max_rows[:-1], self.kernels)] + [f"more: {self.kernels[-1]}"]
        return f"in_features={self.in_features}, out_features={self.out_features}, " + ", ".join(bounds)
