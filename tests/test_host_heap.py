"""The host heap kept between tiles (``engine.host_heap``): where it applies, and that it stops the
page faults of tiles' tensors allocated again; the A/B measure of what a tiled run adds to its ops."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bigpicture.engine import host_heap

glibc = pytest.mark.skipif(host_heap._libc() is None, reason="glibc's malloc only")

_FAULTS = r"""
import json, resource, torch
from torch import nn
import bigpicture as bp
from bigpicture.engine import host_heap
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()).eval()
net = bp.tiled(model, tile=128)
x = torch.randn(1, 3, 256, 256)
with torch.no_grad():
    for _ in range(3):
        net(x)  # plans; the heap grows to the step's peak
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        net(x)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, "policy": host_heap.policy()}))
"""


def _faults(**env) -> dict:
    """Page faults of three warm tiled inferences in a fresh process, and the heap policy there."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.pop("BIGPICTURE_HOST_HEAP", None)
    p = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True,
                       env={**environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@glibc
def test_tiles_reuse_the_pages_of_the_tiles_before_them():
    """Each step allocates four 32-channel 130^2 tensors per tile (2 MiB each). Served by mmap and
    handed back to the OS at each free (``MALLOC_MMAP_THRESHOLD_=65536``, a malloc the user tuned,
    which the engine leaves alone), their pages fault in again at every tile; kept, the warm steps
    fault in next to nothing. (glibc's default heap lies between, by its allocation history: its
    dynamic threshold faulted 8 to ~4,700 pages over the same steps in runs of this test.)"""
    kept, mapped = _faults(), _faults(MALLOC_MMAP_THRESHOLD_="65536")
    assert kept["policy"] == "kept" and mapped["policy"] == "user"
    assert mapped["faults"] > 1000  # 3 steps x 4 tiles x 4 tensors of ~500 pages each
    assert kept["faults"] < mapped["faults"] / 10
    assert _faults(BIGPICTURE_HOST_HEAP="system")["policy"] == "system"


def test_the_policy_follows_the_environment(monkeypatch):
    monkeypatch.setitem(host_heap._state, "kept", None)
    for name in host_heap._USER_VARIABLES + ("GLIBC_TUNABLES", "BIGPICTURE_HOST_HEAP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BIGPICTURE_HOST_HEAP", "system")
    assert host_heap.policy() == "system"
    monkeypatch.setenv("BIGPICTURE_HOST_HEAP", "on")
    with pytest.raises(ValueError, match="BIGPICTURE_HOST_HEAP='on'"):
        host_heap.policy()
    monkeypatch.delenv("BIGPICTURE_HOST_HEAP")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert host_heap.policy() == "user"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX")
    assert host_heap.policy() == ("kept" if host_heap._libc() is not None else "other")
    monkeypatch.delenv("GLIBC_TUNABLES")

    class Refusing:  # a glibc whose mallopt refuses the settings: its defaults stand
        def mallopt(self, param, value):
            return 0

    monkeypatch.setattr(host_heap, "_libc", Refusing)
    assert host_heap.policy() == "kept"  # not asked yet: it would apply
    assert not host_heap.keep() and host_heap.policy() == "system"
    monkeypatch.setitem(host_heap._state, "kept", None)
    monkeypatch.setattr(host_heap, "_libc", lambda: None)
    assert host_heap.policy() == "other" and not host_heap.keep() and host_heap.policy() == "other"
    host_heap.release()  # nothing to do: no error


def test_the_in_situ_cost_is_the_median_difference_of_alternated_runs():
    """``_in_situ`` alternates a tiled step and the replay of its aten calls, on one clock: with a
    clock that gives each step 5 units and each replay 3, then one step 9 (a disturbed moment), the
    median difference is 2; the replay runs exactly the calls of one step."""
    from bigpicture.perf.calibrate_engine import _blocks, _in_situ, _tiled

    net, _ = _tiled(_blocks().eval(), (1, 3, 64, 64), torch.float32, 32)
    x = torch.randn(1, 3, 64, 64)
    # start, middle, end of each of 3 repeats: differences 2, 6, 2
    clock = iter([0.0, 5.0, 8.0, 8.0, 17.0, 20.0, 20.0, 25.0, 28.0]).__next__

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count() as one:
        net(x)
    with Count() as all_calls:
        assert _in_situ(net, x, clock, 3) == 2
    # planning call, recorded call, a first replay, then 3 x (step + replay): every step as many calls
    assert all_calls.n >= 9 * one.n
