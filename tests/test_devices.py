import dataclasses
import json

import pytest
import torch

from bigpicture.errors import TilingError
from bigpicture.perf.calibrate import calibrate
from bigpicture.perf.devices import DEVICES, Device, get_device, load_calibration, local_cpu

# the figures most likely to be mistyped as the "with sparsity" ones, which are twice these
DENSE_BF16_TFLOPS = {"A100-80GB": 312, "H100-SXM": 989.5, "L4": 121, "L40S": 362.05, "A10": 125}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # never read or write the user's real calibration from a test
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))


def test_table_has_the_gpus_of_the_issue():
    names = {"V100", "A100-40GB", "A100-80GB", "H100-SXM", "H100-PCIe", "H200", "L4", "L40S", "A10", "T4"}
    assert names | {"RTX-3090", "RTX-4090"} <= set(DEVICES)


@pytest.mark.parametrize("device", DEVICES.values(), ids=list(DEVICES))
def test_every_entry_is_complete_and_sourced(device: Device):
    assert "datasheet" in device.source or "whitepaper" in device.source
    assert device.memory_bytes >= 16 * 2**30
    assert 100e9 < device.bandwidth_bytes_per_s < 10e12
    assert {"fp32", "tf32", "fp16", "bf16"} <= set(device.peak_flops)
    # tensor cores never make a dtype slower than plain fp32
    assert device.peak("bf16") >= device.peak("fp32") and device.peak("fp16") >= device.peak("fp32")
    assert device.peak("tf32") >= device.peak("fp32")
    assert 0 < device.launch_overhead_s < 1e-4


@pytest.mark.parametrize("name, tflops", DENSE_BF16_TFLOPS.items())
def test_tensor_core_figures_are_dense(name: str, tflops: float):
    assert DEVICES[name].peak(torch.bfloat16) == pytest.approx(tflops * 1e12)


def test_device_is_an_immutable_value():
    device = DEVICES["A100-80GB"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        device.memory_bytes = 1
    with pytest.raises(TypeError):
        device.peak_flops["fp32"] = 1.0
    assert hash(device) == hash(dataclasses.replace(device))


@pytest.mark.parametrize("name", ["H100-SXM", "h100-sxm", "H100_SXM", "h100 sxm", "H100SXM", " h100-SXM "])
def test_lookup_forgives_case_and_separators(name: str):
    assert get_device(name) is DEVICES["H100-SXM"]


def test_lookup_of_full_product_names():
    assert get_device("V100-SXM2-32GB") is DEVICES["V100"]
    assert get_device("GeForce RTX 4090") is DEVICES["RTX-4090"]


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(TilingError) as e:
        get_device("B200")
    assert all(name in str(e.value) for name in DEVICES)


def test_ambiguous_device_names_the_candidates():
    with pytest.raises(TilingError, match="A100-40GB' or 'A100-80GB"):
        get_device("A100")


def test_peak_of_an_unknown_dtype_is_an_error():
    with pytest.raises(TilingError, match="int8"):
        DEVICES["T4"].peak(torch.int8)


def test_local_cpu_uncalibrated():
    cpu = get_device("cpu")
    assert cpu.name == "cpu" and "uncalibrated" in cpu.source
    assert cpu.memory_bytes > 2**28 and cpu.cores >= 1
    assert cpu.peak(torch.float32) > 0 and cpu.peak(torch.float64) > 0


def test_calibration_round_trip(tmp_path):
    path = tmp_path / "sub" / "calibration.json"
    measured = calibrate(path, quick=True)
    assert json.loads(path.read_text()) == measured == load_calibration(path)
    assert all(rate > 0 for rates in measured["matmul"].values() for rate in rates.values())
    assert {"float32", "float64", "bfloat16"} <= set(measured["matmul"])
    assert measured["conv2d"][0]["flops_per_s"] > 0
    assert measured["bandwidth_bytes_per_s"] > 0 and 0 < measured["launch_overhead_s"] < 0.01
    cpu = local_cpu(path)
    assert cpu.source.startswith("calibrated")
    assert cpu.peak(torch.float32) == max(measured["matmul"]["float32"].values())


@pytest.fixture(scope="module")
def measured_once(tmp_path_factory) -> dict:
    """One quick calibration (seconds) for the tests about where calibrations go, not what they hold."""
    return calibrate(tmp_path_factory.mktemp("once") / "calibration.json", quick=True)


@pytest.fixture
def measured_again(measured_once, monkeypatch):
    """``calibrate`` gives that calibration again instead of measuring (its storing still runs)."""
    import copy

    import bigpicture.perf.calibrate as calibrate_module

    monkeypatch.setattr(calibrate_module, "_measure_all", lambda quick, clock: copy.deepcopy(measured_once))


def test_calibration_goes_to_the_cache_directory(tmp_path, measured_again):
    calibrate(quick=True)
    assert (tmp_path / "cache" / "calibration.json").is_file()
    assert load_calibration() is not None and local_cpu().source.startswith("calibrated")


def test_missing_corrupt_or_foreign_calibration_is_none(tmp_path, measured_again):
    path = tmp_path / "calibration.json"
    assert load_calibration(path) is None
    path.write_text("{not json")
    assert load_calibration(path) is None
    measured = calibrate(path, quick=True)
    path.write_text(json.dumps({**measured, "machine": {**measured["machine"], "node": "elsewhere"}}))
    assert load_calibration(path) is None
