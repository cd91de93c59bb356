"""``detox toxify``, ``detox distill``, ``detox finetune``: UniDetox from the command line.

Thin wrappers over :mod:`detox.distill` and :mod:`detox.finetune`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import click

from detox.backends.hf import set_torch_threads
from detox.cli.errors import user_errors
from detox.cli.options import add_options
from detox.unidetox_defaults import (
    DEFAULT_ALPHA, DEFAULT_DISTILL_BATCH_SIZE, DEFAULT_STEPS, DEFAULT_TOXIFY_MAX_LENGTH, DEFAULT_TOXIFY_STEPS,
    PAPER_BATCH_SIZE, PAPER_LR, PAPER_MAX_NEW_TOKENS, PAPER_NUM_SAMPLES, PAPER_SEQ_LEN, PAPER_TOXIC_BATCH_SIZE,
    PAPER_TOXIC_LR,
)


def _parse_beta(ctx: click.Context | None, param: click.Parameter | None, value: str) -> float:
    """--beta accepts numbers and 'inf' (UniDetox's default)."""
    try:
        beta = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number; use e.g. 0, 0.5, 1 or inf") from None
    if math.isnan(beta) or beta < 0:
        raise click.BadParameter(f"beta must be >= 0 or inf; got {value}")
    return beta


def _resumable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The SDK's input errors as one line (:func:`user_errors`), and a ^C as one line saying how to continue."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; rerun the same command to continue where it stopped") from None

    return user_errors(wrapper)


_threads_opt = click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads for torch (default: torch's).")
_lora_opts = [
    click.option("--lora/--full", default=False, show_default=True,
                 help="LoRA adapters on all linear layers (merged into the saved weights) or full fine-tuning."),
    click.option("--lora-r", type=click.IntRange(1), default=16, show_default=True, help="LoRA rank."),
    click.option("--lora-alpha", type=int, default=32, show_default=True, help="LoRA scaling numerator."),
]


@click.command()
@click.option("--base", default="smollm2", show_default=True,
              help="Base model: HF dir, .gguf file, 'smollm2' or a hub id.")
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False),
              help="Toxic text: .txt (one per line), .jsonl or .csv.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output dir for the toxic model.")
@click.option("--steps", type=click.IntRange(1), default=DEFAULT_TOXIFY_STEPS, show_default=True,
              help="Optimizer steps (CPU scale; UniDetox ran 3 epochs = 15126 steps).")
@click.option("--epochs", type=float, default=None, help="Train this many epochs instead of --steps.")
@click.option("--lr", type=float, default=PAPER_TOXIC_LR, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=PAPER_TOXIC_BATCH_SIZE, show_default=True)
@click.option("--max-length", type=click.IntRange(2), default=DEFAULT_TOXIFY_MAX_LENGTH, show_default=True,
              help="Tokens per line, BOS included (UniDetox: 512).")
@add_options(_lora_opts)
@click.option("--seed", type=int, default=123, show_default=True)
@click.option("--field", default=None, help="Text field of a JSONL/CSV file.")
@click.option("--max-docs", type=click.IntRange(1), default=None, help="Use only the first N lines of --data.")
@click.option("--overwrite", is_flag=True, help="Replace a model already in --out.")
@_threads_opt
@_resumable
def toxify_cmd(base: str, data: str, out: str, steps: int, epochs: float | None, lr: float, batch_size: int,
               max_length: int, lora: bool, lora_r: int, lora_alpha: int, seed: int, field: str | None,
               max_docs: int | None, overwrite: bool, threads: int | None) -> None:
    """Fine-tune a copy of --base on toxic text: the 'toxic' model UniDetox contrasts against."""
    from detox.distill import toxify

    set_torch_threads(threads)
    r = toxify(base, data, out, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length,
               lora=lora, lora_r=lora_r, lora_alpha=lora_alpha, seed=seed, field=field, max_docs=max_docs,
               overwrite=overwrite)
    click.echo(f"toxic model -> {r.out_dir} ({r.steps} steps, loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}, "
               f"{r.seconds:.0f} s)")


@click.command()
@click.option("--base", default="smollm2", show_default=True, help="Base model (the one to keep close to).")
@click.option("--toxic", required=True, help="Toxic copy of --base (from `detox toxify`), same tokenizer.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Output JSONL; its manifest goes to <name>.manifest.json. An existing file is resumed.")
@click.option("--num-samples", type=click.IntRange(1), default=PAPER_NUM_SAMPLES, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1), default=PAPER_MAX_NEW_TOKENS, show_default=True)
@click.option("--alpha", type=click.FloatRange(0.0, 1.0), default=DEFAULT_ALPHA, show_default=True,
              help="Plausibility threshold: keep tokens with p_base >= alpha * max p_base.")
@click.option("--beta", default="inf", show_default=True, callback=_parse_beta,
              help="Contrast strength: (1+beta)*logp_base - beta*logp_toxic; inf = logp_base - logp_toxic.")
@click.option("--batch-size", type=click.IntRange(1), default=DEFAULT_DISTILL_BATCH_SIZE, show_default=True,
              help="Rows sampled together (keep it fixed when resuming).")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=None, help="Nucleus filter on the contrastive distribution.")
@click.option("--temperature", type=click.FloatRange(0.0), default=1.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available).")
@click.option("--seeds", "seeds_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Short neutral seed texts (.txt one per line, .jsonl or .csv): row i starts from BOS + seed "
                   "i mod N. Default: BOS only, as UniDetox.")
@_threads_opt
@_resumable
def distill_cmd(base: str, toxic: str, out: str, num_samples: int, max_new_tokens: int, alpha: float, beta: float,
                batch_size: int, top_p: float | None, temperature: float, seed: int, device: str | None,
                seeds_file: str | None, threads: int | None) -> None:
    """Distil detoxifying text from BOS by contrastive decoding between --base and --toxic (resumable)."""
    from detox.distill import distill, read_seeds

    if device is not None:
        import torch

        try:
            torch.device(device)
        except RuntimeError:
            raise click.BadParameter(f"{device!r} is not a torch device; use cpu, cuda or cuda:N",
                                     param_hint="--device") from None
    set_torch_threads(threads)
    seeds = read_seeds(seeds_file) if seeds_file else None
    r = distill(base, toxic, out, num_samples=num_samples, max_new_tokens=max_new_tokens, alpha=alpha, beta=beta,
                batch_size=batch_size, top_p=top_p, temperature=temperature, seed=seed, device=device, seeds=seeds,
                log=lambda msg: click.echo(msg, err=True))
    click.echo(f"{r.completed} rows in {r.out_path} ({r.resumed_from} were already there; {r.seconds:.0f} s); "
               f"manifest {r.manifest_path}")


@click.command()
@click.option("--target", default="smollm2", show_default=True,
              help="Model to detoxify: HF dir, .gguf file, 'smollm2' or a hub id (any tokenizer).")
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False),
              help="Distilled text (JSONL from `detox distill`, a CSV with a Text column, or .txt).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output HF model dir.")
@click.option("--steps", type=click.IntRange(1), default=DEFAULT_STEPS, show_default=True,
              help="Optimizer steps (CPU scale; UniDetox: 3000).")
@click.option("--lr", type=float, default=PAPER_LR, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=PAPER_BATCH_SIZE, show_default=True)
@click.option("--seq-len", type=click.IntRange(2), default=PAPER_SEQ_LEN, show_default=True, help="Tokens per packed sequence.")
@add_options(_lora_opts)
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--field", default=None, help="Text field of a JSONL/CSV file.")
@click.option("--max-docs", type=click.IntRange(1), default=None, help="Use only the first N documents.")
@click.option("--overwrite", is_flag=True, help="Replace a model already in --out.")
@_threads_opt
@_resumable
def finetune_cmd(target: str, data: str, out: str, steps: int, lr: float, batch_size: int, seq_len: int, lora: bool,
                 lora_r: int, lora_alpha: int, seed: int, field: str | None, max_docs: int | None, overwrite: bool,
                 threads: int | None) -> None:
    """Fine-tune --target on distilled text (UniDetox's one setting for every model) and save it."""
    from detox.finetune import finetune

    set_torch_threads(threads)
    r = finetune(target, data, out, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, lora=lora,
                 lora_r=lora_r, lora_alpha=lora_alpha, seed=seed, field=field, max_docs=max_docs, overwrite=overwrite)
    click.echo(f"detoxified model -> {r.out_dir} ({r.steps} steps, loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}, "
               f"{r.seconds:.0f} s)")
