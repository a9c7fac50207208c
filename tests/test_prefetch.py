"""net.run's reader thread: exact either way, on by default only where a GPU computes."""

import concurrent.futures

import numpy as np
import pytest
import torch
from torch import nn

import bigpicture as bp


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 5, padding=2)).eval()


@pytest.mark.parametrize("prefetch, reads_ahead", [(None, False), (False, False), (True, True)])
def test_prefetch_is_exact_and_off_by_default_on_the_cpu(prefetch, reads_ahead, monkeypatch):
    submitted = []
    submit = concurrent.futures.ThreadPoolExecutor.submit

    def spy(self, fn, *args, **kwargs):
        submitted.append(getattr(fn, "__name__", ""))
        return submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", spy)
    model = _model()
    x = np.random.default_rng(0).random((1, 3, 70, 60), dtype=np.float32)
    out = bp.tiled(model, tile=16).run(x, prefetch=prefetch)
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(np.asarray(out)), model(torch.from_numpy(x)))
    assert ("read" in submitted) == reads_ahead
