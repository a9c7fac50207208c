"""GPU convolution rates: the assumptions of ``rates.GPU_ASSUMPTIONS``, each with its source.

GPUs in the device table are not measured here; ``rates.Rates.conv`` asks ``gpu_conv_rate`` for
a convolution's rate on one (the rest of a GPU's rates are in ``rates.py``; ``rates`` arguments
here are its ``Rates``, which import this module)."""

from __future__ import annotations

import math

import torch

GPU_CONV_EFFICIENCY = 0.7

# Output positions x output channels per thread block of the implicit GEMM: a typical cuBLAS/cuDNN
# tile (NVIDIA, "Matrix Multiplication Background User's Guide", DU-09799-001, sec. 2.3 and 3)
GPU_CTA_TILE = (128, 128)
# Winograd F(2x2, 3x3): 16 multiplies where direct convolution takes 36 for a 2x2 output tile
# (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016, sec. 4)
WINOGRAD_3X3 = 36 / 16


def gpu_conv_rate(
    rates, nd: int, fan_in: int, cout: int, positions: int, stride: int, transposed: bool,
    cin: int | None, kernel: int | None,
) -> float:  # fmt: skip
    """Flops/s (direct-convolution flops) of a cuDNN convolution, its implicit GEMM of M = output
    positions (batch included), N = output channels, K = `fan_in` (NVIDIA, "Convolutional Layers
    User's Guide", DU-09798-001: the mapping of a convolution to a GEMM):

    - 70% of the dtype's dense peak (`GPU_CONV_EFFICIENCY`), less for short K (each block's
      prologue and epilogue amortised over K / (K + h), h wider on tensor cores);
    - tile quantization (M and N rounded up to whole blocks of `GPU_CTA_TILE`) and wave
      quantization (blocks in whole waves over the SMs, one at a time per SM), as the NVIDIA Matrix
      Multiplication Background User's Guide (DU-09799-001, sec. 3.1, 3.2) describes them;
    - float32 on CUDA cores (no TF32: V100, T4, or ``allow_tf32`` off): a 3x3 stride-1 2D
      convolution runs as Winograd F(2x2,3x3), 2.25x fewer multiplies (Lavin & Gray 2016); cuDNN
      implements it for forward, data and filter gradients (CUDNN_CONVOLUTION_*_ALGO_WINOGRAD*, 3x3
      filters, stride 1: cuDNN API reference) and ``torch.backends.cudnn.benchmark`` picks the
      fastest algorithm. The transforms are neglected (they are memory-bound and amortised over
      the channels). Kernel volume 9 in 2D is taken for 3x3 (a 1x9 kernel would be counted so too);
    - tensor cores on NCHW tensors (PyTorch's default layout, the tile interpreter's): cuDNN runs
      tensor-core kernels in NHWC and transposes NCHW operands first and the result back ("The cuDNN
      library may use padding, folding, and NCHW-to-NHWC transformations to call the Tensor Core
      operations", cuDNN Developer Guide, Tensor Core operations; NVIDIA Convolutional Layers User's
      Guide, "Tensor Layouts In Memory: NCHW vs NHWC"): each kernel (forward, data gradient, filter
      gradient) reads and writes both its activation operands once more, at the stream rate.
      Input channels are per group, so a grouped convolution's input transpose is under-counted.
    """
    dev = rates.device
    tensor_cores = rates.peak > 1.01 * dev.peak("fp32")
    half = 32 if tensor_cores else 8  # tensor-core tiles are deeper in K: they fill later
    rate = rates.peak * GPU_CONV_EFFICIENCY * fan_in / (fan_in + half)
    rate *= quantization(positions, cout, dev.sms)
    winograd = nd == 2 and kernel == 9 and stride == 1 and not transposed
    if winograd and not tensor_cores and rates.dtype == torch.float32:
        rate *= WINOGRAD_3X3
    if tensor_cores and not rates.channels_last:
        item = rates.dtype.itemsize
        cin = cin if cin is not None else fan_in // max(kernel or 1, 1)
        scaled = positions * stride**nd  # the other operand's positions: input of a strided conv
        elems = cin * (positions if transposed else scaled) + cout * (scaled if transposed else positions)
        moved = 2 * elems * item  # read in one layout, written in the other
        flops = 2 * positions * fan_in * cout
        rate = flops / (flops / rate + moved / rates.stream("copy", moved))
    return rate


def quantization(positions: int, channels: int, sms: int | None) -> float:
    """Useful fraction of a GPU's work for a GEMM of `positions` x `channels` outputs in blocks of
    `GPU_CTA_TILE`: tile quantization (the last block in each dimension partly idle) times wave
    quantization (the last wave of blocks over `sms` SMs partly idle; not counted without `sms`).
    Few output channels get a narrower block (32 or 64 wide): the libraries carry kernels of several
    tile shapes and pick one per problem (the same guide, sec. 2.3)."""
    tm, tn = GPU_CTA_TILE
    tn = next((n for n in (32, 64) if channels <= n), tn)
    blocks = math.ceil(positions / tm) * math.ceil(channels / tn)
    tiles = positions * channels / (blocks * tm * tn)
    waves = blocks / (math.ceil(blocks / sms) * sms) if sms else 1.0
    return tiles * waves
