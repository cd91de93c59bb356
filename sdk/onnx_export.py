"""Export a target causal LM to ONNX (with KV cache) for ONNX Runtime, and fingerprint the export from its own files.

``export_target`` refuses an export whose fingerprint, recomputed from the exported files alone (tokenizer + the
LM-head weight read out of the graph), differs from the source model's, so an artifact aligned on the HF model is
known to match the ONNX model before anyone runs it (docs/onnxruntime.md). Reading a fingerprint needs only ``onnx``,
numpy and the tokenizer; only the export needs torch and ``optimum-onnx``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from detox.artifacts.manifest import TargetFingerprint
from detox.extras import optimum_onnx_message
from detox.fingerprint import fingerprint_hf, hf_vocab_tokens, make_fingerprint
from detox.targets import load_hf_target, pad_as_eos

FINGERPRINT_FILE = "detox_fingerprint.json"
ONNX_FILE = "model.onnx"
TASK = "text-generation-with-past"

_PASS_THROUGH = ("Identity", "Cast")


class OnnxExportError(ValueError):
    """The export failed, or a directory is not a usable ONNX export of a causal LM."""


# ---------------------------------------------------------------------------------------------------------------
# Reading an export (no torch).


def onnx_model_file(path: str | os.PathLike[str]) -> Path:
    """The ``.onnx`` file of an export directory (``model.onnx``, else the only ``.onnx`` in it), or ``path`` itself."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise OnnxExportError(f"{p} does not exist; export a model first: detox export-onnx --target MODEL --out {p}")
    if (p / ONNX_FILE).is_file():
        return p / ONNX_FILE
    found = sorted(p.glob("*.onnx"))
    if len(found) != 1:
        raise OnnxExportError(
            f"{p} is not an ONNX export of a causal LM (expected {ONNX_FILE}, found {[f.name for f in found] or 'none'}); "
            f"create one with: detox export-onnx --target MODEL --out {p}"
        )
    return found[0]


def _constant(name: str, inits: dict[str, Any], producers: dict[str, Any]) -> np.ndarray | None:
    """The value of tensor ``name`` if it is a constant: an initializer, a Constant node, or one seen through
    Identity/Cast/2-D Transpose (exporters store tied LM heads as a transposed copy of the embedding)."""
    from onnx import numpy_helper

    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers.get(name)
    if node is None:
        return None
    if node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
        return None
    if node.op_type in _PASS_THROUGH:
        return _constant(node.input[0], inits, producers)
    if node.op_type == "Transpose":
        value = _constant(node.input[0], inits, producers)
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if value is not None and value.ndim == 2 and (not perm or perm[0] == [1, 0]):
            return value.T
    return None


def onnx_output_embedding(path: str | os.PathLike[str]) -> np.ndarray:
    """The LM-head matrix ``W_out`` ([vocab, hidden], float32) read out of an exported graph.

    Follows the ``logits`` output back to the product that makes it (``MatMul(h, W)`` with ``W`` [hidden, vocab],
    or ``Gemm`` with or without ``transB``) and returns its constant operand, whatever the initializer is called.
    """
    import onnx

    file = onnx_model_file(path)
    graph = onnx.load(str(file)).graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    outputs = [o.name for o in graph.output]
    name = "logits" if "logits" in outputs else (outputs[0] if outputs else "")
    node = producers.get(name)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producers.get(node.input[0])
    weight = None
    if node is not None and node.op_type in ("MatMul", "Gemm"):
        w = _constant(node.input[1], inits, producers)
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        weight = None if w is None or w.ndim != 2 else (w if trans_b else w.T)
    if weight is None:
        raise OnnxExportError(
            f"{file}: could not find the LM-head weight that produces '{name}' (found "
            f"{node.op_type if node is not None else 'no node'}); detox reads W_out from a MatMul/Gemm with a constant "
            "weight. Re-export with: detox export-onnx --target MODEL --out DIR (without graph optimizations)"
        )
    return np.array(weight, dtype=np.float32, order="C")  # a writable copy (initializers are read-only buffers)


def onnx_parameter_count(path: str | os.PathLike[str]) -> int:
    """About the number of weights in an exported graph (initializers; a tied LM head, stored as [V, H] and [H, V], once)."""
    import onnx

    graph = onnx.load(str(onnx_model_file(path)), load_external_data=False).graph
    dims = {i.name: tuple(i.dims) for i in graph.initializer}
    total = sum(int(np.prod(d)) for d in dims.values())
    head = next((n.input[1] for n in graph.node if "logits" in n.output and n.op_type == "MatMul"), None)
    h, v = dims.get(head, (0, 0)) if head else (0, 0)
    tied = h and v and (v, h) in dims.values()
    return total - (h * v if tied else 0)


def load_export_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer saved in an export directory (offline), with a clear error if it is missing."""
    from transformers import AutoTokenizer

    directory = Path(path)
    directory = directory.parent if directory.is_file() else directory
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # transformers raises OSError/ValueError/...
        raise OnnxExportError(
            f"{directory} has no loadable tokenizer files; re-export with detox export-onnx (it saves them), "
            "or pass tokenizer= explicitly"
        ) from err
    return pad_as_eos(tok)


def fingerprint_onnx(path: str | os.PathLike[str], tokenizer: Any = None, weight: np.ndarray | None = None,
                     name: str = "") -> TargetFingerprint:
    """Fingerprint of an ONNX export computed from its own files: tokenizer and the graph's LM-head weight."""
    tokenizer = tokenizer if tokenizer is not None else load_export_tokenizer(path)
    weight = weight if weight is not None else onnx_output_embedding(path)
    return make_fingerprint(hf_vocab_tokens(tokenizer), weight, name or str(path))


def read_export_fingerprint(path: str | os.PathLike[str]) -> TargetFingerprint | None:
    """The source model's fingerprint that ``export_target`` recorded, or ``None`` for exports made elsewhere."""
    p = Path(path)
    file = (p.parent if p.is_file() else p) / FINGERPRINT_FILE
    if not file.is_file():
        return None
    return TargetFingerprint.model_validate(json.loads(file.read_text(encoding="utf-8"))["fingerprint"])


def verify_export(path: str | os.PathLike[str]) -> TargetFingerprint:
    """Recompute the fingerprint from the export's files; raise if it differs from the recorded source fingerprint."""
    recorded = read_export_fingerprint(path)
    computed = fingerprint_onnx(path)
    if recorded is not None:
        diffs = recorded.differences(computed)
        if diffs:
            raise OnnxExportError(
                f"{path}: the exported model does not match the model it was exported from ({', '.join(diffs)} differ); "
                "an artifact aligned to the source would be refused. Re-export with a float32 export (the default) "
                "and without graph optimizations that rewrite the LM head"
            )
    return computed


# ---------------------------------------------------------------------------------------------------------------
# Exporting (torch + optimum-onnx).


def export_target(target: str | os.PathLike[str], out: str | os.PathLike[str], overwrite: bool = False,
                  opset: int | None = None, log: Callable[[str], None] = lambda m: None) -> TargetFingerprint:
    """Export ``target`` to ``out`` (a directory ``ORTModelForCausalLM.from_pretrained`` loads); return its fingerprint.

    GGUF targets are dequantized to float32 by transformers and exported from memory, so the ONNX model has the
    same weights (and fingerprint) as the HF model ``detox align --target FILE.gguf`` aligns to.
    """
    import warnings

    try:
        from optimum.exporters.onnx import onnx_export_from_model as export
    except ImportError as err:
        raise OnnxExportError(optimum_onnx_message("exporting to ONNX")) from err
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OnnxExportError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) or another --out")
        shutil.rmtree(out)
    log(f"loading {target} with transformers")
    model, tokenizer = load_hf_target(target)
    source = fingerprint_hf(model, tokenizer, name=str(target))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Export into a sibling temp dir and move it into place, so a failed export never leaves a half-written OUT.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary directory
    try:
        log(f"exporting to ONNX ({TASK})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings from the TorchScript exporter
            export(model, tmp, task=TASK, opset=opset, do_validation=False)
        tokenizer.save_pretrained(tmp)
        record = {"fingerprint": source.model_dump(), "source": str(target), "task": TASK}
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        log("checking the export's fingerprint against the source model")
        computed = verify_export(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return computed.model_copy(update={"name": str(out)})
