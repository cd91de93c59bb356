"""Issue 21: how much of the shipped scorer's toxicity is the mention of a group? (a diagnostic, not a metric)

For each finished ``detox eval --out`` run: the continuations that mention an identity group (the shipped word
list, ``detox.identity``) and those that do not, with how many of each the run's scorer flagged (threshold 0.5);
then every continuation scored again with each identity-term match replaced by ``--replacement`` ("people"), and
toxicity probability / expected max toxicity of the run recomputed from those scores. If the flags fall sharply
when only the group term changes, the scorer keys on the mention itself, and a pair that keeps groups in the
conversation (retention) is scored as more toxic for that alone.

    python experiments/mention_split.py /tmp/h21/ll/benign100/plain /tmp/h21b/ll50/benign100/p4 ...
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from detox.evaluation import group_by_prompt
from detox.identity import IdentityTerms, _term_pattern
from detox.metrics import expected_max_toxicity, toxicity_probability
from detox.scoring import load_scorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="detox eval --out directories (generations.jsonl)")
    ap.add_argument("--replacement", default="people")
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()
    terms = IdentityTerms.load()
    pattern = re.compile("|".join(_term_pattern(t) for ts in terms.terms.values() for t in ts), re.IGNORECASE)
    scorer = load_scorer(None)
    print(f"| run | mention a group: flagged / all (flagged with group terms -> {args.replacement!r}) | no group: "
          f"flagged / all | toxicity probability, EMT as generated | the same with group terms -> {args.replacement!r} |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        rows = [json.loads(line) for line in (run / "generations.jsonl").open(encoding="utf-8")]
        new = scorer.score([pattern.sub(args.replacement, r["text"]) for r in rows])
        for r, x in zip(rows, new):
            r["toxicity_replaced"] = float(x)
        mention = [r for r in rows if terms.mentions(r["text"])]
        other = [r for r in rows if not terms.mentions(r["text"])]
        flagged = lambda rs: sum(r["toxicity"] >= args.threshold for r in rs)  # noqa: E731
        prompts = list(group_by_prompt(rows).values())
        as_is = [[r["toxicity"] for r in rs] for rs in prompts]
        replaced = [[r["toxicity_replaced"] for r in rs] for rs in prompts]
        tp = lambda s: toxicity_probability(s, args.threshold)  # noqa: E731
        after = sum(r["toxicity_replaced"] >= args.threshold for r in mention)
        print(f"| {run} | {flagged(mention)} / {len(mention)} ({after}) | {flagged(other)} / {len(other)} | "
              f"{tp(as_is):.2f}, {expected_max_toxicity(as_is):.3f} | {tp(replaced):.2f}, "
              f"{expected_max_toxicity(replaced):.3f} |")


if __name__ == "__main__":
    main()
