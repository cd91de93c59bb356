"""The Backend interface (``detox.backends``): the registry, ``detox.wrap``'s dispatch through it, the layering
(adapters below backends, no torch on the llama.cpp path), and that a backend's serving loop (``decode``) produces
what its one-prompt ``generate`` does."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from detox.backends import Sampling, TokenInfo, backend_for, get, names

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The weather today is"


@dataclass
class Row:
    """A plain implementation of :class:`detox.backends.Row` that records what the backend pushes."""

    prompt_ids: list[int]
    max_tokens: int
    index: int = 0
    top_logprobs: int = 0
    pieces: list[str] = field(default_factory=list)
    infos: list[TokenInfo | None] = field(default_factory=list)
    reason: str | None = None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def push(self, piece: str, info: TokenInfo | None = None) -> bool:
        self.pieces.append(piece)
        self.infos.append(info)
        if len(self.pieces) >= self.max_tokens:
            self.reason = "length"
        return self.done

    def finish(self, reason: str) -> bool:
        self.reason = self.reason or reason
        return True


def test_registry_lists_every_backend_module_and_rejects_unknown_names():
    modules = sorted(p.stem for p in (ROOT / "sdk" / "backends").glob("*.py") if p.stem not in ("__init__", "base"))
    assert names() == sorted(get(n).name for n in names())
    assert len(names()) == len(modules) and {"hf", "llamacpp", "onnx"} <= set(names())
    with pytest.raises(ValueError, match=r"unknown backend 'vllm': use hf, llamacpp, onnx"):
        get("vllm")


def test_wrap_of_an_unsupported_object_names_what_is_supported():
    import detox

    with pytest.raises(TypeError, match=r"does not support builtins\.dict; supported: transformers causal LMs, "
                                        r"llama_cpp\.Llama, optimum\.onnxruntime\.ORTModelForCausalLM"):
        detox.wrap({})
    with pytest.raises(TypeError, match="supported"):
        backend_for(object())


def _imports(path: Path) -> set[str]:
    names_: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names_.add(node.module)
        elif isinstance(node, ast.Import):
            names_.update(a.name for a in node.names)
    return names_


def test_adapters_sit_below_wrapping_and_backends():
    """The old cycle (detox.wrapping <-> adapters, hidden in function-level imports) must not come back."""
    for path in sorted((ROOT / "adapters").glob("*.py")):
        above = {m for m in _imports(path) if m == "detox.wrapping" or m.startswith(("detox.backends", "detox.cli",
                                                                                       "detox.serve"))}
        assert not above, f"{path.name} imports {sorted(above)}"
    for path in sorted((ROOT / "sdk" / "backends").glob("*.py")):
        assert not {m for m in _imports(path) if m.startswith(("detox.cli", "detox.serve", "detox.wrapping"))}, path.name


def test_listing_backends_and_the_cli_import_no_inference_library():
    """A lean (llama.cpp only) install must be able to list the backends and build the CLI."""
    script = ("import json, sys\nimport detox.backends as b\nimport detox.cli.main\nb.names()\n"
              "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'llama_cpp', 'onnxruntime', 'optimum') "
              "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_no_code_outside_the_backends_compares_backend_names():
    """What differs between backends lives in sdk/backends/: a comparison with a backend's name anywhere else in the
    SDK or the CLI (``backend == "onnx"``) is how that knowledge leaked out before."""
    found = []
    for path in sorted([*ROOT.glob("sdk/**/*.py"), *ROOT.glob("cli/*.py"), *ROOT.glob("adapters/*.py")]):
        if "backends" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                    isinstance(c, ast.Constant) and c.value in names() for c in [node.left, *node.comparators]):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def test_eval_says_onnx_needs_a_perplexity_model_before_loading_anything(tmp_path):
    from click.testing import CliRunner

    from detox.cli.main import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "The weather today is"}) + "\n")
    r = CliRunner().invoke(main, ["eval", "--backend", "onnx", "--target", str(tmp_path / "no-such-export"),
                                  "--prompts", str(prompts), "--out", str(tmp_path / "e")])
    assert r.exit_code != 0 and "no reference model for perplexity on backend onnx; pass --ppl-model or " \
        "--no-perplexity" in r.output, r.output
    assert get("onnx").perplexity_problem() and get("hf").perplexity_problem() is None
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("command", [["generate", "Hello"], ["bench"]])
def test_a_missing_optimum_onnx_is_one_line_saying_what_to_install(command, tmp_path, monkeypatch):
    """Every command loading an ONNX target says how to install optimum-onnx (bench used to call it unexpected)."""
    from click.testing import CliRunner

    from detox.cli.main import main

    monkeypatch.setitem(sys.modules, "optimum.onnxruntime", None)  # `from optimum.onnxruntime import ...` fails
    r = CliRunner().invoke(main, [*command, "--backend", "onnx", "--target", str(tmp_path)])
    assert r.exit_code == 1, r.output
    assert "needs optimum-onnx" in r.output and "pip install 'detox[onnx]'" in r.output, r.output
    assert "unexpected" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


@pytest.fixture(scope="module")
def llama_backend():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    from detox.targets import TargetNotFoundError

    try:
        backend = get("llamacpp").load("smollm2", context_window=256, seed=0, threads=1)
    except TargetNotFoundError as err:
        pytest.skip(str(err))
    backend.wrap()
    return backend


def test_llamacpp_wrap_dispatches_by_type_and_decode_matches_generate(llama_backend):
    import detox

    assert backend_for(llama_backend.model) is get("llamacpp")
    assert type(detox.wrap(llama_backend.model)).__name__ == "DetoxLlama"
    for fused in (False, True):
        pieces: list[str] = []
        text = llama_backend.generate(PROMPT, 8, False, 1.0, 1.0, 0, echo=pieces.append, fused=fused)
        assert text == "".join(pieces) and text.strip()
        row = Row(llama_backend.encode(PROMPT), max_tokens=8, top_logprobs=2)
        strength = llama_backend.fused.calibrator.default_strength if fused else None
        llama_backend.decode([row], Sampling(max_new_tokens=8, temperature=0.0, strength=strength, logprobs=True))
        assert "".join(row.pieces) == text, fused
        assert all(info is not None and info.logprob <= 0 and len(info.top) == 2 for info in row.infos)


def test_llamacpp_runner_refuses_before_wrapping():
    pytest.importorskip("llama_cpp")
    from detox.backends.llamacpp import LlamaCppBackend

    with pytest.raises(RuntimeError, match="wrap"):
        LlamaCppBackend(object()).runner(fused=True)


def test_hf_decode_matches_generate_fused_and_not(llama_target_dir, aligned_llama, one_torch_thread):
    pytest.importorskip("torch")
    hf = get("hf").load(str(llama_target_dir))
    fused = hf.wrap(aligned_llama, 0.7)
    assert backend_for(hf.model) is get("hf") and fused.strength == 0.7
    assert not fused.calibrator.manifest.alignment.target.differences(hf.fingerprint())
    hf.tokenizer.padding_side = "left"
    for strength in (None, 0.7):
        text = hf.generate(PROMPT, 6, False, 1.0, 1.0, 0, echo=lambda _: None, fused=strength is not None)
        row = Row(hf.encode(PROMPT), max_tokens=6, top_logprobs=2)
        hf.decode([row], Sampling(max_new_tokens=6, temperature=0.0, strength=strength, logprobs=True))
        assert "".join(row.pieces) == text, strength
        # greedy: each token is the most likely one of the distribution it was drawn from
        assert all(info is not None and len(info.top) == 2 and info.logprob == info.top[0][1] <= 0 for info in row.infos)
