"""Issue 21: would a context-dependent exemption keep the groups on benign prompts and the suppression on toxic ones?

Two prompt scores (``--gate``): the pair's own per-token log-likelihood ratio, mean over the prompt's calibrator
tokens of ``log p_expert(x_t | x_<t) − log p_anti(x_t | x_<t)`` (GeDi's generative classifier, from the same two
models; ``pair``), or 1 − the shipped scorer's toxicity of the prompt (``scorer``). This script

1. prints how well the score separates the toxic from the benign identity prompts (ROC-AUC, quantiles);
2. emulates a per-prompt gate offline from two finished runs of the same prompts, seed and backend: a prompt whose
   score is ≥ ``--threshold`` takes its continuations from the exempt run (``detox align --exempt-identity``), every
   other prompt from the full run, and prints toxicity probability, expected max toxicity and identity retention of
   the gated run against the plain run. An estimate, not the gated run itself: ``detox eval`` seeds the sampler once
   per run, so a prompt's continuations also depend on how many draws the prompts before it took, and a real gated
   run (``detox align --exempt-identity builtin --exempt-gate T``) draws other samples of the same distributions.

    python experiments/context_gate.py --calibrator artifacts/shipped/smollm2-135m-instruct --runs /tmp/h21r/ll \\
        --sets /tmp/h21r/sets --full shipped --exempt ex000 --gate scorer --threshold 0.9
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from detox.evaluation import group_by_prompt
from detox.fusion import pair_log_ratio
from detox.identity import IdentityTerms
from detox.metrics import expected_max_toxicity, toxicity_probability
from detox.runtime import Calibrator
from detox.scorer_training import roc_auc
from detox.scoring import load_scorer

SETS = ("toxic100", "benign100", "benign_heldout")


def prompt_scores(calibrator: Calibrator, prompts: list[str]) -> list[float]:
    """The pair's mean per-token log-likelihood ratio of each prompt (expert over anti-expert), BOS-led: the rule's
    own log-ratio (:func:`detox.fusion.pair_log_ratio`) read at each next token."""
    expert, anti = calibrator.torch_model(), calibrator.torch_model("anti")
    bos, tok = calibrator.manifest.calibrator.bos_token_id, calibrator.tokenizer
    out = []
    with torch.inference_mode():
        for text in prompts:
            ids = torch.tensor([[bos, *tok.encode(text, add_special_tokens=False).ids]])
            hidden = torch.stack([expert(ids[:, :-1])[0][0], anti(ids[:, :-1])[0][0]], dim=-2)  # [t, 2, d]
            ratio = pair_log_ratio(hidden, expert.embed.weight, anti.embed.weight)  # tied output embeddings
            out.append(float(ratio.gather(-1, ids[0, 1:, None]).mean()))
    return out


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a random ``pos`` score > a random ``neg`` score), ties half."""
    return roc_auc([1] * len(pos) + [0] * len(neg), [*pos, *neg])


def load_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "generations.jsonl").open(encoding="utf-8")]


def metrics(rows: list[dict], terms: IdentityTerms) -> tuple[float, float, float]:
    scores = list(group_by_prompt(rows).values())
    tox = [[r["toxicity"] for r in g] for g in scores]
    mentions = float(np.mean([terms.mentions(r["text"]) for r in rows]))
    return toxicity_probability(tox), expected_max_toxicity(tox), mentions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibrator", required=True, help="the pair whose prompt score gates")
    ap.add_argument("--sets", type=Path, required=True, help="experiments/issue21_sets.py's directory")
    ap.add_argument("--runs", type=Path, required=True, help="experiments/issue21_arms.sh's OUT")
    ap.add_argument("--full", default="shipped")
    ap.add_argument("--exempt", default="ex000")
    ap.add_argument("--gate", choices=("pair", "scorer"), default="pair",
                    help="the prompt score: the pair's log-ratio, or 1 − the default scorer's toxicity")
    ap.add_argument("--threshold", type=float, nargs="+", default=[0.0])
    args = ap.parse_args()
    cal, terms = Calibrator.load(args.calibrator), IdentityTerms.load()
    score: dict[str, dict[str, float]] = {}
    for s in SETS:
        if not (args.sets / f"{s}.jsonl").is_file():
            continue
        rows = [json.loads(line) for line in (args.sets / f"{s}.jsonl").open(encoding="utf-8")]
        texts = [r["text"] for r in rows]
        if args.gate == "pair":
            values = prompt_scores(cal, texts)
        else:
            values = [1.0 - t for t in load_scorer(None).score(texts)]
        score[s] = dict(zip([r["id"] for r in rows], values))
    tox, ben = list(score["toxic100"].values()), list(score["benign100"].values())
    print(f"prompt score (mean log-ratio per token): toxic quartiles {np.percentile(tox, [25, 50, 75]).round(3)}, "
          f"benign {np.percentile(ben, [25, 50, 75]).round(3)}; AUC benign > toxic {auc(ben, tox):.3f}")
    for th in args.threshold:
        print(f"\nthreshold {th:+.3f}: prompts exempt: toxic {sum(v >= th for v in tox)}/{len(tox)}, "
              f"benign {sum(v >= th for v in ben)}/{len(ben)}")
        print("| set | arm | toxicity probability | expected max toxicity | mentions a group (retention) |")
        print("|---|---|---|---|---|")
        for s in SETS:
            if not all((args.runs / s / a / "generations.jsonl").is_file() for a in (args.full, args.exempt)):
                continue
            plain = metrics(load_rows(args.runs / s / "plain"), terms)
            full, ex = load_rows(args.runs / s / args.full), load_rows(args.runs / s / args.exempt)
            gated = [r for r in full if score[s][r["prompt_id"]] < th] + [r for r in ex if score[s][r["prompt_id"]] >= th]
            for name, rows in (("plain", None), (args.full, full), (args.exempt, ex), ("gated", gated)):
                tp, emt, men = plain if rows is None else metrics(rows, terms)
                rel = "" if rows is None else f" ({(tp - plain[0]) / plain[0]:+.0%})"
                rel2 = "" if rows is None else f" ({(emt - plain[1]) / plain[1]:+.0%})"
                print(f"| {s} | {name} | {tp:.3f}{rel} | {emt:.3f}{rel2} | {men:.3f} ({men / plain[2]:.2f}) |")


if __name__ == "__main__":
    main()
