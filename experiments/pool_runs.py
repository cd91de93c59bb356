"""Pool `detox eval` runs of the same prompts at different seeds into one run with more samples per prompt, and print
each arm against the pooled plain run: two runs × 5 samples at seeds 0 and 1 are the protocol's × 10 (other draws of
the same distributions than one run at × 10, which would take twice as long as either).

    python experiments/pool_runs.py --plain /tmp/a/plain,/tmp/b/plain \\
        v310=/tmp/a/v310,/tmp/b/v310 gate05=/tmp/a/gate05,/tmp/b/gate05

Per judge (every column of the runs' judges.jsonl): toxicity probability and expected max toxicity; then distinct-2
over each prompt's pooled samples and the share of continuations that mention a group on the prompts that have one
(docs/identity.md; its ratio to plain is the identity retention). Runs of one arm must share prompts and settings
other than the seed; the script refuses runs that do not.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from detox.identity import IdentityTerms, prompt_groups
from detox.metrics import expected_max_toxicity, mean_distinct_n, toxicity_probability


def load_pooled(dirs: list[Path]) -> tuple[dict[str, list[dict]], str]:
    """prompt id → its samples over all runs (text and every judge's score), and the runs' prompts file."""
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    prompts_file, seeds = None, set()
    for d in dirs:
        settings = json.loads((d / "settings.json").read_text(encoding="utf-8"))
        if prompts_file not in (None, settings["prompts_file"]):
            sys.exit(f"{d}: prompts file {settings['prompts_file']} differs from {prompts_file}; pool runs of one set")
        prompts_file = settings["prompts_file"]
        if settings["settings"]["seed"] in seeds:
            sys.exit(f"{d}: seed {settings['settings']['seed']} is pooled twice; pool runs at different seeds")
        seeds.add(settings["settings"]["seed"])
        with (d / "generations.jsonl").open(encoding="utf-8") as gens, (d / "judges.jsonl").open(encoding="utf-8") as js:
            for g_line, j_line in zip(gens, js, strict=True):
                g, j = json.loads(g_line), json.loads(j_line)
                if (g["prompt_id"], g["sample"]) != (j["prompt_id"], j["sample"]):
                    sys.exit(f"{d}: generations.jsonl and judges.jsonl are out of step at {g['prompt_id']}")
                by_prompt[g["prompt_id"]].append({"text": g["text"], **{k: v for k, v in j.items()
                                                                        if k not in ("prompt_id", "sample")}})
    assert prompts_file is not None
    return dict(by_prompt), prompts_file


def metrics(by_prompt: dict[str, list[dict]], ids: list[str], groups: dict[str, list[str]],
            terms: IdentityTerms) -> dict[str, float]:
    judges = [k for k in by_prompt[ids[0]][0] if k != "text"]
    out: dict[str, float] = {}
    for judge in judges:
        scores = [[s[judge] for s in by_prompt[p]] for p in ids]
        out[f"TP {judge}"] = toxicity_probability(scores)
        out[f"EMT {judge}"] = expected_max_toxicity(scores)
    out["distinct-2"] = mean_distinct_n([[s["text"] for s in by_prompt[p]] for p in ids], 2)
    mentions = [terms.mentions(s["text"]) for p in ids if groups.get(p) for s in by_prompt[p]]
    out["mentions a group (identity prompts)"] = sum(mentions) / len(mentions) if mentions else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plain", required=True, help="RUN_DIR,RUN_DIR,...: the plain runs (no calibrator)")
    parser.add_argument("arms", nargs="+", help="NAME=RUN_DIR,RUN_DIR,...")
    args = parser.parse_args()
    terms = IdentityTerms.load()
    plain, prompts_file = load_pooled([Path(d) for d in args.plain.split(",")])
    ids = sorted(plain)
    groups = prompt_groups(prompts_file, terms)
    base = metrics(plain, ids, groups, terms)
    names, cols = [], []
    for arm in args.arms:
        name, _, dirs = arm.partition("=")
        pooled, arm_prompts = load_pooled([Path(d) for d in dirs.split(",")])
        if arm_prompts != prompts_file or sorted(pooled) != ids:
            sys.exit(f"{name}: its runs cover other prompts than the plain runs ({arm_prompts})")
        if {len(v) for v in pooled.values()} != {len(v) for v in plain.values()}:
            sys.exit(f"{name}: another number of samples per prompt than the plain runs; pool as many runs")
        names.append(name)
        cols.append(metrics(pooled, ids, groups, terms))
    samples = len(plain[ids[0]])
    print(f"{prompts_file}: {len(ids)} prompts × {samples} samples; change against plain (retention: share of plain)")
    print("| metric | plain | " + " | ".join(names) + " |")
    print("|" + "---|" * (len(names) + 2))
    for key, b in base.items():
        if key.startswith("mentions"):
            cells = [f"{c[key]:.3f} ({c[key] / b:.2f})" for c in cols]
        else:
            cells = [f"{c[key]:.3f} ({(c[key] - b) / b:+.1%})" for c in cols]
        print(f"| {key} | {b:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
