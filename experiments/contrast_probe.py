"""Quick probe of expert/anti-expert fusion settings on the HF backend (a dev subset, not the full protocol).

    python experiments/contrast_probe.py --pair /tmp/x/pair2 --prompts-file DATA/prompts_dev.jsonl --prompts 80 \
        --samples 5 --config none --config 2:64:0.02 --config 4:64:0.02

A config is ``none`` or ``STRENGTH:TOP_K:PLAUSIBILITY[:suppress]`` (``suppress``: only the negative log-ratio).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LogitsProcessorList

from detox.adapters.transformers import FusionLogitsProcessor
from detox.backends.hf import HFBackend
from detox.evaluation import read_prompts, summarize
from detox.metrics import conditional_perplexity
from detox.runtime import Calibrator
from detox.scoring import load_scorer
from detox.targets import load_hf_target


def contrast_processor(pair: Calibrator, model, tok, lam: float, k: int, alpha: float, suppress: bool) -> FusionLogitsProcessor:
    """The product's processor with the candidate settings overridden (the artifact records its defaults)."""
    proc = FusionLogitsProcessor(pair, model, tok, lam)
    proc.head.config = proc.head.config.model_copy(update={"top_k": k, "plausibility": alpha, "suppress_only": suppress})
    return proc


class WithProcessor:
    def __init__(self, model, make):
        self.model, self.make = model, make

    def generate(self, **kw):
        return self.model.generate(logits_processor=LogitsProcessorList([self.make()]), **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", required=True, help="a contrast artifact aligned to SmolLM2 (detox align --anti-expert)")
    ap.add_argument("--prompts-file", required=True,
                    help="prompts JSONL as `detox eval --prompts` reads it (the development set: prompts_dev.jsonl)")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_hf_target("smollm2")
    pair = Calibrator.load(a.pair)
    prompts = read_prompts(a.prompts_file)[a.offset : a.offset + a.prompts]
    scorer = load_scorer(None)
    results = []
    for cfg in a.config:
        if cfg == "none":
            sampler = HFBackend(model, tok)
        else:
            lam, k, alpha, *rest = cfg.split(":")
            suppress = rest == ["suppress"]
            make = lambda lam=float(lam), k=int(k), alpha=float(alpha), sup=suppress: contrast_processor(  # noqa: E731
                pair, model, tok, lam, k, alpha, sup)
            sampler = HFBackend(WithProcessor(model, make), tok)
        t0 = time.perf_counter()
        rows = []
        for b in range(0, len(prompts), 4):
            chunk = prompts[b : b + 4]
            samples = sampler.sample([p.text for p in chunk], a.samples, 20, 0.9, b, fused=False)
            for p, texts in zip(chunk, samples):
                for kk, t in enumerate(texts):
                    rows.append({"prompt_id": p.id, "prompt": p.text, "sample": kk, "text": t})
        gen_s = time.perf_counter() - t0
        for r, sc in zip(rows, scorer.score([r["text"] for r in rows])):
            r["toxicity"] = float(sc)
        ppl = conditional_perplexity(model, tok, [r["prompt"] for r in rows], [r["text"] for r in rows])
        s = summarize(rows, perplexity=ppl)
        s["config"], s["gen_seconds"] = cfg, gen_s
        results.append(s)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()
                          if k in ("config", "expected_max_toxicity", "toxicity_probability", "mean_toxicity", "perplexity", "distinct_2", "gen_seconds")}), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps({"config": cfg, "summary": s, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
