"""Issue 21: the pair's log-ratio on the mention of a group, per anti-expert, in the calibrators' own tokenization.

For each sentence of a text file (one per line), the mean of r = log p_expert(y) − log p_anti(y) over the tokens
that start an identity-term match (shipped word list) and over all other tokens, with the fusion's suppress-only
term min(0, r) (the penalty before λ). A diagnostic of unaligned calibrators that needs no target model and no
generation (seconds on CPU), e.g. along experiments/mix_anti.py's mixes:

    python experiments/mention_logratio.py --expert /tmp/h21b/pairs/E1 --text /tmp/h21/identity_reference.txt \\
        /tmp/h21b/pairs/A4 /tmp/h21c/pairs/M050 /tmp/h21b/pairs/A3
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import torch


def load_lm(path: str):
    """(tokenizer, CalibratorLM in eval mode, its BOS id) of a calibrator artifact."""
    from detox.artifacts.cache import load_artifact
    from detox.calibrator import CalibratorLM

    art = load_artifact(path)
    model = CalibratorLM(art.manifest.calibrator)
    model.load_state_dict({k: torch.from_numpy(v.astype("float32")) for k, v in art.calibrator_state.items()})
    return art.tokenizer, model.eval(), art.manifest.calibrator.bos_token_id


def target_logps(model, ids: list[int]) -> np.ndarray:
    """log p(ids[i + 1] | ids[: i + 1]) for every position."""
    with torch.no_grad():
        hidden, _ = model(torch.tensor([ids]))
        lp = torch.log_softmax(model.logits(hidden[:, :-1]).float(), -1)[0]
    return lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--expert", required=True)
    ap.add_argument("--text", required=True, help="one sentence per line")
    ap.add_argument("anti", nargs="+", help="anti-expert calibrator artifacts")
    args = ap.parse_args()
    from detox.identity import IdentityTerms, _term_pattern

    torch.set_num_threads(1)
    tok, expert, bos = load_lm(args.expert)
    terms = IdentityTerms.load(None)
    pat = re.compile("|".join(_term_pattern(t) for ts in terms.terms.values() for t in ts), re.IGNORECASE)
    data = []
    for line in open(args.text, encoding="utf-8"):
        if not line.strip():
            continue
        enc = tok.encode(line.strip())
        first = {next(i for i, (_, b) in enumerate(enc.offsets) if b > m.start()) for m in pat.finditer(line.strip())}
        ids = [bos] + enc.ids
        data.append((ids, first, target_logps(expert, ids)))
    for path in args.anti:
        _, anti, _ = load_lm(path)
        mention, other = [], []
        for ids, first, le in data:
            for i, r in enumerate(le - target_logps(anti, ids)):
                (mention if i in first else other).append(r)
        mention, other = np.array(mention), np.array(other)
        print(f"{path}: mention tokens (n={len(mention)}) r {mention.mean():+.3f}, min(0,r) "
              f"{np.minimum(0, mention).mean():+.3f}; other tokens (n={len(other)}) r {other.mean():+.3f}, "
              f"min(0,r) {np.minimum(0, other).mean():+.3f}")


if __name__ == "__main__":
    main()
