"""The one batch type that carries data between stages (rollout -> reward -> advantages -> learner).

Rows are samples (or trained steps); `tensors` hold batch-first tensors, `meta` per-row Python values
(prompts, group ids). It pickles cheaply, so it is also what crosses Ray actor boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Batch:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {k: len(v) for k, v in {**self.tensors, **self.meta}.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"batch columns have different lengths: {lengths}")

    def __len__(self) -> int:
        for column in (*self.tensors.values(), *self.meta.values()):
            return len(column)
        return 0

    def __getitem__(self, key: str) -> Any:
        return self.tensors[key] if key in self.tensors else self.meta[key]

    def select(self, index: torch.Tensor | list[int]) -> Batch:
        """Rows at `index` (a list or a 1-D long/bool tensor), in that order."""
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            index = index.nonzero().flatten()
        rows = [int(i) for i in index]
        index_tensor = torch.tensor(rows, dtype=torch.long)
        return Batch(
            {k: v[index_tensor.to(v.device)] for k, v in self.tensors.items()},
            {k: [v[i] for i in rows] for k, v in self.meta.items()},
        )

    def split(self, parts: int) -> list[Batch]:
        """`parts` contiguous chunks whose sizes differ by at most one (some may be empty)."""
        n = len(self)
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        return [self.select(list(range(a, b))) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def chunks(self, size: int) -> list[Batch]:
        """Consecutive chunks of at most `size` rows."""
        return [self.select(list(range(a, min(a + size, len(self))))) for a in range(0, len(self), size)]

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        batches = [b for b in batches if len(b)]
        if not batches:
            return Batch()
        return Batch(
            {k: torch.cat([b.tensors[k] for b in batches]) for k in batches[0].tensors},
            {k: [x for b in batches for x in b.meta[k]] for k in batches[0].meta},
        )

    def to(self, device: torch.device | str) -> Batch:
        return Batch({k: v.to(device) for k, v in self.tensors.items()}, dict(self.meta))
