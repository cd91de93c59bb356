"""The calibrator without torch: exported to ONNX at align time, run with ONNX Runtime and numpy.

Torch-free backends (llama.cpp) run the calibrator from the ``calibrator.onnx`` an aligned artifact carries: one
sequence, one KV-cache pair per layer, so each target step costs a few cached calibrator token steps as on the torch
path; a contrast artifact's graph holds expert and anti-expert as batch rows 0 and 1 and gives their log-ratio.
It runs at every decoding step, where ONNX Runtime's cost is per operator, so the graph is written with its fused
transformer operators (11 per layer instead of ~45 traced), and its products' weights are int8 blocks by default
(docs/benchmarks.md). Building the graph needs numpy and ``onnx``; :class:`OnnxRunner` needs numpy and onnxruntime.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from detox.config import CalibratorConfig
from detox.quantization import quantize_blockwise

OPSET = 18
ROTARY_POSITIONS = 32768  # rows of the rotary cos/sin tables: the longest text the exported calibrator can read
LAYOUT = "detox-calibrator-onnx-3"  # metadata_props["layout"]: per-layer caches, fused operators, models as batch rows
_MS = "com.microsoft"
FLOAT32, INT8 = "float32", "int8"  # weights_dtype: how the graph stores its products' weights
WEIGHTS_DTYPES = (INT8, FLOAT32)
QUANT_BLOCK = 32  # rows per quantization block of an int8 MatMulNBits weight
QUANTIZED_TOLERANCE = 0.05  # export check: a quantized graph's largest error, as a fraction of the output's magnitude


def build_calibrator_graph(weights: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
                           config: CalibratorConfig, weights_dtype: str = FLOAT32) -> Any:
    """The calibrator as an ``onnx.ModelProto``, from its state dict (numpy arrays, names as in ``CalibratorLM``).

    ``weights`` may also be a pair ``[expert, anti_expert]`` (same ``config``): both run on the same ids as one batch
    (one run instead of two), and the graph ends in what contrast fusion reads, ``log_ratio`` ``[1, 1, vocab_cal]``
    (as :meth:`detox.fusion.ContrastHead.prepare` computes it in torch).

    Exact float16 weights are stored as float16 + a ``Cast`` (half the file; ONNX Runtime folds it at load, as it
    folds the RMSNorm scales multiplied into the next product's weights and the rotary tables).
    ``weights_dtype="int8"``: every product's weight as 8-bit blocks (:mod:`detox.quantization`): a quarter of the
    bytes per step for about 1 % error (``"float32"``: exact).
    """
    from onnx import TensorProto, helper, numpy_helper

    check_weights_dtype(weights_dtype)
    models = [weights] if isinstance(weights, Mapping) else list(weights)
    n = len(models)
    if n not in (1, 2):
        raise ValueError(f"build_calibrator_graph takes one model or an [expert, anti-expert] pair, got {n} models")
    d, heads, layers = config.hidden_size, config.num_heads, config.num_layers
    eps = float(config.norm_eps)
    inits: list[Any] = []
    nodes: list[Any] = []

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: Any) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, domain=domain, **attrs))

    def const(name: str, value: np.ndarray) -> str:
        value = np.ascontiguousarray(value)
        if value.dtype.kind == "f" and np.array_equal(value.astype(np.float16).astype(value.dtype), value):
            inits.append(numpy_helper.from_array(value.astype(np.float16), name + ".f16"))
            node("Cast", [name + ".f16"], [name], to=TensorProto.FLOAT)
        else:
            inits.append(numpy_helper.from_array(value, name))
        return name

    def stacked(name: str) -> np.ndarray:
        return np.stack([np.asarray(m[name], dtype=np.float32) for m in models])

    def quantized_matmul(x: str, name: str, weight: np.ndarray, out: str) -> None:
        """``x @ weight[i]`` for each model ``i`` (``weight`` ``[n, in, out]``) with 8-bit blocks: one
        ``MatMulNBits`` per model, on that model's batch row of ``x``."""
        rows = [x] if n == 1 else [f"{x}.{i}" for i in range(n)]
        if n > 1:
            node("Split", [x], rows, axis=0, num_outputs=n)
        parts = [out] if n == 1 else [f"{out}.{i}" for i in range(n)]
        for i, (row, part) in enumerate(zip(rows, parts)):
            qw = quantize_blockwise(weight[i], QUANT_BLOCK)
            tensors = [numpy_helper.from_array(a, f"{name}.{i}.{kind}")
                       for kind, a in (("q", qw.packed), ("scales", qw.scales), ("zeros", qw.zero_points))]
            inits.extend(tensors)
            node("MatMulNBits", [row, *(t.name for t in tensors)], [part], domain=_MS, K=qw.k, N=qw.n, bits=qw.bits,
                 block_size=qw.block_size, accuracy_level=4)  # 4: int8 arithmetic
        if n > 1:
            node("Concat", parts, [out], axis=0)

    def linear(x: str, name: str, out: str, norm: str | None = None) -> None:
        """``out = x @ Wᵀ`` for each model's torch weight ``name``, scaled by the norm before it."""
        weight = stacked(name).transpose(0, 2, 1)  # [n, in, out]
        if weights_dtype == FLOAT32:  # the norm's scale as a Mul that ONNX Runtime folds at load
            const(name, weight)
            if norm is not None:
                node("Mul", [name, const(norm, stacked(norm)[:, :, None])], [name + ".scaled"])
            node("MatMul", [x, name if norm is None else name + ".scaled"], [out])
            return
        if norm is not None:
            weight = weight * stacked(norm)[:, :, None]
        quantized_matmul(x, name, weight, out)

    ones = const("norm.ones", np.ones(d, dtype=np.float32))  # the norms' own scale; the real one is folded

    # rotary tables [ROTARY_POSITIONS, head_dim / 2], as CalibratorLM computes them (float32 positions x inv_freq)
    hd = config.head_dim
    inv_freq = (1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))).astype(np.float32)
    const("rope.inv_freq", inv_freq[None, :])
    for name, value in (("rope.start", 0.0), ("rope.limit", float(ROTARY_POSITIONS)), ("rope.delta", 1.0)):
        inits.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
    node("Range", ["rope.start", "rope.limit", "rope.delta"], ["rope.range"])
    node("Unsqueeze", ["rope.range", const("rope.axis", np.array([1], dtype=np.int64))], ["rope.positions"])
    node("Mul", ["rope.positions", "rope.inv_freq"], ["rope.freqs"])
    node("Cos", ["rope.freqs"], ["rope.cos"])
    node("Sin", ["rope.freqs"], ["rope.sin"])

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])]
    outputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [n, "seq", d])]
    embed = np.concatenate([np.asarray(m["embed.weight"], dtype=np.float32) for m in models])  # model i: rows i*V...
    if n == 1:
        node("Gather", [const("embed.weight", embed), "input_ids"], ["x"])
    else:
        offsets = const("embed.offsets", (np.arange(n, dtype=np.int64) * config.vocab_size)[:, None])
        node("Add", ["input_ids", offsets], ["ids"])  # [n, seq]: each model's ids into its block of the table
        node("Gather", [const("embed.weight", embed), "ids"], ["x"])
    node("Shape", ["past_key_0"], ["offset"], start=2, end=3)  # [past]: positions continue after the cache

    residual, delta = "x", None  # the block input is residual + delta (delta folded into the next norm)
    for i in range(layers):
        b = f"blocks.{i}."
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", TensorProto.FLOAT, [n, heads, "past", hd]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", TensorProto.FLOAT, [n, heads, "total", hd]))
        if delta is None:
            node("SimplifiedLayerNormalization", [residual, ones], [b + "n1"], axis=-1, epsilon=eps)
        else:
            node("SkipSimplifiedLayerNormalization", [delta, residual, ones], [b + "n1", "", "", b + "x"],
                 domain=_MS, epsilon=eps)
            residual = b + "x"
        linear(b + "n1", b + "qkv.weight", b + "qkv", b + "attn_norm.weight")
        node("Split", [b + "qkv"], [b + "q", b + "k", b + "v"], axis=-1, num_outputs=3)
        for t in ("q", "k"):
            node("RotaryEmbedding", [b + t, "offset", "rope.cos", "rope.sin"], [b + t + "_rot"], domain=_MS,
                 num_heads=heads, interleaved=0)
        node("MultiHeadAttention", [b + "q_rot", b + "k_rot", b + "v", "", "", "", f"past_key_{i}", f"past_value_{i}"],
             [b + "att", f"present_key_{i}", f"present_value_{i}"], domain=_MS, num_heads=heads, unidirectional=1)
        linear(b + "att", b + "out.weight", b + "att_out")
        node("SkipSimplifiedLayerNormalization", [b + "att_out", residual, ones], [b + "n2", "", "", b + "h"],
             domain=_MS, epsilon=eps)
        linear(b + "n2", b + "up.weight", b + "up", b + "mlp_norm.weight")
        node("Gelu", [b + "up"], [b + "gelu"], domain=_MS)  # erf form, as torch's F.gelu
        linear(b + "gelu", b + "down.weight", b + "down")
        residual, delta = b + "h", b + "down"
    node("SkipSimplifiedLayerNormalization", [delta, residual, ones], ["normed"], domain=_MS, epsilon=eps)
    node("Mul", ["normed", const("norm.weight", stacked("norm.weight")[:, None, :])], ["hidden"])
    if n == 2:  # the contrast pair's log-ratio at the last position; the reshaped, transposed table is folded at load
        outputs[0] = helper.make_tensor_value_info("log_ratio", TensorProto.FLOAT, [1, 1, config.vocab_size])
        last = [const(name, np.array([v], dtype=np.int64)) for name, v in (("last.start", -1), ("last.end", 2**62),
                                                                              ("last.axis", 1))]
        node("Slice", ["hidden", *last], ["hidden.last"])
        if weights_dtype == FLOAT32:
            node("Reshape", ["embed.weight", const("head.shape", np.array([n, config.vocab_size, d], dtype=np.int64))],
                 ["head.embed"])
            node("Transpose", ["head.embed"], ["head.weight"], perm=[0, 2, 1])
            node("MatMul", ["hidden.last", "head.weight"], ["head.logits"])
        else:
            quantized_matmul("hidden.last", "head.weight", embed.reshape(n, config.vocab_size, d).transpose(0, 2, 1),
                             "head.logits")
        node("LogSoftmax", ["head.logits"], ["head.logprobs"], axis=-1)
        node("Split", ["head.logprobs"], ["head.expert", "head.anti"], axis=0, num_outputs=2)
        node("Sub", ["head.expert", "head.anti"], ["log_ratio"])

    graph = helper.make_graph(nodes, "detox_calibrator", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(_MS, 1)],
                              producer_name="detox")
    helper.set_model_props(model, {"layout": LAYOUT, "rotary_positions": str(ROTARY_POSITIONS), "models": str(n),
                                   "weights_dtype": weights_dtype})
    return model  # not onnx.checker: it does not know ONNX Runtime's operators; the export check runs it instead


def check_weights_dtype(value: str, name: str = "weights_dtype") -> None:
    """Refuse a ``weights_dtype`` (called ``name`` where the user gave it) that no graph can be built with; callers
    that export last (``detox align``, ``reexport-onnx``) check it before any work is done."""
    if value not in WEIGHTS_DTYPES:
        raise ValueError(f"{name} must be one of {', '.join(WEIGHTS_DTYPES)}, got {value!r}")


def export_calibrator_onnx(model: Any, path: str | os.PathLike[str], anti: Any = None,
                           weights_dtype: str = FLOAT32) -> Path:
    """Write a :class:`~detox.calibrator.CalibratorLM` (with ``anti``: the pair) as one ONNX file
    (:func:`build_calibrator_graph`), checked against the torch model(s) on a cached run of three chunks when
    onnxruntime is installed (``RuntimeError`` beyond :func:`export_tolerance`)."""
    import onnx

    models = [model] if anti is None else [model, anti]
    weights = [{k: v.detach().float().cpu().numpy() for k, v in m.state_dict().items()} for m in models]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_calibrator_graph(weights, model.config, weights_dtype), str(out))
    _check_export(models, out)
    return out


def export_tolerance(expected: np.ndarray, weights_dtype: str) -> float:
    """The largest error an export may have against the torch model(s)' ``expected`` output: float rounding, plus,
    with int8 weights, :data:`QUANTIZED_TOLERANCE` of the output's largest magnitude (about 1 % is typical)."""
    scale = QUANTIZED_TOLERANCE * float(np.abs(expected).max()) if weights_dtype == INT8 else 0.0
    return 1e-3 + scale


def _check_export(models: list[Any], path: Path) -> None:
    try:
        import onnxruntime  # noqa: F401  (only checks that it is installed)
    except ImportError:
        return
    import torch

    from detox.fusion import pair_log_ratio

    runner = OnnxRunner(path)
    state = runner.empty_state()
    caches = [m.empty_cache(1) for m in models]
    g = torch.Generator().manual_seed(0)
    for n in (5, 1, 3):
        ids = torch.randint(0, models[0].config.vocab_size, (1, n), generator=g)
        got, state = runner.run(ids[0].tolist(), state)
        hidden = []
        with torch.inference_mode():
            for i, m in enumerate(models):
                h, caches[i] = m(ids, caches[i])
                hidden.append(h[0, -1].float())
            if len(models) == 2:  # the log-ratio, as ContrastHead.prepare computes it
                expected = pair_log_ratio(torch.stack(hidden), *(m.embed.weight.float() for m in models))
            else:
                expected = hidden[0]
        err = float(np.abs(got - expected.numpy()).max())
        if not err <= export_tolerance(expected.numpy(), runner.weights_dtype):
            raise RuntimeError(f"the ONNX export of the calibrator differs from the torch model (max error {err:.3g})")


def session_options(threads: int = 1) -> Any:
    """ONNX Runtime options for a calibrator session: ``threads`` intra-op threads that do not spin (the step is tiny,
    and idle-spinning threads would steal the cores the target model is decoding on), full graph optimisation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


class OnnxRunner:
    """Runs ``calibrator.onnx`` with ONNX Runtime, one chunk at a time (the :class:`~detox.stream.CalibratorRunner`
    protocol); the state is a tuple of numpy caches ``(key_0, value_0, key_1, ...)``. It gives a single model's
    hidden state ``[d_cal]``, or a pair's log-ratio ``[vocab_cal]`` (``gives_log_ratio``)."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), session_options(threads), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("layout") != LAYOUT:
            raise ValueError(
                f"{self.path} is not a calibrator export this detox can run (layout {meta.get('layout', 'unknown')!r}, "
                f"expected {LAYOUT!r}): it was written by an older detox. Export it again (same weights, new version): "
                "detox artifacts reexport-onnx ARTIFACT --out NEW_DIR"
            )
        self.max_positions = int(meta["rotary_positions"])
        self.gives_log_ratio = self.session.get_outputs()[0].name == "log_ratio"  # a contrast pair
        self.weights_dtype = meta.get("weights_dtype", FLOAT32)
        self.cache_names = [i.name for i in self.session.get_inputs()[1:]]
        models, heads, _, head_dim = self.session.get_inputs()[1].shape
        self.models = int(models)
        self.cache_shape = (self.models, int(heads), 0, int(head_dim))

    def empty_state(self) -> tuple[np.ndarray, ...]:
        return tuple(np.zeros(self.cache_shape, np.float32) for _ in self.cache_names)

    def run(self, ids: list[int], state: tuple[np.ndarray, ...]) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """The output at the last id (the hidden state ``[d_cal]``; a pair's log-ratio ``[vocab_cal]``) and the cache
        extended by ``ids``."""
        total = state[0].shape[2] + len(ids)
        if total > self.max_positions:
            raise ValueError(f"the calibrator can read at most {self.max_positions} tokens of text; this sequence "
                             f"needs {total}. Start a new sequence (or reset the wrapped model) for longer texts.")
        feeds = dict(zip(self.cache_names, state))
        feeds["input_ids"] = np.asarray([ids], dtype=np.int64)
        hidden, *caches = self.session.run(None, feeds)
        return hidden[0, -1], tuple(caches)
