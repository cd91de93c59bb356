"""Write a reference-text file of informal, non-offensive tweets for `detox eval --reference-text` (issue 21 asks for
the likelihood of text in a non-standard dialect, as Welbl et al. 2021 measured on African-American English
tweets). No dialect-labelled public set is in ../shared/data; the closest is Davidson et al.'s "neither" tweets
(judge_train.csv, source davidson, label 0): informal Twitter English, much of it in dialect features such as
habitual "be", but not labelled by dialect, so treat it as a proxy.

    python experiments/informal_reference.py --data ../shared/data/judge_train.csv --out /tmp/s35/davidson_neither.txt

A seeded sample (random.Random(seed)) of tweets of 5-40 words; handles become "@user", links and HTML entities are
dropped, whitespace is collapsed to single spaces so that each tweet is one line.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
from pathlib import Path


def clean(text: str) -> str:
    text = re.sub(r"https?://\S+", "", text)
    text = re.sub(r"@\w+", "@user", text)
    text = re.sub(r"&#\d+;", "", text.replace("&amp;", "&"))
    return " ".join(text.split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="../shared/data/judge_train.csv")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("-n", type=int, default=234, help="tweets to write (default: as many as benign_identity.tsv has)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with args.data.open(encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "davidson" and r["label"] == "0"]
    if not rows:
        raise SystemExit(f"{args.data}: no rows with source 'davidson' and label 0; pass ../shared/data/judge_train.csv")
    random.Random(args.seed).shuffle(rows)
    texts = [t for t in (clean(r["text"]) for r in rows) if 5 <= len(t.split()) <= 40][: args.n]
    args.out.write_text("\n".join(texts) + "\n", encoding="utf-8")
    print(f"wrote {len(texts)} tweets to {args.out}")


if __name__ == "__main__":
    main()
