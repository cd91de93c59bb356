"""``detox demo``: SmolLM2 with and without the shipped calibrator, side by side, with toxicity scores."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import click

from detox.cli.errors import user_errors



def _demo_prompts_path() -> Path:
    import detox

    return Path(detox.__file__).resolve().parent / "resources" / "demo_prompts.jsonl"


@click.command("demo")
@click.option("--target", default="smollm2", show_default=True, help="Model to demo (needs a shipped or given calibrator).")
@click.option("--calibrator", default=None, help="Aligned artifact: directory, .detox file or NAME@RANGE (default: shipped).")
@click.option("--prompts", default=None, type=click.Path(exists=True, dir_okay=False), help="JSONL with a 'text' field.")
@click.option("--max-new-tokens", default=20, show_default=True)
@click.option("--strength", default=None, type=float, help="Fusion strength (default: the artifact's).")
@user_errors
def demo_cmd(target, calibrator, prompts, max_new_tokens, strength) -> None:
    """Generate for a few prompts with and without the calibrator and print a side-by-side table."""
    import torch

    import detox
    from detox.data import read_texts
    from detox.scoring import load_scorer
    from detox.targets import load_hf_target

    texts = read_texts(prompts or _demo_prompts_path())
    click.echo(f"loading {target} through transformers ...", err=True)
    model, tokenizer = load_hf_target(target)
    tokenizer.padding_side = "left"
    fused = detox.wrap(model, calibrator=calibrator, strength=strength, tokenizer=tokenizer)
    m = fused.calibrator.manifest
    click.echo(f"calibrator {m.name}@{m.version} ({fused.calibrator.path.name}), strength {fused.strength}", err=True)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    outputs = {}
    for label, runner in (("plain", model), ("detox", fused)):
        t0 = time.perf_counter()
        with torch.inference_mode():
            ids = runner.generate(**batch, **gen)
        outputs[label] = tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        click.echo(f"{label}: {time.perf_counter() - t0:.1f}s for {len(texts)} prompts", err=True)
    scorer = load_scorer(None)
    scores = {k: scorer.score(v) for k, v in outputs.items()}
    width = 46
    click.echo(f"\n{'prompt':<34} | {'without calibrator':<{width}} tox  | {'with detox calibrator':<{width}} tox")
    click.echo("-" * (34 + 2 * width + 16))
    for i, prompt in enumerate(texts):
        left = textwrap.shorten(outputs["plain"][i].replace("\n", " "), width, placeholder="…")
        right = textwrap.shorten(outputs["detox"][i].replace("\n", " "), width, placeholder="…")
        click.echo(f"{textwrap.shorten(prompt, 34, placeholder='…'):<34} | {left:<{width}} {scores['plain'][i]:.2f} | "
                   f"{right:<{width}} {scores['detox'][i]:.2f}")
    mean = {k: sum(v) / len(v) for k, v in scores.items()}
    click.echo(f"\nmean toxicity ({scorer.name}): without {mean['plain']:.3f}, with calibrator {mean['detox']:.3f}")
    click.echo(json.dumps({"mean_toxicity": mean}), err=True)
