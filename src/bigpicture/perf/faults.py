"""Page faults of a tiled CPU run: the heap glibc hands back to the OS between tiles, faulted in again.

    every tile's values freed at its end --(working set over glibc's trim threshold)--> heap returned
    next tile: its working set faulted in afresh, page by page (the kernel traps and zeroes each)

Counted on the benchmark's runs (getrusage, one thread): the resnet at 1024^2 faults 110 MiB a step
with tile 512 (4 tiles x its 28 MiB working set) and 168 MiB with tile 256, DenseNet-121 at 512^2
with tile 256 305 MiB; 0.3-0.5 ms per MiB on this machine, 10-15% of those inference steps. The
MONAI UNets fault almost nothing: their dense outputs and im2col columns raise the threshold over
their working sets. A training step is charged its forward pass's faults (without autograd, as in
inference); measured training steps faulted less than that (resnet tile 512: 41 MiB a step, 110 in
inference; unet2d tile 384: 48, predicted 69), which is not modelled. The counts also vary 2-5x
between identical fresh processes (resnet tile 512 inference: 16, 32, 37 MiB a step; DenseNet tile
256: 168, 196, 280): glibc's dynamic mmap threshold follows the process's history, not the plan.
"""

from __future__ import annotations

import math

from bigpicture.engine.split import Split
from bigpicture.engine.tiles import Layout, working_counts
from bigpicture.perf.rates import Rates, heap_fault_bytes
from bigpicture.perf.steps import node_step
from bigpicture.perf.walk import grad_in, grads, tile_at


def largest_block(split: Split, lay: Layout, item: int, rates: Rates, input_copy: bool, memo: dict) -> int:
    """Bytes of the largest block a step frees: a value or a convolution's workspace of the tile in
    the middle of the grid (whole-size boxes: the largest), or a boundary tensor (the dense sinks,
    assembled at full size and freed after the step). ``memo``: the split's steps, as ``walk``'s."""
    working = max((working_counts(split, lay, k) for k in split.sinks), key=math.prod)
    need, _ = tile_at(split, lay, tuple(c // 2 for c in working))
    grad = grads(split, need, False)
    steps = [node_step(split, n, need, grad_in(split, n, grad), input_copy, item, rates, memo)
             for n in list(grad)[1:]]  # fmt: skip
    values = [max(st.out, st.temp) for st in steps]
    dense = [k for k in split.sinks if any(split.roles.get(u) in ("tail", "output") for u in k.users)]
    sinks = [math.prod(split.shapes[k]) * item for k in dense]  # reductions' sinks stream: small
    return max(values + sinks, default=0)


def fault_seconds(
    split: Split, lay: Layout, peak: int, tiles: int, item: int, rates: Rates, input_copy: bool, memo: dict
) -> float:
    """Seconds a run of ``tiles`` tiles of working set ``peak`` spends faulting pages in
    (`rates.heap_fault_bytes` at the calibrated `fault_s_per_byte`); 0 on GPUs and uncalibrated CPUs."""
    if rates.gpu or not rates.fault_s_per_byte:
        return 0.0
    largest = largest_block(split, lay, item, rates, input_copy, memo)
    return float(heap_fault_bytes(peak, largest, tiles)) * rates.fault_s_per_byte
