"""Target fingerprints: what binds an aligned calibrator to the exact model it was aligned to.

A fingerprint hashes the token vocabulary (id-ordered token strings) and the output-embedding matrix
(rounded to float16, so dequantization paths that agree to float16 precision agree here), and records
vocab and hidden sizes. The same model reached through transformers, a GGUF file or an ONNX export
gets the same fingerprint.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import numpy as np

from detox.artifacts.manifest import TargetFingerprint


def hash_vocab(tokens: Sequence[str | None]) -> str:
    h = hashlib.sha256()
    for tok in tokens:
        h.update((tok or "").encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def hash_matrix(weight: np.ndarray) -> str:
    arr = np.ascontiguousarray(np.asarray(weight, dtype=np.float32).astype("<f2"))
    h = hashlib.sha256()
    h.update(str(arr.shape).encode())
    h.update(arr.tobytes())
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


def hf_vocab_tokens(tokenizer: Any) -> list[str | None]:
    """Id-ordered token strings of a transformers tokenizer (base vocabulary plus added tokens)."""
    return list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))


def fingerprint_hf(model: Any, tokenizer: Any, name: str = "") -> TargetFingerprint:
    """Fingerprint of a transformers causal LM (its output embedding) and its tokenizer."""
    weight = model.get_output_embeddings().weight.detach().float().cpu().numpy()
    return make_fingerprint(hf_vocab_tokens(tokenizer), weight, name or str(getattr(model, "name_or_path", "")))


def gguf_vocab_and_output(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray]:
    """Token strings and the dequantized output matrix (``output.weight`` or tied ``token_embd.weight``) of a GGUF."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        raise ValueError(f"{path} has no tokenizer.ggml.tokens; cannot fingerprint its vocabulary")
    tokens = [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
    tensors = {t.name: t for t in reader.tensors}
    t = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if t is None:
        raise ValueError(f"{path} has neither output.weight nor token_embd.weight")
    weight = dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
    return tokens, weight


def fingerprint_gguf(path: str | os.PathLike[str]) -> TargetFingerprint:
    tokens, weight = gguf_vocab_and_output(path)
    return make_fingerprint(tokens, weight, os.path.basename(str(path)))
