"""Which prompts one judge flags under one arm and not the other, and why: for two arms of `detox eval` runs (pooled
over seeds as in pool_runs.py), count the prompts whose toxicity-probability flag (worst continuation ≥ 0.5) differs,
split by whether the prompt is toxic (the dev set's ``toxic_prompt``), whether the flagged worst continuation
mentions an identity group (shipped word list) and whether a second judge also flags it. Issue 21 used it to see what
the prompt gate costs under ``minilm-head``.

    python experiments/gate_flips.py --judge minilm-head --second minilm-ft@2.0+1d36c2b8bea0 \\
        v310=/tmp/a/v310,/tmp/b/v310 gate05=/tmp/a/gate05,/tmp/b/gate05

The prompts file (with the dev set's ``toxic_prompt``) is the one the runs' settings.json names.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from detox.data import iter_jsonl
from detox.identity import IdentityTerms

from pool_runs import load_pooled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--judge", default="minilm-head", help="judges.jsonl column that decides the flag")
    ap.add_argument("--second", default=None, help="another judges.jsonl column, reported on the flipped worst text")
    ap.add_argument("--examples", type=int, default=10, help="benign prompts flagged by the second arm only to print")
    ap.add_argument("arms", nargs=2, metavar="NAME=DIR[,DIR...]")
    args = ap.parse_args()
    (name_a, (a, prompts_file)), (name_b, (b, _)) = [
        (arm.split("=", 1)[0], load_pooled([Path(d) for d in arm.split("=", 1)[1].split(",")])) for arm in args.arms]
    # ids as detox eval gives them: the row's "id", else its 0-based line number
    prompts = {str(row.get("id", lineno - 1)): row for lineno, row in iter_jsonl(prompts_file)}
    terms = IdentityTerms.load()
    counts: Counter = Counter()
    examples = []
    for pid in a:
        flag_a = max(s[args.judge] for s in a[pid]) >= 0.5
        flag_b = max(s[args.judge] for s in b[pid]) >= 0.5
        if flag_a == flag_b:
            continue
        worst = max(b[pid] if flag_b else a[pid], key=lambda s: s[args.judge])
        toxic = bool(prompts[pid].get("toxic_prompt"))
        key = (f"{name_b} only" if flag_b else f"{name_a} only", "toxic prompt" if toxic else "benign prompt",
               "mentions a group" if terms.mentions(worst["text"]) else "no mention")
        if args.second:
            key += (f"{args.second} ≥ 0.5" if worst[args.second] >= 0.5 else f"{args.second} < 0.5",)
        counts[key] += 1
        if flag_b and not toxic:
            examples.append((prompts[pid]["text"], worst["text"], worst[args.judge], worst.get(args.second)))
    print(f"prompts whose {args.judge} flag differs between {name_a} and {name_b}:")
    for key, n in sorted(counts.items()):
        print(f"{n:4d}  " + " | ".join(key))
    for prompt, text, s1, s2 in examples[:args.examples]:
        print(f"- {prompt!r} -> {text!r}: {args.judge} {s1:.2f}" + (f", {args.second} {s2:.2f}" if s2 is not None else ""))


if __name__ == "__main__":
    main()
