"""``bp.from_onnx``: a model from another framework (exported to ONNX) as an ``nn.Module``.

    module = bp.from_onnx("model.onnx")        # or an onnx.ModelProto
    net = bp.tiled(module, tile=1024)          # exactly like a native PyTorch model

onnx2torch converts the ONNX graph into a ``torch.fx.GraphModule`` of torch layers (``nn.Conv2d``,
``nn.BatchNorm2d``, ...) and small modules of its own. Most of those trace as they are; a few read
their constant inputs as Python values at run time (``Resize`` reads its scales with
``tensor.tolist()``), which a trace cannot do. Those are lowered here, once, into the torch call
they make with the constants filled in (``F.interpolate(x, scale_factor=2.0, mode="nearest")``),
so every op reaches the engine as an op it has a rule for. Graphs older than opset 10 are first
upgraded by ONNX's version converter (``Upsample`` becomes ``Resize``). onnx and onnx2torch are
optional extras (``pip install onnx onnx2torch``; onnx2torch's NMS and RoIAlign converters want
torchvision, which nothing here needs: without it those two ops are unavailable).
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from bigpicture.errors import TilingError

OPSET = 13  # graphs below opset 10 (Upsample) are upgraded to this one before conversion
# onnx2torch module class name -> rule(gm, node, module) -> the torch call (fn, args, kwargs)
LOWERINGS: dict[str, Callable] = {}


def lowering(*names: str):
    """Register how to lower onnx2torch modules of these class names into a plain torch call."""

    def register(fn):
        LOWERINGS.update(dict.fromkeys(names, fn))
        return fn

    return register


def from_onnx(model) -> nn.Module:
    """The ONNX model (a path or an ``onnx.ModelProto``) as an ``nn.Module`` that ``bp.tiled`` runs.

    The result is a ``torch.fx.GraphModule`` in eval mode whose parameters are the ONNX initializers
    (trainable, e.g. for fine-tuning with BatchNorm frozen by ``bp.freeze_batchnorm``). Ops that
    onnx2torch cannot convert raise its own error.
    """
    onnx, onnx2torch = _imports()
    proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    if _opset(proto) < 10:
        proto = onnx.version_converter.convert_version(proto, OPSET)
    gm = onnx2torch.convert(proto)
    lower(gm)
    return gm.eval()  # an ONNX graph is an inference graph: BatchNormalization uses its running statistics


def lower(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace, in place, the onnx2torch modules that do not trace by the torch calls they make."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        rule = LOWERINGS.get(type(module).__name__)
        if rule is None:
            continue
        fn, args, kwargs = rule(gm, node, module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(fn, args, kwargs)
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


@lowering("OnnxResize", "OnnxResizeV10")
def _resize(gm: fx.GraphModule, node: fx.Node, module: nn.Module):
    """``F.interpolate`` with the scales or sizes the ONNX graph holds as constants."""
    inputs = dict(zip(("input_tensor", "roi", "scales", "sizes"), node.args)) | dict(node.kwargs)
    if type(module).__name__ == "OnnxResizeV10":  # Resize-10: (input, scales), the rest as Resize
        inputs = {"input_tensor": node.args[0], "scales": inputs.get("roi", inputs.get("scales"))}
        module = module._resize
    scales, sizes = _constant(gm, inputs.get("scales")), _constant(gm, inputs.get("sizes"))
    roi = _constant(gm, inputs.get("roi"))
    if roi is not None and roi.numel() and not module.ignore_roi:
        raise TilingError(f"ONNX Resize `{node.name}` with a region of interest has no torch equivalent.")
    given = sizes if sizes is not None and sizes.numel() else scales
    if given is None or not given.numel():
        raise TilingError(
            f"ONNX Resize `{node.name}`: its scales or sizes are computed in the graph, not constants; "
            "bigpicture needs them fixed before the first tile (export the model with a fixed scale)."
        )
    values = given.tolist()
    if values[:2] != [1, 1] and (given is scales or not module.ignore_bs_ch_size):
        raise TilingError(f"ONNX Resize `{node.name}` resizes the batch or channel dimension ({values}).")
    nd = len(values) - 2
    mode = {"nearest": "nearest", "linear": ("linear", "bilinear", "trilinear")[nd - 1], "cubic": "bicubic"}
    size = [int(v) for v in values[2:]] if given is sizes else None
    factor = [float(v) for v in values[2:]] if given is scales else None
    kwargs = dict(
        size=size, scale_factor=factor, mode=mode[module.onnx_mode], align_corners=module.align_corners
    )
    return F.interpolate, (inputs["input_tensor"],), kwargs


def _constant(gm: fx.GraphModule, arg) -> torch.Tensor | None:
    """The value of a constant input (an initializer or a Constant node), else None."""
    if arg is None or isinstance(arg, torch.Tensor):
        return arg
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = gm
        for part in arg.target.split("."):
            value = getattr(value, part)
        return value
    if isinstance(arg, fx.Node) and arg.op == "call_module":
        module = gm.get_submodule(arg.target)
        if type(module).__name__ == "OnnxConstant" and not arg.args:
            return torch.as_tensor(module())
    return None


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), OPSET)


def _imports():
    try:
        import onnx
    except ImportError as e:
        raise ImportError("bp.from_onnx needs onnx and onnx2torch: pip install onnx onnx2torch") from e
    try:
        import onnx2torch
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise ImportError("bp.from_onnx needs onnx2torch: pip install onnx2torch") from e
        with _torchvision_stand_in():
            import onnx2torch
    return onnx, onnx2torch


@contextlib.contextmanager
def _torchvision_stand_in():
    """A torchvision that only its NMS and RoIAlign converters would call, while onnx2torch imports.

    onnx2torch imports torchvision for those two converters alone; where torchvision is missing
    (or does not import), the stand-in lets the rest load and is removed again at once, so no other
    library mistakes it for the real one. Using either op then fails with a clear message."""

    def missing(*args, **kwargs):
        raise ImportError("this ONNX op (NMS or RoiAlign) needs torchvision: pip install torchvision")

    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    tv.ops, ops.roi_align, ops.nms, ops.box_convert = ops, missing, missing, missing
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.ops")}
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
