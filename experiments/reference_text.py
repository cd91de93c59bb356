"""Per-token perplexity of a text file under the shipped default fused with SmolLM2 vs SmolLM2 alone (transformers),
without generating anything: what ``detox eval --reference-text`` adds to an eval run, on its own.

    nice -n 10 python experiments/reference_text.py /tmp/h6/identity/reference.txt --threads 1
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="one text per line")
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--calibrator", default=None, help="default: the shipped one")
    ap.add_argument("--strength", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import detox
    from detox.reference_text import read_lines, score_reference_texts
    from detox.targets import load_hf_target

    model, tok = load_hf_target(args.target)
    fused = detox.wrap(model, calibrator=args.calibrator, strength=args.strength, tokenizer=tok)
    result = score_reference_texts(fused, read_lines(args.file))
    print(json.dumps(result.as_dict()))
    print(result.markdown(args.file))


if __name__ == "__main__":
    main()
