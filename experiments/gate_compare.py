"""Issue 21/22: which prompts two scorers put on different sides of a prompt gate (``detox align --exempt-gate T``).

A gated artifact exempts a prompt's identity terms when the shipped scorer scores the prompt below ``T``. When the
shipped scorer changes, this says how many prompts of each set change gate (and so whether earlier gated runs
still hold). Scores the prompt text as written; the engine scores the text its detokenizer gives back for the
prompt's tokens, which can differ in whitespace, so a prompt scored this close to the threshold may go either way.

    python experiments/gate_compare.py --old ./previous-build --new default --threshold 0.05 /tmp/h21s/*.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from detox.data import read_texts
from detox.scoring import load_scorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="scorer spec the runs were gated with")
    ap.add_argument("--new", required=True, help="scorer spec to compare")
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("prompts", nargs="+", type=Path,
                    help="prompt files: JSONL (the text field), .txt or .csv, as detox.data.read_texts reads them")
    a = ap.parse_args()
    old, new = load_scorer(a.old), load_scorer(a.new)
    for path in a.prompts:
        texts = read_texts(path, "text")
        po, pn = old.score(texts), new.score(texts)
        go, gn = [p < a.threshold for p in po], [p < a.threshold for p in pn]
        moved = [(t, x, y) for t, x, y, u, v in zip(texts, po, pn, go, gn) if u != v]
        print(f"{path.name}: {len(texts)} prompts, exempt old {sum(go)}, new {sum(gn)}, "
              f"on different sides {len(moved)}")
        for t, x, y in moved:
            print(f"  old {x:.3f} new {y:.3f}  {t[:90]}")


if __name__ == "__main__":
    main()
