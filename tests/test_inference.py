"""``bigpicture.engine.inference.run``: every source kind equals the untiled model; zarr equals memory;
a SIGKILLed run resumes to the identical result; changed arguments are refused; bad inputs fail clearly."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bigpicture as bp
from bigpicture.cli.infer import add_infer_command
from bigpicture.engine.inference import run

zarr = pytest.importorskip("zarr")
TESTS = Path(__file__).parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


class Interrupted(Exception):
    pass


STOP_AFTER: list = [None]  # a number of tile calls of ``slow`` after which it raises Interrupted


def slow(x):
    """The identity, sleeping ``BP_TEST_DELAY`` seconds per call (per tile): slows a run down to kill it.

    With ``STOP_AFTER[0] = n`` the (n + 1)-th call on real values raises ``Interrupted``.
    """
    time.sleep(float(os.environ.get("BP_TEST_DELAY", "0")))
    if STOP_AFTER[0] is not None and not isinstance(x, torch._subclasses.FakeTensor):
        if STOP_AFTER[0] == 0:
            STOP_AFTER[0] = None
            raise Interrupted
        STOP_AFTER[0] -= 1
    return x


torch.fx.wrap("slow")  # traced as one call, so that it runs per tile
bp.register_pointwise(slow)


class Slow(nn.Module):
    def forward(self, x):
        return slow(x)


class SegAndMean(nn.Module):
    """A small segmentation net that also returns its output's spatial mean (a streamed reduction)."""

    def __init__(self, channels=3, nd=2):
        super().__init__()
        conv, pool = (nn.Conv2d, nn.MaxPool2d) if nd == 2 else (nn.Conv3d, nn.MaxPool3d)
        self.body = nn.Sequential(
            conv(channels, 4, 3, padding=1), nn.ReLU(), pool(2), conv(4, 4, 3, padding=1), Slow(),
            nn.Upsample(scale_factor=2), conv(4, 2, 3, padding=1),
        )  # fmt: skip
        self.dims = tuple(range(2, 2 + nd))

    def forward(self, x):
        y = self.body(x)
        return y, y.mean(dim=self.dims)


def seg_net(channels=3, nd=2, seed=0):
    torch.manual_seed(seed)
    return SegAndMean(channels, nd).eval()


def seg_only(channels=3):
    """The segmentation part alone, for runs that write one dense output to zarr."""
    return seg_net(channels).body


class TwoHeads(nn.Module):
    """Two dense outputs at strides 1 and 2 (a head with deep supervision) around a reduced one;
    with ``norm``, a GroupNorm in the middle (``multipass=True``: two passes over the tiles)."""

    def __init__(self, channels=3, norm=False, as_dict=False):
        super().__init__()
        self.stem = nn.Conv2d(channels, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4) if norm else nn.Identity()
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.seg, self.aux = nn.Conv2d(4, 2, 3, padding=1), nn.Conv2d(4, 3, 1)
        self.as_dict = as_dict

    def forward(self, x):
        y = torch.relu(self.norm(slow(self.stem(x))))
        d = torch.relu(self.down(y))
        if self.as_dict:
            return {"seg": self.seg(y), "aux": self.aux(d)}
        return self.seg(y), d.mean(dim=(2, 3)), self.aux(d)


def two_heads(channels=3, norm=False, as_dict=False, seed=0):
    torch.manual_seed(seed)
    return TwoHeads(channels, norm, as_dict).eval()


def image(shape=(1, 3, 48, 56), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def untiled(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(x)).float())


def assert_same(got, expected, exact=False):
    got = got if isinstance(got, (tuple, list)) else (got,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    for a, b in zip(got, expected, strict=True):
        a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


# -- every source kind --------------------------------------------------------------------------


def _sources(tmp_path, x):
    np.save(tmp_path / "x.npy", x)
    z = zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=x.shape, chunks=(1, 3, 16, 16), dtype="u1")
    z[:] = x
    bp_io = pytest.importorskip("bigpicture.io")
    pytest.importorskip("tifffile")
    bp_io.write_pyramid(x, tmp_path / "x.ome.tiff", mpp=0.5, tile=16)
    h5py = pytest.importorskip("h5py")
    da = pytest.importorskip("dask.array")
    h5 = h5py.File(tmp_path / "x.h5", "w")
    h5.create_dataset("image", data=x, chunks=(1, 3, 16, 16))
    return {
        "h5py dataset": h5["image"],
        "dask array": da.from_array(x, chunks=(1, 3, 16, 16)),
        "numpy": x,
        "memmap": np.load(tmp_path / "x.npy", mmap_mode="r"),
        "npy path": str(tmp_path / "x.npy"),
        "zarr array": z,
        "zarr path": tmp_path / "x.zarr",
        "tensor": torch.from_numpy(x).float(),
        "tiff slide": bp_io.open_slide(tmp_path / "x.ome.tiff"),
        "transformed": bp_io.as_source(x, lambda a: a.astype(np.float32) / 255),
    }


def test_every_source_kind_equals_untiled(tmp_path):
    x = image()
    model = seg_net()
    net = bp.tiled(model, tile=16)
    for name, src in _sources(tmp_path, x).items():
        scaled = name == "transformed"
        expected = untiled(model, x.astype(np.float32) / 255 if scaled else x)
        got = run(net, src)
        assert_same(got, expected), name
        assert net.report.computed == len(net.plan.tiles), name


def test_nifti_volume_equals_untiled(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    volume = np.random.default_rng(2).standard_normal((20, 16, 12)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(tmp_path / "v.nii"))
    model = seg_net(channels=1, nd=3)
    got = run(bp.tiled(model, tile=8), tmp_path / "v.nii")
    assert_same(got, untiled(model, volume[None, None]))


# -- zarr output ---------------------------------------------------------------------------------


def test_zarr_output_equals_memory(tmp_path):
    x = image()
    net = bp.tiled(seg_net(), tile=16)
    memory = run(net, x)
    stored = run(net, x, out=tmp_path / "y.zarr")
    assert isinstance(stored[0], zarr.Array) and stored[0].chunks == (1, 2, 16, 16)  # one chunk per write box
    assert_same(stored, memory, exact=True)
    assert_same(zarr.open_array(str(tmp_path / "y.zarr"), mode="r")[:], memory[0], exact=True)
    again = run(net, x, out=tmp_path / "y.zarr")
    assert net.report.resumed == net.report.tiles and net.report.computed == 0
    assert_same(again, memory, exact=True)


@pytest.mark.parametrize("as_dict", [False, True])
def test_several_dense_outputs_go_into_one_group(tmp_path, as_dict):
    x, out = image(), tmp_path / "y.zarr"
    model = two_heads(as_dict=as_dict)
    net = bp.tiled(model, tile=16)
    memory = run(net, x)
    stored = run(net, x, out=out)
    names = ("seg", "aux") if as_dict else ("0", "2")  # each output's place in the model's output
    group = zarr.open_group(str(out), mode="r")
    assert sorted(group.array_keys()) == sorted(names)
    assert group[names[0]].chunks == (1, 2, 16, 16) and group[names[1]].chunks == (1, 3, 8, 8)  # write boxes
    if as_dict:
        assert set(stored) == {"seg", "aux"} and all(isinstance(v, zarr.Array) for v in stored.values())
        stored, memory, expected = (tuple(d[k] for k in names) for d in (stored, memory, untiled(model, x)))
    else:
        assert isinstance(stored[0], zarr.Array) and isinstance(stored[2], zarr.Array)
        expected = untiled(model, x)
    assert_same(stored, memory, exact=True)
    assert_same(stored, expected)
    assert_same([group[n] for n in names], [memory[0], memory[-1]], exact=True)
    again = run(net, x, out=out)
    assert net.report.resumed == net.report.tiles and net.report.computed == 0
    assert_same(again if not as_dict else tuple(again[k] for k in names), memory, exact=True)
    with pytest.raises(bp.TilingError, match=r"meta\['tile'\]: stored \[16, 16\], now \[24, 24\]"):
        run(bp.tiled(two_heads(as_dict=as_dict), tile=24), x, out=out)
    run(bp.tiled(seg_net(), tile=16), x, out=tmp_path / "one.zarr")
    with pytest.raises(bp.TilingError, match="one output array of another run"):
        run(bp.tiled(two_heads(as_dict=as_dict), tile=16), x, out=tmp_path / "one.zarr")


def test_an_output_array_exports_to_a_pyramid(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    x, out = image((1, 3, 64, 64)), tmp_path / "y.zarr"
    run(bp.tiled(two_heads(), tile=16), x, out=out)
    with pytest.raises(bp.TilingError, match=r"zarr group of 2 arrays \(0, 2\).*y.zarr/0"):
        bp.io.write_pyramid(out, tmp_path / "y.ome.tif")
    aux = zarr.open_group(str(out), mode="r")["2"]
    for given in (out / "2", aux):
        path = bp.io.write_pyramid(given, tmp_path / "aux.ome.tif", mpp=1.0, tile=16)
        with tifffile.TiffFile(path) as tif:
            np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), aux[0])


def test_multipass_resume_skips_finished_passes(tmp_path, monkeypatch):
    monkeypatch.setattr("bigpicture.engine.check.PROBE_ELEMENTS", 0)  # `slow` counts tile calls: no probe
    x, out = image((1, 3, 64, 64), seed=6), tmp_path / "y.zarr"
    model = two_heads(norm=True)
    make = lambda: bp.tiled(model, tile=16, multipass=True)  # noqa: E731
    net = make()
    whole = run(net, x, out=tmp_path / "whole.zarr")
    assert_same(whole, untiled(model, x))
    assert_same(whole, run(net, x), exact=True)
    per_pass = len(net.plan.tiles)
    assert len(net.plan.earlier) == 1 and net.report.tiles == 2 * per_pass
    for calls, passes in ((5, 0), (per_pass, 1)):  # interrupted after 5 tiles of pass 0, then of pass 1
        STOP_AFTER[0] = calls
        try:
            with pytest.raises(Interrupted):
                run(make(), x, out=out)
        finally:
            STOP_AFTER[0] = None
        record = _record(out)
        assert len(record.get("passes", [])) == passes and sum(b - a for a, b in record["done"]) == 5
    net = make()
    resumed = run(net, x, out=out)
    assert net.report.resumed == per_pass + 5 and net.report.computed == per_pass - 5  # pass 0 not rerun
    assert_same(resumed, whole, exact=True)
    run(net, x, out=out)
    assert net.report.resumed == net.report.tiles == 2 * per_pass
    with pytest.raises(bp.TilingError, match=r"meta\['weights'\]"):
        run(bp.tiled(two_heads(norm=True, seed=1), tile=16, multipass=True), x, out=out)


KILLED = {  # kind: (the net, the pass during which the run is killed)
    "one output": (lambda: bp.tiled(seg_net(), tile=16), 0),
    "two outputs": (lambda: bp.tiled(two_heads(), tile=16), 0),
    "multipass, in pass 0": (lambda: bp.tiled(two_heads(norm=True), tile=16, multipass=True), 0),
    "multipass, in pass 1": (lambda: bp.tiled(two_heads(norm=True), tile=16, multipass=True), 1),
}


def _kill_target(src: str, out: str, kind: str = "one output") -> None:
    """Run in a subprocess: a slow run into ``out``, to be killed part-way."""
    run(KILLED[kind][0](), zarr.open_array(src, mode="r"), out=out)


def _record(out: Path):
    """The store's record, or None while it does not exist or is being rewritten."""
    try:
        return zarr.open(str(out), mode="r").attrs["bigpicture"]
    except Exception:
        return None


@pytest.mark.parametrize("kind", list(KILLED))
def test_sigkill_resumes_to_the_identical_result(tmp_path, kind):
    make, kill_pass = KILLED[kind]
    x = image((1, 3, 64, 64), seed=3)
    z = zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=x.shape, dtype="u1")
    z[:] = x
    out = tmp_path / "y.zarr"
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
        "import test_inference as t; t._kill_target(*sys.argv[1:])"
    )
    env = {**os.environ, "BP_TEST_DELAY": "0.15", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", code, str(tmp_path / "x.zarr"), str(out), kind]
    child = subprocess.Popen(args, env=env)
    done, deadline = 0, time.time() + 90
    while done < 3 and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
        record = _record(out) if (out / "zarr.json").exists() else None
        if record is not None and len(record.get("passes", [])) == kill_pass:
            done = sum(b - a for a, b in record["done"])
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL and done >= 3, "the run ended before it could be killed"
    record = _record(out)
    assert len(record.get("passes", [])) == kill_pass  # killed in the pass meant
    done = sum(b - a for a, b in record["done"])

    net = make()
    resumed = run(net, z, out=out)
    per_pass = len(net.plan.tiles)
    assert net.report.tiles == per_pass * (1 + len(net.plan.earlier))
    assert net.report.resumed == kill_pass * per_pass + done  # finished passes and tiles are not redone
    assert net.report.computed == net.report.tiles - net.report.resumed
    whole = run(make(), z, out=tmp_path / "whole.zarr")
    assert_same(resumed, whole, exact=True)  # the dense outputs and the streamed mean, bit for bit
    assert_same(resumed, untiled(net.model, x))


def test_changed_arguments_are_refused(tmp_path):
    x, out = image(), tmp_path / "y.zarr"
    run(bp.tiled(seg_net(), tile=16), x, out=out)
    with pytest.raises(bp.TilingError, match=r"meta\['tile'\]: stored \[16, 16\], now \[24, 24\]"):
        run(bp.tiled(seg_net(), tile=24), x, out=out)
    with pytest.raises(bp.TilingError, match=r"meta\['weights'\]"):
        run(bp.tiled(seg_net(seed=1), tile=16), x, out=out)
    with pytest.raises(bp.TilingError, match=r"meta\['input'\]"):
        run(bp.tiled(seg_net(), tile=16), torch.from_numpy(x).float(), out=out)
    net = bp.tiled(seg_net(seed=1), tile=24)
    run(net, x, out=out, resume=False)  # starts over
    assert net.report.computed == net.report.tiles


# -- background ----------------------------------------------------------------------------------


def background_image(shape=(1, 3, 64, 80)):
    x = np.full(shape, 255, np.uint8)
    x[..., 20:36, 30:52] = image((1, 3, 16, 22), seed=4)
    return x


@pytest.mark.parametrize("value", [255, [255, 255, 255]])
def test_background_tiles_are_reused_exactly(tmp_path, value):
    x = background_image()
    model = seg_net()
    net = bp.tiled(model, tile=12)  # not a multiple of the net's stride 2: two alignments of tiles
    plain = run(net, x)
    skipping = run(net, x, background=value)
    assert net.report.skipped > 0 and net.report.computed + net.report.skipped == net.report.tiles
    assert_same(skipping, plain, exact=True)
    assert_same(skipping, untiled(model, x))
    stored = run(net, x, out=tmp_path / "y.zarr", background=value)
    assert_same(stored, plain, exact=True)


class CountingSource(bp.io.Source):
    def __init__(self, x):
        self.x, self.shape, self.dtype, self.reads = x, x.shape, x.dtype, 0

    def read(self, region):
        self.reads += 1
        return self.x[region]


def test_tissue_mask_skips_reading_background(tmp_path):
    from bigpicture.engine.background import MaskedSource

    x = image((1, 3, 64, 80), seed=5)
    mask = np.zeros((16, 20), bool)
    mask[5:9, 7:13] = True
    counting = CountingSource(x)
    source = MaskedSource(counting, mask, fill=255)
    model = seg_net()
    net = bp.tiled(model, tile=8)
    got = run(net, source)
    assert net.report.skipped > 0
    assert counting.reads < net.report.tiles  # tiles known background from the mask are never read
    masked = np.where(np.repeat(np.repeat(mask, 4, 0), 4, 1), x, 255).astype(np.uint8)
    assert_same(got, untiled(model, masked))
    assert_same(got, run(net, masked), exact=True)


def test_position_dependent_resampling_turns_skipping_off():
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear",
                                                                     align_corners=True)).eval()  # fmt: skip
    x = background_image()
    net = bp.tiled(model, tile=16)
    with pytest.warns(UserWarning, match="align_corners"):
        got = run(net, x, background=255)
    assert net.report.skipped == 0
    assert_same(got, untiled(model, x))


# -- errors --------------------------------------------------------------------------------------


def test_bad_inputs_fail_clearly(tmp_path):
    net = bp.tiled(seg_net(), tile=16)
    with pytest.raises(FileNotFoundError, match="no such file"):
        run(net, tmp_path / "missing.svs")
    pytest.importorskip("tifffile")
    bp.io.write_pyramid(image((1, 3, 64, 64)), tmp_path / "x.tiff", tile=16, compression=None)
    data = (tmp_path / "x.tiff").read_bytes()
    (tmp_path / "cut.tiff").write_bytes(data[: len(data) // 2])
    with pytest.raises(bp.TilingError, match="truncated"):
        run(net, tmp_path / "cut.tiff")
    with pytest.raises(bp.TilingError, match="no level 7"):
        run(net, bp.io.open_slide(tmp_path / "x.tiff", level=7))
    z = zarr.open_array(
        str(tmp_path / "x.zarr"), mode="w", shape=(1, 3, 48, 56), chunks=(1, 3, 16, 16), dtype="u1"
    )
    z[:] = image()
    chunk = next(p for p in (tmp_path / "x.zarr").rglob("*") if p.is_file() and "json" not in p.name)
    chunk.write_bytes(b"not a chunk")
    with pytest.raises(bp.TilingError, match=r"reading region \[.*\] failed"):
        run(net, z)


# -- the command ---------------------------------------------------------------------------------


def test_infer_command_resumes_and_refuses_changes(tmp_path, capsys):
    (tmp_path / "model.py").write_text(
        f"import sys; sys.path.insert(0, {str(TESTS)!r})\nfrom test_inference import seg_only as factory\n"
    )
    torch.save(seg_only().state_dict(), tmp_path / "w.pt")
    x = background_image()
    np.save(tmp_path / "x.npy", x)
    parser = argparse.ArgumentParser()
    add_infer_command(parser.add_subparsers())

    def infer(*extra):
        model = f"{tmp_path / 'model.py'}:factory"
        a = parser.parse_args(["infer", str(tmp_path / "x.npy"), "--out", str(tmp_path / "y.zarr"), "--model",
                               model, "--weights", str(tmp_path / "w.pt"), "--quiet", *extra])  # fmt: skip
        return a.run(a)

    assert infer("--tile", "16", "--background", "255", "--scale", "0.5") == 0
    expected = untiled(seg_only(), x.astype(np.float32) * 0.5)
    assert_same(zarr.open_array(str(tmp_path / "y.zarr"), mode="r")[:], expected)
    assert infer("--tile", "16", "--background", "255", "--scale", "0.5") == 0  # all done: nothing to compute
    with pytest.raises(bp.TilingError, match="Affine"):
        infer("--tile", "16", "--background", "255", "--scale", "0.25")
    assert infer("--tile", "16", "--scale", "0.25", "--overwrite") == 0
    assert "wrote" in capsys.readouterr().out


def test_infer_command_writes_every_dense_output(tmp_path, capsys):
    (tmp_path / "model.py").write_text(
        f"import sys; sys.path.insert(0, {str(TESTS)!r})\nfrom test_inference import two_heads as factory\n"
    )
    torch.save(two_heads().state_dict(), tmp_path / "w.pt")
    x = image((1, 3, 64, 64), seed=7)
    np.save(tmp_path / "x.npy", x)
    parser = argparse.ArgumentParser()
    add_infer_command(parser.add_subparsers())
    a = parser.parse_args(["infer", str(tmp_path / "x.npy"), "--out", str(tmp_path / "y.zarr"), "--model",
                           f"{tmp_path / 'model.py'}:factory", "--weights", str(tmp_path / "w.pt"), "--quiet",
                           "--tile", "16"])  # fmt: skip
    assert a.run(a) == 0
    seg, mean, aux = untiled(two_heads(), x)
    group = zarr.open_group(str(tmp_path / "y.zarr"), mode="r")
    assert_same([group["0"], group["2"]], [seg, aux])
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'y.zarr'}/0, shape (1, 2, 64, 64)" in printed
    assert f"wrote {tmp_path / 'y.zarr'}/2, shape (1, 3, 32, 32)" in printed
    assert "output 1, shape (1, 4), is reduced over the image and not stored" in printed
