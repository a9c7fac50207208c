"""Cost of running a network: FLOPs and bytes per aten op, counted on fake tensors.

Nothing of the input's size is allocated: the module runs under FakeTensorMode, so a
1 x 3 x 100,000 x 100,000 input costs only the bookkeeping of its shape.

    input shape --fake run--> aten ops --(flops, bytes read, bytes written)--> OpRecord
                                                            sum --> Cost --roofline--> seconds

FLOPs follow torch.utils.flop_counter (2 per multiply-add, convolutions, matmuls and
attention only): the other ops are memory-bound, and the roofline times them by bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.module_tracker import ModuleTracker

from bigpicture.errors import TilingError
from bigpicture.perf.devices import Device

aten = torch.ops.aten


@dataclass(frozen=True)
class Cost:
    """Work of some ops; `launches` is how many kernels they take (each pays a launch overhead)."""

    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    launches: int = 0

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Cost)))

    def __mul__(self, times: int) -> Cost:
        if not isinstance(times, int):
            return NotImplemented
        return Cost(*(getattr(self, f.name) * times for f in fields(Cost)))

    __rmul__ = __mul__

    def time_on(
        self, device: Device, dtype: torch.dtype | str = torch.float32, efficiency: float = 1.0
    ) -> float:
        """Roofline seconds: the slower of compute at `efficiency` x peak and memory traffic,
        plus the launches.

        The roofline of a sum is at most the sum of the rooflines of its parts: time ops one
        by one and add the times where some are compute-bound and others memory-bound.
        """
        compute = self.flops / (device.peak(dtype) * efficiency)
        memory = self.bytes / device.bandwidth_bytes_per_s
        return max(compute, memory) + self.launches * device.launch_overhead_s


@dataclass(frozen=True)
class OpRecord:
    """One aten op of the run. `name` is the innermost module running it ("Global" if none)."""

    name: str
    op: str
    phase: str  # "forward" or "backward"
    flops: int
    bytes_read: int
    bytes_written: int
    output_shape: tuple[int, ...]  # of the first tensor output

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def cost(self) -> Cost:
        return Cost(self.flops, self.bytes_read, self.bytes_written, launches=1)


@dataclass(frozen=True)
class Count:
    records: tuple[OpRecord, ...]
    output_shapes: tuple[tuple[int, ...], ...]

    def _sum(self, phases: tuple[str, ...]) -> Cost:
        return sum((r.cost for r in self.records if r.phase in phases), Cost())

    @property
    def total(self) -> Cost:
        return self._sum(("forward", "backward"))

    @property
    def forward(self) -> Cost:
        return self._sum(("forward",))

    @property
    def backward(self) -> Cost:
        return self._sum(("backward",))


# ops that only reserve memory: nothing is read or written until another op fills it
_ALLOCATIONS = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided}


def _nbytes(t: torch.Tensor) -> int:
    # an expanded view touches its small storage, a slice only its own elements
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


def _tensors(tree: object) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _innermost(parents: set[str]) -> str:
    # ModuleTracker names nest ("Net.layer1.0.conv1"); the deepest running module owns the op
    return max(parents, key=lambda n: (n.count("."), len(n)))


class _OpCounter(TorchDispatchMode):
    """Records every aten op that moves data: views and allocations launch no kernel."""

    def __init__(self, tracker: ModuleTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.phase = "forward"
        self.records: list[OpRecord] = []

    def __torch_dispatch__(
        self, func: torch._ops.OpOverload, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> object:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        packet = func.overloadpacket
        if not outputs or func.is_view or packet in _ALLOCATIONS or func.namespace == "prim":
            return out
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        inputs = _tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))
        self.records.append(
            OpRecord(
                name=_innermost(self.tracker.parents),
                op=str(func),
                phase=self.phase,
                flops=int(flops),
                bytes_read=sum(map(_nbytes, inputs)),
                bytes_written=sum(map(_nbytes, outputs)),
                output_shape=tuple(outputs[0].shape),
            )
        )
        return out


@dataclass
class _FakeRun:
    module: nn.Module
    x: torch.Tensor
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]

    def forward(self) -> object:
        return torch.func.functional_call(self.module, {**self.params, **self.buffers}, (self.x,))

    @property
    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.params.values() if p.requires_grad]


@contextlib.contextmanager
def _fake_run(module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype) -> Iterator[_FakeRun]:
    """Fake copies of the input, parameters and buffers; the user's module keeps its own."""
    # non-fake tensors the module creates itself (constants, attributes) are converted on use
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    # a module built on the meta device (to skip allocating its weights) is counted as on the CPU
    devices = [t.device for t in (*module.parameters(), *module.buffers()) if not t.is_meta]
    device = devices[0] if devices else torch.device("cpu")

    def fake(t: torch.Tensor) -> torch.Tensor:
        t = torch.empty_like(t, device=device) if t.is_meta else mode.from_tensor(t.detach())
        return t.to(dtype) if t.is_floating_point() else t

    with mode:
        params = {k: fake(p).requires_grad_(p.requires_grad) for k, p in module.named_parameters()}
        buffers = {k: fake(b) for k, b in module.named_buffers()}
        x = torch.empty(tuple(input_shape), dtype=dtype, device=device)
        try:
            yield _FakeRun(module, x, params, buffers)
        except (DataDependentOutputException, DynamicOutputShapeException) as e:
            raise TilingError(
                f"cannot count {type(module).__name__} on fake tensors: {e.func} depends on tensor "
                "values, not only on the input shape. Count the part of the model before that op."
            ) from e


def count(
    module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32, training: bool = False
) -> Count:
    """Per-op FLOPs and bytes of `module` on an input of `input_shape`, with the backward if
    `training`; the module's own train/eval mode decides how its layers behave."""
    with _fake_run(module, input_shape, dtype) as run, ModuleTracker() as tracker:
        counter = _OpCounter(tracker)
        with counter, torch.set_grad_enabled(training):
            out = run.forward()
        ends = [t for t in _tensors(out) if t.requires_grad]
        if training and ends and run.trainable:
            # the loss is made outside the counter (it is not the model's work), but through a
            # sum, so that ModuleTracker's hooks on the outputs fire and name the backward ops
            loss = sum(t.sum() for t in ends)
            counter.phase = "backward"
            with counter:
                # autograd.grad, not backward(): nothing accumulates into anyone's .grad
                torch.autograd.grad(loss, run.trainable, torch.ones_like(loss), allow_unused=True)
    return Count(tuple(counter.records), tuple(tuple(t.shape) for t in _tensors(out)))


def activation_bytes(
    module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> int:
    """Bytes autograd keeps from the forward for the backward, each storage once.

    Parameters and buffers are left out (they are resident anyway); the input counts when a
    layer saves it, since it must then stay alive until the backward.
    """
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # keeping `t` alive keeps its storage id from being reused by a later tensor
        saved[t.untyped_storage()._cdata] = t
        return t

    with _fake_run(module, input_shape, dtype) as run:
        resident = {t.untyped_storage()._cdata for t in (*run.params.values(), *run.buffers.values())}
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run.forward()
    return sum(t.untyped_storage().nbytes() for key, t in saved.items() if key not in resident)
