"""Lightning trains a tiled model exactly as the untiled one: fast_dev_run, accumulation, DDP, checkpoints.

Every run is one SGD step in float64, compared with the same step computed untiled here:
parameters - lr * mean over the step's images of the untiled gradient (Lightning divides an
accumulated loss by the number of batches; DDP averages the ranks' gradients).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning")

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "lightning_recipe.py"
spec = importlib.util.spec_from_file_location("lightning_recipe", RECIPE)
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)


def untiled_step(items: list[int], lr: float = 0.5, seed: int = 0) -> dict:
    """The parameters after one SGD step on the mean loss gradient of ``items``, untiled."""
    torch.manual_seed(seed)
    model = recipe.classifier().double()
    data = recipe.SyntheticSlides(count=max(items) + 1)
    grads = [torch.zeros_like(p) for p in model.parameters()]
    for i in items:
        x, y = data[i]
        model.zero_grad()
        F.cross_entropy(model(x[None]), y[None]).backward()
        grads = [g + p.grad / len(items) for g, p in zip(grads, model.parameters())]
    return {n: p.detach() - lr * g for (n, p), g in zip(model.named_parameters(), grads)}


def assert_params(module, expected: dict) -> None:
    got = dict(module.net.model.named_parameters())
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name].detach(), expected[name], msg=name)


def test_fast_dev_run(one_thread):
    module = recipe.TiledClassifier()
    data = torch.utils.data.DataLoader(recipe.SyntheticSlides(count=2), batch_size=1)
    recipe.trainer(fast_dev_run=1).fit(module, data)
    assert len(module.net.plan.tiles) > 1  # tiled for real: 96 px at tile 32
    assert_params(module, untiled_step([0]))


def test_gradient_accumulation(one_thread):
    module = recipe.TiledClassifier()
    data = torch.utils.data.DataLoader(recipe.SyntheticSlides(count=3), batch_size=1)
    recipe.trainer(steps=1, accumulate=3).fit(module, data)
    assert_params(module, untiled_step([0, 1, 2]))


def test_checkpoint_save_and_load(tmp_path, one_thread):
    module = recipe.TiledClassifier()
    data = torch.utils.data.DataLoader(recipe.SyntheticSlides(count=1), batch_size=1)
    t = recipe.trainer(steps=1)
    t.fit(module, data)
    t.save_checkpoint(tmp_path / "last.ckpt")
    loaded = recipe.TiledClassifier.load_from_checkpoint(tmp_path / "last.ckpt")
    assert_params(loaded, untiled_step([0]))
    x = recipe.SyntheticSlides()[3][0][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module(x))


@pytest.mark.slow
def test_ddp_two_processes_on_gloo(tmp_path):
    """``strategy="ddp"`` on CPU: two processes (Lightning launches the recipe again), gloo."""
    ckpt = tmp_path / "ddp.ckpt"
    done = subprocess.run(
        [sys.executable, str(RECIPE), "--devices", "2", "--strategy", "ddp", "--checkpoint", str(ckpt)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gloo" in done.stderr + done.stdout or "distributed_backend=gloo" in done.stderr
    loaded = recipe.TiledClassifier.load_from_checkpoint(ckpt)
    assert_params(loaded, untiled_step([0, 1]))  # rank 0 read image 0, rank 1 image 1; gradients averaged
