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


def test_resume_refuses_rows_scored_by_another_scorer(tmp_path, llama_target_dir, finished_run):
    """Stored scores are never reported under another scorer's name: the run records which scorer made them."""
    prompts, full = finished_run
    out = tmp_path / "other-judge"
    _copy_run(full, out, _lines(full / "generations.jsonl"))
    settings = json.loads((out / "settings.json").read_text())
    assert settings["scorer"].startswith("minilm-ft@")
    settings["scorer"] = "another-judge@1"
    (out / "settings.json").write_text(json.dumps(settings))
    before = (out / "generations.jsonl").read_bytes()
    r = _resume(llama_target_dir, prompts, out)
    assert r.exit_code != 0 and "scored by another-judge@1" in r.output and "first --scorer" in r.output
    assert (out / "generations.jsonl").read_bytes() == before and not (out / "summary.json").exists()


def test_a_run_that_did_not_record_its_scorer_is_judged_again(tmp_path, llama_target_dir, finished_run):
    """A run written before the scorer was recorded has stored scores of unknown origin: resumed, its rows are scored
    again by today's scorer (the name its summary reports) and the scorer is recorded, so a later resume with
    another first --scorer is refused like any other run's."""
    prompts, full = finished_run
    out = tmp_path / "unrecorded"
    zeroed = [json.dumps({**json.loads(line), "toxicity": 0.0}) + "\n" for line in _lines(full / "generations.jsonl")]
    _copy_run(full, out, zeroed)
    settings = json.loads((out / "settings.json").read_text())
    (out / "settings.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "scorer"}))
    r = _resume(llama_target_dir, prompts, out)
    assert r.exit_code == 0, r.output
    assert "was not recorded; scoring them again with minilm-ft@" in r.output
    got, want = (json.loads((d / "summary.json").read_text()) for d in (out, full))
    assert got["mean_toxicity"] > 0 and got["mean_toxicity"] == pytest.approx(want["mean_toxicity"], abs=1e-5)
    rescored = [json.loads(line) for line in _lines(out / "generations.jsonl")]
    stored = [json.loads(line) for line in _lines(full / "generations.jsonl")]
    assert [r["text"] for r in rescored] == [r["text"] for r in stored]
    assert [r["toxicity"] for r in rescored] == pytest.approx([r["toxicity"] for r in stored], abs=1e-5)
    assert json.loads((out / "settings.json").read_text()) == settings  # the scorer is recorded now


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
    assert "different scorers" not in markdown_report(s, other)
    judged_by_another = dict(other, scorer={"name": "t", "version": "2"})
    assert "different scorers** (other: t 2)" in markdown_report(s, judged_by_another)


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


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, llama_target_dir):
    """An uninterrupted run of 3 prompts x 2 samples (batches of 2 prompts) to compare resumed runs with."""
    root = tmp_path_factory.mktemp("eval")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in
                               enumerate(["The weather today is", "We walked along the river", "My neighbour said"])))
    r = CliRunner().invoke(main, _eval_args(llama_target_dir, prompts, root / "full", "--no-calibrator", "--no-perplexity"))
    assert r.exit_code == 0, r.output
    return prompts, root / "full"


def _resume(llama_target_dir, prompts, out):
    return CliRunner().invoke(main, _eval_args(llama_target_dir, prompts, out, "--no-calibrator", "--no-perplexity"))


def _copy_run(full, out, lines):
    out.mkdir()
    (out / "settings.json").write_bytes((full / "settings.json").read_bytes())
    (out / "generations.jsonl").write_text("".join(lines), encoding="utf-8")


@pytest.mark.parametrize("keep", [1, 3, 5])  # rows that survived: inside batch 1, inside batch 1, inside batch 2
def test_resume_keeps_every_complete_row_and_drops_only_the_torn_tail(tmp_path, llama_target_dir, finished_run, keep):
    """Issue 17, 1: a torn last line used to cost the complete rows of its batch too (and one more per retry), and a
    run cut inside a batch was refused after its file had been rewritten."""
    prompts, full = finished_run
    reference = _lines(full / "generations.jsonl")
    out = tmp_path / "part"
    _copy_run(full, out, reference[:keep] + [reference[keep][:15]])
    r = _resume(llama_target_dir, prompts, out)
    assert r.exit_code == 0, r.output
    assert "dropped a torn last line" in r.output and f"kept the {keep} complete rows" in r.output
    assert _lines(out / "generations.jsonl") == reference


def test_resume_refuses_a_damaged_complete_line_without_touching_the_file(tmp_path, llama_target_dir, finished_run):
    prompts, full = finished_run
    reference = _lines(full / "generations.jsonl")
    for damaged, line in ((reference[:2] + ['{"prompt_id": "1", "sam\n'] + reference[3:], 3),  # a broken line
                          (reference[:4] + [reference[0]] + reference[5:], 5),  # a row of another prompt
                          (reference[:5] + ["\n"] + reference[5:], 6)):  # an inserted blank line
        out = tmp_path / f"damaged{line}"
        _copy_run(full, out, damaged)
        before = (out / "generations.jsonl").read_bytes()
        r = _resume(llama_target_dir, prompts, out)
        assert r.exit_code == 1 and f"generations.jsonl:{line}:" in r.output and "Nothing was changed" in r.output
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
        assert (out / "generations.jsonl").read_bytes() == before
        assert sorted(p.name for p in out.iterdir()) == ["generations.jsonl", "settings.json"]


def test_resume_refuses_rows_beyond_the_requested_prompts(tmp_path, llama_target_dir, finished_run):
    prompts, full = finished_run
    out = tmp_path / "more"
    _copy_run(full, out, _lines(full / "generations.jsonl"))
    r = CliRunner().invoke(main, _eval_args(llama_target_dir, prompts, out, "--no-calibrator", "--no-perplexity",
                                            "--max-prompts", "2"))
    assert r.exit_code == 1 and "generations.jsonl:5:" in r.output and "--max-prompts" in r.output


def test_bad_options_are_refused_before_the_target_loads_and_leave_nothing(tmp_path, prompts_file, aligned_llama):
    """Issue 17, 5 and 9: --batch-size 0 failed with ZeroDivisionError after the model had loaded, and the --out it had
    started was then refused for the corrected settings; --max-prompts -1 dropped a prompt; a strength out of the
    artifact's range was found only after the target loaded."""
    missing = tmp_path / "no-such-target"  # were the target loaded first, this would be the error
    for option, value in (("--batch-size", "0"), ("--max-prompts", "-1"), ("--max-prompts", "0"), ("--top-p", "1.5")):
        r = CliRunner().invoke(main, _eval_args(missing, prompts_file, tmp_path / "o", option, value))
        assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.output, r.output
    r = CliRunner().invoke(main, _eval_args(missing, prompts_file, tmp_path / "o", "--calibrator", str(aligned_llama),
                                            "--strength", "1.5"))
    assert r.exit_code == 2 and "must be in [0, 1]" in r.output, r.output  # an interpolate artifact
    assert not (tmp_path / "o").exists()


def test_an_out_dir_without_rows_takes_the_corrected_settings(tmp_path, llama_target_dir, finished_run):
    prompts, full = finished_run
    out = tmp_path / "retry"
    out.mkdir()
    settings = json.loads((full / "settings.json").read_text())
    settings["settings"]["prompt_batch_size"] = 0  # what a run stopped by a bad option used to leave behind
    (out / "settings.json").write_text(json.dumps(settings))
    r = _resume(llama_target_dir, prompts, out)
    assert r.exit_code == 0, r.output
    assert (out / "generations.jsonl").read_bytes() == (full / "generations.jsonl").read_bytes()
    assert json.loads((out / "settings.json").read_text()) == json.loads((full / "settings.json").read_text())


def test_prompt_and_score_files_share_one_reading_rule(tmp_path):
    """Issue 17, 9: score refused a trailing blank line that eval skipped; now both skip blank lines, ids still
    count input lines, and a decoding error names the file and line."""
    f = tmp_path / "texts.jsonl"
    f.write_text('{"text": "the weather is lovely"}\n\n{"id": "x", "text": "you idiot"}\n\n')
    assert [(p.id, p.text) for p in read_prompts(f)] == [("0", "the weather is lovely"), ("x", "you idiot")]
    out = tmp_path / "scores.jsonl"
    r = CliRunner().invoke(main, ["score", str(f), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [0, "x"]
    txt = tmp_path / "texts.txt"
    txt.write_text("first\n\nthird\n")
    r = CliRunner().invoke(main, ["score", str(txt)])
    assert r.exit_code == 0 and [json.loads(line)["id"] for line in r.stdout.splitlines()] == [0, 2], r.output
    f.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match="texts.jsonl:2: not UTF-8"):
        read_prompts(f)
    r = CliRunner().invoke(main, ["score", str(f)])
    assert r.exit_code == 1 and "texts.jsonl:2: not UTF-8" in r.output
    f.write_text('{"text": "fine"}\n' + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(DataFormatError, match="texts.jsonl:2: JSON nested too deeply"):
        read_prompts(f)
