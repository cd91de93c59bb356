"""Quick probe of expert/anti-expert fusion settings on the HF backend (a dev subset, not the full protocol).

    python experiments/contrast_probe.py --expert artifacts/shipped/smollm2-135m-instruct --anti /tmp/x/anti1 \
        --prompts 40 --samples 5 --config none --config 0:64:0.01 --config 2:64:0.01

A config is ``none`` or ``STRENGTH:TOP_K:PLAUSIBILITY``. The anti-expert uses its own alignment when it is an
aligned artifact, else the expert's alignment map (it was fine-tuned from the expert).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from detox.adapters.transformers import FusionLogitsProcessor
from detox.evaluation import HFSampler, read_prompts, summarize
from detox.fusion import FusionHead, contrast_fuse, top_candidates
from detox.metrics import conditional_perplexity
from detox.runtime import Calibrator
from detox.scoring import load_scorer
from detox.targets import load_hf_target


class Contrast(LogitsProcessor):
    def __init__(self, expert: FusionLogitsProcessor, anti: FusionLogitsProcessor, strength: float, k: int, alpha: float):
        self.expert, self.anti, self.strength, self.k, self.alpha = expert, anti, strength, k, alpha

    def __call__(self, input_ids, scores):
        idx, keep = top_candidates(scores, self.k, self.alpha)
        if self.strength == 0:
            return torch.full_like(scores, float("-inf")).scatter(-1, idx, scores.gather(-1, idx).masked_fill(~keep, float("-inf")))
        he = self.expert.calibrator_hidden(input_ids).float()
        ha = self.anti.calibrator_hidden(input_ids).float()
        return contrast_fuse(scores, idx, keep, self.expert.head.term_at(he, idx), self.anti.head.term_at(ha, idx), self.strength)


class WithProcessor:
    def __init__(self, model, make):
        self.model, self.make = model, make

    def generate(self, **kw):
        return self.model.generate(logits_processor=LogitsProcessorList([self.make()]), **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expert", required=True)
    ap.add_argument("--anti", required=True)
    ap.add_argument("--prompts-file", default="../shared/data/prompts_dev.jsonl")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_hf_target("smollm2")
    expert, anti = Calibrator.load(a.expert), Calibrator.load(a.anti)
    W = model.get_output_embeddings().weight
    eh = expert.fusion_head(W)
    ah = anti.fusion_head(W) if anti.is_aligned else eh
    prompts = read_prompts(a.prompts_file)[a.offset : a.offset + a.prompts]
    scorer = load_scorer(None)
    results = []
    for cfg in a.config:
        if cfg == "none":
            sampler = HFSampler(model, tok)
        else:
            lam, k, alpha = cfg.split(":")
            make = lambda lam=float(lam), k=int(k), alpha=float(alpha): Contrast(  # noqa: E731
                FusionLogitsProcessor(expert, None, tok, 0.0, head=eh), FusionLogitsProcessor(anti, None, tok, 0.0, head=ah),
                lam, k, alpha)
            sampler = HFSampler(WithProcessor(model, make), tok)
        t0 = time.perf_counter()
        rows = []
        for b in range(0, len(prompts), 4):
            chunk = prompts[b : b + 4]
            samples = sampler.sample([p.text for p in chunk], a.samples, 20, 0.9, b)
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
