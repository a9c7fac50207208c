"""TiledInferer: MONAI's inferer interface, with the untiled network's outputs (float64, exact)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("monai")
from monai.data import MetaTensor  # noqa: E402
from monai.inferers import SlidingWindowInferer  # noqa: E402
from monai.networks.nets import UNet  # noqa: E402

from bigpicture.monai import TiledInferer  # noqa: E402


def _unet(dims: int = 2):
    torch.manual_seed(0)
    return (
        UNet(dims, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="batch").double().eval()
    )


class Heads(nn.Module):
    """Several outputs, as deep-supervision and multi-task networks return them."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Conv2d(1, 4, 3, padding=1)
        self.seg = nn.Conv2d(4, 2, 3, padding=1)
        self.down = nn.Conv2d(4, 3, 3, stride=2, padding=1)

    def forward(self, x):
        h = torch.relu(self.body(x))
        seg, low = self.seg(h), self.down(h)
        return {
            "tuple": lambda: (seg, low),
            "list": lambda: [seg, low],
            "dict": lambda: {"seg": seg, "low": low},
        }[self.kind]()


# name: (network factory, input shape, tile); tiles leave interior tiles and tiles on every border
CASES = {
    "unet_2d": (lambda: _unet(2), (1, 1, 40, 36), 16),
    "unet_3d": (lambda: _unet(3), (1, 1, 16, 12, 20), 8),
    "unet_2d_batch2": (lambda: _unet(2), (2, 1, 24, 28), 8),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_tiled_inferer_equals_untiled_network(name, one_thread):
    factory, shape, tile = CASES[name]
    network, x = factory(), torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(TiledInferer(tile=tile)(x, network), network(x))


def test_tiled_inferer_replaces_sliding_window_in_one_line(one_thread):
    network, x = _unet(), torch.randn(1, 1, 40, 36, dtype=torch.float64)
    whole = SlidingWindowInferer(roi_size=(40, 36), sw_batch_size=1)  # one window: the untiled network
    windows = SlidingWindowInferer(roi_size=(16, 16), sw_batch_size=1, overlap=0.25)
    with torch.no_grad():
        untiled, blended, tiled = whole(x, network), windows(x, network), TiledInferer(tile=16)(x, network)
    torch.testing.assert_close(tiled, untiled)
    assert (blended - untiled).abs().max() > 1e-3  # windows of 16 px miss context: blending is not exact


def test_metatensor_in_gives_metatensor_out_with_its_metadata(one_thread):
    network = _unet()
    affine = torch.diag(torch.tensor([0.5, 0.25, 1.0, 1.0], dtype=torch.float64))
    x = MetaTensor(
        torch.randn(1, 1, 32, 24, dtype=torch.float64), affine=affine, meta={"filename_or_obj": "a.tif"}
    )
    with torch.no_grad():
        y = TiledInferer(tile=16)(x, network)
        expected = network(x.as_tensor())
    assert isinstance(y, MetaTensor)
    torch.testing.assert_close(y.affine, affine)
    assert y.meta["filename_or_obj"] == "a.tif"
    torch.testing.assert_close(y.as_tensor(), expected)


@pytest.mark.parametrize("kind", ["tuple", "list", "dict"])
def test_several_outputs_keep_their_structure(kind, one_thread):
    torch.manual_seed(0)
    network, x = Heads(kind).double(), torch.randn(1, 1, 30, 34, dtype=torch.float64)
    x_meta = MetaTensor(x, affine=torch.eye(4, dtype=torch.float64) * 2)
    with torch.no_grad():
        expected = network(x)
        plain, meta = TiledInferer(tile=12)(x, network), TiledInferer(tile=12)(x_meta, network)
    assert type(plain) is type(expected) and type(meta) is type(expected)
    torch.testing.assert_close(plain, expected)
    values = meta.values() if kind == "dict" else meta
    assert all(isinstance(v, MetaTensor) and v.affine[0, 0] == 2 for v in values)


class Scaled(nn.Module):
    """A network with a second positional input, as ``inferer(inputs, network, *args)`` passes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x, scale):
        return self.conv(x) * scale


def test_extra_positional_arguments_reach_the_network(one_thread):
    torch.manual_seed(0)
    network, x = Scaled().double(), torch.randn(1, 1, 30, 26, dtype=torch.float64)
    scale = MetaTensor(torch.tensor(3.0, dtype=torch.float64))  # unwrapped as the input is
    with torch.no_grad():
        torch.testing.assert_close(TiledInferer(tile=8)(x, network, scale), network(x, scale.as_tensor()))


def test_keyword_arguments_are_a_clear_error():
    with pytest.raises(TypeError, match="scale"):
        TiledInferer(tile=8)(torch.randn(1, 1, 16, 16), Scaled(), scale=2.0)


def test_progress_bar_over_the_tiles(one_thread, capsys):
    pytest.importorskip("tqdm")
    network, x = _unet(), torch.randn(1, 1, 40, 36, dtype=torch.float64)
    inferer = TiledInferer(tile=16, progress=True)
    with torch.no_grad():
        torch.testing.assert_close(inferer(x, network), network(x))
    tiles = len(inferer.tiled(network).plan.tiles)
    assert tiles > 1 and f"{tiles}/{tiles}" in capsys.readouterr().err


def test_wrapper_is_cached_per_network():
    inferer, a, b = TiledInferer(tile=16), _unet(), _unet()
    assert inferer.tiled(a) is inferer.tiled(a)
    assert inferer.tiled(b) is not inferer.tiled(a)


def test_memory_budget_and_output_device(one_thread):
    network, x = _unet(), torch.randn(1, 1, 40, 36, dtype=torch.float64)
    inferer = TiledInferer(memory="64MiB", device="cpu", sw_device="cpu")
    with torch.no_grad():
        y = inferer(x, network)
    torch.testing.assert_close(y, network(x))
    assert y.device == torch.device("cpu")


def test_device_is_where_the_output_lives(one_thread):
    # The only other device on a CPU machine: "meta", which shows the output was moved, metadata kept.
    network = _unet()
    x = MetaTensor(
        torch.randn(1, 1, 32, 24, dtype=torch.float64), affine=torch.eye(4, dtype=torch.float64) * 2
    )
    with torch.no_grad():
        meta, plain = (TiledInferer(tile=16, device="meta")(v, network) for v in (x, x.as_tensor()))
    assert isinstance(meta, MetaTensor) and meta.device.type == "meta" and meta.affine[0, 0] == 2
    assert type(plain) is torch.Tensor and plain.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tiles_on_the_gpu_output_on_the_cpu():
    network, x = _unet().cuda(), torch.randn(1, 1, 40, 36, dtype=torch.float64)
    with torch.no_grad():
        y = TiledInferer(tile=16, sw_device="cuda", device="cpu")(x, network)
        expected = network(x.cuda()).cpu()
    assert y.device == torch.device("cpu")
    torch.testing.assert_close(y, expected)


def test_sw_device_other_than_the_network_is_a_clear_error():
    with pytest.raises(ValueError, match="network.to"):
        TiledInferer(tile=16, sw_device="meta")(torch.randn(1, 1, 16, 16, dtype=torch.float64), _unet())


def test_callable_network_is_a_clear_error():
    network = _unet()
    with pytest.raises(TypeError, match="nn.Module"):
        TiledInferer(tile=16)(torch.randn(1, 1, 16, 16), lambda x: network(x))


def test_inside_supervised_evaluator(one_thread):
    pytest.importorskip("ignite")
    from ignite.engine import Events
    from monai.engines import SupervisedEvaluator

    network = _unet()
    images = [torch.randn(1, 40, 36, dtype=torch.float64) for _ in range(2)]
    data = [{"image": im, "label": torch.zeros(1, 40, 36)} for im in images]
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader, network=network, inferer=TiledInferer(tile=16)
    )
    predictions = []
    evaluator.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: predictions.append(e.state.output[0]["pred"])
    )
    evaluator.run()
    assert len(predictions) == len(images)
    with torch.no_grad():
        for image, pred in zip(images, predictions):
            torch.testing.assert_close(torch.as_tensor(pred), network(image[None])[0])


@pytest.fixture
def small_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)  # random RGB: a stand-in for a slide crop
    path = tmp_path / "crop.tif"
    tifffile.imwrite(path, image, photometric="rgb", tile=(16, 16))
    return path, image


def _rgb_net():
    torch.manual_seed(0)
    return UNet(2, 3, 2, channels=(4, 8), strides=(2,), num_res_units=1, norm="batch").double().eval()


def test_load_image_output(small_tiff, one_thread):
    from monai.transforms import LoadImage

    path, image = small_tiff
    load = LoadImage(reader="PILReader", image_only=True, ensure_channel_first=True, dtype=np.float64)
    x = load(str(path))[None]
    network = _rgb_net()
    with torch.no_grad():
        y = TiledInferer(tile=16)(x, network)
        expected = network(x.as_tensor())
    assert isinstance(y, MetaTensor) and y.meta["filename_or_obj"] == str(path)
    torch.testing.assert_close(y.as_tensor(), expected)
    # LoadImage puts the first image axis last in its (C, W, H) array: the pixels are the file's
    torch.testing.assert_close(x[0].permute(2, 1, 0).numpy(), image.astype(np.float64))


def test_wsi_reader_output(small_tiff, one_thread):
    from monai.data import WSIReader

    path, image = small_tiff
    reader = WSIReader(backend="tifffile")
    array, meta = reader.get_data(reader.read(str(path)), location=(8, 4), size=(32, 32))
    np.testing.assert_array_equal(array.transpose(1, 2, 0), image[8:40, 4:36])  # (C, H, W) of the crop
    x = MetaTensor(torch.as_tensor(array, dtype=torch.float64)[None], meta=meta)
    network = _rgb_net()
    with torch.no_grad():
        y = TiledInferer(tile=16)(x, network)
        torch.testing.assert_close(y.as_tensor(), network(x.as_tensor()))
    assert y.meta["location"].tolist() == [8, 4]
