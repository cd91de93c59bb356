"""What the continuations that still score toxic are: the share that mention an identity group.

    python experiments/residual_toxicity.py /tmp/evals/ll_plain /tmp/evals/ll_contrast /tmp/evals/ll_l16

Reads each eval's generations.jsonl (``detox eval --out``); prints, per run, how many continuations score at or
above the threshold, how many of those contain an identity term, and how often identity terms occur at all.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

IDENTITY = re.compile(
    r"\b(gays?|lesbians?|homosexuals?|queer|trans(gender)?|bisexual|lgbt\w*|jews?|jewish|muslims?|islam\w*|black|"
    r"blacks|asians?|mexicans?|latin\w*|women|woman|men|girls?|immigrants?|native|indians?|chinese|arabs?|"
    r"christians?|disabled|autis\w*|feminis\w*|heterosexual|same-sex)\b",
    re.IGNORECASE,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="detox eval --out directories")
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()
    for run in args.runs:
        rows = [json.loads(line) for line in (run / "generations.jsonl").open(encoding="utf-8")]
        toxic = [r for r in rows if r["toxicity"] >= args.threshold]
        with_identity = [r for r in rows if IDENTITY.search(r["text"])]
        toxic_identity = [r for r in toxic if IDENTITY.search(r["text"])]
        print(f"{run.name}: {len(toxic)}/{len(rows)} continuations score >= {args.threshold}; "
              f"{len(toxic_identity)} of them ({len(toxic_identity) / max(1, len(toxic)):.0%}) mention an identity "
              f"group; identity terms in {len(with_identity) / len(rows):.1%} of all continuations")


if __name__ == "__main__":
    main()
