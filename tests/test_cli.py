"""The detox command line: help, the train → align → generate path on tiny models, and clean failures."""

import json

from click.testing import CliRunner

from detox.artifacts import load_artifact
from detox.cli.main import main

from conftest import SAMPLE_TEXT


def test_help_lists_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("train", "align", "generate", "demo"):
        assert name in result.output


def test_train_align_generate(tmp_path, llama_target_dir):
    runner = CliRunner()
    cal = tmp_path / "cal"
    r = runner.invoke(main, ["train", "--data", str(SAMPLE_TEXT), "--out", str(cal), "--max-steps", "6", "--batch-size", "8",
                             "--seq-len", "32", "--vocab-size", "300", "--hidden-size", "32", "--layers", "1", "--heads", "4",
                             "--ffn-size", "64", "--name", "cli-cal", "--version", "1.0.0"])
    assert r.exit_code == 0, r.output
    assert load_artifact(cal).manifest.name == "cli-cal"
    aligned = tmp_path / "aligned"
    r = runner.invoke(main, ["align", "--target", str(llama_target_dir), "--calibrator", str(cal), "--out", str(aligned),
                             "--data", str(SAMPLE_TEXT), "--vocab-epochs", "1", "--context-epochs", "1", "--max-docs", "40",
                             "--strength", "0.5"])
    assert r.exit_code == 0, r.output
    m = load_artifact(aligned).manifest
    assert m.kind == "aligned" and m.alignment.default_strength == 0.5
    assert m.alignment.settings["onnx_weights"] == "int8"  # the default: the calibrator graph reads 8-bit weights
    from detox.runtime import Calibrator

    assert Calibrator.load(aligned).onnx_runner().weights_dtype == "int8"
    plain = runner.invoke(main, ["generate", "The weather is", "--target", str(llama_target_dir), "--no-calibrator",
                                 "--max-new-tokens", "8"])
    fused = runner.invoke(main, ["generate", "The weather is", "--target", str(llama_target_dir), "--calibrator", str(aligned),
                                 "--strength", "1.0", "--max-new-tokens", "8"])
    assert plain.exit_code == 0 and fused.exit_code == 0, plain.output + fused.output
    assert plain.output.strip() and plain.output != fused.output


def test_bad_inputs_exit_nonzero_with_a_clear_message(tmp_path, llama_target_dir, aligned_gpt2):
    runner = CliRunner()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\nnot json\n")
    r = runner.invoke(main, ["train", "--data", str(bad), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "bad.jsonl:2" in r.output
    r = runner.invoke(main, ["generate", "hi", "--target", str(llama_target_dir), "--calibrator", str(aligned_gpt2)])
    assert r.exit_code != 0 and "detox align" in r.output
    r = runner.invoke(main, ["generate", "hi", "--target", str(tmp_path / "missing.gguf")])
    assert r.exit_code != 0 and "not found" in r.output
    r = runner.invoke(main, ["align", "--target", str(llama_target_dir), "--calibrator", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "manifest.json" in r.output
    assert not (tmp_path / "o").exists()


def test_align_refuses_options_the_chosen_fusion_never_reads(tmp_path, llama_target_dir, tiny_calibrator, tiny_anti):
    runner = CliRunner()
    base = ["align", "--target", str(llama_target_dir), "--calibrator", str(tiny_calibrator)]
    r = runner.invoke(main, base + ["--anti-expert", str(tiny_anti), "--out", str(tmp_path / "a"),
                                    "--data", str(SAMPLE_TEXT), "--method", "vocab"])
    assert r.exit_code == 2 and "--data, --method" in r.output and "token map" in r.output, r.output
    r = runner.invoke(main, base + ["--out", str(tmp_path / "b"), "--top-k", "8", "--two-sided"])
    assert r.exit_code == 2 and "--top-k, --suppress-only/--two-sided" in r.output and "--anti-expert" in r.output, r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_demo_samples_scores_and_reports_identity_mentions(llama_target_dir, contrast_llama):
    r = CliRunner().invoke(main, ["demo", "--target", str(llama_target_dir), "--calibrator", str(contrast_llama),
                                  "--samples", "2", "--max-new-tokens", "4", "--threads", "1"])
    assert r.exit_code == 0, r.output
    out = r.output
    assert out.count("without detox: ") == 8 and out.count("with detox:    ") == 8  # the 8 shipped prompts
    assert "(benign, about black)" in out and out.count("continuations that mention an identity group") == 3
    assert "benign identity prompts: " in out and "/6 continuations mention a group without detox" in out
    assert "time after warm-up (8 prompts x 2 samples, 4 tokens, 1 torch threads)" in out
    summary = json.loads(out.strip().splitlines()[-1])  # the machine-readable line (stderr, mixed in here)
    assert set(summary["seconds"]) == {"plain", "detox"} and set(summary["identity_mentions"]) == {"plain", "detox"}


def test_generate_checks_strength_against_the_artifact_before_loading_the_target(tmp_path, aligned_llama):
    """Issue 17, 9: --strength was validated only after the target loaded; an interpolate artifact takes [0, 1]."""
    missing = tmp_path / "no-such-model"  # loading it would fail with another message
    for backend in ("hf", "llamacpp"):
        r = CliRunner().invoke(main, ["generate", "--backend", backend, "--target", str(missing), "--calibrator",
                                      str(aligned_llama), "--strength", "5", "Hi"])
        assert r.exit_code == 2, r.output
        assert "--strength" in r.output and "[0, 1]" in r.output and "no-such-model" not in r.output
