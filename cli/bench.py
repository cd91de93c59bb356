"""``detox bench``: decoding tokens/s fused vs unfused, measured side by side in one run."""

from __future__ import annotations

from typing import Any, Callable

import click

from detox.backends import get, names as backend_names
from detox.bench import compare, format_result, peak_rss_mb
from detox.cli.errors import user_errors


def runners_for(backend: str, target: str, calibrator: Any, strength: float | None, tokens: int, prompt: str,
                provider: str | None = "auto") -> tuple[Callable[[], int], Callable[[], int], Any, int]:
    """``(plain, fused, calibrator, target_params)`` for one backend: the two calls ``detox bench`` times."""
    loaded = get(backend).load(target, context_window=512, seed=0, provider=provider)
    fused = loaded.wrap(calibrator, strength)
    return (loaded.bench_runner(prompt, tokens, fused=False), loaded.bench_runner(prompt, tokens, fused=True),
            fused.calibrator, loaded.parameter_count())


@click.command("bench")
@click.option("--backend", type=click.Choice(backend_names()), default="hf", show_default=True,
              help="'llamacpp': --target is a .gguf file; 'onnx': a directory written by `detox export-onnx`.")
@click.option("--target", default="smollm2", show_default=True)
@click.option("--calibrator", default=None, help="Aligned artifact: directory, .detox file or NAME@RANGE (default: shipped match).")
@click.option("--strength", default=None, type=float)
@click.option("--tokens", default=32, show_default=True, help="New tokens per run (forced, so runs are comparable).")
@click.option("--repetitions", default=5, show_default=True)
@click.option("--prompt", default="The city council met on Tuesday to discuss", show_default=True)
@click.option("--provider", default="auto", show_default=True, help="ONNX Runtime execution provider(s) for --backend onnx.")
@user_errors
def bench_cmd(backend, target, calibrator, strength, tokens, repetitions, prompt, provider) -> None:
    """Print unfused and fused tokens/s at batch 1 and, as the last line, their time ratio."""
    plain, fused, cal, target_params = runners_for(backend, target, calibrator, strength, tokens, prompt, provider)
    result = compare(plain, fused, repetitions=repetitions)
    cal_params = sum(int(v.size) for v in cal.artifact.calibrator_state.values())
    click.echo(f"calibrator: {cal.manifest.name}@{cal.manifest.version}, {cal_params / 1e6:.2f}M parameters "
               f"({100 * cal_params / target_params:.1f}% of the target's {target_params / 1e6:.1f}M)")
    click.echo(f"peak resident memory: {peak_rss_mb():.0f} MB")
    click.echo(format_result(result, backend))
