"""False positives on benign sentences about identity groups vs the same kind of sentences without a group (issue 22).

The sentences in experiments/data/ were written for this check (never trained on): identity_probe.tsv names the
groups DynaHate's hate targets and ToxiGen's sentences here do not (women, Muslims, Jews, trans people, ...);
identity_probe_control.txt holds sentences of the same style and topics with no group in them.

    python experiments/identity_probe.py --scorer default --scorer minilm-head --scorer ./my-scorer
"""

from __future__ import annotations

import argparse
from pathlib import Path

from detox.scoring import load_scorer

HERE = Path(__file__).parent / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scorer", action="append", default=None, help="scorer spec (repeatable; default: default)")
    ap.add_argument("--probe", type=Path, default=HERE / "identity_probe.tsv")
    ap.add_argument("--control", type=Path, default=HERE / "identity_probe_control.txt")
    args = ap.parse_args()
    rows = [line.split("\t", 1) for line in args.probe.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    control = [line.strip() for line in args.control.read_text(encoding="utf-8").splitlines() if line.strip()]
    for spec in args.scorer or ["default"]:
        scorer = load_scorer(spec)
        p = scorer.score([text for _, text in rows])
        q = scorer.score(control)
        hits = [(s, g, t) for s, (g, t) in zip(p, rows) if s >= 0.5]
        n_ctl = sum(s >= 0.5 for s in q)
        print(f"{spec} ({scorer.name} {scorer.version}): identity FPR {len(hits)}/{len(rows)} = {len(hits) / len(rows):.3f}"
              f", control FPR {n_ctl}/{len(q)} = {n_ctl / len(q):.3f}")
        for s, g, t in sorted(hits, reverse=True):
            print(f"  {s:.2f}  {g:9s} {t}")


if __name__ == "__main__":
    main()
