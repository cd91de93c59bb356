"""Which ``pip install`` brings which optional module: one place for every "not installed" message.

The base install holds only what every backend needs; torch, transformers, llama.cpp and optimum come with extras
(``detox[hf]``, ``detox[llamacpp]``, ``detox[onnx]``, ...; see the README's install matrix). Code that needs one
of them imports it lazily, so a command that does not need it never fails for its absence.
"""

from __future__ import annotations

# top-level module -> what to install (an extra of detox, or a plain package)
INSTALL_HINTS: dict[str, str] = {
    "torch": "detox[hf]",
    "transformers": "detox[hf]",
    "accelerate": "detox[hf]",
    "peft": "detox[hf]",
    "onnx": "detox[hf]",
    "detoxify": "detox[hf]",
    "matplotlib": "matplotlib",
    "llama_cpp": "detox[llamacpp]",
    "onnxruntime": "onnxruntime",
    "optimum": "detox[onnx]",
}


def missing_module_message(err: ModuleNotFoundError, needed_for: str = "this command") -> str | None:
    """One line saying which optional dependency is missing and how to install it; ``None`` for other modules
    (a missing module detox does not know is a bug to show as is, not an install hint)."""
    top = (err.name or "").split(".")[0]
    hint = INSTALL_HINTS.get(top)
    if hint is None:
        return None
    torch_free = " (detox[llamacpp] is torch-free)" if top in ("torch", "transformers") else ""
    return f"{needed_for} needs {top}, which is not installed{torch_free}: pip install '{hint}'"


def optimum_onnx_message(needed_for: str) -> str:
    """Why ``optimum-onnx`` could not be imported, and the fix: it pins transformers 4.57.x, while the rest of detox
    also runs on transformers 5.x, so a 5.x environment is named as the cause."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        have = version("transformers")
    except PackageNotFoundError:
        have = None
    clash = f"; this environment has transformers {have}" if have and not have.startswith("4.57.") else ""
    return (f"{needed_for} needs optimum-onnx, which pins transformers 4.57.x{clash}: pip install 'detox[onnx]' "
            f"(or 'detox[onnx-gpu]' for CUDA), in an environment that can have transformers 4.57")
