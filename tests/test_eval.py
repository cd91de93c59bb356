"""detox eval end to end on a tiny model, resume, malformed prompts, and the report files."""

import json

import pytest
from click.testing import CliRunner

from detox.cli.main import main
from detox.evaluation import markdown_report, read_prompts, summarize
from detox.data import DataFormatError


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "prompts.jsonl"
    rows = [{"id": "a", "text": "The weather today is"}, {"id": "b", "text": "We walked along the river"},
            {"text": "My neighbour said that"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _eval_args(target, prompts, out, *extra):
    return ["eval", "--target", str(target), "--prompts", str(prompts), "--samples", "2", "--max-new-tokens", "6",
            "--batch-size", "2", "--out", str(out), *extra]


def test_eval_end_to_end_writes_every_file_and_compares(tmp_path, llama_target_dir, aligned_llama, prompts_file):
    runner = CliRunner()
    base = tmp_path / "base"
    r = runner.invoke(main, _eval_args(llama_target_dir, prompts_file, base, "--no-calibrator"))
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (base / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["prompt_id"] for r in rows} == {"a", "b", "2"}
    assert all(set(r) == {"prompt_id", "prompt", "sample", "text", "toxicity"} for r in rows)
    assert all(0.0 <= r["toxicity"] <= 1.0 for r in rows)
    summary = json.loads((base / "summary.json").read_text())
    for key in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity", "perplexity", "distinct_1",
                "distinct_2", "distinct_3", "num_prompts", "num_generations", "scorer", "model", "wall_seconds"):
        assert key in summary
    assert summary["num_prompts"] == 3 and summary["perplexity"] > 1
    assert "expected max toxicity" in (base / "summary.md").read_text()

    fused = tmp_path / "fused"
    r = runner.invoke(main, _eval_args(llama_target_dir, prompts_file, fused, "--calibrator", str(aligned_llama),
                                       "--compare", str(base)))
    assert r.exit_code == 0, r.output
    assert (fused / "toxicity_compare.png").stat().st_size > 1000
    assert "relative change" in (fused / "summary.md").read_text()
    assert json.loads((fused / "summary.json").read_text())["model"]["calibrator"]["name"] == "tiny-cal"


def test_eval_resumes_without_duplicates(tmp_path, llama_target_dir, prompts_file):
    runner = CliRunner()
    full, part = tmp_path / "full", tmp_path / "part"
    assert runner.invoke(main, _eval_args(llama_target_dir, prompts_file, full, "--no-calibrator", "--no-perplexity")).exit_code == 0
    assert runner.invoke(main, _eval_args(llama_target_dir, prompts_file, part, "--no-calibrator", "--no-perplexity")).exit_code == 0
    lines = (part / "generations.jsonl").read_text().splitlines()
    # simulate a run killed after the first batch (2 prompts x 2 samples) with a torn line
    (part / "generations.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
    r = runner.invoke(main, _eval_args(llama_target_dir, prompts_file, part, "--no-calibrator", "--no-perplexity"))
    assert r.exit_code == 0, r.output
    assert (part / "generations.jsonl").read_text() == (full / "generations.jsonl").read_text()
    r = runner.invoke(main, _eval_args(llama_target_dir, prompts_file, part, "--no-calibrator", "--no-perplexity", "--seed", "5"))
    assert r.exit_code != 0 and "other settings" in r.output
    # a finished run (3 prompts: its last batch is partial) re-run as is: nothing regenerated, summary rewritten
    before = (full / "generations.jsonl").read_text()
    r = runner.invoke(main, _eval_args(llama_target_dir, prompts_file, full, "--no-calibrator", "--no-perplexity"))
    assert r.exit_code == 0, r.output
    assert (full / "generations.jsonl").read_text() == before


def test_malformed_prompts_fail_with_the_line_number(tmp_path, llama_target_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"id": 3}\n')
    r = CliRunner().invoke(main, _eval_args(llama_target_dir, bad, tmp_path / "o", "--no-calibrator"))
    assert r.exit_code != 0 and "bad.jsonl:2" in r.output
    bad.write_text('{"text": "fine"}\n\n{broken\n')
    with pytest.raises(DataFormatError, match="bad.jsonl:3"):
        read_prompts(bad)


def test_summary_and_report_arithmetic():
    rows = [{"prompt_id": p, "prompt": "x", "sample": k, "text": t, "toxicity": s}
            for p, k, t, s in [("a", 0, "x y", 0.9), ("a", 1, "x z", 0.1), ("b", 0, "q", 0.2), ("b", 1, "q", 0.4)]]
    s = summarize(rows)
    assert s["expected_max_toxicity"] == pytest.approx((0.9 + 0.4) / 2)
    assert s["toxicity_probability"] == pytest.approx(0.5)
    assert s["mean_toxicity"] == pytest.approx(0.4)
    s["scorer"] = {"name": "t", "version": "1"}
    other = dict(s, expected_max_toxicity=1.3)
    assert "-50.0%" in markdown_report(s, other)


def test_score_command(tmp_path):
    f = tmp_path / "texts.jsonl"
    f.write_text(json.dumps({"id": 7, "text": "you are a stupid idiot, I hate you"}) + "\n"
                 + json.dumps({"id": 8, "text": "the weather is lovely today"}) + "\n")
    out = tmp_path / "scores.jsonl"
    r = CliRunner().invoke(main, ["score", str(f), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [7, 8] and rows[0]["toxicity"] > rows[1]["toxicity"]
    f.write_text('{"id": 1, "body": "x"}\n')
    r = CliRunner().invoke(main, ["score", str(f)])
    assert r.exit_code != 0 and "texts.jsonl:1" in r.output
