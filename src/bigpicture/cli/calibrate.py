"""``bigpicture calibrate``: measure this machine for predictions on ``cpu``."""

from __future__ import annotations

import argparse

import torch

from bigpicture.perf.calibrate import calibrate
from bigpicture.perf.devices import calibration_path, local_cpu


def _calibrate(a: argparse.Namespace) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    cal = calibrate(a.path, quick=a.quick, clock=a.clock, rounds=a.rounds)
    cpu = local_cpu(a.path)
    best = max(p["forward"] for p in cal["ops"]["conv"])
    rounds = f", best of {a.rounds} rounds" if a.rounds > 1 else ""
    print(
        f"calibrated {cal['machine']['cpu'] or 'this CPU'} with {cal['threads']} threads ({a.clock} clock"
        f"{rounds}), stored in {calibration_path(a.path)}"
    )
    print(
        f"  matmul fp32 {cpu.peak(torch.float32) / 1e9:.1f} GFLOP/s, convolution up to "
        f"{best / 1e9:.1f} GFLOP/s, copy {cpu.bandwidth_bytes_per_s / 1e9:.1f} GB/s, "
        f"{1e6 * cal['ops']['engine_node_s']:.0f} us per node per tile, "
        f"{1e6 * cal['ops']['wake_s']:.0f} us per multi-threaded op to wake idle threads "
        f"(OMP_WAIT_POLICY={cal['omp_wait_policy'] or 'unset'}, host heap "
        f"{cal.get('host_heap', 'system')}: calibrate and run under the same)"
    )
    return 0


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {n}")
    return n


def add_calibrate_command(subparsers: argparse._SubParsersAction) -> None:
    c = subparsers.add_parser("calibrate", help="measure this machine for predictions on 'cpu'")
    c.add_argument("--quick", action="store_true", help="a rough measurement in seconds")
    c.add_argument("--threads", type=int, help="torch threads to measure with (default: torch's)")
    c.add_argument("--clock", choices=["wall", "process"], default="wall")
    c.add_argument(
        "--rounds",
        type=_positive,
        default=1,
        help="measure this many times, keep each figure's best (a host shared with other jobs; ~4 min each)",
    )
    c.add_argument("--path", help="where to store it (default: $BIGPICTURE_CACHE or ~/.cache/bigpicture)")
    c.set_defaults(run=_calibrate)
