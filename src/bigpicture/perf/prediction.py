"""``Prediction``: a plan's predicted peak memory and time, and how ``print(plan)`` shows it."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Stage:
    name: str
    flops: int
    seconds: float


@dataclass(frozen=True)
class Prediction:
    """Predicted peak memory (bytes) and time (seconds: one forward, or forward + backward)."""

    device: str
    dtype: torch.dtype
    training: bool
    tile: tuple[int, ...]
    tiles: int
    classes: int
    memory: int
    time: float
    flops: int
    halo_overhead: float  # work of the tiled run over the untiled one, minus 1
    memory_parts: tuple[tuple[str, int], ...]
    stages: tuple[Stage, ...]
    by_kind: tuple[tuple[str, float], ...]  # seconds per op kind
    assumptions: str
    note: str = ""  # why this tile, when the planner chose it

    def with_note(self, note: str) -> Prediction:
        return replace(self, note=note)

    def rows(self) -> list[tuple[str, str]]:
        """The lines of ``str(prediction)`` as (name, text) pairs: what ``print(plan)`` shows too."""
        mode = "training step (forward + recompute + backward)" if self.training else "inference (forward)"
        parts = ", ".join(f"{k} {_size(v)}" for k, v in self.memory_parts if v)
        stages = ", ".join(f"{s.name} {_seconds(s.seconds)}" for s in self.stages if s.seconds)
        kinds = ", ".join(f"{k} {100 * v / max(self.time, 1e-12):.0f}%" for k, v in self.by_kind if v)
        rows = [
            ("device", f"{self.device}, {str(self.dtype).removeprefix('torch.')}, {mode}"),
            (
                "tile",
                f"{' x '.join(map(str, self.tile))} input px, {self.tiles:,} tiles ({self.classes} kinds)",
            ),
            ("halo overhead", _overhead(self.halo_overhead)),
            ("peak memory", f"{_size(self.memory)} = {parts}"),
            ("time", f"{_seconds(self.time)} = {stages}"),
            ("work", f"{_flops(self.flops)}; time by op: {kinds}"),
            ("assumptions", self.assumptions),
        ]
        if self.note:
            rows.insert(2, ("planner", self.note))
        return rows

    def __str__(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:.0f} B"


def _flops(n: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:.0f} FLOP"


def _seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    return f"{s:.3g} s" if s >= 1 else f"{1e3 * s:.3g} ms"


def _overhead(share: float) -> str:
    """The tiles' extra work over the untiled model's (less, where the graph crops what tiles skip)."""
    more = "more" if share >= 0 else "less"
    return f"{100 * abs(share):.1f}% {more} work than untiled"
