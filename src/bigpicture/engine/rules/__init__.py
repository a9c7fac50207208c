"""Per-op rules: which input box an output box needs, and how to compute that output box.

One rule per op, registered by decorator on the module classes, functions and method names
it covers. A rule is ``fn(node, ctx) -> Op``; the ``Op`` it returns is bound to one node of
one plan. Window ops (convolution, pooling) map output rows [a, b) to input rows

    [a*s - p, (b-1)*s - p + d*(k-1) + 1)

and read the part outside the image as the op's own padding (see ``padding.read``), so a tile
computes exactly the untiled values of its box. Registering a rule for your own op::

    import bigpicture as bp
    bp.register_pointwise(MyActivation)            # acts on each position alone

    @bp.rules.rule(MyConv)                          # anything else: an Op subclass
    def my_conv(node, ctx):
        return MyConvOp(node, ctx)
"""

from __future__ import annotations

from fractions import Fraction

from torch.fx.node import map_aggregate

from bigpicture.engine.box import Box
from bigpicture.engine.padding import Value, read, source_box
from bigpicture.errors import TilingError

_RULES: dict[object, object] = {}


def rule(*keys):
    """Register ``fn(node, ctx) -> Op`` for module classes, functions or method names ("relu")."""

    def register(fn):
        for key in keys:
            _RULES[key] = fn
        return fn

    return register


def register_pointwise(*keys) -> None:
    """Declare ops that compute each spatial position from the same position of their inputs."""
    rule(*keys)(Pointwise)


def lookup(node, ctx) -> Op:
    fn = None
    if node.op == "call_module":
        for cls in type(ctx.module(node)).__mro__:
            if cls in _RULES:
                fn = _RULES[cls]
                break
    elif node.op == "call_method":
        fn = _RULES.get(node.target)
    else:
        fn = _RULES.get(node.target)
        if fn is None and isinstance(node.target, type) and issubclass(node.target, tuple):
            fn = _RULES[tuple]  # a namedtuple class, as torch.fx records building one
    if fn is None:
        name = ctx.op_name(node)
        raise TilingError(
            f"{ctx.where(node)}: no rule for {name}, so bigpicture cannot tell which input region each "
            f"output region needs. If {name} acts on each spatial position alone, declare it with "
            f"`bp.register_pointwise({name})`; otherwise register a rule with `@bp.rules.rule({name})` "
            "(see the bigpicture.engine.rules docstring)."
        )
    return fn(node, ctx)


class Op:
    """A node's rule, bound to the node and the shapes of one plan. Default: pointwise."""

    kind = "local"  # local | reduce | boundary

    def __init__(self, node, ctx) -> None:
        self.node = node
        self.name = ctx.op_name(node)
        self.call = ctx.callable(node)
        self.inputs = ctx.spatial_inputs(node)
        self.in_extents = [ctx.extent(i) for i in self.inputs]
        self.extent = ctx.extent(node) if self.kind == "local" else None
        self.nd = ctx.nd

    @property
    def stride(self) -> tuple[Fraction, ...]:
        """Input pixels per output pixel, per spatial dimension."""
        return (Fraction(1),) * self.nd

    def needs(self, out: Box) -> list[Box]:
        return [out.clip(e) for e in self.in_extents]

    def run(self, out: Box, args, kwargs):
        return self.call(map_aggregate(args, self._crop(out)), map_aggregate(kwargs, self._crop(out)))

    def _crop(self, out: Box):
        def crop(v):
            if not isinstance(v, Value):
                return v
            if isinstance(v.tensor, (tuple, list)):  # the items of a channel split
                return type(v.tensor)(read(Value(t, v.box), out, self.extent) for t in v.tensor)
            return read(v, out, self.extent)

        return crop

    def flops(self, out: Box, channels: int) -> int:
        return out.numel * channels


class Pointwise(Op):
    pass


class Window(Op):
    """Convolution-like: kernel k, stride s, dilation d, padding lo per dimension."""

    kernel: tuple[int, ...]
    step: tuple[int, ...]
    dilation: tuple[int, ...]
    pad_lo: tuple[int, ...]
    mode = "constant"

    @property
    def stride(self):
        return tuple(Fraction(s) for s in self.step)

    def padded_box(self, out: Box) -> Box:
        """The input box the output box reads, in image coordinates, padding included."""
        return Box.from_dims(
            (a * s - p, (b - 1) * s - p + d * (k - 1) + 1)
            for a, b, s, p, d, k in zip(out.lo, out.hi, self.step, self.pad_lo, self.dilation, self.kernel)
        )

    def needs(self, out):
        return [source_box(self.padded_box(out), self.in_extents[0], self.mode)]

    def read(self, out, value, fill=0.0):
        return read(value, self.padded_box(out), self.in_extents[0], self.mode, fill)

    def pads_natively(self, cpu: bool) -> bool:
        """Whether the op pads the image border with its own ``padding=`` instead of reading a padded
        copy (``window.NativePadding``) when it runs on a CPU (``cpu``) or not: the engine asks with
        its input's device, the performance model with the device it predicts."""
        return False


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _bind(node, ctx, names, defaults):
    """Non-tensor arguments of a functional call, by name (weights are read when the tile runs)."""
    bound = _bind_values(node.args, node.kwargs, names, defaults)
    return {k: v for k, v in bound.items() if k not in ("weight", "bias")}


def _same_padding(kernel, dilation):
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    return tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)


def _replaces(gm, old, new) -> None:
    """``new`` (made at capture to replace ``old``) names the user's line of ``old`` in errors."""
    from bigpicture.engine.capture import _stack_trace

    new.meta["stack_trace"] = old.stack_trace or _stack_trace(gm, old.name)


def _bind_values(args, kwargs, names, defaults):
    """Arguments after the input, by name, with the function's defaults filled in."""
    bound = dict(defaults)
    bound.update(zip(names, args[1:]))
    bound.update(kwargs)
    return bound


from bigpicture.engine.rules import (  # noqa: E402, F401, I001  (registers the rules)
    attention_pool,
    pointwise,
    reduce,
    resample,
    shuffle,
    stacked,
    stats,
    unpool,
    window,
)
from bigpicture.engine.rules import channels as channel_ops  # noqa: E402, F401
