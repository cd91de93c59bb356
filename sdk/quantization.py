"""Block-wise int8 weight quantization in the layout of ONNX Runtime's ``MatMulNBits`` operator (numpy only).

The calibrator's step at batch 1 is a chain of matrix-vector products, and on a CPU those are limited by how many
weight bytes they read, not by arithmetic: the float32 pair reads 27 MB per step. Stored as 8-bit blocks, the same
products read a quarter of that, and ONNX Runtime's ``MatMulNBits`` kernel runs them as integer dot products
(docs/benchmarks.md). Each block of ``block_size`` consecutive input rows of one output column gets its own scale and
zero point (asymmetric, with 0 exactly representable), so a block's error is at most half a step of its own range.
(4 bits were measured too: ten times the error in the shipped pair's log-ratio for 0.36 ms less per step, so not
offered.) The fast 8-bit kernels are ONNX Runtime's integer ones (``accuracy_level=4``; x86 since 1.22): where a
build lacks them, its float fallback ran the pair's products in 10.9 ms instead of 1.0 ms here, so export with
``--onnx-weights float32`` for such platforms.

Layout (``com.microsoft.MatMulNBits`` with ``bits=8``, for ``y = x @ W`` with ``W`` ``[K, N]``): ``B`` is ``uint8
[N, K/block, block]``, ``scales`` ``float32 [N·K/block]``, ``zero_points`` ``uint8 [N·K/block]``, and
``W[k, n] = (B − zero) · scale`` (``K`` is zero-padded up to whole blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = 8


@dataclass
class QuantizedWeight:
    """One ``[K, N]`` weight as ``MatMulNBits`` stores it (see the module docstring)."""

    packed: np.ndarray  # uint8 [N, blocks, block_size]
    scales: np.ndarray  # float32 [N * blocks]
    zero_points: np.ndarray  # uint8 [N * blocks]
    k: int
    n: int
    block_size: int
    bits: int = BITS


def quantize_blockwise(weight: np.ndarray, block_size: int = 32) -> QuantizedWeight:
    """Quantize ``weight`` (``[K, N]``, as in ``x @ weight``) to 8-bit blocks of ``block_size`` rows."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two ≥ 16 (MatMulNBits), got {block_size}")
    w = np.asarray(weight, dtype=np.float32)
    k, n = w.shape
    blocks = -(-k // block_size)
    cols = np.zeros((n, blocks * block_size), np.float32)
    cols[:, :k] = w.T
    cols = cols.reshape(n, blocks, block_size)
    top = 2**BITS - 1
    lo = np.minimum(cols.min(-1), 0.0)
    hi = np.maximum(cols.max(-1), 0.0)
    scale = (hi - lo) / top
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, top).astype(np.uint8)
    q = np.clip(np.rint(cols / scale[..., None]) + zero[..., None], 0, top).astype(np.uint8)
    return QuantizedWeight(q, scale.reshape(-1), zero.reshape(-1), k, n, block_size)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """The ``[K, N]`` float32 weight that ``qw`` stands for."""
    blocks = qw.packed.shape[1]
    zero = qw.zero_points.reshape(qw.n, blocks, 1).astype(np.float32)
    cols = (qw.packed.astype(np.float32) - zero) * qw.scales.reshape(qw.n, blocks, 1)
    return cols.reshape(qw.n, -1)[:, : qw.k].T.copy()
