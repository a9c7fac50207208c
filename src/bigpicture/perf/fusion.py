"""Inductor's fusion in the performance model, for compiled tiles (``perf.compiled``).

Assumption: TorchInductor fuses a chain of memory-bound ops (pointwise ops, eval-mode normalisation,
activations) into one generated kernel that reads the chain's inputs once and writes its result
once; convolutions, pooling and matmuls stay library calls (oneDNN, cuDNN, cuBLAS) and are not
fused with their neighbours (Ansel et al., "PyTorch 2: Faster Machine Learning Through Dynamic
Python Bytecode Transformation and Graph Compilation", ASPLOS 2024, section 5: inductor's
scheduler fuses pointwise and reduction nodes into one loop nest; the inductor design notes on
"vertical fusion"). So a chain of k pointwise ops on a tensor of B bytes moves 2B instead of 2kB:

    eager     conv -> [bn: read B, write B] -> [relu: read B, write B] -> conv
    compiled  conv -> [bn+relu: read B, write B]                        -> conv

In the model: an op is a *follower* when one of its inputs is made by another memory-bound op
that nothing else uses and that is not an output of the tiles (its value need never be stored). A
follower no longer pays that input's read, nor its producer's write: of a follower's traffic (its m
inputs and its output, taken as equal in size), 2 of the m + 1 tensors go, so a unary follower
costs nothing and a binary one a third. The backward's pointwise chains fuse the same way. Not
modelled: epilogue fusion into convolutions, horizontal fusion, reductions fused across a chain,
the compile time itself (paid once per tile geometry, reported apart by benchmarks/compiled.py).
On the host, the tile interpreter's per-node cost is gone (a tile is one call of its compiled
graph); each op is charged its launch floor instead of a dispatch (``fused_rates``). The
predictions are for GPUs first: there the memory-bound ops are most of the time (27% norm, 23%
unary, 17% binary for a ResNet-50 step, issue 13), and a small tile's host time.
"""

from __future__ import annotations

import numpy as np

from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose, Pad, Resample, Slice

FUSED_KINDS = ("unary", "binary", "norm", "prelu")  # steps.Step.kind of the memory-bound ops
ASSUMPTION = (
    "compiled tiles: chains of memory-bound ops fused by inductor, each follower's chained read and its "
    "producer's write removed (perf/fusion.py)"
)
_NOT_MEMORY_BOUND = (Window, ConvTranspose, Pad, Resample, Slice)


def fused_rates(rates):
    """``rates`` for compiled tiles: memory-bound steps fused (``fuse``, through ``rates.fused``), and
    on the host no tile interpreter (one compiled graph per tile): each op costs its launch, not the
    interpreter's per-node cost plus a dispatch (an upper bound: followers launch nothing)."""
    rates.fused = True
    rates.node_s = rates.train_node_s = 0.0
    if rates.gpu:
        rates.host_op_s = rates.launch_s
    return rates


def fuse(split, node, st) -> None:
    """Scales the step ``st`` of ``node`` (forward and backward seconds) to its share of traffic
    left in a fused chain; leaves compute-bound steps and chain heads alone."""
    inputs = [i for i in split.ops[node].inputs if i in split.ops]
    chained = [p for p in inputs if _fusable_producer(split, p)]
    if not chained:
        return
    share = max(0.0, 1.0 - 2.0 * len(chained) / (len(inputs) + 1))
    fused = np.isin(st.kind, FUSED_KINDS)  # a step on arrays (steps.steps_of): one kind per row
    st.fwd_s = np.where(fused, st.fwd_s * share, st.fwd_s)
    st.bwd_s = np.where(fused, st.bwd_s * share, st.bwd_s)


def _fusable_producer(split, p) -> bool:
    """A value inductor never writes out: a memory-bound op's, with one user, not a tile output."""
    op = split.ops.get(p)
    return (
        op is not None
        and p is not split.input
        and split.roles.get(p) == "spatial"
        and p not in split.sinks
        and len(p.users) == 1
        and op.kind == "local"
        and not isinstance(op, _NOT_MEMORY_BOUND)
    )
