"""Byte-identity check of fused generations: write every sampled continuation, or compare two such files.

Generate (the shipped default calibrator, nucleus sampling seeded as ``detox eval`` seeds it, through the same
samplers ``detox eval`` uses, so the check covers the real sampling paths)::

    python benchmarks/check_generations.py --prompts dev.jsonl --backend hf --batch-size 8 --out hf-b8.jsonl

Compare (exit status 1 on any difference)::

    python benchmarks/check_generations.py --compare baseline/hf-b8.jsonl new/hf-b8.jsonl

A refactoring that must not change what users get (issue 19) keeps every configuration's file byte-identical.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def compare(a: Path, b: Path) -> int:
    """Print identical/different counts of rows ``(prompt, sample)`` in ``a`` and ``b``; the number of differences."""
    rows_a, rows_b = _read_jsonl(a), _read_jsonl(b)
    key = lambda r: (r["prompt_index"], r["sample"])  # noqa: E731
    by_a, by_b = {key(r): r["text"] for r in rows_a}, {key(r): r["text"] for r in rows_b}
    missing = sorted(set(by_a) ^ set(by_b))
    same = sum(by_a[k] == by_b[k] for k in set(by_a) & set(by_b))
    diff = [k for k in sorted(set(by_a) & set(by_b)) if by_a[k] != by_b[k]]
    click.echo(f"{a} vs {b}: {same} identical, {len(diff)} different, {len(missing)} in only one file")
    for k in diff[:5]:
        click.echo(f"  prompt {k[0]} sample {k[1]}:\n    A {by_a[k]!r}\n    B {by_b[k]!r}")
    return len(diff) + len(missing)


@click.command()
@click.option("--compare", "compare_files", nargs=2, type=click.Path(exists=True, dir_okay=False), default=None,
              help="Compare two output files instead of generating; exit 1 on any difference.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), help="JSONL with a 'text' field per line.")
@click.option("--n", "n_prompts", default=50, show_default=True, type=click.IntRange(1), help="First N prompts.")
@click.option("--samples", default=4, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True)
@click.option("--backend", type=click.Choice(["hf", "llamacpp", "onnx"]), default="hf", show_default=True)
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1), help="Prompts per batch (as eval's).")
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(1))
@click.option("--top-p", default=0.9, show_default=True)
@click.option("--target", default="smollm2", show_default=True, help="smollm2, a .gguf, or an ONNX export directory.")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch / llama.cpp threads (default: theirs).")
@click.option("--out", type=click.Path(dir_okay=False), help="Output JSONL (one row per generation).")
def main(compare_files, prompts, n_prompts, samples, seed, backend, batch_size, max_new_tokens, top_p, target, threads,
         out) -> None:
    """Generate with the shipped calibrator and write every continuation (or --compare two such files)."""
    if compare_files:
        sys.exit(1 if compare(Path(compare_files[0]), Path(compare_files[1])) else 0)
    if not prompts or not out:
        raise click.UsageError("--prompts and --out are needed to generate (or use --compare A B)")
    from tqdm import tqdm

    from detox.cli.evaluate import load_backend  # the sampling `detox eval` uses
    from detox.evaluation import read_prompts

    if threads and backend != "llamacpp":
        import torch

        torch.set_num_threads(threads)
    items = read_prompts(prompts)[:n_prompts]
    loaded, info = load_backend(backend, target, None, False, None, threads)
    rows, t0 = [], time.perf_counter()
    for b in tqdm(range(0, len(items), batch_size), desc=f"{backend} b{batch_size}", unit="batch"):
        chunk = items[b : b + batch_size]
        texts = loaded.sample([p.text for p in chunk], samples, max_new_tokens, top_p, seed + b)  # eval's seeding
        rows += [{"prompt_index": b + i, "sample": k, "text": texts[i][k]} for i in range(len(chunk)) for k in range(samples)]
    Path(out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    click.echo(f"wrote {len(rows)} generations to {out} in {time.perf_counter() - t0:.0f} s "
               f"(calibrator {info.get('calibrator', {}).get('name')}@{info.get('calibrator', {}).get('version')}, "
               f"strength {info.get('calibrator', {}).get('strength')})", err=True)


if __name__ == "__main__":
    main()
