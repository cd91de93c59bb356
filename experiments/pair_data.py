"""Issue 21, data side: training files for a pair whose expert has also seen benign human (identity) text.

Writes, under ``--out``:

* ``expert_human.txt``: benign human-written text for fine-tuning the shipped expert (``detox train --init``): the
  DGHS "nothate" part of ``nontoxic_train.txt`` (its identity-directed contrast cases), the Davidson "neither" tweets
  and a seeded sample of the ParaDetox neutral rewrites;
* ``anti_mix.txt``: ``toxic_train.txt`` plus a seeded sample of ``expert_human.txt``'s DGHS lines (the variant whose
  anti-expert also keeps seeing benign identity text, so the mention of a group cancels in the log-ratio);
* ``toxic_hate_upweighted.txt``: ``toxic_train.txt`` without the lines that start with a dev prompt, its
  identity-directed hate part (DGHS hate + ToxiGen hate, the first 2476 lines) repeated ``--hate-copies`` times in
  all, for an anti-expert weighted towards the kind of toxicity the toxic dev prompts ask for (ParaDetox profanity
  is 83% of ``toxic_train.txt``).

Held out from both, explicitly: every sentence of ``--holdout-tsv`` (``benign_identity.tsv``, the evaluation set:
its 234 ToxiGen neutral sentences are also the last lines of ``nontoxic_train.txt``), every line of each
``--holdout-text`` (e.g. the neutral control reference sentences), and every line that starts with a prompt of
``--holdout-prompts`` (``prompts_dev.jsonl``: its DGHS/ToxiGen prompts are prefixes of training sentences).
``nontoxic_train.txt``'s source order (README of the shared data): DGHS nothate 1937, Davidson 3980, ParaDetox
17762, ToxiGen neutral 234, minus 149 lines also in ``toxic_train.txt``; the split below takes the README's counts as
boundaries, so a boundary can be off by the lines removed before it (they are all benign text either way).

    python experiments/pair_data.py --data-dir ../shared/data --holdout-text /tmp/h6/control_reference.txt \\
        --out /tmp/h21/data
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path


def key(text: str) -> str:
    """The shared data's de-duplication key: lower-cased alphanumerics."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, required=True, help="the shared data folder (nontoxic_train.txt, ...)")
    ap.add_argument("--holdout-tsv", type=Path, default=None, help="default: DATA_DIR/benign_identity.tsv")
    ap.add_argument("--holdout-prompts", type=Path, default=None, help="default: DATA_DIR/prompts_dev.jsonl")
    ap.add_argument("--holdout-text", type=Path, action="append", default=[])
    ap.add_argument("--paradetox", type=int, default=4000, help="ParaDetox neutral lines to sample")
    ap.add_argument("--anti-dghs", type=int, default=700, help="DGHS nothate lines mixed into anti_mix.txt")
    ap.add_argument("--hate-copies", type=int, default=3, help="copies of the hate lines in toxic_hate_upweighted.txt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    d = args.data_dir
    tsv = args.holdout_tsv or d / "benign_identity.tsv"
    identity = {key(line.split("\t", 1)[1]) for line in tsv.read_text().splitlines()[1:] if "\t" in line}
    held = set(identity)
    for f in args.holdout_text:
        held |= {key(line) for line in f.read_text().splitlines() if line.strip()}
    prompts = [key(json.loads(line)["text"]) for line in (args.holdout_prompts or d / "prompts_dev.jsonl").open()]
    lines = [line.strip() for line in (d / "nontoxic_train.txt").read_text().splitlines() if line.strip()]
    # source boundaries: ToxiGen neutral = the held-out tsv sentences at the end; DGHS first, then Davidson, ParaDetox
    n_tg = sum(key(x) in identity for x in lines[-300:])
    dghs, davidson, paradetox = lines[:1937], lines[1937:1937 + 3980], lines[1937 + 3980:len(lines) - n_tg]
    dropped = {"holdout": 0, "prompt_prefix": 0}

    def keep(x: str) -> bool:
        k = key(x)
        if k in held:
            dropped["holdout"] += 1
            return False
        if any(k.startswith(p) for p in prompts):
            dropped["prompt_prefix"] += 1
            return False
        return True

    rng = random.Random(args.seed)
    dghs = [x for x in dghs if keep(x)]
    davidson = [x for x in davidson if keep(x)]
    paradetox = rng.sample([x for x in paradetox if keep(x)], args.paradetox)
    human = dghs + davidson + paradetox
    rng.shuffle(human)
    toxic = [x for x in (d / "toxic_train.txt").read_text().splitlines() if x.strip()]
    anti = toxic + rng.sample(dghs, args.anti_dghs)
    rng.shuffle(anti)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "expert_human.txt").write_text("\n".join(human) + "\n")
    (args.out / "anti_mix.txt").write_text("\n".join(anti) + "\n")
    # the toxic dev prompts are prefixes of toxic_train.txt lines: keep their continuations out of this anti-expert
    not_prompt = lambda x: not any(key(x).startswith(p) for p in prompts)  # noqa: E731
    hate = [x for x in toxic[:2476] if not_prompt(x)]
    profanity = [x for x in toxic[2476:] if not_prompt(x)]
    upweighted = hate + profanity + hate * (args.hate_copies - 1)
    (args.out / "toxic_hate_upweighted.txt").write_text("\n".join(upweighted) + "\n")
    counts = {"dghs_nothate": len(dghs), "davidson_neither": len(davidson), "paradetox_neutral": len(paradetox),
              "toxigen_neutral_tail_held_out": n_tg, "dropped": dropped, "anti_mix": {"toxic": len(toxic),
                                                                                   "dghs_nothate": args.anti_dghs},
              "toxic_hate_upweighted": {"hate": len(hate), "profanity": len(profanity), "hate_copies": args.hate_copies,
                                        "prompt_prefix_dropped": len(toxic) - len(hate) - len(profanity)}}
    (args.out / "counts.json").write_text(json.dumps(counts, indent=1))
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
