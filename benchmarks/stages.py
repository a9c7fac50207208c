"""Stages kept in a slower tier (issue 13, item 3): the halo recompute cuts remove, predicted on GPUs,
and the bytes a cut holds and moves, measured on this CPU against the prediction.

    python benchmarks/stages.py [--write] [--quick]

1. The planner's plan for a MONAI DynUNet 3D training step at 512^3 in bfloat16 on L4, A100-40GB and
   H100-SXM (its tile for the device's memory), without cuts and with ``cuts="auto"`` and
   ``host_memory="512GiB"`` (a GPU server's RAM: DGX A100 has 1 TiB, DGX H100 2 TiB): predicted halo
   overhead (extra work over the untiled model), time, the cuts' host memory and traffic per step.
2. A small run on this CPU (the same DynUNet with 4-8 channels at 32^3, tile 8, float64) cut at the
   nodes the planner chose for the L4: the bytes written into the host tier and read back by the
   tiles (counted in ``engine/held.py``'s writes and reads), against ``print(plan)``'s traffic; and
   the outputs against the untiled model's.
"""

from __future__ import annotations

import argparse
import os
import time

from results import publish

DEVICES = ("L4", "A100-40GB", "H100-SXM")
HOST = "512GiB"


def dynunet(filters=None):
    from monai.networks.nets import DynUNet

    kernels, strides = [3] * 5, [1, 2, 2, 2, 2]
    return DynUNet(3, 1, 3, kernels, strides, strides[1:], filters=filters, norm_name="batch").eval()


def predicted(device: str, size: int) -> dict:
    import torch

    import bigpicture as bp
    from bigpicture.engine.cuts import plan_traffic
    from bigpicture.engine.stages import size as nbytes

    model, shape = dynunet(), (1, 1) + (size,) * 3
    run = dict(device=device, dtype=torch.bfloat16, training=True)
    t0 = time.perf_counter()
    plain = bp.make_plan(model, shape, **run)
    t1 = time.perf_counter()
    staged = bp.make_plan(model, shape, cuts="auto", host_memory=HOST, **run)
    t2 = time.perf_counter()
    rows = plan_traffic(staged)
    cuts = [r.node for r in rows]
    host = [r for r in rows if r.tier == "host"]
    return {
        "device": device, "size": size, "tile": plain.tile, "halo": plain.prediction.halo_overhead,
        "time": plain.time, "staged_tile": [p.tile for p in (*staged.earlier, staged)],
        "staged_halo": staged.prediction.halo_overhead,
        "staged_time": staged.time, "cuts": cuts,
        "tiers": ", ".join(sorted({r.tier for r in rows})) or "-",
        "held": nbytes(2 * sum(r.held for r in host)),
        "moved": nbytes(sum(r.moved for r in rows)), "plan_s": (t1 - t0, t2 - t1),
        "memory": (plain.memory, staged.memory),
    }  # fmt: skip


def measured(cuts: list[str], training: bool) -> dict:
    """Bytes a small cut run writes into and reads from the host tier, against the prediction."""
    import torch

    import bigpicture as bp
    from bigpicture.engine import held
    from bigpicture.engine.cuts import plan_traffic

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = dynunet(filters=(4, 8, 8, 8, 8)).double()
    x = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    counts = {"write": 0, "read": 0, "grad": 0}
    write, read, leaf, add = held.DeviceTier.write, held.Crop.read, held.Crop.leaf, held.Crop.add_grad

    def counted(key, nbytes):
        counts[key] += nbytes

    held.DeviceTier.write = lambda s, st, b, v: (counted("write", v.nbytes), write(s, st, b, v))[1]
    held.Crop.read = lambda s, out: _read(s, out, read, counted)
    held.Crop.leaf = classmethod(lambda c, w, b, d: _leaf(c, w, b, d, leaf, counted))
    held.Crop.add_grad = lambda s, t, g: (counted("grad", g.nbytes), add(s, t, g))[1]
    try:
        net = bp.tiled(model, tile=8, cuts=cuts)
        with torch.set_grad_enabled(training):
            y, expected = net(x), model(x)
            if training:
                y.square().sum().backward()
        error = float((y - expected).abs().max())
    finally:
        held.DeviceTier.write, held.Crop.read, held.Crop.add_grad = write, read, add
        held.Crop.leaf = classmethod(leaf.__func__)
    rows = plan_traffic(net.plan)
    predicted_moved = sum(r.moved for r in rows)
    held_bytes = sum(r.held for r in rows)
    # the earlier passes' backward reads the held gradient by write boxes, which partition it: one held
    moved = counts["write"] + counts["read"] + counts["grad"] + (held_bytes if training else 0)
    return {"mode": "training" if training else "inference", "tiles": len(net.plan.tiles),
            "passes": 1 + len(net.plan.earlier), "held": held_bytes, "moved": moved,
            "predicted": predicted_moved, "error": error, **counts}  # fmt: skip


def _read(crop, out, read, counted):
    value = read(crop, out)
    if crop.whole is None or crop.values is crop.whole:  # from the tier, not from the tile's own leaf
        counted("read", value.nbytes)
    return value


def _leaf(cls, whole, box, device, leaf, counted):
    crop = leaf.__func__(cls, whole, box, device)
    counted("read", crop.values.nbytes)
    return crop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write its section of RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="L4 only")
    a = ap.parse_args()
    t0 = time.perf_counter()
    rows = [predicted(d, 512) for d in (DEVICES[:1] if a.quick else DEVICES)]
    head = ("device", "tile", "halo overhead", "predicted step", "with cuts: tiles of the stages",
            "halo overhead",
            "predicted step", "cuts", "tier", "host memory (values + gradients)", "traffic per step",
            "planning s (plain, cuts)")  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        out.append(
            f"| {r['device']} | {_side(r['tile'])} | {100 * r['halo']:.0f}% | {r['time']:.2f} s | "
            f"{' / '.join(dict.fromkeys(map(_side, r['staged_tile'])))} | {100 * r['staged_halo']:.0f}% | "
            f"{r['staged_time']:.2f} s | "
            f"{len(r['cuts'])} | {r['tiers']} | {r['held']} | {r['moved']} | "
            f"{r['plan_s'][0]:.0f}, {r['plan_s'][1]:.0f} |"
        )
    print("\n".join(out), flush=True)
    cuts = rows[0]["cuts"]  # the L4's: in host memory
    checks = [measured(cuts, training) for training in (False, True)]
    head = ("mode", "passes", "tiles (last pass)", "held", "written to the tier", "read back",
            "gradients added", "moved, measured", "moved, predicted", "measured / predicted",
            "max abs error vs untiled")  # fmt: skip
    out2 = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for c in checks:
        out2.append(
            f"| {c['mode']} | {c['passes']} | {c['tiles']} | {_kib(c['held'])} | {_kib(c['write'])} | "
            f"{_kib(c['read'])} | {_kib(c['grad'])} | {_kib(c['moved'])} | {_kib(c['predicted'])} | "
            f"{c['moved'] / c['predicted']:.3f} | {c['error']:.1e} |"
        )
    print("\n".join(out2))
    title = "## Stages kept in a slower tier: halo overhead and traffic (benchmarks/stages.py)"
    publish("stages.py", title, [
        f"Machine: this CPU (predictions need no GPU), load average {os.getloadavg()[0]:.1f}; "
        f"{time.perf_counter() - t0:.0f} s in all. MONAI DynUNet 3D (kernels 3, strides 1,2,2,2,2, batch "
        f"norm), 512^3, bfloat16, training step; the planner's tile for the device's memory, without and "
        f"with `cuts=\"auto\", host_memory=\"{HOST}\"`. The planner keeps a cut in the first tier that "
        "fits: the device's own memory, then the host's (pinned). Host memory counts the values and "
        "gradients of the cuts kept there; traffic is the bytes moved per step between the tiles and the "
        "tier (over the card's PCIe link, `devices.HOST_LINKS`, for the host tier), charged in the "
        "predicted step, not overlapped.", "",
        *out, "", f"Cuts chosen on {rows[0]['device']}: {', '.join(f'`{c}`' for c in cuts)}.", "",
        "Measured on this CPU: the same DynUNet with filters (4, 8, 8, 8, 8) at 32^3 in float64, tile 8, "
        "cut at those nodes; bytes counted where `engine/held.py` writes the tier and reads it back (in "
        "training also each tile's crop leaf and its gradient added back; the earlier passes' backward "
        "reads the held gradient by write boxes, which partition it, counted as one held size). The "
        "prediction counts every tile's recompute read, the kept last tile's included.", "", *out2, "",
    ], a.write)  # fmt: skip


def _side(tile) -> str:
    return "x".join(map(str, tile)) if len(set(tile)) > 1 else f"{tile[0]}^{len(tile)}"


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f} KiB"


if __name__ == "__main__":
    main()
