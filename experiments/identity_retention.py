"""Issue 21: identity retention and the likelihood of benign identity text, shipped default vs no calibrator.

Builds benign identity prompts from a ``group<TAB>text`` file (``--data``, e.g. ``benign_identity.tsv``) the way the
dev set was built (each sentence cut to the first half of its words, 3–12 words; ``group`` kept as the prompt's
group), writes the whole sentences as a reference-text file, then runs ``detox eval`` without and with the
calibrator (the fused run also scores the reference text, ``--reference-text``) and prints the numbers.

    nice -n 10 python experiments/identity_retention.py --data DATA/benign_identity.tsv \\
        --out /tmp/h6/identity --max-prompts 100 --samples 5 --max-new-tokens 20
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path


def read_tsv(path: Path) -> list[tuple[str, str]]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        cells = line.split("\t")
        if len(cells) != 2:
            sys.exit(f"{path}:{lineno}: expected 'group<TAB>text'")
        if lineno == 1 and cells == ["group", "text"]:
            continue
        rows.append((cells[0].strip(), cells[1].strip()))
    return rows


def cut(text: str) -> str:
    """The dev set's rule: the first half of the words, at least 3 and at most 12."""
    words = text.split()
    return " ".join(words[: min(12, max(3, len(words) // 2))])


def build_inputs(rows: list[tuple[str, str]], out: Path, max_prompts: int | None, seed: int) -> tuple[Path, Path]:
    picked = list(enumerate(rows))
    if max_prompts is not None and max_prompts < len(picked):
        picked = sorted(random.Random(seed).sample(picked, max_prompts))
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"benign-{i:03d}", "text": cut(t), "group": g,
                                           "source": f"benign_identity/{g}"}) + "\n" for i, (g, t) in picked))
    reference = out / "reference.txt"
    reference.write_text("".join(t + "\n" for _, t in rows))
    return prompts, reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="group<TAB>text file (benign_identity.tsv)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--max-prompts", type=int, default=100, help="a seeded random subset of the sentences as prompts")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="hf")
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--calibrator", default=None, help="default: the shipped one")
    ap.add_argument("--strength", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-reference", action="store_true", help="skip the reference-text scoring")
    ap.add_argument("--tag", default="fused", help="output subdirectory of the fused run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    prompts, reference = build_inputs(read_tsv(args.data), args.out, args.max_prompts, args.seed)
    detox = [str(Path(sys.executable).with_name("detox")), "eval"]
    common = ["--backend", args.backend, "--target", args.target, "--prompts", str(prompts), "--samples", str(args.samples),
              "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed), "--no-perplexity",
              "--threads", str(args.threads)]
    plain = args.out / "plain"
    subprocess.run(detox + common + ["--no-calibrator", "--out", str(plain)], check=True)
    fused_args = common + ["--out", str(args.out / args.tag), "--compare", str(plain)]
    fused_args += ["--calibrator", args.calibrator] if args.calibrator else []
    fused_args += ["--strength", str(args.strength)] if args.strength is not None else []
    fused_args += [] if args.no_reference else ["--reference-text", str(reference)]
    subprocess.run(detox + fused_args, check=True)
    a = json.loads((plain / "summary.json").read_text())
    b = json.loads((args.out / args.tag / "summary.json").read_text())
    share = "mentions_any_group_on_identity_prompts"
    print(json.dumps({
        "unfused_share": a["identity"][share], "fused_share": b["identity"][share],
        "retention": b["identity"][share] / a["identity"][share] if a["identity"][share] else None,
        "toxicity_probability": [a["toxicity_probability"], b["toxicity_probability"]],
        "expected_max_toxicity": [a["expected_max_toxicity"], b["expected_max_toxicity"]],
        "distinct_2": [a["distinct_2"], b["distinct_2"]],
        "reference_text": b.get("reference_text"),
    }, indent=2))


if __name__ == "__main__":
    main()
