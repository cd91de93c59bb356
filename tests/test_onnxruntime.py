"""ONNX Runtime backend: a tiny random Llama exported with optimum, fused generation through ORTModelForCausalLM.

Everything runs on ONNX Runtime's CPU provider: the target and the calibrator (``calibrator.onnx``).
"""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import detox
from detox.adapters.onnxruntime import CPU, CUDA, DetoxORTModel, default_providers, load_ort_target, resolve_providers
from detox.artifacts import ArtifactError
from detox.cli.main import main
from detox.fingerprint import fingerprint_hf
from detox.onnx_export import (FINGERPRINT_FILE, OnnxExportError, export_target, fingerprint_onnx,
                               onnx_output_embedding, read_export_fingerprint, verify_export)
from detox.runtime import Calibrator

PROMPTS = ["The weather today is", "We walked along the river and"]
NEW = 8


@pytest.fixture(scope="module")
def onnx_dir(llama_target_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "llama-onnx"
    export_target(str(llama_target_dir), out)
    return out


@pytest.fixture(scope="module")
def ort(onnx_dir):
    model, tok = load_ort_target(onnx_dir, "cpu")
    tok.padding_side = "left"
    return model, tok


@pytest.fixture(scope="module")
def hf(llama_target_dir):
    return AutoModelForCausalLM.from_pretrained(llama_target_dir).eval()


def _greedy(model, tok, prompts, new=NEW, **kw):
    batch = tok(prompts, return_tensors="pt", padding=True)
    kw.setdefault("min_new_tokens", new)  # fixed lengths make outputs comparable
    return model.generate(**batch, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id, **kw)


def test_export_is_loadable_and_fingerprints_match_the_source(onnx_dir, hf, ort, aligned_llama):
    for name in ("model.onnx", "config.json", "tokenizer.json", FINGERPRINT_FILE):
        assert (onnx_dir / name).is_file(), name
    source = fingerprint_hf(hf, ort[1])
    assert read_export_fingerprint(onnx_dir).same_model(source)
    computed = fingerprint_onnx(onnx_dir)  # from the export's own files: tokenizer + the graph's LM head
    assert computed.same_model(source)
    assert verify_export(onnx_dir).same_model(source)
    np.testing.assert_array_equal(onnx_output_embedding(onnx_dir), hf.get_output_embeddings().weight.detach().numpy())
    Calibrator.load(aligned_llama).require_aligned_to(computed)  # an artifact aligned on the HF model fits the export


def test_export_refuses_overwrite_and_detects_a_mismatched_record(onnx_dir, llama_target_dir, tmp_path):
    with pytest.raises(OnnxExportError, match="--overwrite"):
        export_target(str(llama_target_dir), onnx_dir)
    copy = tmp_path / "copy"
    shutil.copytree(onnx_dir, copy)
    record = json.loads((copy / FINGERPRINT_FILE).read_text())
    record["fingerprint"]["output_embedding_sha256"] = "0" * 64
    (copy / FINGERPRINT_FILE).write_text(json.dumps(record))
    with pytest.raises(OnnxExportError, match="does not match the model it was exported from"):
        verify_export(copy)


def test_output_embedding_found_through_gemm_transpose_and_constants(tmp_path):
    """Other exporters' spellings of the LM head: Gemm(transB=1), MatMul(Transpose(W)), a Constant weight."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    W = np.arange(12, dtype=np.float32).reshape(4, 3)  # [vocab 4, hidden 3]
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 3])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    graphs = {
        "gemm": ([helper.make_node("Gemm", ["h", "W"], ["logits"], transB=1)], [numpy_helper.from_array(W, "W")]),
        "transpose": ([helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
                       helper.make_node("MatMul", ["h", "Wt"], ["logits"])], [numpy_helper.from_array(W, "W")]),
        "constant": ([helper.make_node("Constant", [], ["Wt"], value=numpy_helper.from_array(W.T.copy())),
                      helper.make_node("MatMul", ["h", "Wt"], ["y"]), helper.make_node("Identity", ["y"], ["logits"])], []),
    }
    for name, (nodes, inits) in graphs.items():
        path = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(helper.make_graph(nodes, name, [h], [logits], inits)), str(path))
        np.testing.assert_array_equal(onnx_output_embedding(path), W, err_msg=name)
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["h"], ["logits"])], "g", [h], [logits])), str(path))
    with pytest.raises(OnnxExportError, match="LM-head weight"):
        onnx_output_embedding(path)


def test_strength_zero_reproduces_unfused_greedy_exactly(ort, aligned_llama):
    model, tok = ort
    wrapped = detox.wrap(model, calibrator=aligned_llama, tokenizer=tok, strength=0.0)
    assert isinstance(wrapped, DetoxORTModel)
    plain = _greedy(model, tok, PROMPTS)
    assert torch.equal(_greedy(wrapped, tok, PROMPTS), plain)
    fused = detox.wrap(model, calibrator=aligned_llama, tokenizer=tok, strength=1.0)
    with fused.disable_fusion():
        assert torch.equal(_greedy(fused, tok, PROMPTS), plain)
    assert not torch.equal(_greedy(fused, tok, PROMPTS), plain)  # and the fusion does change the output


def test_wrap_without_tokenizer_uses_the_exports_own(ort, aligned_llama):
    """``detox.wrap(ort_model, calibrator=...)``: the tokenizer saved next to the export, the same generations."""
    from detox.fingerprint import hf_vocab_tokens

    model, tok = ort
    wrapped = detox.wrap(model, calibrator=aligned_llama, strength=0.7)
    assert hf_vocab_tokens(wrapped.tokenizer) == hf_vocab_tokens(tok)
    explicit = detox.wrap(model, calibrator=aligned_llama, tokenizer=tok, strength=0.7)
    assert torch.equal(_greedy(wrapped, tok, PROMPTS), _greedy(explicit, tok, PROMPTS))


def test_fused_scores_equal_unfused_plus_fusion_term_at_every_step(ort, hf, aligned_llama):
    """At every step of a padded batch: scores == (1-λ)·logits + λ·W_out·LayerNorm(h_cal·A), with h_cal from a
    full re-tokenization of the text so far through the torch calibrator (no cache, no ONNX) and W_out from HF."""
    model, tok = ort
    lam = 0.4
    cal = Calibrator.load(aligned_llama)
    wrapped = detox.wrap(model, calibrator=cal, tokenizer=tok, strength=lam)
    # min_new_tokens=0: its processor would set the EOS score to -inf after ours
    out = _greedy(wrapped, tok, PROMPTS, min_new_tokens=0, output_scores=True, output_logits=True, return_dict_in_generate=True)
    a = cal.alignment_arrays()
    A, gamma, beta = (torch.from_numpy(a[k]) for k in ("A", "ln_weight", "ln_bias"))
    eps = float(cal.manifest.alignment.settings.get("ln_eps", 1e-5))
    W = hf.get_output_embeddings().weight.detach()
    prompt_len = tok(PROMPTS, return_tensors="pt", padding=True)["input_ids"].shape[1]
    assert len(out.scores) == NEW  # no early end-of-text: every step is checked
    changed = 0.0
    for t, (logits, scores) in enumerate(zip(out.logits, out.scores)):
        for row in range(len(PROMPTS)):
            text = tok.decode(out.sequences[row, :prompt_len + t], skip_special_tokens=True).rstrip("\ufffd")
            ids = [cal.manifest.calibrator.bos_token_id] + cal.tokenizer.encode(text, add_special_tokens=False).ids
            with torch.no_grad():
                h_cal = cal.torch_model()(torch.tensor([ids]))[0][0, -1]
            term = W @ torch.nn.functional.layer_norm(h_cal @ A, (A.shape[1],), gamma, beta, eps)
            expected = (1 - lam) * logits[row] + lam * term
            torch.testing.assert_close(scores[row], expected, atol=1e-4, rtol=1e-4, msg=f"step {t}, row {row}")
            changed = max(changed, float((scores[row] - logits[row]).abs().max()))
    assert changed > 1e-3  # the fusion term is not negligible


def test_overlapped_fusion_gives_the_same_scores_and_really_overlaps(ort, aligned_llama, fusion_threads):
    """The default computes each step's term on a worker thread during the forward pass: same values as inline."""
    from detox.adapters.onnxruntime import wrap_ort

    model, tok = ort
    threads = fusion_threads
    kw = dict(output_scores=True, return_dict_in_generate=True)
    inline = _greedy(wrap_ort(model, aligned_llama, 0.7, tok, overlap=False), tok, PROMPTS, **kw)
    assert threads and not any(t.startswith("detox-fusion") for t in threads)
    threads.clear()
    overlapped = _greedy(wrap_ort(model, aligned_llama, 0.7, tok), tok, PROMPTS, **kw)
    assert sum(t.startswith("detox-fusion") for t in threads) >= NEW - 1  # every step after the first
    assert torch.equal(inline.sequences, overlapped.sequences)
    for a, b in zip(inline.scores, overlapped.scores):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_onnx_and_hf_fused_greedy_agree(ort, hf, aligned_llama):
    model, tok = ort
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        gap = float((model(**batch).logits - hf(**batch).logits).abs().max())
    assert gap < 1e-4, f"ONNX and HF logits differ by {gap}"  # measured: ~1e-7 (float32 op order)
    for lam in (0.0, 0.7):
        ours = _greedy(detox.wrap(model, calibrator=aligned_llama, tokenizer=tok, strength=lam), tok, PROMPTS)
        theirs = _greedy(detox.wrap(hf, calibrator=aligned_llama, tokenizer=tok, strength=lam), tok, PROMPTS)
        assert torch.equal(ours, theirs), f"strength {lam}: ONNX {ours.tolist()} vs HF {theirs.tolist()} (logit gap {gap})"


def test_contrast_pair_on_onnx_matches_hf_and_runs_both_calibrators(ort, hf, contrast_llama):
    """The expert/anti-expert pair through ORTModelForCausalLM (overlapped) gives HF's fused output (its effect on
    the logits is checked against the formula in test_contrast.py)."""
    model, tok = ort
    wrapped = detox.wrap(model, calibrator=contrast_llama, tokenizer=tok)
    assert wrapped.runner.gives_log_ratio and wrapped.strength == 8.0  # the pair in one graph
    ours = _greedy(wrapped, tok, PROMPTS)
    theirs = _greedy(detox.wrap(hf, calibrator=contrast_llama, tokenizer=tok), tok, PROMPTS)
    assert torch.equal(ours, theirs), f"ONNX {ours.tolist()} vs HF {theirs.tolist()}"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    sampled = []
    for model_ in (wrapped, detox.wrap(hf, calibrator=contrast_llama, tokenizer=tok)):
        torch.manual_seed(0)  # sampling follows the fused distribution on both backends alike
        sampled.append(model_.generate(**batch, max_new_tokens=NEW, do_sample=True, top_p=0.9, top_k=0,
                                       pad_token_id=tok.pad_token_id))
    assert torch.equal(*sampled)


def test_padded_batch_matches_one_by_one_and_sampling_beams_run(ort, aligned_llama):
    model, tok = ort
    wrapped = detox.wrap(model, calibrator=aligned_llama, tokenizer=tok, strength=0.7)
    batched = _greedy(wrapped, tok, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        single = _greedy(wrapped, tok, [prompt])
        assert single[0, -NEW:].tolist() == batched[i, -NEW:].tolist()
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    sampled = wrapped.generate(**batch, max_new_tokens=5, do_sample=True, top_p=0.9, pad_token_id=tok.pad_token_id)
    beams = wrapped.generate(**batch, max_new_tokens=5, num_beams=3, num_return_sequences=2, pad_token_id=tok.pad_token_id)
    assert sampled.shape[0] == 2 and beams.shape[0] == 4


def test_wrong_or_unaligned_artifact_is_refused(ort, aligned_gpt2, tiny_calibrator):
    model, tok = ort
    with pytest.raises(ArtifactError, match="detox align"):
        detox.wrap(model, calibrator=aligned_gpt2, tokenizer=tok)
    with pytest.raises(ArtifactError, match="detox align"):
        detox.wrap(model, calibrator=tiny_calibrator, tokenizer=tok)


def test_providers_default_to_cpu_without_a_gpu_and_explain_missing_ones():
    import onnxruntime as ort

    assert resolve_providers("cpu") == [CPU]
    assert resolve_providers([CPU]) == [CPU]
    assert default_providers()[-1] == CPU and resolve_providers("auto") == default_providers()
    if CUDA in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: CUDA is a valid choice here")
    assert default_providers() == [CPU]
    with pytest.raises(ValueError, match=r"detox\[onnx-gpu\]"):
        resolve_providers("cuda")


def test_calibrator_runs_on_the_target_provider_unless_told_otherwise(ort, aligned_llama):
    import onnxruntime

    from detox.adapters.onnxruntime import wrap_ort

    model, tok = ort
    wrapped = detox.wrap(model, calibrator=aligned_llama, tokenizer=tok, strength=0.7)
    assert wrapped.runner.session.get_providers() == model.providers == [CPU]
    other = [p for p in onnxruntime.get_available_providers() if p not in (CPU, CUDA, "TensorrtExecutionProvider")]
    if not other:
        pytest.skip("no second execution provider in this onnxruntime build")
    moved = wrap_ort(model, aligned_llama, 0.7, tok, calibrator_providers=[other[0], CPU])
    assert moved.runner.session.get_providers() == [other[0], CPU]
    assert torch.equal(_greedy(moved, tok, PROMPTS), _greedy(wrapped, tok, PROMPTS))


def test_cli_export_generate_and_bench(tmp_path, llama_target_dir, aligned_llama):
    runner = CliRunner()
    out = tmp_path / "exported"
    r = runner.invoke(main, ["export-onnx", "--target", str(llama_target_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "fingerprint matches" in r.output and (out / "model.onnx").is_file()
    args = ["generate", "The weather is", "--backend", "onnx", "--target", str(out), "--provider", "cpu", "--max-new-tokens", "8"]
    plain = runner.invoke(main, [*args, "--no-calibrator"])
    fused = runner.invoke(main, [*args, "--calibrator", str(aligned_llama), "--strength", "1.0"])
    assert plain.exit_code == 0 and fused.exit_code == 0, plain.output + fused.output
    assert plain.output.strip() and plain.output != fused.output
    missing = runner.invoke(main, ["generate", "hi", "--backend", "onnx", "--target", str(llama_target_dir)])
    assert missing.exit_code != 0 and "detox export-onnx" in missing.output  # a HF dir, not an export
    bench = runner.invoke(main, ["bench", "--backend", "onnx", "--target", str(out), "--calibrator", str(aligned_llama),
                                 "--tokens", "4", "--repetitions", "1"])
    assert bench.exit_code == 0, bench.output
    assert re.fullmatch(r"fused/unfused time: \d+\.\d\dx", bench.output.strip().splitlines()[-1])


def test_cli_eval_on_the_onnx_backend(tmp_path, onnx_dir, aligned_llama):
    import json

    from click.testing import CliRunner

    from detox.cli.main import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "The weather today is"}) + "\n" + json.dumps({"text": "We walked"}) + "\n")
    args = ["eval", "--backend", "onnx", "--target", str(onnx_dir), "--prompts", str(prompts), "--samples", "2",
            "--max-new-tokens", "5", "--no-perplexity"]
    plain = CliRunner().invoke(main, [*args, "--no-calibrator", "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    fused = CliRunner().invoke(main, [*args, "--calibrator", str(aligned_llama), "--out", str(tmp_path / "fused")])
    assert fused.exit_code == 0, fused.output
    summary = json.loads((tmp_path / "fused" / "summary.json").read_text())
    assert summary["num_generations"] == 4 and summary["model"]["calibrator"]["name"] == "tiny-cal"
    assert summary["model"]["target_fingerprint"]["vocab_size"] > 0
