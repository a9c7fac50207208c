"""What the commands share: the model from ``--model``/``--model-args``, the input size, dtypes."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import torch
from torch import nn

from bigpicture.errors import TilingError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "tf32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp64": torch.float64,
    "float64": torch.float64,
}


def load_model(spec: str, args: dict) -> nn.Module:
    """``monai:DenseNet121``, ``package.module:factory`` or ``path/to/file.py:factory``, called with args."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise TilingError(
            f"--model {spec!r}: write SOURCE:NAME, e.g. monai:DenseNet121 or path/to/file.py:factory."
        )
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise TilingError(f"--model {spec!r}: no file {path}.")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        package = {"monai": "monai.networks.nets", "torchvision": "torchvision.models", "timm": "timm"}.get(
            where, where
        )
        try:
            module = importlib.import_module(package)
        except ImportError as e:
            raise TilingError(f"--model {spec!r}: cannot import {package} ({e}).") from e
    if not hasattr(module, name):
        raise TilingError(f"--model {spec!r}: {module.__name__} has no {name!r}.")
    model = getattr(module, name)(**args)
    if not isinstance(model, nn.Module):
        raise TilingError(f"--model {spec!r} made a {type(model).__name__}, not a torch.nn.Module.")
    return model


def parse_args_text(text: str) -> dict:
    """``a=1,b=(2,3),c=batch`` -> {"a": 1, "b": (2, 3), "c": "batch"}: Python literals, else strings."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += ch in "([{" and 1 or (-1 if ch in ")]}" else 0)
        if ch == "," and depth == 0:
            if text[start:i].strip():
                items.append(text[start:i])
            start = i + 1
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise TilingError(f"--model-args: {item!r} is not NAME=VALUE.")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def parse_input(text: str, batch: int) -> tuple[int, ...]:
    """``3x100000x100000`` (channels x spatial) -> (batch, 3, 100000, 100000)."""
    try:
        dims = tuple(int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        dims = ()
    if len(dims) < 2 or min(dims) < 1:
        raise TilingError(
            f"--input {text!r}: write CHANNELSxSPATIAL..., e.g. 3x100000x100000 or 1x512x512x512."
        )
    return (batch, *dims)
