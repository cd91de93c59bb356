"""Block-wise int8 weights: the numpy quantizer's layout is the one ONNX Runtime's MatMulNBits reads."""

import numpy as np
import pytest

from detox.quantization import QuantizedWeight, quantize_blockwise


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """The ``[K, N]`` float32 weight that ``qw`` stands for (the layout, read back: the test's reference)."""
    blocks = qw.packed.shape[1]
    zero = qw.zero_points.reshape(qw.n, blocks, 1).astype(np.float32)
    cols = (qw.packed.astype(np.float32) - zero) * qw.scales.reshape(qw.n, blocks, 1)
    return cols.reshape(qw.n, -1)[:, : qw.k].T.copy()


@pytest.mark.parametrize("k", [64, 40])  # whole blocks, and a last block padded with zeros
def test_quantization_error_is_at_most_half_a_step_of_each_block(k):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, 24)).astype(np.float32)
    w[:, 3] = np.abs(w[:, 3])  # an all-positive column: its range still includes 0
    w[:, 5] = 0.0  # an all-zero column
    qw = quantize_blockwise(w, block_size=32)
    assert qw.packed.dtype == np.uint8 and qw.packed.shape == (24, 2, 32)
    back = dequantize(qw)
    assert back.shape == w.shape
    step = np.repeat(qw.scales.reshape(24, 2), 32, axis=1)[:, :k].T  # each weight's block scale
    assert (np.abs(back - w) <= step / 2 + 1e-6).all()
    assert (back[:, 5] == 0).all() and (np.abs(back - w).max() > 0)


def test_block_size_must_suit_matmulnbits():
    with pytest.raises(ValueError, match="power of two"):
        quantize_blockwise(np.zeros((64, 8), np.float32), block_size=24)


def test_onnx_runtime_reads_the_layout_as_written():
    """MatMulNBits with float arithmetic (accuracy_level 0) gives x @ dequantize(W): the packing is what it reads."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    k, n = 72, 40
    qw = quantize_blockwise(rng.standard_normal((k, n)).astype(np.float32), block_size=32)
    inits = [numpy_helper.from_array(a, name) for name, a in (("B", qw.packed), ("S", qw.scales), ("Z", qw.zero_points))]
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                            block_size=32, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ dequantize(qw), rtol=1e-4, atol=1e-4)
