"""Issue 21: train an anti-expert with some target tokens left out of its loss (an experiment, not shipped).

The anti-expert is the expert fine-tuned on toxic text (``detox train --init EXPERT``). Every token it learns to
predict more often than the expert is penalized in fusion, including the mention of a group when the toxic text is
identity-directed hate. This script runs the same ``detox train`` (``detox.training.train_calibrator``, same
settings, data order and manifest) with a loss that ignores a set of target token ids, so the anti-expert does not
learn to raise their probability:

* ``--mask identity``: the first token of every identity-term match (the shipped word list, docs/identity.md) in the
  training text: the mention of a group is not learned as toxic; what follows it still is. Uses a word list, so the
  retention measured with the same list is an optimistic estimate for groups outside it.
* ``--mask odds``: no word list: a token stays in the loss only if its unigram log-odds in the toxic text against
  ``--benign`` text (the expert's human data, which holds the DGHS "nothate" contrast cases) is at least
  ``--min-log-odds``; tokens as frequent in benign text (function words, group mentions that occur on both sides)
  are left out, so the anti-expert moves only on tokens that are specific to toxic text. (Its token statistics
  were checked; no pair was trained with it yet: at 1.0 only 15.9% of the toxic text's tokens stay in the loss.)

    python experiments/masked_anti.py --mask identity --init /tmp/h21/pairs/E1 --data ../shared/data/toxic_train.txt \\
        --out /tmp/h21b/pairs/A4 --epochs 4 --lr 1e-3 --warmup-steps 10 --name anti-idmask
"""

from __future__ import annotations

import argparse
import math
import re
from collections import Counter
from pathlib import Path

import torch


def identity_first_tokens(texts: list[str], tokenizer, terms_path: str | None) -> Counter:
    """Token ids that start an identity-term match (their count), skipping first tokens that are not a prefix of
    at least 3 letters of the matched word (a split like " a|frican" must not mask " a" everywhere)."""
    from detox.identity import IdentityTerms, _term_pattern

    terms = IdentityTerms.load(terms_path)
    pat = re.compile("|".join(_term_pattern(t) for ts in terms.terms.values() for t in ts), re.IGNORECASE)
    found: Counter = Counter()
    for text, enc in zip(texts, tokenizer.encode_batch(texts)):
        for m in pat.finditer(text):
            for tid, (a, b) in zip(enc.ids, enc.offsets):
                if b > m.start():
                    piece = text[max(a, m.start()):b].strip().lower()
                    if len(piece) >= 3 and m.group(0).lower().startswith(piece):
                        found[tid] += 1
                    break
    return found


def odds_masked_tokens(texts: list[str], benign: list[str], tokenizer, min_log_odds: float) -> tuple[set, Counter]:
    """Token ids whose add-one log-odds (toxic vs benign unigram frequency) is below ``min_log_odds``."""
    tox = Counter(t for e in tokenizer.encode_batch(texts) for t in e.ids)
    ben = Counter(t for e in tokenizer.encode_batch(benign) for t in e.ids)
    nt, nb, v = sum(tox.values()), sum(ben.values()), tokenizer.get_vocab_size()
    lo = {t: math.log((tox[t] + 1) / (nt + v)) - math.log((ben[t] + 1) / (nb + v)) for t in range(v)}
    return {t for t in range(v) if lo[t] < min_log_odds}, tox


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mask", choices=["identity", "odds"], required=True)
    ap.add_argument("--init", required=True, help="the expert calibrator artifact to start from")
    ap.add_argument("--data", action="append", required=True, help="toxic training text (repeatable)")
    ap.add_argument("--benign", action="append", default=[], help="--mask odds: benign text to compare with")
    ap.add_argument("--min-log-odds", type=float, default=1.0)
    ap.add_argument("--identity-terms", default=None, help="--mask identity: a word list (default: the shipped one)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--name", default="anti-masked")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted run from OUT.ckpt (same data and settings; detox train --resume)")
    args = ap.parse_args()

    import detox.training as T
    from detox.artifacts.cache import load_artifact
    from detox.data import read_texts

    tokenizer = load_artifact(args.init).tokenizer
    texts = [t for p in args.data for t in read_texts(p)]
    if args.mask == "identity":
        found = identity_first_tokens(texts, tokenizer, args.identity_terms)
        masked = set(found)
        counts = found
    else:
        if not args.benign:
            ap.error("--mask odds needs --benign FILE")
        benign = [t for p in args.benign for t in read_texts(p)]
        masked, counts = odds_masked_tokens(texts, benign, tokenizer, args.min_log_odds)
    total = sum(counts.values()) if args.mask == "odds" else None
    if args.mask == "odds":
        kept = sum(c for t, c in counts.items() if t not in masked)
        print(f"odds mask: {len(masked)} of {tokenizer.get_vocab_size()} ids masked; {kept / total:.1%} of the "
              f"toxic text's tokens stay in the loss")
        top = sorted(((c, t) for t, c in counts.items() if t not in masked), reverse=True)[:40]
    else:
        print(f"identity mask: {len(masked)} token ids, {sum(found.values())} occurrences")
        top = sorted(((c, t) for t, c in found.items()), reverse=True)[:40]
    print("most frequent " + ("kept" if args.mask == "odds" else "masked") + ": "
          + ", ".join(f"{tokenizer.id_to_token(t)!r}×{c}" for c, t in top))

    keep = torch.ones(tokenizer.get_vocab_size(), dtype=torch.bool)
    keep[sorted(masked)] = False

    def masked_loss(model, batch: torch.Tensor) -> torch.Tensor:
        """``detox.training._lm_loss`` with the masked target ids ignored."""
        hidden, _ = model(batch)
        core = model.module if hasattr(model, "module") else model
        logits = core.logits(hidden[:, :-1]).float()
        labels = batch[:, 1:]
        labels = labels.masked_fill(~keep.to(labels.device)[labels], -100)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)

    T._lm_loss = masked_loss
    s = T.TrainSettings(epochs=args.epochs, lr=args.lr, warmup_steps=args.warmup_steps)
    m = T.train_calibrator(args.data, args.out, s, name=args.name, init_from=args.init, resume=args.resume)
    print(f"wrote {args.out}: {m.name}@{m.version}, {m.training.steps} steps, metrics {m.training.metrics}")


if __name__ == "__main__":
    main()
