"""Census of MONAI's networks: does the default call `bp.tiled(model, tile=...)` reproduce them exactly?

Every family of `monai.networks.nets` that builds at small settings without torchvision, in 2D and
3D where it supports both, eval mode, float64, tiles smaller than the input in every dimension.
Each row compares outputs, parameter gradients and input gradients with the untiled model
(`tests/helpers.assert_tiled_matches`, the test suite's oracle) and is one of

    EXACT   tiled == untiled
    CLEAR   a bp.TilingError before any tile (the message is shown)
    WRONG   a result that differs from the untiled model
    CRASH   any other exception

    python benchmarks/census.py                 # every row; --only resnet18 to pick rows
    python benchmarks/census.py --write         # and the table into RESULTS.md

The same table parametrises tests/test_census.py (heavy rows there only with `-m slow`).
"""

# ruff: noqa: E501  (the table of network constructors reads best one row per line)
from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


@dataclass(frozen=True)
class Case:
    family: str
    dims: int
    build: Callable  # () -> nn.Module, in float32
    shape: tuple  # input (N, C, *spatial)
    tile: int | tuple
    heavy: bool = False  # a slow test (seconds to minutes here); the census runs it anyway
    expect: str = "EXACT"  # or "CLEAR:<text the message must hold>" (attention: the op's name)
    note: str = field(default="", compare=False)
    known: str = ""  # why the row does not yet give ``expect``: the missing rule (its test is an xfail)


def _nets():
    from monai.networks import nets

    return nets


def _n(name, *args, **kwargs):
    """A factory of ``monai.networks.nets.<name>(*args, **kwargs)``, imported when called."""
    return lambda: getattr(_nets(), name)(*args, **kwargs)


def _resnet(name, d):
    return lambda: getattr(_nets(), name)(spatial_dims=d, n_input_channels=1, num_classes=2)


def _img(d, side, c=1):
    return (1, c) + (side,) * d


def _tile(d, side):
    return (side,) * d


def _both(family, build, side, tile, heavy3d=True, **kw):
    """The 2D and the 3D row of a family: ``build(d)`` builds it for ``d`` spatial dimensions."""
    side2, side3 = side if isinstance(side, tuple) else (side, side)
    tile2, tile3 = tile if isinstance(tile, tuple) else (tile, tile)
    return [
        Case(family, 2, lambda: build(2), _img(2, side2), tile2, **kw),
        Case(family, 3, lambda: build(3), _img(3, side3), tile3, heavy=heavy3d or kw.get("heavy", False),
             **{k: v for k, v in kw.items() if k != "heavy"}),
    ]  # fmt: skip


def cases() -> list[Case]:
    nets = _nets
    rows = []
    rows += _both("AHNet", lambda d: nets().AHNet(layers=(1, 1, 1, 1), spatial_dims=d, in_channels=1, out_channels=2,
                                                    psp_block_num=2, upsample_mode="transpose"), (64, 32), (32, 16), heavy=True)
    rows += _both("AttentionUnet", lambda d: nets().AttentionUnet(d, 1, 2, channels=(4, 8, 16), strides=(2, 2)),
                  (32, 16), (16, 8))
    rows += _both("AutoEncoder", lambda d: nets().AutoEncoder(d, 1, 1, channels=(4, 8), strides=(2, 2)), (32, 16), (16, 8))
    rows += _both("BasicUNet", lambda d: nets().BasicUNet(d, 1, 2, features=(4, 4, 8, 8, 8, 4)), (32, 32), (16, 16))
    rows += _both("BasicUNetPlusPlus", lambda d: nets().BasicUNetPlusPlus(d, 1, 2, features=(4, 4, 8, 8, 8, 4)),
                  (32, 32), (16, 16), heavy=True)
    for size in ("121", "169", "201", "264"):
        rows += _both(f"DenseNet{size}", lambda d, s=size: getattr(nets(), f"DenseNet{s}")(
            spatial_dims=d, in_channels=1, out_channels=2, init_features=8, growth_rate=4), (64, 32), (32, 16),
            heavy=size != "121")
    rows.append(Case("Discriminator", 2, _n("Discriminator", (1, 32, 32), (4, 8), (2, 2)), _img(2, 32), 16))
    rows.append(Case("Discriminator", 3, _n("Discriminator", (1, 16, 16, 16), (4, 8), (2, 2)), _img(3, 16), 8,
                     heavy=True))
    rows += _both("DynUNet", lambda d: nets().DynUNet(d, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                                                      upsample_kernel_size=[2, 2]), (32, 16), (16, 8))
    rows += _both("EfficientNetBN", lambda d: nets().EfficientNetBN("efficientnet-b0", pretrained=False,
                                                                    spatial_dims=d, in_channels=1, num_classes=2),
                  (64, 32), (32, 16), heavy=True)
    rows += _both("HighResNet", lambda d: nets().HighResNet(d, 1, 2, layer_params=_HIGHRES), (16, 12), (8, 6))
    rows.append(Case("HoVerNet", 2, _n("HoVerNet", in_channels=3, out_classes=2), (1, 3, 256, 256), 128, heavy=True,
                     note="fast mode needs 256 px inputs"))
    rows += _both("LocalNet", lambda d: nets().LocalNet(d, 1, 4, extract_levels=(0, 1, 2), out_channels=2),
                  (32, 16), (16, 8))
    rows += _both("MedNeXt", lambda d: nets().MedNeXt(d, init_filters=4, in_channels=1, out_channels=2,
                                                      blocks_down=(1, 1), blocks_bottleneck=1, blocks_up=(1, 1),
                                                      kernel_size=3), (32, 16), (16, 8))
    rows.append(Case("Quicknat", 2, _n("Quicknat", num_classes=2, num_channels=1, num_filters=8), _img(2, 32), 16))
    rows += _both("RegUNet", lambda d: nets().RegUNet(d, 1, 4, depth=2, out_channels=2), (32, 16), (16, 8))
    rows.append(Case("Regressor", 2, _n("Regressor", (1, 32, 32), (2,), (4, 8), (2, 2)), _img(2, 32), 16))
    rows.append(Case("Regressor", 3, _n("Regressor", (1, 16, 16, 16), (2,), (4, 8), (2, 2)), _img(3, 16), 8,
                     heavy=True))
    for name in ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200"):
        rows += _both(name, lambda d, n=name: _resnet(n, d)(), (64, 32), (32, 16), heavy=name != "resnet18")
    for name in ("SEResNet50", "SEResNext50", "SEResNet101", "SEResNet152", "SEResNext101", "SENet154"):
        rows += _both(name, lambda d, n=name: getattr(nets(), n)(spatial_dims=d, in_channels=1, num_classes=2),
                      (64, 32), (32, 16), heavy=True)
    rows += _both("SegResNet", lambda d: nets().SegResNet(d, init_filters=8, in_channels=1, out_channels=2),
                  (32, 16), (16, 8))
    rows += _both("SegResNetDS", lambda d: nets().SegResNetDS(d, init_filters=4, in_channels=1, out_channels=2,
                                                              blocks_down=(1, 1, 1)), (32, 16), (16, 8))
    rows += _both("UNet", lambda d: nets().UNet(d, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1),
                  (32, 16), (16, 8))
    rows += _both("VNet", lambda d: nets().VNet(d, 1, 2), (32, 16), (16, 8), heavy=True)
    mean = "use_mean_at_inference=True (else its eval forward adds in place to exp's output, which torch cannot back-propagate)"
    rows.append(Case("VarAutoEncoder", 2, _n("VarAutoEncoder", 2, (1, 32, 32), 1, 4, (4, 8), (2, 2), use_mean_at_inference=True),
                     _img(2, 32), 16, note=mean))
    rows.append(Case("VarAutoEncoder", 3, _n("VarAutoEncoder", 3, (1, 16, 16, 16), 1, 4, (4, 8), (2, 2), use_mean_at_inference=True),
                     _img(3, 16), 8, heavy=True, note=mean))
    rows += [Case("VoxelMorphUNet", d, lambda d=d: nets().VoxelMorphUNet(d, 2, 4, channels=(4, 8, 8, 8), final_conv_channels=(4, 4)),
                  _img(d, side, c=2), side // 2, heavy=d == 3) for d, side in ((2, 32), (3, 16))]
    rows += _both("PatchDiscriminator", lambda d: nets().PatchDiscriminator(d, 4, 1, num_layers_d=2),
                  (32, 16), (16, 8))
    rows += _both("AutoencoderKL", lambda d: Reconstruct(nets().AutoencoderKL(d, 1, 1, num_res_blocks=1, channels=(4, 8),
                                                                  attention_levels=(False, False), latent_channels=2,
                                                                  norm_num_groups=2, with_encoder_nonlocal_attn=False,
                                                                  with_decoder_nonlocal_attn=False)), (32, 16), (16, 8),
                  note="`reconstruct` (forward samples the latent at random)")
    # Attention on tokens is a global stage: the patch embedding is tiled (pass 0), the transformer
    # runs untiled on the tokens held whole, and the decoder's tiles read them back as a grid.
    rows.append(Case("ViT", 2, lambda: First(_n("ViT", 1, (32, 32), (8, 8), hidden_size=16, mlp_dim=16, num_layers=1,
                                              num_heads=2, spatial_dims=2)()), _img(2, 32), 16,
                     note="its first output; the patch embedding is tiled, the transformer runs untiled after it"))
    rows.append(Case("UNETR", 2, _n("UNETR", 1, 2, (32, 32), feature_size=4, hidden_size=16, mlp_dim=16,
                                    num_heads=2, spatial_dims=2), _img(2, 32), 16,
                     note="the tokens (2x2) held whole between passes; the decoder tiled"))
    rows.append(Case("UNETR", 3, _n("UNETR", 1, 2, (32, 32, 32), feature_size=4, hidden_size=16, mlp_dim=16,
                                    num_heads=2, spatial_dims=3), _img(3, 32), 16, heavy=True,
                     note="the tokens (2x2x2) held whole between passes; the decoder tiled"))
    rows.append(Case("SwinUNETR", 2, _n("SwinUNETR", in_channels=1, out_channels=2, feature_size=12,
                                        depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), spatial_dims=2),
                     _img(2, 64), 32, note="the Swin transformer's stages (1/2 to 1/32 resolution) held whole, "
                                           "untiled; the decoder tiled"))
    return rows  # fmt: skip


class First(nn.Module):
    """The first output of a model that returns (output, list of hidden states)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]


class Reconstruct(First):
    """An autoencoder's deterministic reconstruction (its forward samples the latent at random)."""

    def forward(self, x):
        return self.model.reconstruct(x)


_HIGHRES = (
    {"name": "conv_0", "n_features": 4, "kernel_size": 3},
    {"name": "res_1", "n_features": 4, "kernels": (3, 3), "repeat": 1},
    {"name": "res_2", "n_features": 8, "kernels": (3, 3), "repeat": 1},
    {"name": "res_3", "n_features": 8, "kernels": (3, 3), "repeat": 1},
    {"name": "conv_1", "n_features": 8, "kernel_size": 1},
    {"name": "conv_2", "kernel_size": 1},
)


def case_id(case: Case) -> str:
    return f"{case.family}-{case.dims}d"


def build(case: Case):
    """The case's model in float64 and eval mode, with BatchNorm statistics measured on data.

    The statistics come from train-mode forwards on random images of the case's shape (another seed
    than the census input), as a trained network's would: freshly initialised deep residual nets
    with arbitrary statistics grow their activations layer by layer (outputs near 1e5, gradients
    near 1e10 in ResNet-101), where float64's own rounding in the untiled model exceeds
    `assert_close`'s absolute tolerance on near-zero elements. Calibrated, each BatchNorm's output is
    normalised, as in the networks users train.
    """
    torch.manual_seed(0)
    model = case.build().double()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if norms:
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.momentum = None  # a cumulative average over the calibration batches
        model.train()
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for _ in range(2):  # 16 images: a 1-voxel deep layer still sees 16 values per channel
                model(torch.randn((8,) + tuple(case.shape[1:]), dtype=torch.float64, generator=g))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    return model.eval()


@dataclass
class Row:
    case: Case
    status: str  # EXACT | CLEAR | WRONG | CRASH, or NOT RUN (the census's time budget ran out)
    seconds: float
    message: str = ""


def run(case: Case) -> Row:
    """One census row: the default call against the untiled model, outputs and every gradient."""
    from helpers import assert_tiled_matches

    import bigpicture as bp

    start = time.perf_counter()
    try:
        model = build(case)
        x = torch.randn(case.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        assert_tiled_matches(model, x, case.tile)
        status, message = "EXACT", ""
    except bp.TilingError as e:
        status, message = "CLEAR", str(e)
    except AssertionError as e:
        status, message = "WRONG", str(e)
    except Exception as e:  # the census reports every other failure as it is
        status, message = "CRASH", f"{type(e).__name__}: {e}"
    return Row(case, status, time.perf_counter() - start, message)


def _run_index(index: int, threads: int) -> tuple[str, float, str]:
    torch.set_num_threads(threads)
    row = run(cases()[index])
    return row.status, row.seconds, row.message


def run_all(chosen: list[Case], jobs: int, threads: int, budget: float | None) -> list[Row]:
    """Every chosen row, ``jobs`` at a time in worker processes, printed in table order as they end."""
    import multiprocessing

    deadline = None if budget is None else time.monotonic() + budget
    if jobs == 1:  # in this process, light rows first: no start-up per row
        done = {}
        for case in sorted(chosen, key=lambda c: c.heavy):
            if deadline is not None and time.monotonic() > deadline:
                break
            done[case_id(case)] = r = run(case)
            print(f"{case_id(case):28s} {r.status:7s} {r.seconds:7.1f} s  {r.message[:150]}", flush=True)
        late = f"not started within the census budget of {budget} s"
        return [done.get(case_id(c)) or Row(c, "NOT RUN", 0.0, late) for c in chosen]
    ids = [case_id(c) for c in cases()]
    rows = []
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        pending = [pool.apply_async(_run_index, (ids.index(case_id(c)), threads)) for c in chosen]
        for case, result in zip(chosen, pending):
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                rows.append(Row(case, *result.get(left)))
            except multiprocessing.TimeoutError:
                rows.append(Row(case, "NOT RUN", 0.0, f"not finished within the census budget of {budget:.0f} s"))
            r = rows[-1]
            print(f"{case_id(case):28s} {r.status:7s} {r.seconds:7.1f} s  {r.message[:150]}", flush=True)
        pool.terminate()
    return rows


def table(rows: list[Row]) -> list[str]:
    lines = ["| family | dims | input | tile | result | time | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.case
        tile = "x".join(map(str, c.tile)) if isinstance(c.tile, tuple) else str(c.tile)
        text = (r.message.splitlines() or [""])[0].replace("|", "/")
        text = text if len(text) < 300 else text[:297] + "..."
        note = "; ".join(s for s in (c.note, text) if s)
        lines.append(f"| {c.family} | {c.dims}D | {'x'.join(map(str, c.shape))} | {tile} | {r.status} | "
                     f"{r.seconds:.1f} s | {note} |")  # fmt: skip
    counts = {s: sum(r.status == s for r in rows) for s in ("EXACT", "CLEAR", "WRONG", "CRASH", "NOT RUN")}
    return lines + ["", ", ".join(f"{k} {v}" for k, v in counts.items()) + f" of {len(rows)} rows."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="rows whose family-dims id contains one of these")
    parser.add_argument("--light", action="store_true", help="skip the heavy rows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once, each in its own process")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole census; rows unfinished by then are NOT RUN")
    parser.add_argument("--write", action="store_true", help="put the table into benchmarks/RESULTS.md")
    args = parser.parse_args()

    import monai
    import torch
    from results import publish

    torch.set_num_threads(args.threads)
    chosen = [c for c in cases() if not (args.light and c.heavy)]
    if args.only:
        chosen = [c for c in chosen if any(o.lower() in case_id(c).lower() for o in args.only)]
    rows = run_all(chosen, args.jobs, args.threads, args.budget)
    machine = f"{platform.machine()}, torch {torch.__version__}, MONAI {monai.__version__}, {args.threads} thread(s)"
    body = [f"{date.today()}, {machine}. Eval mode, float64, outputs, parameter and input gradients compared "
            "with `torch.testing.assert_close` defaults (tests/helpers.py). The default call `bp.tiled(model, "
            "tile=...)`; CLEAR is a `bp.TilingError` before any tile runs.", "", *table(rows)]
    publish("census.py", "## MONAI census: the default call on every network family (benchmarks/census.py)",
            body, args.write)


if __name__ == "__main__":
    main()
