"""The GPU path's choices, without a GPU: which backend, which device each rank uses, and that the
object collectives run on it. torch.cuda and torch.distributed are replaced by recorders; no
collective runs (the collectives themselves run on gloo in tests/test_distributed*.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from bigpicture.engine import distributed
from bigpicture.engine.distributed import Team, init_from_env, rank_device


@pytest.fixture
def gpus(monkeypatch):
    """A machine with ``gpus.count`` CUDA devices (current: ``gpus.current``); calls recorded."""

    class Gpus:
        count, current, calls = 8, 0, []

    monkeypatch.setattr(torch.cuda, "is_available", lambda: Gpus.count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: Gpus.count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: Gpus.current)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: Gpus.calls.append(("set_device", d)))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    Gpus.calls = []
    return Gpus


@pytest.mark.parametrize(
    "kind, local, count, current, expected",
    [
        ("cuda", "3", 8, 0, "cuda:3"),  # torchrun: LOCAL_RANK's GPU
        ("cuda", "3", 1, 0, "cuda:0"),  # one visible GPU per process (CUDA_VISIBLE_DEVICES)
        ("cuda", None, 8, 5, "cuda:5"),  # no LOCAL_RANK: the current device (set_device)
        ("cpu", "3", 8, 0, "cpu"),  # gloo: the CPU, whatever the GPUs
    ],
)
def test_rank_device(gpus, monkeypatch, kind, local, count, current, expected):
    gpus.count, gpus.current = count, current
    if local is not None:
        monkeypatch.setenv("LOCAL_RANK", local)
    assert rank_device(kind) == torch.device(expected)


@pytest.mark.parametrize(
    "count, asked, backend, device",
    [(4, None, "nccl", "cuda:2"), (4, "cpu", "gloo", "cpu"), (0, None, "gloo", "cpu")],
)
def test_init_from_env_chooses_backend_and_device(gpus, monkeypatch, count, asked, backend, device):
    gpus.count = count
    monkeypatch.setenv("LOCAL_RANK", "2")
    started = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda b, **kw: started.append((b, kw)))
    assert init_from_env(asked) == torch.device(device)
    assert started[0][0] == backend
    if backend == "nccl":  # the GPU is current (and bound to the group) before NCCL starts
        assert gpus.calls == [("set_device", torch.device(device))]
        assert started[0][1] == {"device_id": torch.device(device)}
    else:
        assert gpus.calls == [] and started[0][1] == {}


def _fake_group(monkeypatch, backend: str, rank: int = 1, world: int = 2):
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)


@pytest.mark.parametrize(
    "backend, expected", [("nccl", "cuda:1"), ("gloo", "cpu"), ("cuda:nccl,cpu:gloo", "cpu")]
)
def test_team_device_follows_the_backend(gpus, monkeypatch, backend, expected):
    _fake_group(monkeypatch, backend)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Team(object()).device == torch.device(expected)


def test_object_collectives_run_on_the_ranks_gpu(gpus, monkeypatch):
    """NCCL sends pickled objects from the current CUDA device: the team makes it this rank's."""
    _fake_group(monkeypatch, "nccl")
    monkeypatch.setenv("LOCAL_RANK", "1")
    current, seen = [None], []

    @contextlib.contextmanager
    def on(device):
        before, current[0] = current[0], device
        yield
        current[0] = before

    def gather(out, obj, group=None):
        seen.append(current[0])
        out[:] = [obj] * len(out)

    monkeypatch.setattr(torch.cuda, "device", on)
    monkeypatch.setattr(dist, "all_gather_object", gather)
    team = Team(object())
    assert team.gather("x") == ["x", "x"]
    assert seen == [torch.device("cuda:1")] and current[0] is None


def test_no_cuda_call_in_the_engine():
    """Devices come from ``rank_device`` and tensors' own devices, never a bare ``.cuda()``."""
    from pathlib import Path

    engine = Path(distributed.__file__).parent
    assert not [p.name for p in engine.rglob("*.py") if ".cuda()" in p.read_text()]


@pytest.mark.parametrize("contiguous", [True, False])
def test_dense_sums_go_through_the_device_in_pieces(monkeypatch, contiguous):
    """A dense tensor is summed in pieces of at most CHUNK_BYTES (a host tensor larger than the GPU)."""
    _fake_group(monkeypatch, "gloo")
    calls = []

    def all_reduce(t, group=None):  # two ranks with the same values: the sum doubles them
        calls.append(t.numel())
        t.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(distributed, "CHUNK_BYTES", 40)  # 5 float64 values
    x = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    t = x.clone() if contiguous else x.clone().transpose(1, 2)
    expected = 2 * t
    Team(object()).dense({"sink": t})
    torch.testing.assert_close(t, expected)
    assert calls == [5, 5, 5, 5, 4]
