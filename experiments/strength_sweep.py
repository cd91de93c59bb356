"""Fusion-strength sweep with ``detox eval``: toxicity vs perplexity (the trade-off curve), as a table and a plot.

    python experiments/strength_sweep.py --calibrator artifacts/shipped/smollm2-135m-instruct \
        --prompts DATA/prompts_dev.jsonl --strengths 0,1,2,4,6,8 --max-prompts 100 --samples 5 --out /tmp/sweep --plot docs/strength_sweep.png

Each strength is one resumable ``detox eval`` run in OUT/s<λ>; the baseline (no calibrator) is OUT/none
(strength 0 gives the same logits; it is kept as a check of that).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run_eval(out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    if not (out / "summary.json").is_file():
        cmd = [sys.executable, "-m", "detox.cli.main", "eval", "--backend", args.backend, "--prompts", args.prompts,
               "--max-prompts", str(args.max_prompts), "--samples", str(args.samples), "--threads", str(args.threads),
               "--out", str(out), *extra]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibrator", required=True)
    ap.add_argument("--strengths", default="0,1,2,4,6,8")
    ap.add_argument("--backend", default="hf")
    ap.add_argument("--prompts", required=True,
                    help="prompts JSONL passed to `detox eval --prompts` (the development set: prompts_dev.jsonl)")
    ap.add_argument("--max-prompts", type=int, default=100)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()

    base = run_eval(args.out / "none", args, ["--no-calibrator"])
    rows = [("none", base)]
    for lam in args.strengths.split(","):
        rows.append((lam, run_eval(args.out / f"s{lam}", args, ["--calibrator", args.calibrator, "--strength", lam])))

    keys = ["toxicity_probability", "expected_max_toxicity", "perplexity", "distinct_2"]
    lines = ["| strength | toxicity prob. | exp. max toxicity | perplexity | distinct-2 |", "|---|---|---|---|---|"]
    for name, s in rows:
        cells = []
        for k in keys:
            rel = "" if name == "none" else f" ({100 * (s[k] - base[k]) / base[k]:+.0f}%)"
            cells.append(f"{s[k]:.3f}{rel}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    (args.out / "sweep.md").write_text(table + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        pts = rows[1:]
        ax.plot([s["perplexity"] for _, s in pts], [s["toxicity_probability"] for _, s in pts], "o-", label="toxicity probability")
        ax.plot([s["perplexity"] for _, s in pts], [s["expected_max_toxicity"] for _, s in pts], "s-", label="expected max toxicity")
        for i, (name, s) in enumerate(pts):  # labels alternate above and below the curve: neighbours can be close
            ax.annotate(f"λ={name}", (s["perplexity"], s["toxicity_probability"]), textcoords="offset points",
                        xytext=(4, 6) if i % 2 == 0 else (4, -12), fontsize=8)
        ax.scatter([base["perplexity"]] * 2, [base["toxicity_probability"], base["expected_max_toxicity"]], c="k", marker="x",
                   label="no calibrator", zorder=3)
        ax.set(xlabel="perplexity of continuations (unfused target)", ylabel="toxicity",
               title=f"contrast fusion strength sweep ({args.backend}, {base['num_prompts']} prompts × {args.samples})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
