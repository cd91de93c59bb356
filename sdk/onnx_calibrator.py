"""The calibrator without torch: exported to ONNX at align time, run with ONNX Runtime and numpy.

Backends that must not pull in torch (llama.cpp) run the calibrator from the ``calibrator.onnx`` an aligned
artifact carries. The graph computes what :class:`~detox.calibrator.CalibratorLM` computes for one sequence:
``(input_ids [1, t], past_k, past_v) -> (hidden [1, t, d], present_k, present_v)`` with caches shaped
``[layers, 1, heads, past, head_dim]`` and dynamic ``t``/``past`` axes, so each target step costs a few
cached calibrator token steps, exactly as on the torch path.

Only :func:`export_calibrator_onnx` needs torch and ``onnx`` (it is called by ``detox align``); importing this
module and using :class:`OnnxRunner` needs only numpy and onnxruntime.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

INPUT_NAMES = ("input_ids", "past_k", "past_v")
OUTPUT_NAMES = ("hidden", "present_k", "present_v")
OPSET = 17

KV = tuple[np.ndarray, np.ndarray]


def _export_module(model: Any) -> Any:
    """An export-only twin of ``model`` (batch 1) that computes the same function with fewer graph nodes.

    ONNX Runtime pays a few microseconds per node, and the calibrator runs at every target step, so the graph is
    kept lean: constant reshapes instead of shape arithmetic, rotary ``rotate_half`` as a product with a constant
    matrix, RMSNorm and GELU in the forms ONNX Runtime fuses into single kernels, one additive causal mask. The
    exporter also lacks ``aten::rms_norm``. Weights that are exact float16 values (artifacts store float16) are
    kept as float16 + a cast, which ONNX Runtime folds at load: half the file, identical results.
    :func:`export_calibrator_onnx` checks the export against ``model`` when onnxruntime is available.
    """
    import torch
    from torch import nn

    cfg = model.config
    h, d = cfg.num_heads, cfg.head_dim

    def stored(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float().clone()
        return t.half() if torch.equal(t.half().float(), t) else t

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []
            for name, value in model.state_dict().items():
                if name == "inv_freq":
                    continue
                key = name.replace(".", "__")
                self.register_buffer(key, stored(value))
                self.names.append(key)
            self.register_buffer("inv_freq", model.inv_freq.detach().float().clone())
            rot = torch.zeros(d, d)  # x @ rot == rotate_half(x) == cat(-x2, x1)
            half = d // 2
            rot[half:, :half] = -torch.eye(half)
            rot[:half, half:] = torch.eye(half)
            self.register_buffer("rot", rot)

        def w(self, name: str) -> torch.Tensor:
            return getattr(self, name.replace(".", "__")).float()

        def rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
            return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * self.w(name)

        def forward(self, input_ids: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor) -> tuple[torch.Tensor, ...]:
            p = past_k.shape[3]
            x = self.w("embed.weight")[input_ids[0]]  # [t, d_model]
            t = input_ids.shape[1]
            pos = torch.arange(t, dtype=torch.float32) + p
            freqs = pos[:, None] * self.inv_freq[None, :]
            emb = torch.cat([freqs, freqs], dim=-1)
            cos, sin = emb.cos(), emb.sin()  # [t, head_dim]
            q_pos = torch.arange(t)[:, None] + p
            k_pos = torch.arange(t + p)[None, :]
            bias = torch.zeros(t, t + p).masked_fill(k_pos > q_pos, float("-inf"))
            keys, values = [], []
            for i in range(cfg.num_layers):
                b = f"blocks.{i}."
                qkv = (self.rms(x, b + "attn_norm.weight") @ self.w(b + "qkv.weight").t()).reshape(-1, 3, h, d).permute(1, 2, 0, 3)
                q, k, v = qkv[0], qkv[1], qkv[2]  # [heads, t, head_dim]
                q = q * cos + (q @ self.rot) * sin
                k = k * cos + (k @ self.rot) * sin
                k = torch.cat([past_k[i, 0], k], dim=1)
                v = torch.cat([past_v[i, 0], v], dim=1)
                att = torch.softmax((q @ k.transpose(1, 2)) * (d ** -0.5) + bias, dim=-1) @ v
                x = x + att.transpose(0, 1).reshape(-1, h * d) @ self.w(b + "out.weight").t()
                up = torch.nn.functional.gelu(self.rms(x, b + "mlp_norm.weight") @ self.w(b + "up.weight").t())
                x = x + up @ self.w(b + "down.weight").t()
                keys.append(k)
                values.append(v)
            hidden = self.rms(x, "norm.weight")
            return hidden[None], torch.stack(keys)[:, None], torch.stack(values)[:, None]

    return Twin().eval()


def export_calibrator_onnx(model: Any, path: str | os.PathLike[str], check: bool = True) -> Path:
    """Export a :class:`~detox.calibrator.CalibratorLM` (torch) to one ONNX file with a dynamic KV cache.

    Needs torch and the ``onnx`` package; ``check`` compares the export with ``model`` on a cached two-chunk run
    when onnxruntime is installed (raising ``RuntimeError`` if they differ).
    """
    import torch

    cfg = model.config
    twin = _export_module(model)
    ids = torch.tensor([[1, 2, 3]], dtype=torch.long)
    past = torch.zeros(cfg.num_layers, 1, cfg.num_heads, 2, cfg.head_dim)
    cache_axes = {3: "past"}
    dynamic_axes = {
        "input_ids": {1: "seq"}, "past_k": cache_axes, "past_v": cache_axes,
        "hidden": {1: "seq"}, "present_k": {3: "total"}, "present_v": {3: "total"},
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer / deprecation chatter about the TorchScript exporter
        # dynamo=False: the TorchScript exporter ships with torch; the dynamo one needs onnxscript, not a dependency
        torch.onnx.export(twin, (ids, past, past.clone()), str(out), dynamo=False, opset_version=OPSET,
                          input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic_axes,
                          do_constant_folding=False)  # keep float16 weights + casts; ONNX Runtime folds them at load
    if check:
        _check_export(model, out)
    return out


def _check_export(model: Any, path: Path) -> None:
    try:
        import onnxruntime  # noqa: F401  (only checks that it is installed)
    except ImportError:
        return
    import torch

    runner = OnnxRunner(path)
    state = runner.empty_state()
    cache = model.empty_cache(1)
    g = torch.Generator().manual_seed(0)
    for n in (5, 1):
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g)
        hidden, state = runner.run(ids[0].tolist(), state)
        with torch.inference_mode():
            expected, cache = model(ids, cache)
        err = float(np.abs(hidden - expected[0, -1].float().numpy()).max())
        if not err <= 1e-3:
            raise RuntimeError(f"the ONNX export of the calibrator differs from the torch model (max error {err:.3g})")


class OnnxRunner:
    """Runs ``calibrator.onnx`` with ONNX Runtime, one chunk at a time (the :class:`~detox.stream.CalibratorRunner`
    protocol); the state is the numpy pair ``(past_k, past_v)``.

    One intra-op thread without spinning by default: the calibrator step is tiny, and idle-spinning threads would
    steal the cores the target model is decoding on.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        names = tuple(i.name for i in self.session.get_inputs())
        if names != INPUT_NAMES:
            raise ValueError(f"{self.path} is not a detox calibrator export (inputs {names}, expected {INPUT_NAMES})")
        layers, _, heads, _, head_dim = self.session.get_inputs()[1].shape
        self.cache_shape = (int(layers), 1, int(heads), 0, int(head_dim))

    def empty_state(self) -> KV:
        return np.zeros(self.cache_shape, np.float32), np.zeros(self.cache_shape, np.float32)

    def run(self, ids: list[int], state: KV) -> tuple[np.ndarray, KV]:
        """Hidden state of the last id ``[d_cal]`` and the cache extended by ``ids``."""
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64), "past_k": state[0], "past_v": state[1]}
        hidden, k, v = self.session.run(None, feeds)
        return hidden[0, -1], (k, v)
