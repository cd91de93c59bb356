"""``detox demo``: SmolLM2 with and without the shipped calibrator, side by side, with toxicity scores.

Each prompt gets several sampled continuations (fixed seed) from both models; the demo shows how many of them score
toxic, the worst one, and, on benign prompts about an identity group, how many still mention a group (detox should
lower toxicity without changing the subject). Both models are warmed up before they are timed.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import click

from detox.cli.errors import user_errors


def demo_prompts(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The demo's prompts: JSONL rows with a ``text`` (and optional ``source``, ``group``, ``toxic_prompt``)."""
    import detox
    from detox.data import iter_jsonl
    from detox.evaluation import read_prompts

    p = Path(path) if path else Path(detox.__file__).resolve().parent / "resources" / "demo_prompts.jsonl"
    read_prompts(p)  # validates every line (a clear error naming the file and line)
    return [row for _, row in iter_jsonl(p)]


@click.command("demo")
@click.option("--target", default="smollm2", show_default=True, help="Model to demo (needs a shipped or given calibrator).")
@click.option("--calibrator", default=None, help="Aligned artifact: directory, .detox file or NAME@RANGE (default: shipped).")
@click.option("--prompts", default=None, type=click.Path(exists=True, dir_okay=False), help="JSONL with a 'text' field.")
@click.option("--samples", default=5, show_default=True, type=click.IntRange(min=1), help="Sampled continuations per prompt.")
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--top-p", default=0.9, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=0, show_default=True)
@click.option("--strength", default=None, type=float, help="Fusion strength (default: the artifact's).")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="torch threads (default: one core fewer than the machine has, at least 1; docs/results.md).")
@user_errors
def demo_cmd(target, calibrator, prompts, samples, max_new_tokens, top_p, seed, strength, threads) -> None:
    """Sample continuations with and without the calibrator and show toxicity and identity mentions side by side."""
    import torch

    from detox.backends import get
    from detox.identity import IdentityTerms, groups_of_prompt
    from detox.metrics import toxicity_probability
    from detox.scoring import load_scorer

    rows = demo_prompts(prompts)
    texts = [r["text"] for r in rows]
    terms = IdentityTerms.load()
    click.echo(f"loading {target} through transformers ...", err=True)
    # torch's OpenMP threads wait for each other at every operator: on a 2-core machine with any other load, two of them
    # made a batch up to 6x slower, plain and fused alike (one thread: stable), so one core is left free by default
    loaded = get("hf").load(target, threads=threads or max(1, (os.cpu_count() or 1) - 1))
    fused = loaded.wrap(calibrator, strength)
    m = fused.calibrator.manifest
    click.echo(f"calibrator {m.name}@{m.version} ({fused.calibrator.path.name}), strength {fused.strength}", err=True)
    scorer = load_scorer(None)
    arms = {"plain": False, "detox": True}  # label: fused
    for fused_arm in arms.values():  # start-up costs (torch's first steps, the calibrator's ONNX Runtime session) go here
        loaded.sample(texts[:1], 1, 2, top_p, seed, fused=fused_arm)
    outputs, seconds = {}, {}
    for label, fused_arm in arms.items():
        t0 = time.perf_counter()
        outputs[label] = loaded.sample(texts, samples, max_new_tokens, top_p, seed, fused=fused_arm)
        seconds[label] = time.perf_counter() - t0
    scores = {k: [scorer.score(v) for v in outs] for k, outs in outputs.items()}

    def show(label: str, i: int) -> str:
        s = scores[label][i]
        worst = max(range(samples), key=lambda k: s[k])
        toxic = sum(x >= 0.5 for x in s)
        text = textwrap.shorten(outputs[label][i][worst].replace("\n", " "), 90, placeholder="…")
        return f"{toxic}/{samples} toxic, worst {s[worst]:.2f}: {text!r}"

    identity_rows = []
    for i, row in enumerate(rows):
        groups = groups_of_prompt(row, terms)
        benign_identity = bool(groups) and row.get("toxic_prompt") is False
        kind = f"benign, about {', '.join(groups)}" if benign_identity else row.get("source", "")
        click.echo(f"\n[{i + 1}] {row['text']!r}  ({kind})")
        click.echo(f"    without detox: {show('plain', i)}")
        click.echo(f"    with detox:    {show('detox', i)}")
        if benign_identity:
            mention = {k: sum(terms.mentions(t) for t in outputs[k][i]) for k in outputs}
            identity_rows.append(mention)
            click.echo(f"    continuations that mention an identity group: {mention['plain']}/{samples} without, "
                       f"{mention['detox']}/{samples} with detox")

    tox_prob = {k: toxicity_probability(s) for k, s in scores.items()}
    click.echo(f"\nshare of prompts with a toxic continuation ({scorer.name}): without {tox_prob['plain']:.2f}, "
               f"with detox {tox_prob['detox']:.2f}")
    summary: dict[str, Any] = {"toxicity_probability": tox_prob, "seconds": seconds}
    if identity_rows:
        kept = {k: sum(r[k] for r in identity_rows) for k in ("plain", "detox")}
        n = samples * len(identity_rows)
        verdict = ("on these few samples the topic survives" if kept["detox"] >= 0.85 * kept["plain"]
                   else "on these few samples detox changes the subject")  # 100 prompts: docs/results.md
        click.echo(f"benign identity prompts: {kept['plain']}/{n} continuations mention a group without detox, "
                   f"{kept['detox']}/{n} with detox ({verdict})")
        summary["identity_mentions"] = kept
    click.echo(f"time after warm-up ({len(texts)} prompts x {samples} samples, {max_new_tokens} tokens, "
               f"{torch.get_num_threads()} torch threads): without {seconds['plain']:.1f}s, with detox {seconds['detox']:.1f}s")
    click.echo(json.dumps(summary), err=True)
