"""Distributed inference into one zarr store (``net.run(src, out=...)`` with a group): every rank
writes its own tiles and keeps its own record; a rank killed with SIGKILL and the job restarted
gives a store identical, bit for bit, to an uninterrupted run."""

from __future__ import annotations

import importlib.util
import os
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist
from distributed_launch import launch
from helpers import _compare
from test_distributed import CASES

import bigpicture as bp
from bigpicture.io import sinks

pytest.importorskip("zarr")

RESUME = {  # name: (case, input shape, marks rank 1 makes before it is killed)
    "unet": ("unet", (1, 2, 32, 32), 3),
    "groupnorm": ("groupnorm", (1, 2, 24, 24), 6),
}


def infer(rank: int, world: int, name: str, path: str, kill_after: int, resumed: bool) -> None:
    case, shape, _ = RESUME[name]
    make, _, tile, multipass = CASES[case]
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    if kill_after and rank == world - 1:
        _kill_after(kill_after)
    net = bp.tiled(model, tile=tile, multipass=multipass, group=dist.group.WORLD)
    result = net.run(x, out=path)
    with torch.no_grad():
        expected = model(x)
    got = [
        torch.from_numpy(np.asarray(r[:])) if not isinstance(r, torch.Tensor) else r for r in _items(result)
    ]
    _compare(got, list(_items(expected)), f"{name} output")
    torch.save(got, f"{path}.rank{rank}.pt")
    if resumed and rank == world - 1:
        assert net.report.resumed > 0, net.report


def _items(value):
    return value if isinstance(value, (tuple, list)) else (value,)


def _kill_after(marks: int) -> None:
    """SIGKILL this process once it has recorded ``marks`` finished tiles."""
    mark, count = sinks._Record.mark_done, [0]

    def mark_then_die(self, index, state=None):
        mark(self, index, state)
        count[0] += 1
        if count[0] == marks:
            os.kill(os.getpid(), signal.SIGKILL)

    sinks._Record.mark_done = mark_then_die


@pytest.mark.parametrize("name", ["unet", pytest.param("groupnorm", marks=pytest.mark.slow)])
def test_resume_after_sigkill_of_one_rank_is_identical(tmp_path, name):
    whole, killed = str(tmp_path / "whole.zarr"), str(tmp_path / "killed.zarr")
    launch(infer, 2, name, whole, 0, False)
    with pytest.raises(Exception, match="signal|SIGKILL|exited"):
        launch(infer, 2, name, killed, RESUME[name][2], False)
    assert not os.path.exists(f"{killed}.rank1.pt")  # the killed run did not finish
    launch(infer, 2, name, killed, 0, True)
    for rank in range(2):
        a, b = torch.load(f"{whole}.rank{rank}.pt"), torch.load(f"{killed}.rank{rank}.pt")
        assert all(torch.equal(u, v) for u, v in zip(a, b)), rank
    zarr = pytest.importorskip("zarr")
    a, b = zarr.open(whole, mode="r"), zarr.open(killed, mode="r")
    if hasattr(a, "array_keys"):
        assert sorted(a.array_keys()) == sorted(b.array_keys())
        pairs = [(a[k], b[k]) for k in a.array_keys()]
    else:
        pairs = [(a, b)]
    for u, v in pairs:
        assert np.array_equal(np.asarray(u[:]), np.asarray(v[:]))


MODEL_FILE = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2, padding=1))
"""


@pytest.mark.slow
def test_torchrun_infer_cli(tmp_path):
    """``torchrun --nproc-per-node 2 -m bigpicture infer``: both ranks write one store, equal to the model's output."""
    import subprocess
    import sys

    from distributed_launch import free_port

    (tmp_path / "net.py").write_text(MODEL_FILE)
    x = np.random.default_rng(0).standard_normal((1, 2, 24, 20)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "bigpicture", "infer", str(tmp_path / "x.npy"),
               "--out", str(tmp_path / "y.zarr"), "--model", f"{tmp_path / 'net.py'}:make", "--tile", "8",
               "--device", "cpu", "--quiet"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    zarr = pytest.importorskip("zarr")
    spec = importlib.util.spec_from_file_location("net", tmp_path / "net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.no_grad():
        expected = module.make()(torch.from_numpy(x))
    torch.testing.assert_close(
        torch.from_numpy(np.asarray(zarr.open(str(tmp_path / "y.zarr"), mode="r")[:])), expected
    )
    assert sorted(p.name for p in (tmp_path / "y.zarr").glob(".bigpicture-*.json")) == [
        ".bigpicture-rank0of2.json",
        ".bigpicture-rank1of2.json",
    ]
