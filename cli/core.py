"""``detox train``, ``detox align`` and ``detox generate``: the core workflow on the command line."""

from __future__ import annotations

import typing
from typing import Any

import click
from click.core import ParameterSource

from detox.artifacts.manifest import MIN_MAPPED_SHARE
from detox.backends import get, names as backend_names
from detox.cli.errors import user_errors
from detox.cli.options import load_calibrator_early, onnx_weights_option, strength_option
from detox.methods import METHODS
from detox.onnx_export import export_target


@click.command("train")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training text: .txt (one document per line), .jsonl or .csv. Repeatable.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory of the calibrator artifact to write.")
@click.option("--field", default=None, help="Text field of JSONL/CSV rows (default: text/Text/content/sentence).")
@click.option("--epochs", default=3.0, show_default=True, type=float)
@click.option("--max-steps", default=None, type=int, help="Stop after this many optimizer steps (overrides --epochs).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--seq-len", default=128, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--warmup-steps", default=100, show_default=True)
@click.option("--init", "init_from", default=None, type=click.Path(exists=True),
              help="Continue training an existing calibrator (keeps its tokenizer and architecture), e.g. to make "
                   "an anti-expert: the expert fine-tuned on toxic text.")
@click.option("--vocab-size", default=8192, show_default=True, help="Size of the calibrator's own BPE vocabulary.")
@click.option("--hidden-size", default=192, show_default=True)
@click.option("--layers", default=4, show_default=True)
@click.option("--heads", default=6, show_default=True)
@click.option("--ffn-size", default=768, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--checkpoint-dir", default=None, type=click.Path(file_okay=False), help="Default: OUT.ckpt next to OUT.")
@click.option("--checkpoint-every", default=200, show_default=True)
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from the checkpoint if one exists.")
@click.option("--name", default="calibrator", show_default=True)
@click.option("--version", "version", default="0.1.0", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@user_errors
def train_cmd(data, out, field, epochs, max_steps, batch_size, seq_len, lr, warmup_steps, init_from, vocab_size, hidden_size, layers, heads,
              ffn_size, seed, checkpoint_dir, checkpoint_every, resume, name, version, overwrite) -> None:
    """Train a calibration model (its own tokenizer + a compact LM) on non-toxic text.

    Runs on CPU as is; on several GPUs with `accelerate launch -m detox.cli.main train ...`.
    """
    from detox.config import CalibratorConfig
    from detox.training import TrainSettings, train_calibrator

    model = CalibratorConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=layers, num_heads=heads, ffn_size=ffn_size)
    s = TrainSettings(epochs=epochs, max_steps=max_steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed,
                      warmup_steps=warmup_steps, checkpoint_every=checkpoint_every, model=model)
    m = train_calibrator(list(data), out, s, checkpoint_dir=checkpoint_dir, resume=resume, name=name, version=version,
                         field_name=field, overwrite=overwrite, init_from=init_from)
    if m is not None:
        click.echo(f"wrote {out}: {m.name}@{m.version}, {m.training.steps} steps, metrics {m.training.metrics}")


def _method_options(command: Any) -> Any:
    """Add every registered fusion method's ``detox align`` options, each with its default and type from the
    method's config (:mod:`detox.methods`), so defaults live once."""
    for method in reversed(list(METHODS.values())):
        for opt in reversed(method.cli_options):
            help = f"{method.name.capitalize()} fusion: {opt.help}"
            if opt.files:
                command = click.option(opt.flags, opt.name, multiple=True, type=click.Path(exists=True, dir_okay=False),
                                       help=help)(command)
                continue
            info = method.config.model_fields[opt.name]
            choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal else ()
            kind = click.Choice(choices) if choices else (None if "/" in opt.flags else info.annotation)
            command = click.option(opt.flags, opt.name, type=kind, default=info.default, show_default=True,
                                   help=help)(command)
    return command


def _method_config(method: Any, strength: float | None, given: dict[str, Any]) -> Any:
    """``method``'s config from ``detox align``'s options; an option of another method given on the command line is
    a user mistake (that method never reads it): say so instead of silently ignoring it."""
    ctx = click.get_current_context()
    for other in METHODS.values():
        if other is method:
            continue
        flags = [o.flags for o in other.cli_options
                 if ctx.get_parameter_source(o.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]
        if flags:
            raise click.UsageError(f"{', '.join(flags)}: only used by {other.name} fusion ({other.chosen_by}), but this "
                                   f"alignment uses {method.name} fusion ({method.chosen_by}). Drop them.")
    own = {o.name: given[o.name] for o in method.cli_options if not o.files}
    return method.config.parse({**own, **({} if strength is None else {"default_strength": strength})})


@click.command("align")
@click.option("--target", required=True, help="HF model directory, .gguf file, 'smollm2' (packaged) or hub id.")
@click.option("--calibrator", default=None,
              help="Trained (or aligned) calibrator artifact: directory or .detox file. Default: the shipped calibrator.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory of the aligned artifact to write.")
@click.option("--anti-expert", default=None, type=click.Path(exists=True),
              help="Anti-expert calibrator (the expert fine-tuned on toxic text: detox train --init EXPERT ...). "
                   "Gives contrast fusion: target + λ·(expert − anti-expert) on the target's plausible tokens. "
                   "A contrast --calibrator keeps its own anti-expert.")
@click.option("--fusion", default=None, type=click.Choice(sorted(METHODS)),
              help="Fusion method (docs/method.md) [default: contrast with an anti-expert, else interpolate].")
@click.option("--strength", default=None, type=float,
              help="Default fusion strength recorded in the artifact [default: "
                   + ", ".join(f"{m.config().default_strength:g} {m.name}" for m in METHODS.values()) + "].")
@_method_options
@onnx_weights_option
@click.option("--min-mapped-share", default=MIN_MAPPED_SHARE, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Refuse a target unless at least this share of its vocabulary has text the calibrator can read "
                   "(real targets: 97-99%; see docs/align.md).")
@click.option("--exempt-identity", default=None, metavar="builtin|FILE|none",
              help="Contrast only: never push down the first token of an identity term of this word list (the "
                   "shipped one, or a JSON file), so groups stay in the conversation (docs/identity.md). Default: "
                   "what the calibrator was aligned with (built-in list only); none: no exemption.")
@click.option("--exempt-penalty", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="With --exempt-identity: the share of the suppression those tokens keep (0: none; between 0 and "
                   "1 trades group retention for toxicity reduction, docs/identity.md).")
@click.option("--exempt-gate", default=None, type=click.FloatRange(0.0, 1.0, min_open=True), metavar="TOXICITY",
              help="With --exempt-identity: exempt only prompts that the shipped scorer scores below this toxicity "
                   "(e.g. 0.1); other prompts get the full rule [default: every prompt] (docs/identity.md).")
@click.option("--seed", default=0, show_default=True)
@click.option("--name", default=None, help="Artifact name (default: the calibrator's).")
@click.option("--version", "version", default=None, help="Artifact version (default: the calibrator's).")
@click.option("--overwrite", is_flag=True)
@user_errors
def align_cmd(target, calibrator, out, anti_expert, fusion, strength, onnx_weights, min_mapped_share, exempt_identity,
              exempt_penalty, exempt_gate, seed, name, version, overwrite, **method_options) -> None:
    """Align a calibrator to a target model (target frozen) and write an artifact bound to that target.

    The target is not loaded: only its vocabulary (and, for interpolate artifacts, its output matrix) is read from
    its files, and its fingerprint is hashed in chunks."""
    from detox.alignment import AlignSettings, align_artifact, alignment_fusion
    from detox.artifacts.shipped import default_calibrator_path

    calibrator = calibrator or str(default_calibrator_path())
    config = _method_config(alignment_fusion(calibrator, anti_expert, fusion), strength, method_options)
    s = AlignSettings(config, onnx_weights=onnx_weights, min_mapped_share=min_mapped_share, seed=seed,
                      exempt_identity=exempt_identity, exempt_penalty=exempt_penalty,
                      exempt_gate=exempt_gate)
    m = align_artifact(calibrator, target, out, list(method_options.get("data", ())) or None, s, name=name,
                       version=version, overwrite=overwrite, log=lambda msg: click.echo(msg, err=True),
                       anti_expert=anti_expert)
    metrics = m.alignment.metrics
    click.echo(f"wrote {out}: aligned to {m.alignment.target.name} in {metrics['align_seconds']:.1f}s; "
               + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "align_seconds"))


@click.command("generate")
@click.argument("prompt")
@click.option("--target", default="smollm2", show_default=True, help="HF model directory, .gguf file, 'smollm2' or hub id.")
@click.option("--calibrator", default=None,
              help="Aligned artifact: directory, .detox file or NAME@RANGE (registry). Default: the shipped match.")
@click.option("--no-calibrator", is_flag=True, help="Generate without fusion (the baseline).")
@strength_option
@click.option("--backend", type=click.Choice(backend_names()), default="hf", show_default=True,
              help="'llamacpp' runs a .gguf --target with llama-cpp-python (no torch needed); "
                   "'onnx' runs a --target directory written by `detox export-onnx` with ONNX Runtime.")
@click.option("--provider", default="auto", show_default=True,
              help="ONNX Runtime execution provider(s) for --backend onnx: auto (CUDA if available, else CPU), cpu, "
                   "cuda, or comma-separated provider names.")
@click.option("--max-new-tokens", default=40, show_default=True)
@click.option("--sample/--greedy", default=False, show_default=True)
@click.option("--top-p", default=0.9, show_default=True)
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@user_errors
def generate_cmd(prompt, target, calibrator, no_calibrator, strength, backend, provider, max_new_tokens, sample, top_p,
                 temperature, seed) -> None:
    """Print the continuation of PROMPT, with the calibrator fused (default) or without."""
    if no_calibrator and (calibrator or strength is not None):
        raise click.UsageError("--no-calibrator cannot be combined with --calibrator or --strength")
    calibrator = load_calibrator_early(calibrator, strength)  # a bad --strength fails before the target loads
    target_on = get(backend).load(target, context_window=2048, seed=seed, provider=provider)
    if not no_calibrator:
        target_on.wrap(calibrator, strength)
    target_on.generate(prompt, max_new_tokens, sample, top_p, temperature, seed, fused=not no_calibrator,
                       echo=lambda text: click.echo(text, nl=False))  # in pieces where the backend streams
    click.echo()


@click.command("export-onnx")
@click.option("--target", required=True, help="HF model directory, .gguf file, 'smollm2' (packaged) or hub id.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write (model.onnx, tokenizer, fingerprint).")
@click.option("--opset", default=None, type=int, help="ONNX opset (default: optimum's choice for the architecture).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@user_errors
def export_onnx_cmd(target, out, opset, overwrite) -> None:
    """Export a causal LM to ONNX with KV cache (optimum), for `--backend onnx` and ORTModelForCausalLM.

    The target's fingerprint is recorded and re-checked from the exported files, so calibrators aligned to
    TARGET work on the export unchanged.
    """
    fp = export_target(target, out, overwrite=overwrite, opset=opset, log=lambda msg: click.echo(msg, err=True))
    click.echo(f"wrote {out}: vocab {fp.vocab_size}, hidden {fp.hidden_size}; fingerprint matches {target}")
