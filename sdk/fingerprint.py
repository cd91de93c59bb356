"""Target fingerprints: what binds an aligned calibrator to the exact model it was aligned to (docs/align.md).

A fingerprint hashes the id-ordered vocabulary and the output matrix rounded to float16 (so dequantization paths
that agree to float16 agree here), row chunk by row chunk, so it is computed from a target's files without loading
the model. :func:`model_fingerprint` is the other, exact identity, for resuming a UniDetox distillation, where a
LoRA-toxified copy must not pass for its base (the target fingerprint is deliberately tolerant of dequantization).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from detox.artifacts.manifest import TargetFingerprint
from detox.gguf_reader import read_gguf
from detox.targets import TargetFiles, locate_target
from detox.tokenizer import hf_vocab_tokens

__all__ = ["hash_vocab", "MatrixHasher", "hash_matrix", "make_fingerprint", "hf_vocab_tokens", "fingerprint_hf",
           "fingerprint_files", "fingerprint_target", "fingerprint_gguf", "model_fingerprint"]


def hash_vocab(tokens: Sequence[str | None]) -> str:
    h = hashlib.sha256()
    for tok in tokens:
        h.update((tok or "").encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


class MatrixHasher:
    """:func:`hash_matrix` fed row chunk by row chunk: the same digest for any chunking, so a matrix too big for
    memory (a 7B model's 152k x 3584 head is 2.2 GB in float32) is hashed from a stream of chunks."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.rows = 0
        self._h = hashlib.sha256()
        self._h.update(str(self.shape).encode())

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float32)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"chunk of shape {rows.shape} does not continue a matrix of shape {self.shape}")
        self._h.update(np.ascontiguousarray(rows.astype("<f2")))  # hashed through the buffer protocol: no copy
        self.rows += len(rows)

    def hexdigest(self) -> str:
        if self.rows != self.shape[0]:
            raise ValueError(f"hashed {self.rows} of {self.shape[0]} rows")
        return self._h.hexdigest()


def hash_matrix(weight: np.ndarray) -> str:
    """sha256 of ``str(shape)`` and the matrix rounded to little-endian float16 (row-major)."""
    h = MatrixHasher(np.shape(weight))
    h.update(weight)  # as float32
    return h.hexdigest()


def make_fingerprint(tokens: Sequence[str | None], output_embedding: np.ndarray, name: str = "") -> TargetFingerprint:
    vocab_size, hidden_size = output_embedding.shape
    return TargetFingerprint(
        vocab_sha256=hash_vocab(tokens),
        vocab_size=int(vocab_size),
        hidden_size=int(hidden_size),
        output_embedding_sha256=hash_matrix(output_embedding),
        name=name,
    )


def fingerprint_hf(model: Any, tokenizer: Any, name: str = "") -> TargetFingerprint:
    """Fingerprint of a transformers causal LM (its output embedding) and its tokenizer."""
    weight = model.get_output_embeddings().weight.detach().float().cpu().numpy()
    return make_fingerprint(hf_vocab_tokens(tokenizer), weight, name or str(getattr(model, "name_or_path", "")))


def fingerprint_files(target: TargetFiles, keep_output: bool = False,
                      progress: bool = False) -> tuple[TargetFingerprint, np.ndarray | None]:
    """The fingerprint of a target read from its files — vocabulary plus the output matrix streamed in row chunks —
    identical to :func:`fingerprint_hf` of the loaded model (GGUF: to the fingerprint of its metadata vocabulary and
    de-quantized output matrix). Peak memory is one chunk, unless ``keep_output`` also returns the float32 matrix
    (interpolate alignment needs it)."""
    from tqdm.auto import tqdm

    tokens = target.gguf.tokens() if target.gguf is not None else hf_vocab_tokens(target.tokenizer())
    shape = target.output_shape()
    hasher = MatrixHasher(shape)
    out = np.empty(shape, dtype=np.float32) if keep_output else None
    with tqdm(total=shape[0], desc="fingerprint", unit="row", disable=not progress) as bar:
        for rows in target.output_rows():
            if out is not None:
                out[hasher.rows : hasher.rows + len(rows)] = rows
            hasher.update(rows)
            bar.update(len(rows))
    fp = TargetFingerprint(vocab_sha256=hash_vocab(tokens), vocab_size=shape[0], hidden_size=shape[1],
                           output_embedding_sha256=hasher.hexdigest(), name=target.name)
    return fp, out


def fingerprint_target(spec: str | os.PathLike[str], progress: bool = False) -> TargetFingerprint:
    """Fingerprint of a target spec (``.gguf``, ``smollm2``, HF directory, hub id) without loading the model."""
    return fingerprint_files(locate_target(spec), progress=progress)[0]


def fingerprint_gguf(path: str | os.PathLike[str]) -> TargetFingerprint:
    """Fingerprint of a GGUF file: its metadata vocabulary and its output matrix, streamed."""
    return fingerprint_files(TargetFiles(str(path), Path(path), read_gguf(path)))[0]


# config keys that differ between two loads of the same weights: left out of model_fingerprint
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                         "_attn_implementation_autoset", "use_cache"}


def model_fingerprint(model: Any, tokenizer: Any) -> dict[str, str]:
    """Exact identity of a transformers model, for resuming distillation: what the distill manifest records per model.

    ``config_vocab``: config (minus paths/versions) + tokenizer vocabulary; ``output_embedding``: the LM head
    weights; ``parameters``: every tensor of the state dict (a LoRA-toxified copy of a tied-embedding model has
    the base's LM head, so the head alone cannot tell base and toxic apart).
    """
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    head = model.get_output_embeddings()
    head_hash = _tensor_sha256([head.weight]) if head is not None else ""
    state = model.state_dict()
    return {
        "config_vocab_sha256": h.hexdigest(),
        "output_embedding_sha256": head_hash,
        "parameters_sha256": _tensor_sha256([state[k] for k in sorted(state)]),
    }


def _tensor_sha256(tensors: list[Any]) -> str:
    """sha256 of each torch tensor's dtype, shape and raw bytes (viewed as uint8: numpy has no bfloat16)."""
    import torch

    h = hashlib.sha256()
    for t in tensors:
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
