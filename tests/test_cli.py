import subprocess
import sys

import pytest

from bigpicture.cli import main
from bigpicture.cli.common import parse_args_text, parse_input
from bigpicture.perf.devices import DEVICES

MODEL = """
from torch import nn


def small(width=8, classes=2):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, width, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, classes))
"""


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "nets.py"
    path.write_text(MODEL)
    return f"{path}:small"


def test_plan_prints_one_row_per_device(model_file, capsys):
    status = main(
        [
            "plan",
            "--model",
            model_file,
            "--model-args",
            "width=16",
            "--input",
            "3x20000x20000",
            "--device",
            "H100-SXM,A100-80GB,RTX-4090",
            "--dtype",
            "bf16",
            "--train",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    lines = out.strip().splitlines()
    assert "1x3x20000x20000, bfloat16, training step" in lines[0]
    assert lines[1].split()[:4] == ["device", "memory", "tile", "tiles"]
    assert [line.split()[0] for line in lines[2:]] == ["H100-SXM", "A100-80GB", "RTX-4090"]
    assert all("planner" in line for line in lines[2:])


def test_plan_with_a_given_tile_and_budget(model_file, capsys):
    assert (
        main(
            [
                "plan",
                "--model",
                model_file,
                "--input",
                "3x4096x4096",
                "--device",
                "cpu",
                "--tile",
                "1024",
                "--memory",
                "1MiB",
            ]
        )
        == 0
    )
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("cpu") and "1024x1024" in row and "does not fit" in row


def test_unknown_device_lists_the_known_ones(model_file, capsys):
    assert main(["plan", "--model", model_file, "--input", "3x64x64", "--device", "B200"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'B200'" in err and all(name in err for name in DEVICES)


def test_nothing_fits_says_the_least_memory(model_file, capsys):
    assert (
        main(["plan", "--model", model_file, "--input", "3x4096x4096", "--device", "cpu", "--memory", "1KiB"])
        == 0
    )
    out = capsys.readouterr().out
    assert "no tile fits" not in out and "Give memory of at least" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nowhere.py:small", "--input", "3x64x64"], "no file nowhere.py"),
        (["--model", "monai", "--input", "3x64x64"], "write SOURCE:NAME"),
        (["--model", "monai:NoSuchNet", "--input", "3x64x64"], "has no 'NoSuchNet'"),
        (["--input", "3by64", "--model", "X"], "--input"),
        (["--dtype", "int3", "--input", "3x64x64", "--model", "X"], "known dtypes"),
    ],
)
def test_clear_errors(model_file, capsys, args, message):
    if "X" in args:
        args[args.index("X")] = model_file
    assert main(["plan", *args]) == 2
    assert message in capsys.readouterr().err


def test_parsers():
    assert parse_args_text("spatial_dims=2,channels=(16, 32),norm=batch,bias=False") == {
        "spatial_dims": 2,
        "channels": (16, 32),
        "norm": "batch",
        "bias": False,
    }
    assert parse_input("3x100000x100000", 1) == (1, 3, 100_000, 100_000)
    assert parse_input("1x512x512x512", 2) == (2, 1, 512, 512, 512)


def test_monai_model_by_name(capsys, tmp_path, monkeypatch):
    pytest.importorskip("monai")
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path))
    assert (
        main(
            [
                "plan",
                "--model",
                "monai:UNet",
                "--model-args",
                "spatial_dims=2,in_channels=1,out_channels=2,channels=(4,8),strides=(2,),norm=batch",
                "--input",
                "1x2048x2048",
                "--device",
                "T4",
                "--dtype",
                "fp16",
                "--train",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("T4")


def test_calibrate_and_python_dash_m(tmp_path):
    path = tmp_path / "cal.json"
    run = subprocess.run(
        [sys.executable, "-m", "bigpicture", "calibrate", "--quick", "--path", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "calibrated" in run.stdout and path.is_file()
    run = subprocess.run([sys.executable, "-m", "bigpicture", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "plan" in run.stdout and "calibrate" in run.stdout


def test_plan_of_a_source_on_disk_adds_its_reads(model_file, tmp_path, capsys):
    """`--source`: the input's size from the file, and its timed reads in each row's time (-v shows
    them: in turn with a CPU's compute, overlapped with a GPU's)."""
    import numpy as np
    import zarr

    z = zarr.open_array(
        str(tmp_path / "x.zarr"), mode="w", shape=(1, 3, 96, 64), chunks=(1, 3, 32, 32), dtype="f4"
    )
    z[:] = np.random.default_rng(0).random(z.shape, dtype=np.float32)
    args = ["plan", "--model", model_file, "--source", str(tmp_path / "x.zarr"), "--tile", "32"]
    assert main([*args, "--device", "cpu,T4", "-v"]) == 0
    out = capsys.readouterr().out
    assert "on 1x3x96x64, float32, inference" in out.splitlines()[0]
    assert (
        "input reads (in turn with the compute)" in out and "input reads (overlapped with the compute)" in out
    )
    assert main([*args, "--input", "3x96x64"]) == 2
    assert "or a file as --source PATH" in capsys.readouterr().err
