"""Capture by running the model once on fake tensors and recording its torch-level calls.

torch.fx evaluates the model's Python on proxies, which are not tensors: it cannot iterate over
them, ask for their shape as numbers or take ``torch.jit.isinstance(x, torch.Tensor)`` as true.
Here the model's own Python runs on fake tensors of the plan's input shape (nothing allocated), so
every branch is the one the untiled model takes, and a ``TorchFunctionMode`` records each torch
function, Tensor method and operator applied to a tensor: the same IR torch.fx gives (F.* and
torch.* functions, Tensor methods, ``operator`` functions, ``call_module`` on the user's own
torch.nn layers), so the rules need nothing new. The graph is specialised to this input shape:
shape arithmetic is done, and the numbers are in the graph.

    model(x_fake) --TorchFunctionMode, Module.__call__, Function.apply--> fx.Graph

Parameters and buffers are ``get_attr`` nodes on the user's own objects; a custom
``autograd.Function`` is one call (its own backward is kept), as in ``capture.capture``.
"""

from __future__ import annotations

import contextlib
import enum
import operator
import sys

import torch
from torch import fx
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.overrides import TorchFunctionMode

from bigpicture.engine import capture as g
from bigpicture.errors import TilingError

_OPERATORS = {
    "__getitem__": operator.getitem, "__add__": operator.add,
    "__iadd__": operator.iadd, "__sub__": operator.sub, "__isub__": operator.isub, "__mul__": operator.mul,
    "__imul__": operator.imul, "__truediv__": operator.truediv, "__itruediv__": operator.itruediv,
    "__floordiv__": operator.floordiv, "__mod__": operator.mod, "__pow__": operator.pow,
    "__matmul__": operator.matmul, "__neg__": operator.neg, "__pos__": operator.pos, "__abs__": operator.abs,
    "__invert__": operator.invert, "__and__": operator.and_, "__or__": operator.or_, "__xor__": operator.xor,
    "__lt__": operator.lt, "__le__": operator.le, "__gt__": operator.gt, "__ge__": operator.ge,
    "__eq__": operator.eq, "__ne__": operator.ne,
}  # fmt: skip
_REFLECTED = {
    "__radd__": operator.add, "__rsub__": operator.sub, "__rmul__": operator.mul,
    "__rtruediv__": operator.truediv, "__rdiv__": operator.truediv, "__rfloordiv__": operator.floordiv,
    "__rpow__": operator.pow, "__rmatmul__": operator.matmul, "__rmod__": operator.mod,
    "__rand__": operator.and_, "__ror__": operator.or_, "__rxor__": operator.xor,
}  # fmt: skip
# Calls that turn a tensor into a Python value: the model branches on (or computes with) tensor values.
_VALUE = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy", "__array__"}
# Calls that return their tensor itself when it already has the asked dtype, device and layout.
_SAME = {"as_tensor", "asarray", "to", "type", "type_as", "contiguous", "float", "double", "half", "cpu"}
_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException)


class Recording:
    """The graph being recorded: which node computed each live tensor of the run."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.graph = model, fx.Graph()
        self.nodes: dict[int, fx.Node] = {}  # id(tensor) -> the node that computed it
        self.alive: list = []  # the recorded tensors, kept so that their ids stay theirs
        self.attrs = {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}
        self.modules = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.root: dict = {}  # get_attr and call_module targets -> the user's objects
        self.depth = 0  # > 0 inside a recorded call: its insides are not recorded
        self.failed: fx.Node | None = None  # the call in which the model raised
        self.derived: set[fx.Node] = set()  # nodes whose values depend on the inputs

    def bind(self, value, node: fx.Node, user_line: str) -> None:
        """Remember that ``value`` (a tensor, or a tuple/list/dict of them) is ``node``'s."""
        node.stack_trace = user_line
        if node.op == "placeholder" or any(i in self.derived for i in node.all_input_nodes):
            self.derived.add(node)
        if isinstance(value, torch.Tensor):
            self.nodes[id(value)] = node
            self.alive.append(value)
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                if _has_tensor(item):
                    self.bind(item, self.graph.call_function(operator.getitem, (node, i)), user_line)
        elif isinstance(value, dict):
            for key, item in value.items():
                if _has_tensor(item):
                    self.bind(item, self.graph.call_function(operator.getitem, (node, key)), user_line)

    def arg(self, value):
        """A call's argument as a graph argument: tensors become the nodes that computed them."""
        if isinstance(value, torch.Tensor):
            return self._tensor(value)
        if isinstance(value, torch.Size):
            return tuple(value)
        if isinstance(value, (tuple, list)):
            return type(value)(self.arg(v) for v in value) if type(value) in (tuple, list) else tuple(
                self.arg(v) for v in value
            )
        if isinstance(value, dict):
            return {k: self.arg(v) for k, v in value.items()}
        if isinstance(value, enum.Enum) and isinstance(value, str):  # MONAI's string enums
            return value.value
        return value

    def _tensor(self, t: torch.Tensor) -> fx.Node:
        if id(t) in self.nodes:
            return self.nodes[id(t)]
        name = self.attrs.get(id(t))
        if name is None and not isinstance(t, FakeTensor):  # a constant tensor of the model's code
            name = f"_bigpicture_constant{len(self.root)}"
        if name is None:
            raise _Unrecorded(f"a tensor of shape {tuple(t.shape)} that no recorded call computed")
        self.root[name] = t
        node = self.nodes[id(t)] = self.graph.get_attr(name)
        self.alive.append(t)
        return node

    def fail(self, node: fx.Node, user_line: str) -> None:
        """The model raised in ``node``'s call (the innermost recorded one is kept)."""
        node.stack_trace = user_line
        self.failed = self.failed or node

    @contextlib.contextmanager
    def failing(self, node: fx.Node, user_line: str):
        try:
            yield
        except (TilingError, _Unrecorded):
            raise
        except Exception:
            self.fail(node, user_line)
            raise

    def tracks(self, args, kwargs) -> bool:
        found = []
        fx.node.map_aggregate((args, kwargs), lambda v: found.append(id(v) in self.nodes))
        return any(found)


class _Unrecorded(Exception):
    """The recording met a value it cannot place in the graph."""


class _Mode(TorchFunctionMode):
    def __init__(self, rec: Recording) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec, name = self.rec, getattr(func, "__name__", "")
        if rec.depth or name == "__get__" and not _returns_tensor_attr(func):
            return func(*args, **kwargs)
        if name in _VALUE and rec.nodes.get(id(args[0])) in rec.derived:
            raise _data_dependent(f"Tensor.{name}")
        try:
            out = func(*args, **kwargs)
        except _DATA_DEPENDENT as e:
            raise _data_dependent(getattr(func, "__qualname__", name)) from e
        except Exception:
            if rec.tracks(args, kwargs):  # the model fails here: name this call in the error
                rec.fail(self._node(func, name, args, kwargs), _user_line())
            raise
        if name == "__setitem__":  # recorded as a copy: a later use sees the new values in any graph
            func, name, out = assign, "assign", args[0]
        if not _has_tensor(out):
            return out
        if name in _SAME and out is args[0]:  # torch.as_tensor(x), x.to(x.dtype): x itself, no node
            return out
        node = self._node(func, name, args, kwargs)
        rec.bind(out, node, _user_line())
        return out

    def _node(self, func, name, args, kwargs) -> fx.Node:
        graph, arg = self.rec.graph, self.rec.arg
        if name == "__get__":  # a tensor-valued attribute (x.T, x.mT): fx records getattr too
            return graph.call_function(getattr, (arg(args[0]), func.__self__.__name__))
        if _is_method(func):
            if name in _OPERATORS:
                return graph.call_function(_OPERATORS[name], arg(tuple(args)), arg(kwargs))
            if name in _REFLECTED:
                return graph.call_function(_REFLECTED[name], (arg(args[1]), arg(args[0])))
            return graph.call_method(name, arg(tuple(args)), arg(kwargs))
        return graph.call_function(func, arg(tuple(args)), arg(kwargs))


def assign(tensor: torch.Tensor, index, value) -> torch.Tensor:
    """``tensor[index] = value`` without changing ``tensor``: a new tensor with the assignment."""
    out = tensor.clone()
    out[index] = value
    return out


def _returns_tensor_attr(getter) -> bool:
    return getattr(getter.__self__, "__name__", "") in ("T", "mT", "H", "mH", "real", "imag", "data", "grad")


def _is_method(func) -> bool:
    return getattr(func, "__qualname__", "").split(".")[0] in ("Tensor", "TensorBase")


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _user_line() -> str:
    """``File "...", line n, in f`` of the innermost frame outside torch and bigpicture."""
    frame = sys._getframe(1)
    while frame is not None and g._internal(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return ""
    return f'File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}'


def _data_dependent(what: str) -> TilingError:
    line = _user_line().replace("File ", "", 1) or "the model's forward"
    return TilingError(
        f"the model's Python code at {line} depends on the values of a tensor computed from the input "
        f"({what}): control flow or sizes decided by tensor values. bigpicture fixes the graph before "
        "the first tile runs, so the branch must follow from shapes alone; move that decision out of "
        "forward (an argument or an attribute), or compute it after the tiled part."
    )


@contextlib.contextmanager
def _layers_as_calls(rec: Recording):
    """The user's torch.nn layers (the modules torch.fx keeps as leaves) become ``call_module`` nodes."""
    original, is_leaf = torch.nn.Module.__call__, fx.Tracer().is_leaf_module

    def call(module, *args, **kwargs):
        name = rec.modules.get(id(module))
        if rec.depth or name is None or not is_leaf(module, name) or not rec.tracks(args, kwargs):
            return original(module, *args, **kwargs)
        rec.root[name] = module
        node = rec.graph.call_module(name, rec.arg(args), rec.arg(kwargs))
        with _inside(rec), rec.failing(node, _user_line()):
            out = original(module, *args, **kwargs)
        rec.bind(out, node, _user_line())
        return out

    torch.nn.Module.__call__ = call
    try:
        yield
    finally:
        torch.nn.Module.__call__ = original


@contextlib.contextmanager
def _inside(rec: Recording):
    rec.depth += 1
    try:
        yield
    finally:
        rec.depth -= 1


def _on_apply(rec: Recording):
    """A custom autograd.Function applied to a recorded tensor is one call: its backward is kept."""

    def apply(cls, c_apply, args, kwargs):
        if rec.depth or not rec.tracks(args, kwargs):
            return c_apply(*args, **kwargs)
        node = rec.graph.call_function(g.FunctionApply(cls), rec.arg(args), rec.arg(kwargs))
        with _inside(rec), rec.failing(node, _user_line()):
            out = c_apply(*args, **kwargs)
        rec.bind(out, node, _user_line())
        return out

    return apply


def record(model: torch.nn.Module, inputs: list, real: list | None = None) -> tuple[fx.GraphModule, object]:
    """The model's graph for these inputs, and the model's own output.

    ``inputs`` as ``capture.propagate`` takes them; the model runs on fake tensors of them, or on
    ``real`` ones (small, eval mode: faster than fake ones, and the output is a real probe).
    Raises ``TilingError`` for control flow on tensor values (naming the line) and for a model that
    fails on these inputs (naming the call); ``RecordingError`` where the recording cannot follow.
    """
    if fx.Tracer().is_leaf_module(model, ""):
        model = torch.nn.Sequential(model)
    rec = Recording(model)
    g.quiet_fake_tensors()
    fake = FakeTensorMode(allow_non_fake_inputs=True) if real is None else contextlib.nullcontext()
    with fake, torch.no_grad() if real is not None else contextlib.nullcontext():
        values = [g.fake(v) for v in inputs] if real is None else list(real)
        for k, v in enumerate(values):
            placeholder = rec.graph.placeholder("x" if k == 0 else f"arg{k}")
            if isinstance(v, torch.Tensor):
                rec.bind(v, placeholder, "")
        try:
            with _Mode(rec), _layers_as_calls(rec), g.functions_as_calls(_on_apply(rec)):
                out = model(*values)
            rec.graph.output(rec.arg(out))
        except (TilingError, _Unrecorded):
            raise
        except Exception as e:
            raise _model_fails(rec, inputs, e) from e
    gm = fx.GraphModule(rec.root, rec.graph, type(model).__name__)
    gm.meta["bigpicture_model"] = model
    gm.meta["bigpicture_capture"] = "recorded"
    return gm, out


RecordingError = _Unrecorded


def _model_fails(rec: Recording, inputs, e: Exception) -> TilingError:
    """The untiled model itself fails on these inputs: name the call, as for a wrong input shape."""
    if rec.failed is None:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        frames = [(f, n) for f, n in _frames(e.__traceback__) if not g._internal(f.f_code.co_filename)]
        where = f" at {frames[-1][0].f_code.co_filename}:{frames[-1][1]}" if frames else ""
        return TilingError(
            f"the untiled {type(rec.model).__name__} itself fails on these inputs{where}: "
            f"{type(e).__name__}: {text}. Use an input the model accepts."
        )
    rec.graph.output(None)
    gm = fx.GraphModule(rec.root, rec.graph, type(rec.model).__name__)
    gm.meta["bigpicture_capture"] = "recorded"
    return g.shape_error(gm, rec.failed, e, inputs)


def _frames(tb):
    while tb is not None:
        yield tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next
