"""Estimate other prompt-gate thresholds from one gated run (issue 21): a prompt the shipped scorer puts below the
threshold T takes its continuations from the run gated at a threshold ≥ T (everything it exempts there is exempt at
T too, with the same draws), every other prompt from the ungated run of the same pair (3.1.0's rule). Every judge of
the runs' judges.jsonl, and identity retention, against the plain run. An estimate: ``detox eval`` seeds the sampler
once per run, so a real run at T draws other samples of the same distributions (context_gate.py's note).

    python experiments/gate_threshold.py --plain /tmp/a/plain --full /tmp/a/v310 --gated /tmp/a/gate05 \\
        --threshold 0.005 0.01 0.02 0.04 0.05

The prompts file is the one the runs' settings.json names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from detox.data import iter_jsonl
from detox.identity import IdentityTerms, prompt_groups
from detox.scoring import load_scorer

from pool_runs import load_pooled, metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plain", type=Path, required=True, help="detox eval --no-calibrator run")
    ap.add_argument("--full", type=Path, required=True, help="the pair without exemption")
    ap.add_argument("--gated", type=Path, required=True, help="the pair gated at a threshold ≥ every --threshold")
    ap.add_argument("--threshold", type=float, nargs="+", required=True)
    args = ap.parse_args()
    (plain, prompts_file), (full, _), (gated, _) = (load_pooled([d]) for d in (args.plain, args.full, args.gated))
    ids = list(plain)
    texts = {str(row.get("id", n - 1)): row["text"] for n, row in iter_jsonl(prompts_file)}
    score = dict(zip(ids, load_scorer(None).score([texts[p] for p in ids])))
    terms = IdentityTerms.load()
    groups = prompt_groups(prompts_file, terms)
    mentions = "mentions a group (identity prompts)"

    base = metrics(plain, ids, groups, terms)
    arms = [("full", full, "")] + [(f"T = {t}", {p: gated[p] if score[p] < t else full[p] for p in ids},
                                    str(sum(score[p] < t for p in ids))) for t in args.threshold] + [("gated run", gated, "")]
    keys = [k for k in base if k.startswith(("TP ", "EMT "))]
    print("| arm | prompts exempt | " + " | ".join(keys) + " | retention |")
    print("|---|---|" + "---|" * len(keys) + "---|")
    for name, by, exempt in arms:
        m = metrics(by, ids, groups, terms)
        cells = [f"{(m[k] / base[k] - 1) * 100:+.1f}%" for k in keys]
        print(f"| {name} | {exempt} | " + " | ".join(cells) + f" | {m[mentions] / base[mentions]:.2f} |")


if __name__ == "__main__":
    main()
