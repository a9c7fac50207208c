"""Capture a model's graph with torch.fx and propagate shapes on fake tensors.

The captured GraphModule shares the user's submodules and parameters (no copies), so every
gradient lands on the user's own ``nn.Parameter`` objects.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.node import map_arg

from bigpicture.engine.shapes import shortcut
from bigpicture.errors import TilingError


def capture(model: torch.nn.Module, stack_traces: bool = False) -> fx.GraphModule:
    """The model's graph. Source lines cost seconds to record, so errors re-trace to get them."""
    tracer = fx.Tracer()
    tracer.record_stack_traces = stack_traces
    if tracer.is_leaf_module(model, ""):  # a bare torch.nn layer: trace it as a call, not its insides
        model = torch.nn.Sequential(model)
    try:
        with functions_as_calls(_proxy_apply):
            graph = tracer.trace(model)
    except Exception as e:  # fx raises many kinds; each means the same to the user
        raise TilingError(
            f"could not capture {type(model).__name__} with torch.fx ({type(e).__name__}: {e}). Tracing "
            "fails on Python control flow that depends on tensor values; move such code out of forward, "
            "or mark the offending submodule as a leaf by wrapping it."
        ) from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["bigpicture_model"] = model
    return gm


class FunctionApply:
    """``cls.apply`` of a custom ``torch.autograd.Function``, kept as one call in the graph.

    torch.fx would trace through its forward and silently drop its custom backward. As a call it
    keeps both, and rules find it by the Function class: ``bp.register_pointwise(MyFunction)``.
    """

    def __init__(self, cls) -> None:
        self.cls = cls
        self.__name__, self.__module__ = cls.__name__, cls.__module__
        self.__qualname__ = cls.__qualname__

    def __call__(self, *args, **kwargs):
        return self.cls.apply(*args, **kwargs)

    def __eq__(self, other) -> bool:
        return other is self.cls or (isinstance(other, FunctionApply) and other.cls is self.cls)

    def __hash__(self) -> int:
        return hash(self.cls)

    def __repr__(self) -> str:
        return f"{self.cls.__qualname__}.apply"


def _proxy_apply(cls, c_apply, args, kwargs):
    flat = []
    fx.node.map_aggregate((args, kwargs), flat.append)
    proxy = next((a for a in flat if isinstance(a, fx.Proxy)), None)
    if proxy is None:
        return c_apply(*args, **kwargs)
    return proxy.tracer.create_proxy("call_function", FunctionApply(cls), args, kwargs)


@contextlib.contextmanager
def functions_as_calls(on_apply):
    """While capturing, ``on_apply(cls, c_apply, args, kwargs)`` applies every custom autograd.Function.

    ``Function.apply`` ends in ``super().apply``, which finds this hook on the class between it
    and the C implementation, however the user got hold of ``apply`` (bound early, or not); the
    capture makes the call one graph node (``FunctionApply``) when a captured value goes in.
    """
    base = torch.autograd.function._SingleLevelFunction
    c_apply = torch._C._FunctionBase.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        return on_apply(cls, c_apply.__get__(None, cls), args, kwargs)

    base.apply = classmethod(apply)
    try:
        yield
    finally:
        del base.apply


def fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def call(gm: fx.GraphModule, node: fx.Node, args, kwargs):
    """Run one node on resolved arguments, exactly as the module's own forward would."""
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        return fetch_attr(gm, node.target)
    raise AssertionError(node.op)


def resolve(node: fx.Node, env: dict):
    return map_arg(node.args, env.__getitem__), map_arg(node.kwargs, env.__getitem__)


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """``node `name` (op) at file:line`` for error messages."""
    where = f"node `{node.name}` ({op_name(gm, node)}"
    if node.op == "call_module":
        where += f" `{node.target}`"
    if "bigpicture_origin" in node.meta:  # a node that replaced one the user wrote
        where += f", from {node.meta['bigpicture_origin']}"
    trace = (node.stack_trace or _stack_trace(gm, node.name) or "").strip().splitlines()
    files = [line.strip() for line in trace if line.strip().startswith("File ") and not _internal(line)]
    if files:
        where += ", " + files[-1].replace("File ", "", 1)
    return where + ")"


_PACKAGE = str(Path(__file__).resolve().parents[1])  # frames in bigpicture or torch are not the user's line


def _internal(line: str) -> bool:
    return "/torch/" in line or _PACKAGE in line


def _stack_trace(gm: fx.GraphModule, name: str) -> str | None:
    model = gm.meta.get("bigpicture_model")
    if model is None or gm.meta.get("bigpicture_capture") == "recorded":  # recorded with its lines
        return None
    if "bigpicture_traces" not in gm.meta:
        traced = capture(model, stack_traces=True)
        gm.meta["bigpicture_traces"] = {n.name: n.stack_trace for n in traced.graph.nodes}
    return gm.meta["bigpicture_traces"].get(name)


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", str(target))
    prefix = {"torch.nn.functional": "F.", "_operator": "operator.", "torch": "torch."}.get(module, "")
    return prefix + name


def propagate(gm: fx.GraphModule, inputs: list) -> dict[fx.Node, object]:
    """Every node's value on fake tensors: shapes and dtypes, with nothing of the input allocated.

    ``inputs`` holds, per placeholder, a (shape, dtype, device) triple for tensors or the value.
    """
    quiet_fake_tensors()
    env: dict[fx.Node, object] = {}
    placeholders = iter(inputs)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = fake(next(placeholders, None))
            elif node.op == "output":
                env[node] = map_arg(node.args[0], env.__getitem__)
            else:
                args, kwargs = resolve(node, env)
                try:
                    env[node] = fast_call(gm, node, args, kwargs)
                except Exception as e:
                    raise shape_error(gm, node, e, inputs) from e
    return env


def fast_call(gm: fx.GraphModule, node: fx.Node, args, kwargs):
    """``call`` on fake tensors, by a shortcut for the layers networks repeat (``shapes.shortcut``)."""
    if node.op == "call_module":
        out = shortcut(gm.get_submodule(node.target), args, kwargs)
        if out is not None:
            return out
    return call(gm, node, args, kwargs)


def fake(value):
    """A placeholder's value: a (shape, dtype, device) triple becomes an empty (fake) tensor."""
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], torch.dtype):
        shape, dtype, device = value
        return torch.empty(shape, dtype=dtype, device=device)
    return value


def quiet_fake_tensors() -> None:
    """FakeTensor logs every failing op with a traceback; bigpicture's TilingError says it better."""
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)


def shape_error(gm, node, e, inputs) -> TilingError:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if any(s in text.lower() for s in ("too small", "output size", "kernel size can't be greater")):
        return TilingError(
            f"the input {tuple(inputs[0][0])} is smaller than the network's minimum: {describe(gm, node)} "
            f"fails with: {text}. Use a larger input (or pad it)."
        )
    return TilingError(
        f"{describe(gm, node)} fails on the input's shape {tuple(inputs[0][0])}: {text}. Check that the "
        "untiled model accepts this input (a larger input, or one of the sizes the model expects)."
    )
