"""``detox bench``: decoding tokens/s fused vs unfused, measured side by side in one run."""

from __future__ import annotations

from typing import Any, Callable

import click

from detox.cli.errors import user_errors


def _hf_runners(target: str, calibrator: str | None, strength: float | None, tokens: int, prompt: str):
    import torch

    import detox
    from detox.targets import load_hf_target

    model, tokenizer = load_hf_target(target)
    fused = detox.wrap(model, calibrator=calibrator, strength=strength, tokenizer=tokenizer)
    inputs = tokenizer(prompt, return_tensors="pt")
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def run(m) -> int:
        with torch.inference_mode():
            out = m.generate(**inputs, **kwargs)
        return int(out.shape[1] - inputs["input_ids"].shape[1])

    target_params = sum(p.numel() for p in model.parameters())
    return (lambda: run(model)), (lambda: run(fused)), fused.calibrator, target_params


def _onnx_runners(target: str, calibrator: str | None, strength: float | None, tokens: int, prompt: str,
                  provider: str | None):
    """The same runs on ONNX Runtime: ``target`` is a directory written by ``detox export-onnx``."""
    import torch

    import detox
    from detox.adapters.onnxruntime import limit_torch_threads, load_ort_target
    from detox.onnx_export import onnx_parameter_count

    model, tokenizer = load_ort_target(target, provider)
    fused = detox.wrap(model, calibrator=calibrator, strength=strength, tokenizer=tokenizer)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def run(m) -> int:
        # the same torch thread setting for both: the wrapped generate applies it on CPU (see DetoxORTModel)
        with torch.inference_mode(), limit_torch_threads(fused.torch_threads if model.device.type == "cpu" else None):
            out = m.generate(**inputs, **kwargs)
        return int(out.shape[1] - inputs["input_ids"].shape[1])

    return (lambda: run(model)), (lambda: run(fused)), fused.calibrator, onnx_parameter_count(model.path)


def _llamacpp_runners(target: str, calibrator: str | None, strength: float | None, tokens: int, prompt: str):
    """Greedy decoding of exactly ``tokens`` tokens with llama.cpp (``generate`` never stops at end-of-text)."""
    from gguf import GGUFReader

    from detox.adapters.llamacpp import load_llama, wrap_llama
    from detox.targets import is_gguf, resolve_target

    path = resolve_target(target)
    if not is_gguf(path):
        raise click.UsageError(f"--backend llamacpp needs a .gguf file (or 'smollm2') as --target, got {target!r}")
    llm = load_llama(path, n_ctx=512, seed=0)
    fused = wrap_llama(llm, calibrator=calibrator, strength=strength)
    ids = llm.tokenize(prompt.encode(), add_bos=False)

    def run(m) -> int:
        llm.reset()
        n = 0
        for n, _ in enumerate(m.generate(ids, temp=0.0), start=1):
            if n == tokens:
                break
        return n

    target_params = sum(int(t.n_elements) for t in GGUFReader(path).tensors)
    return (lambda: run(llm)), (lambda: run(fused)), fused.calibrator, target_params


def runners_for(backend: str, target: str, calibrator: Any, strength: float | None, tokens: int, prompt: str,
                provider: str | None = "auto") -> tuple[Callable[[], int], Callable[[], int], Any, int]:
    """``(plain, fused, calibrator, target_params)`` for one backend: the two calls ``detox bench`` times."""
    if backend == "onnx":
        return _onnx_runners(target, calibrator, strength, tokens, prompt, provider)
    if backend == "llamacpp":
        return _llamacpp_runners(target, calibrator, strength, tokens, prompt)
    return _hf_runners(target, calibrator, strength, tokens, prompt)


@click.command("bench")
@click.option("--backend", type=click.Choice(["hf", "llamacpp", "onnx"]), default="hf", show_default=True,
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
    from detox.bench import compare, format_result, peak_rss_mb

    plain, fused, cal, target_params = runners_for(backend, target, calibrator, strength, tokens, prompt, provider)
    result = compare(plain, fused, repetitions=repetitions)
    cal_params = sum(int(v.size) for v in cal.artifact.calibrator_state.values())
    click.echo(f"calibrator: {cal.manifest.name}@{cal.manifest.version}, {cal_params / 1e6:.2f}M parameters "
               f"({100 * cal_params / target_params:.1f}% of the target's {target_params / 1e6:.1f}M)")
    click.echo(f"peak resident memory: {peak_rss_mb():.0f} MB")
    click.echo(format_result(result, backend))
