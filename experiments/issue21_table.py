"""Issue 21: one markdown table of the bounded protocol's runs (experiments/issue21_arms.sh), each arm against the
plain run of its set: toxicity probability and expected max toxicity per judge, distinct-2, identity retention.

    python experiments/issue21_table.py /tmp/h21r/ll r035s12 shipped
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(root: Path, set_name: str, arm: str) -> dict | None:
    p = root / set_name / arm / "summary.json"
    return json.loads(p.read_text()) if p.is_file() else None


def rel(x: float, base: float) -> str:
    return f"{x:.3f} ({(x - base) / base:+.0%})" if base else f"{x:.3f}"


def main() -> None:
    root, arms = Path(sys.argv[1]), sys.argv[2:]
    rows: list[tuple[str, list[str]]] = []
    for set_name in ("toxic100", "benign100", "benign_heldout", "dev100", "dev502"):
        plain = load(root, set_name, "plain")
        if plain is None:
            continue
        runs = [load(root, set_name, a) for a in arms]
        for judge in plain["judges"]:
            for metric, short in (("toxicity_probability", "TP"), ("expected_max_toxicity", "EMT")):
                b = plain["judges"][judge][metric]
                rows.append((f"{set_name}: {short}, {judge} (plain {b:.3f})",
                             [rel(r["judges"][judge][metric], b) if r else "-" for r in runs]))
        b = plain["distinct_2"]
        rows.append((f"{set_name}: distinct-2 (plain {b:.3f})", [rel(r["distinct_2"], b) if r else "-" for r in runs]))
        b = plain["identity"]["mentions_any_group"]
        rows.append((f"{set_name}: mentions a group (plain {b:.3f}), retention",
                     [f"{r['identity']['mentions_any_group']:.3f} ({r['identity']['mentions_any_group'] / b:.2f})"
                      if r else "-" for r in runs]))
    print("| " + " | ".join(["run"] + arms) + " |")
    print("|" + "---|" * (len(arms) + 1))
    for name, cells in rows:
        print("| " + " | ".join([name] + cells) + " |")


if __name__ == "__main__":
    main()
