"""A captured graph is checked against the model before it is planned.

torch.fx can record the wrong branch of a model's ``if`` and still give a graph (it evaluates
``torch.jit.isinstance(proxy, torch.Tensor)`` as False); any capture can miss what the model's
Python does. So for the plan's inputs each candidate graph is compared with the model itself:

    probe   when the input is small and the model is in eval mode: a real random input through both,
            outputs compared (structure, shapes, dtypes, values)
    fake    otherwise: the graph's outputs on fake tensors against the model's own (structure,
            shapes, dtypes)

The first candidate that passes is used: torch.fx's graph (shape-generic), else the graph recorded
from the model's own run on fake tensors (``record``). When none does, the error says the capture
is at fault, never the input.
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.utils._pytree import tree_structure

from bigpicture.engine import capture as g
from bigpicture.engine.record import RecordingError, record
from bigpicture.errors import TilingError

PROBE_ELEMENTS = 2**18  # a real probe runs when every input has at most this many elements
REDUCED_SIDE = 32  # else torch.fx's graph is probed on an input of at most this side, if the model takes it


def checked_capture(model: torch.nn.Module, inputs: list) -> fx.GraphModule:
    """The model's graph for ``inputs`` (as ``capture.propagate`` takes them), checked against it.

    The model's buffers are as they were before: running the model to record or probe it must not
    count as a step (train-mode BatchNorm would update its running statistics)."""
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        return _checked_capture(model, inputs)
    finally:
        with torch.no_grad():
            for b, value in saved:
                if not torch.equal(b, value):  # untouched buffers keep their version (autograd checks it)
                    b.copy_(value)


def _checked_capture(model: torch.nn.Module, inputs: list) -> fx.GraphModule:
    problems = []
    try:
        traced = g.capture(model)
    except TilingError as e:
        traced, problems = None, [f"torch.fx cannot trace it ({_first_line(e)})"]
    # A small input in eval mode runs for real: faster than fake tensors, and it compares values.
    real = None if any(m.training for m in model.modules()) else probe_inputs(inputs)
    model_error = None  # the model's own run failing on fake tensors (data-dependent Python, a bad input)
    try:
        recorded, expected = record(model, inputs, real)
    except RecordingError as e:
        recorded, expected = None, None
        problems.append(f"recording its run met {e}")
    except TilingError as e:
        recorded, expected, model_error = None, None, e
    for name, gm in (("torch.fx", traced), ("the recorded run", recorded)):
        if gm is None:
            continue
        problem = mismatch(gm, inputs, expected, real)
        if problem is None and real is None and gm is traced:  # only shapes compared: values too
            problem = _reduced_probe(gm, model, inputs)
        if problem is None:
            gm.meta["bigpicture_checks"] = problems
            # the model's own containers (OrderedDict, namedtuple), which graphs hold as dict and tuple
            gm.meta["bigpicture_output"] = None if expected is None else tree_structure(expected)
            return gm
        problems.append(f"{name}'s graph {problem}")
    if model_error is not None and traced is not None:
        # the model's own Python cannot run on fake tensors (e.g. train-mode BatchNorm with momentum=None
        # reads num_batches_tracked): nothing to compare with, so torch.fx's graph is taken unchecked
        unchecked = f"unchecked: the model fails on fake tensors ({model_error})"
        traced.meta["bigpicture_checks"] = [*problems, unchecked]
        return traced
    if model_error is not None:
        raise model_error
    raise TilingError(
        f"could not capture {type(model).__name__} faithfully; the capture is at fault, not the input: "
        + "; ".join(problems)
        + ". Please report this with the model; meanwhile, wrapping the offending submodule's code so "
        "that it depends on shapes only may help."
    )


def mismatch(gm: fx.GraphModule, inputs: list, expected, real: list | None) -> str | None:
    """Why ``gm`` is not the model whose outputs were ``expected``, or None.

    With ``real`` inputs (the ones ``expected`` came from) the values are compared; else the
    structure, shapes and dtypes on fake tensors."""
    if real is None:
        try:
            values = g.propagate(gm, inputs)
        except TilingError as e:
            return f"fails where the model does not: {_first_line(e)}"
        got = values[next(n for n in gm.graph.nodes if n.op == "output")]
        problem = expected is not None and _differs(got, expected, "output")
        return f"computes {problem} on fake tensors" if problem else None
    with torch.no_grad():
        try:
            got = interpret(gm, real)
        except _NodeFailed as e:
            return f"fails where the model does not: {e}"
    return _values_differ(gm, got, expected)


def _values_differ(gm: fx.GraphModule, got, expected) -> str | None:
    problem = _differs(got, expected, "output")
    if problem:
        return f"computes {problem}"
    outputs = [n for n in _tensors(next(n for n in gm.graph.nodes if n.op == "output").args[0], fx.Node)]
    for k, (a, b) in enumerate(zip(_tensors(got), _tensors(expected))):
        if not (torch.allclose(a, b, equal_nan=True) if a.is_floating_point() else torch.equal(a, b)):
            where = g.describe(gm, outputs[k]) if k < len(outputs) else f"output tensor {k}"
            return f"computes other values than the model on a real input: {where}"
    return None


def _reduced_probe(gm: fx.GraphModule, model, inputs: list) -> str | None:
    """A shape-generic graph (torch.fx's) against the model on a small real input of the same
    kind, when the plan's input is too large to run for real and the model accepts the small one."""
    if any(m.training for m in model.modules()):
        return None
    real = probe_inputs([_shrunk(v) if _spec(v) else v for v in inputs])
    if real is None:
        return None
    with torch.no_grad():
        try:
            expected = model(*real)
        except Exception:  # the model does not take the small input: nothing to compare
            return None
        try:
            got = interpret(gm, real)
        except _NodeFailed as e:
            return f"fails where the model does not: {e}"
    return _values_differ(gm, got, expected)


def _shrunk(v):
    shape, dtype, device = v
    return shape[:2] + tuple(min(n, REDUCED_SIDE) for n in shape[2:]), dtype, device


def _spec(v) -> bool:
    return isinstance(v, tuple) and len(v) == 3 and isinstance(v[1], torch.dtype)


def _differs(got, expected, where: str) -> str | None:
    """The first difference in structure, shape or dtype between two outputs, or None."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"a {type(got).__name__} at {where} where the model gives a tensor"
        if got.shape != expected.shape or got.dtype != expected.dtype:
            return (f"{where} of shape {tuple(got.shape)} {got.dtype} where the model gives "
                    f"{tuple(expected.shape)} {expected.dtype}")  # fmt: skip
        return None
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"{_kind(got)} at {where} where the model gives {_kind(expected)}"
        items = zip(range(len(expected)), got, expected)
        return next((d for k, a, b in items if (d := _differs(a, b, f"{where}[{k}]"))), None)
    if isinstance(expected, dict):
        if not isinstance(got, dict) or list(got) != list(expected):
            return f"{_kind(got)} at {where} where the model gives {_kind(expected)}"
        return next((d for k in expected if (d := _differs(got[k], expected[k], f"{where}[{k!r}]"))), None)
    return None if got == expected else f"{got!r} at {where} where the model gives {expected!r}"


def _kind(value) -> str:
    if isinstance(value, (tuple, list, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def probe_inputs(inputs: list) -> list | None:
    """Real random inputs like ``inputs``, when they are small enough to run; else None."""
    out, generator = [], torch.Generator().manual_seed(0)
    for v in inputs:
        if _spec(v):
            shape, dtype, device = v
            if math.prod(shape) > PROBE_ELEMENTS:
                return None
            if dtype.is_floating_point:
                v = torch.randn(shape, dtype=dtype, generator=generator).to(device)
            else:
                v = torch.zeros(shape, dtype=dtype, device=device)
        out.append(v)
    return out


class _NodeFailed(Exception):
    """A node of a captured graph raised on inputs the model accepts."""


def interpret(gm: fx.GraphModule, args: list):
    """The graph's outputs for real ``args``, node by node as the tile interpreter calls them."""
    env, placeholders = {}, iter(args)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders, None)
        elif node.op == "output":
            return fx.node.map_arg(node.args[0], env.__getitem__)
        else:
            try:
                env[node] = g.call(gm, node, *g.resolve(node, env))
            except Exception as e:
                raise _NodeFailed(f"{g.describe(gm, node)}: {_first_line(e)}") from e
    raise AssertionError("graph without output")


def _tensors(value, kind=torch.Tensor) -> list:
    found = []
    fx.node.map_aggregate(value, lambda v: found.append(v) if isinstance(v, kind) else None)
    return found


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
