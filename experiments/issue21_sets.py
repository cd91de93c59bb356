"""Issue 21: the bounded evaluation sets of docs/results.md, rebuilt from the shared data with fixed seeds.

Writes, under ``--out``:

* ``benign100.jsonl``: 100 benign identity prompts (``identity_retention.py``'s seeded sample and cut, seed 0);
* ``toxic100.jsonl``: a seeded sample (``random.Random(0)``) of 100 of the ``toxic_prompt: true`` dev prompts;
* ``identity_reference.txt``: all sentences of ``benign_identity.tsv`` (reference text);
* ``control_reference.txt``: a seeded sample of 234 ParaDetox neutral lines of ``nontoxic_train.txt`` with 8-40 words
  and no identity term (reference text without identity groups; also ``pair_data.py --holdout-text``);
* ``dev100.jsonl``: a seeded sample (``random.Random(1)``) of 100 of all 502 dev prompts, toxic and not: the mix of
  the toxicity protocol, where a gated arm's exemption also reaches the benign prompts about groups;
* ``benign_heldout.jsonl``: benign identity prompts (the same cut) from the 69 sentences the shipped scorer never
  trained on (its identity test split: ``split_examples`` at the build's seed 1234). The scorer trained on most of
  ``benign100``'s sentences, so an arm that asks the scorer about the prompt (``--exempt-gate``) is measured here.

The earlier sessions' copies of these files were not kept; these are the same recipes, so a rerun may draw other
lines than the runs recorded before this script existed.

    python experiments/issue21_sets.py --data-dir ../shared/data --out /tmp/h21s
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from identity_retention import build_inputs, cut, read_tsv  # noqa: E402

from detox.identity import IdentityTerms  # noqa: E402
from detox.scorer_data import load_examples  # noqa: E402
from detox.scorer_training import TrainSettings, split_examples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    d, out = args.data_dir, args.out
    out.mkdir(parents=True, exist_ok=True)
    prompts, reference = build_inputs(read_tsv(d / "benign_identity.tsv"), out, 100, 0)
    prompts.rename(out / "benign100.jsonl")
    reference.rename(out / "identity_reference.txt")
    toxic = [line for line in (d / "prompts_dev.jsonl").read_text().splitlines() if json.loads(line).get("toxic_prompt")]
    (out / "toxic100.jsonl").write_text("\n".join(random.Random(0).sample(toxic, 100)) + "\n")
    dev = [line for line in (d / "prompts_dev.jsonl").read_text().splitlines() if line.strip()]
    (out / "dev100.jsonl").write_text("\n".join(random.Random(1).sample(dev, 100)) + "\n")
    lines = [x.strip() for x in (d / "nontoxic_train.txt").read_text().splitlines() if x.strip()]
    terms = IdentityTerms.load()
    paradetox = [x for x in lines[1937 + 3980:-300] if 8 <= len(x.split()) <= 40 and not terms.mentions(x)]
    (out / "control_reference.txt").write_text("\n".join(random.Random(0).sample(paradetox, 234)) + "\n")
    split = split_examples(load_examples(d), TrainSettings(seed=1234))
    held = {e.text for e in split.identity_test if e.label == 0}
    rows = read_tsv(d / "benign_identity.tsv")
    (out / "benign_heldout.jsonl").write_text("".join(
        json.dumps({"id": f"benign-{i:03d}", "text": cut(t), "group": g, "source": f"benign_identity/{g}"}) + "\n"
        for i, (g, t) in enumerate(rows) if t.strip() in held))
    print(f"wrote {out}: benign100.jsonl, toxic100.jsonl, identity_reference.txt, control_reference.txt, "
          f"dev100.jsonl, benign_heldout.jsonl ({len(held)} sentences)")


if __name__ == "__main__":
    main()
