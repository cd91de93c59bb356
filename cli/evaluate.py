"""``detox eval`` and ``detox score``: toxicity measurements with the RealToxicityPrompts protocol."""

from __future__ import annotations

import functools
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import click

from detox.backends import get, names as backend_names
from detox.cli.errors import user_errors
from detox.cli.options import load_calibrator_early, strength_option
from detox.data import DataFormatError, read_text_records, write_text_atomic
from detox.extras import missing_module_message


def load_backend(backend: str, target: str, calibrator: str | None, no_calibrator: bool, strength: float | None,
                 threads: int | None = None) -> tuple[Any, dict]:
    """``(loaded Backend, identity info)``, wrapped with the calibrator unless ``no_calibrator``."""
    loaded = get(backend).load(target, context_window=512, seed=0, threads=threads)
    info: dict[str, Any] = {"backend": backend, "target": target, "target_fingerprint": loaded.fingerprint().model_dump()}
    if not no_calibrator:
        fused = loaded.wrap(calibrator, strength)
        m = fused.calibrator.manifest
        info["calibrator"] = {"name": m.name, "version": m.version, "path": str(fused.calibrator.path), "strength": fused.strength}
    return loaded, info


def _load_scorers(specs: tuple[str, ...]) -> list[Any]:
    """:func:`detox.scoring.load_scorers`; a missing optional dependency becomes one line saying what to install."""
    try:
        from detox.scoring import load_scorers

        return load_scorers(specs)
    except ModuleNotFoundError as err:
        message = missing_module_message(err, f"the toxicity scorer ({', '.join(map(str, specs)) or 'default'})")
        if message is None:
            raise
        raise click.ClickException(message) from err


@click.command("eval")
@click.option("--target", default="smollm2", show_default=True, help="Model: HF dir, .gguf, 'smollm2', hub id (backend-dependent).")
@click.option("--backend", type=click.Choice(backend_names()), default="hf", show_default=True)
@click.option("--calibrator", default=None, help="Aligned artifact (default: the shipped one matching the target).")
@click.option("--no-calibrator", is_flag=True, help="Baseline: generate without fusion.")
@strength_option
@click.option("--prompts", required=True, type=click.Path(exists=True, dir_okay=False), help="JSONL with 'text' (and optional 'id').")
@click.option("--samples", default=25, type=click.IntRange(1), show_default=True, help="Continuations per prompt (RTP protocol: 25).")
@click.option("--max-new-tokens", default=20, type=click.IntRange(1), show_default=True)
@click.option("--top-p", default=0.9, type=click.FloatRange(0.0, 1.0, min_open=True), show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--max-prompts", default=None, type=click.IntRange(1), help="Use only the first N prompts.")
@click.option("--batch-size", default=4, type=click.IntRange(1), show_default=True,
              help="Prompts per generation batch (HF/ONNX).")
@click.option("--scorer", "scorers", multiple=True,
              help="Toxicity judge (repeatable: every metric per judge, and their agreement): default (the shipped "
                   "minilm-ft), minilm-head, detoxify:CKPT, a `detox scorer train` dir or a HF classifier dir. The first "
                   "one scores generations.jsonl.")
@click.option("--ppl-model", default=None, help="Reference model for perplexity (default: the unfused target).")
@click.option("--no-perplexity", is_flag=True, help="Skip the perplexity computation.")
@click.option("--compare", "compare_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Another eval's --out: adds a before/after table and a toxicity-distribution plot.")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="CPU threads for the target (llama.cpp threads / torch threads); default: the backend's choice.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory (an existing one is resumed).")
@click.option("--identity-terms", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSON {group: [terms]} for the identity metrics (default: the shipped list; docs/identity.md).")
@click.option("--reference-text", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Text file, one text per line: per-token perplexity fused vs unfused (docs/identity.md).")
@user_errors
def eval_cmd(target, backend, calibrator, no_calibrator, strength, prompts, samples, max_new_tokens, top_p, seed,
             max_prompts, batch_size, scorers, ppl_model, no_perplexity, compare_dir, threads, out,
             identity_terms, reference_text) -> None:
    """Evaluate toxicity, fluency and diversity of a model's continuations, with or without a calibrator.

    Writes OUT/generations.jsonl, OUT/summary.json, OUT/summary.md (and OUT/toxicity_compare.png with --compare).
    """
    from detox.evaluation import (EvalRun, EvalSettings, check_resumable, generate_and_score, judges_summary,
                                  read_compare_summary, read_prompts, score_with_judges, summarize, write_judge_scores,
                                  write_summary)

    if no_calibrator and (calibrator or strength is not None):
        raise click.UsageError("--no-calibrator cannot be combined with --calibrator or --strength")
    problem = None if no_perplexity or ppl_model else get(backend).perplexity_problem()
    if problem:
        raise click.ClickException(problem)
    if compare_dir and importlib.util.find_spec("matplotlib") is None:
        raise click.ClickException("--compare draws its plot with matplotlib, which is not installed: pip install matplotlib")
    if reference_text and no_calibrator:
        raise click.UsageError("--reference-text compares the fused and unfused models: drop --no-calibrator")
    from detox.identity import IdentityTerms, identity_summary, prompt_groups, write_identity_report

    terms = IdentityTerms.load(identity_terms)  # bad input files fail before any generation
    if reference_text:
        from detox.reference_text import eval_reference_text, read_lines

        ref_texts = read_lines(reference_text)
    t0 = time.perf_counter()
    out_dir, compare = Path(out), Path(compare_dir) if compare_dir else None
    # everything that can be checked without the target is checked before it loads (that can take minutes)
    items = read_prompts(prompts)[:max_prompts]
    check_resumable(out_dir, items, samples)
    if compare is not None:
        read_compare_summary(compare)
    calibrator = load_calibrator_early(calibrator, strength)
    judges = _load_scorers(scorers)
    score_fn = judges[0]
    loaded, info = load_backend(backend, target, calibrator, no_calibrator, strength, threads)
    run = EvalRun(target=target, backend=backend, calibrator=(info.get("calibrator") or {}).get("path"),
                  strength=(info.get("calibrator") or {}).get("strength"), prompts_file=str(Path(prompts).resolve()),
                  settings=EvalSettings(samples=samples, max_new_tokens=max_new_tokens, top_p=top_p, seed=seed,
                                        prompt_batch_size=batch_size))
    rows = generate_and_score(run, items, functools.partial(loaded.sample, fused=not no_calibrator), score_fn, out_dir,
                              log=lambda msg: click.echo(msg, err=True))
    ppl = None
    if not no_perplexity:
        from detox.metrics import conditional_perplexity
        from detox.targets import load_hf_target

        model, tok = load_hf_target(ppl_model) if ppl_model else loaded.transformers_twin()
        ppl = conditional_perplexity(model, tok, [r["prompt"] for r in rows], [r["text"] for r in rows])
    summary = summarize(rows, perplexity=ppl)
    if len(judges) > 1:
        from detox.scoring import scorer_labels

        judge_scores = score_with_judges(rows, judges, scorer_labels(judges))
        summary.update(judges_summary(rows, judge_scores))
        write_judge_scores(out_dir, rows, judge_scores)
    summary.update({
        "scorer": {"name": score_fn.name, "version": score_fn.version},
        "perplexity_model": ppl_model or (target if not no_perplexity else None),
        "model": info,
        "settings": json.loads(json.dumps(run.settings.__dict__)),
        "wall_seconds": time.perf_counter() - t0,
    })
    summary["identity"] = identity_summary(rows, prompt_groups(prompts, terms), terms)  # docs/identity.md
    if reference_text:
        summary["reference_text"] = eval_reference_text(reference_text, ref_texts, *loaded.transformers_twin(ppl_model),
                                                        run.calibrator, run.strength)
    write_summary(out_dir, summary, compare, log=click.echo)
    write_identity_report(out_dir, summary, compare, log=click.echo)


@click.command("score")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--scorer", default=None,
              help="default (the shipped minilm-ft), minilm-head, detoxify:CKPT, a `detox scorer train` dir or a HF classifier dir.")
@click.option("--field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option("--batch-size", default=64, type=click.IntRange(1), show_default=True)
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Output JSONL (default: standard output).")
@user_errors
def score_cmd(file, scorer, field, batch_size, out) -> None:
    """Score every line of a JSONL (or .txt) file; writes one {"id", "toxicity"} line per text, in order.

    Blank lines are skipped (as in eval's prompts); a row's id is its "id" field, or its 0-based line number."""
    path = Path(file)
    records = read_text_records(path, field, jsonl=path.suffix.lower() == ".jsonl")
    if not records:
        raise DataFormatError(f"{path}: no texts to score (every line is blank)")
    ids, texts = [r.id for r in records], [r.text for r in records]
    scores = _load_scorers((scorer,) if scorer else ())[0].score(texts, batch_size=batch_size, progress=out is not None)
    lines = "".join(json.dumps({"id": i, "toxicity": round(float(s), 6)}) + "\n" for i, s in zip(ids, scores))
    if out:
        write_text_atomic(Path(out), lines)
        click.echo(f"wrote {len(ids)} scores to {out}", err=True)
    else:
        click.echo(lines, nl=False)
