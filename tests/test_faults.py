"""Faults and bad input on the real command line, in subprocesses.

`detox eval` and `detox distill` are killed with SIGKILL at named points (``DETOX_FAULT_POINT``, see
detox.faults) one after another, each time rerun with the same command: nothing complete may be lost, nothing
duplicated, and the final files must equal an uninterrupted run's. Then a table of malformed data files, one per
way a file these commands read can be bad (run in this process: click's runner shows whether an exception
escaped): each must give one ``Error:`` line naming the file (and line), a non-zero exit and no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

KILLED = -signal.SIGKILL


def detox(*args: str, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``detox ARGS`` in a fresh Python process (the console script's entry point), killed at ``fault``."""
    env = {k: v for k, v in os.environ.items() if k not in ("DETOX_FAULT_POINT", "DETOX_DEBUG")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if fault:
        env["DETOX_FAULT_POINT"] = fault
    return subprocess.run([sys.executable, "-m", "detox.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []


def assert_complete_prefix(path: Path, reference: list[str], at_least: int) -> int:
    """The complete lines of ``path`` are the first lines of the uninterrupted run's file (nothing lost or changed,
    nothing duplicated); returns how many."""
    complete = [line for line in lines_of(path) if line.endswith("\n")]
    assert complete == reference[: len(complete)]
    assert len(complete) >= at_least
    return len(complete)


# ---------------------------------------------------------------- detox eval


@pytest.fixture(scope="module")
def eval_prompts(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    texts = ["The weather today is", "We walked along the river", "My neighbour said that", "The old house",
             "In the morning we"]
    p.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return p


def _eval(target: Path, prompts: Path, out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    return detox("eval", "--target", str(target), "--prompts", str(prompts), "--no-calibrator", "--no-perplexity",
                 "--samples", "2", "--max-new-tokens", "5", "--batch-size", "2", "--threads", "1", "--out", str(out),
                 fault=fault)


def test_eval_killed_at_every_point_resumes_to_the_uninterrupted_result(tmp_path, llama_target_dir, eval_prompts):
    ref = _eval(llama_target_dir, eval_prompts, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    reference = lines_of(tmp_path / "ref" / "generations.jsonl")
    assert len(reference) == 10  # 5 prompts x 2 samples, in batches of 2 prompts (4 rows)
    out = tmp_path / "run"
    gen = out / "generations.jsonl"

    # killed right after the first batch is on disk
    r = _eval(llama_target_dir, eval_prompts, out, fault="eval.rows.written")
    assert r.returncode == KILLED, r.stderr
    assert assert_complete_prefix(gen, reference, 4) == 4 and gen.read_text().endswith("\n")

    # killed in the middle of appending the second batch (4 rows): a torn line after some of its rows
    r = _eval(llama_target_dir, eval_prompts, out, fault="eval.rows.torn")
    assert r.returncode == KILLED, r.stderr
    kept = assert_complete_prefix(gen, reference, 4)
    assert 4 < kept < 8 and not gen.read_text().endswith("\n")

    # resumed inside the cut-short batch (only its missing rows), all rows written, killed before summary.md
    r = _eval(llama_target_dir, eval_prompts, out, fault="eval.summary.written")
    assert r.returncode == KILLED, r.stderr
    assert "dropped a torn last line" in r.stderr and f"kept the {kept} complete rows" in r.stderr
    assert lines_of(gen) == reference and not (out / "summary.md").exists()

    # the same command once more: nothing generated again, the summary finished
    r = _eval(llama_target_dir, eval_prompts, out)
    assert r.returncode == 0, r.stderr
    assert gen.read_bytes() == (tmp_path / "ref" / "generations.jsonl").read_bytes()
    got, want = (json.loads((d / "summary.json").read_text()) for d in (out, tmp_path / "ref"))
    for summary in (got, want):
        summary.pop("wall_seconds")
    assert got == want
    assert (out / "summary.md").read_text() == (tmp_path / "ref" / "summary.md").read_text()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind


# ---------------------------------------------------------------- detox distill


@pytest.fixture(scope="module")
def distill_models(llama_target_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny llama target as the base and a perturbed copy of it (same tokenizer) as the toxic model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    toxic = tmp_path_factory.mktemp("toxic") / "toxic"
    model = AutoModelForCausalLM.from_pretrained(llama_target_dir)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(toxic)
    AutoTokenizer.from_pretrained(llama_target_dir).save_pretrained(toxic)
    return llama_target_dir, toxic


def _distill(models: tuple[Path, Path], out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    base, toxic = models
    return detox("distill", "--base", str(base), "--toxic", str(toxic), "--out", str(out), "--num-samples", "6",
                 "--max-new-tokens", "5", "--batch-size", "2", "--seed", "3", "--device", "cpu", "--threads", "1",
                 fault=fault)


def test_distill_killed_at_every_point_resumes_to_the_uninterrupted_result(tmp_path, distill_models):
    ref_path = tmp_path / "ref.jsonl"
    ref = _distill(distill_models, ref_path)
    assert ref.returncode == 0, ref.stderr
    reference = lines_of(ref_path)
    assert len(reference) == 6
    out = tmp_path / "run.jsonl"
    manifest = tmp_path / "run.manifest.json"

    # killed after the second batch's rows are on disk but before the manifest counts them
    r = _distill(distill_models, out, fault="distill.rows.written:2")
    assert r.returncode == KILLED, r.stderr
    assert assert_complete_prefix(out, reference, 4) == 4
    assert json.loads(manifest.read_text())["completed"] == 2  # the manifest lags; the rows are the truth

    # killed in the middle of appending the third batch
    r = _distill(distill_models, out, fault="distill.rows.torn")
    assert r.returncode == KILLED, r.stderr
    assert assert_complete_prefix(out, reference, 4) in (4, 5) and not out.read_text().endswith("\n")

    # killed right after the last manifest update (before the final rows hash)
    r = _distill(distill_models, out, fault="distill.manifest.written")
    assert r.returncode == KILLED, r.stderr
    assert "dropped a torn last line" in r.stderr
    assert lines_of(out) == reference

    r = _distill(distill_models, out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == ref_path.read_bytes()
    got, want = (json.loads(p.read_text()) for p in (manifest, tmp_path / "ref.manifest.json"))
    for key in ("completed", "total_tokens", "stopped_at_eos", "rows_sha256", "num_samples"):
        assert got[key] == want[key], key


# ---------------------------------------------------------------- malformed input, one line each

DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON parser can recurse


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


# (case, file name, content, where the error must point)
BAD_PROMPTS = [
    ("invalid JSON", "p.jsonl", '{"text": "fine"}\n{"text": \n', "p.jsonl:2"),
    ("nested too deeply", "p.jsonl", '{"text": "fine"}\n' + DEEP + "\n", "p.jsonl:2"),
    ("deep value in a row", "p.jsonl", '{"text": "a", "x": ' + DEEP + "}\n", "p.jsonl:1"),
    ("not UTF-8", "p.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "p.jsonl:2"),
    ("not an object", "p.jsonl", '[1, 2]\n', "p.jsonl:1"),
    ("no text field", "p.jsonl", '{"prompt": "hi"}\n', "p.jsonl:1"),
    ("text not a string", "p.jsonl", '{"text": 3}\n', "p.jsonl:1"),
    ("empty text", "p.jsonl", '{"text": "  "}\n', "p.jsonl:1"),
    ("duplicate ids", "p.jsonl", '{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', "p.jsonl:2"),
    ("huge integer", "p.jsonl", '{"text": "a", "id": ' + "9" * 5000 + "}\n", "p.jsonl:1"),
    ("no prompts", "p.jsonl", "\n\n", "p.jsonl"),
]

BAD_SCORE_INPUT = [
    ("invalid JSON", "s.jsonl", '{"text": "fine"}\nnot json\n', "s.jsonl:2"),
    ("nested too deeply", "s.jsonl", DEEP + "\n", "s.jsonl:1"),
    ("not UTF-8", "s.jsonl", b'{"text": "\xff"}\n', "s.jsonl:1"),
    ("no such field", "s.jsonl", '{"body": "x"}\n', "s.jsonl:1"),
    ("not UTF-8 text file", "s.txt", b"fine\n\xc3\x28\n", "s.txt:2"),
    ("only blank lines", "s.txt", "\n \n", "s.txt"),
]

BAD_SEEDS = [
    ("not UTF-8", "seeds.txt", b"hello\n\xfe\n", "seeds.txt:2"),
    ("invalid JSON", "seeds.jsonl", '{"text": "a"}\n{"text"\n', "seeds.jsonl:2"),
    ("nested too deeply", "seeds.jsonl", DEEP + "\n", "seeds.jsonl:1"),
    ("CSV not UTF-8", "seeds.csv", b"text\nok\n\x80\n", "seeds.csv:3"),
]


def cli(*args: str):
    """``detox ARGS`` in this process (click's test runner): the malformed-input table needs no fresh process."""
    from click.testing import CliRunner

    from detox.cli.main import main

    return CliRunner().invoke(main, list(args))


def assert_one_line_error(r, where: str) -> None:
    """Exit status 1, one ``Error:`` line naming ``where``, and no exception escaped (so no traceback)."""
    stderr = r.stderr
    code = r.returncode if isinstance(r, subprocess.CompletedProcess) else r.exit_code
    assert code == 1, (code, stderr)
    if not isinstance(r, subprocess.CompletedProcess):
        assert isinstance(r.exception, SystemExit), r.exception  # click's exit, not an error that escaped
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and errors[0].startswith("Error: "), stderr
    assert where in errors[0], errors[0]


@pytest.mark.parametrize("case, name, content, where", BAD_PROMPTS, ids=[c[0] for c in BAD_PROMPTS])
def test_eval_refuses_a_malformed_prompts_file_in_one_line(tmp_path, case, name, content, where):
    prompts = _write(tmp_path / name, content)
    r = cli("eval", "--target", str(tmp_path / "never-loaded"), "--prompts", str(prompts), "--no-calibrator",
            "--out", str(tmp_path / "out"))
    assert_one_line_error(r, where)
    assert not (tmp_path / "out").exists()  # refused before anything was created


@pytest.mark.parametrize("case, name, content, where", BAD_SCORE_INPUT, ids=[c[0] for c in BAD_SCORE_INPUT])
def test_score_refuses_a_malformed_input_in_one_line(tmp_path, case, name, content, where):
    r = cli("score", str(_write(tmp_path / name, content)), "--out", str(tmp_path / "scores.jsonl"))
    assert_one_line_error(r, where)
    assert not (tmp_path / "scores.jsonl").exists()


@pytest.mark.parametrize("case, name, content, where", BAD_SEEDS, ids=[c[0] for c in BAD_SEEDS])
def test_distill_refuses_a_malformed_seeds_file_in_one_line(tmp_path, case, name, content, where):
    r = cli("distill", "--base", str(tmp_path / "never-loaded"), "--toxic", str(tmp_path / "never-loaded"),
            "--seeds", str(_write(tmp_path / name, content)), "--out", str(tmp_path / "d.jsonl"))
    assert_one_line_error(r, where)


def test_distill_refuses_a_damaged_output_in_one_line_without_touching_it(tmp_path):
    out = _write(tmp_path / "d.jsonl", '{"id": 0, "text": "a", "num_tokens": 1}\n{"id": 1, "te\n'
                                       '{"id": 2, "text": "c", "num_tokens": 1}\n')
    before = out.read_bytes()
    r = cli("distill", "--base", str(tmp_path / "never-loaded"), "--toxic", str(tmp_path / "never-loaded"),
            "--out", str(out))
    assert_one_line_error(r, "d.jsonl:2")
    assert out.read_bytes() == before


@pytest.mark.parametrize("summary", ['{"num_prompts": 3', DEEP, "[]", b"\xff\xfe"])
def test_eval_refuses_a_malformed_compare_summary_before_loading_anything(tmp_path, summary):
    prompts = _write(tmp_path / "p.jsonl", '{"text": "hi"}\n')
    (tmp_path / "before").mkdir()
    _write(tmp_path / "before" / "summary.json", summary)
    r = cli("eval", "--target", str(tmp_path / "never-loaded"), "--prompts", str(prompts), "--no-calibrator",
            "--compare", str(tmp_path / "before"), "--out", str(tmp_path / "out"))
    assert_one_line_error(r, "summary.json")
    assert not (tmp_path / "out").exists()


def test_distill_refuses_a_malformed_manifest_in_one_line_without_touching_anything(tmp_path, distill_models):
    base, toxic = distill_models
    out = _write(tmp_path / "d.jsonl", '{"id": 0, "text": "a", "num_tokens": 1}\n{"id": 1, "text": "b", "num_tok')
    manifest = _write(tmp_path / "d.manifest.json", "[" * 100_000)
    before = out.read_bytes(), manifest.read_bytes()
    r = cli("distill", "--base", str(base), "--toxic", str(toxic), "--out", str(out), "--num-samples", "4",
            "--device", "cpu")
    assert_one_line_error(r, "d.manifest.json")
    assert (out.read_bytes(), manifest.read_bytes()) == before  # not even the torn tail is dropped


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--max-prompts", "0"), ("--max-prompts", "-1"),
                                           ("--samples", "0"), ("--top-p", "0"), ("--strength", "-1"),
                                           ("--strength", "25")])
def test_eval_refuses_a_bad_option_before_loading_anything(tmp_path, option, value):
    prompts = _write(tmp_path / "p.jsonl", '{"text": "hi"}\n')
    r = cli("eval", "--target", str(tmp_path / "never-loaded"), "--prompts", str(prompts), option, value,
            "--out", str(tmp_path / "out"))
    assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback_that_is_otherwise_one_line(tmp_path):
    """The real console entry point, stderr as a user sees it."""
    bad = _write(tmp_path / "s.jsonl", DEEP + "\n")
    plain = detox("score", str(bad))
    assert_one_line_error(plain, "s.jsonl:1")
    debug = detox("--debug", "score", str(bad))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "s.jsonl:1" in debug.stderr


def test_an_error_no_command_expected_is_one_line_too_unless_debug():
    """The `detox` group's last line of defence (a bug, or an exception type a command does not catch)."""
    import click
    from click.testing import CliRunner

    from detox.cli.errors import DetoxGroup, debug_option

    @click.group(cls=DetoxGroup)
    @debug_option
    def group(debug: bool) -> None:
        pass

    @group.command()
    def boom() -> None:
        raise KeyError("no\nsuch key")

    r = CliRunner().invoke(group, ["boom"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert r.stderr.strip().splitlines() == ["Error: KeyError: 'no\\nsuch key' (unexpected; run `detox --debug ...` "
                                             "for the traceback and report it)"]
    r = CliRunner().invoke(group, ["--debug", "boom"])
    assert isinstance(r.exception, KeyError)
