"""Block-wise int8 weight quantization in the layout of ONNX Runtime's ``MatMulNBits`` operator (numpy only).

Why: the calibrator's step at batch 1 is a chain of matrix-vector products, limited on a CPU by the weight bytes they
read; 8-bit blocks read a quarter of them and run as integer dot products (docs/benchmarks.md, which also says why
not 4 bits). Each block of ``block_size`` input rows of one output column has its own scale and zero point
(asymmetric, 0 exact). The fast kernels are ONNX Runtime's integer ones (``accuracy_level=4``; x86 since 1.22):
a build without them ran the pair's products in 10.9 ms instead of 1.0 ms, so export with ``--onnx-weights
float32`` there. Layout, for ``y = x @ W`` with ``W`` ``[K, N]``: ``B`` ``uint8 [N, K/block, block]``,
``scales`` ``float32 [N·K/block]``, ``zero_points`` ``uint8 [N·K/block]``, ``W[k, n] = (B − zero) · scale``
(``K`` zero-padded to whole blocks).
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
