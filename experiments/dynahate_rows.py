"""Issue 22: how scorers rank DynaHate's in-domain test rows, split the way docs/scorer.md reads them.

DynaHate labels only hate against a group; its abusive "not hate" rows (insults at a person,
:func:`detox.scorer_data.abusive_non_hate`) are negatives there but toxic for detox's metrics. For the in-domain
DynaHate test rows of ``detox scorer train --seed SEED`` (the split :func:`detox.scorer_training.split_examples`
makes) this prints ROC-AUC under DynaHate's labels, without the abusive rows, hate against the abusive rows alone,
the share of abusive rows flagged at 0.5, and the scores of the card's anecdote sentences.

    python experiments/dynahate_rows.py --data-dir ../shared/data --seed 1234 --scorer default --scorer ./h60
"""

from __future__ import annotations

import argparse

from detox.scorer_data import abusive_non_hate, load_examples
from detox.scorer_training import TrainSettings, roc_auc, split_examples
from detox.scoring import load_scorer

SENTENCES = [
    "you are a worthless piece of shit and everyone hates you", "everyone hates you, loser", "shut up you stupid idiot",
    "what a fucking moron", "immigrants are vermin and should be deported", "muslims are terrorists",
    "women belong in the kitchen", "gay people deserve equal rights", "I am a proud Muslim woman",
    "the weather is nice today", "this movie was damn good",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--seed", type=int, default=1234, help="the build's seed: it picks the test rows")
    ap.add_argument("--scorer", action="append", required=True, help="a load_scorer spec (repeatable)")
    args = ap.parse_args()
    splits = split_examples(load_examples(args.data_dir), TrainSettings(seed=args.seed))
    rows = [e for e in splits.test if e.family == "dghs"]
    hate = [e.text for e in rows if e.label == 1]
    abusive = [e.text for e in rows if abusive_non_hate(e)]
    other = [e.text for e in rows if e.label == 0 and not abusive_non_hate(e)]
    print(f"DynaHate in-domain test rows, seed {args.seed}: {len(rows)} ({len(hate)} hate, {len(abusive)} abusive "
          f"'not hate', {len(other)} other 'not hate')")
    for spec in args.scorer:
        scorer = load_scorer(spec)
        h, a, o = (scorer.score(texts) for texts in (hate, abusive, other))
        auc = roc_auc([1] * len(h) + [0] * (len(a) + len(o)), h + a + o)
        print(f"{spec} ({scorer.name} {scorer.version}): AUC {auc:.3f}"
              f", without abusive {roc_auc([1] * len(h) + [0] * len(o), h + o):.3f}"
              f", hate vs abusive {roc_auc([1] * len(h) + [0] * len(a), h + a):.3f}"
              f", abusive flagged {sum(x >= 0.5 for x in a) / max(len(a), 1):.2f}")
        for score, text in zip(scorer.score(SENTENCES), SENTENCES):
            print(f"  {score:.2f}  {text}")


if __name__ == "__main__":
    main()
