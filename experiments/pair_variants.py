"""Issue 21: compare contrast-pair variants on one bounded, fixed protocol (SmolLM2 on transformers).

An *arm* is a pair artifact plus a fusion rule, given as ``NAME:key=value,...`` with keys

* ``cal``: an aligned contrast artifact directory (default: the shipped one);
* ``tail``: ``cut`` (the shipped rule: every token outside the target's plausible candidates gets ``-inf``) or
  ``keep`` (those tokens keep the target's own logit; only the candidates get the contrast penalty);
* ``tau``: confident-only suppression, ``min(0, r + τ)`` instead of ``min(0, r)``
  (experiments/confident_suppression.py);
* ``strength``: λ (default: the artifact's).

The arm ``plain`` (no calibrator) is run too unless ``--no-plain``; ``--gen-arms`` limits sampling to some arms.
Per arm:

* ``--reference-text FILE`` (repeatable): per-token perplexity of the file's lines under the *sampled* fused
  distribution against the unfused target (``detox.reference_text.token_log_probs``): with ``tail=cut`` over the
  candidate tokens only (the others have probability 0; ``support_share`` says how many), with ``tail=keep`` over
  every token (all have a finite probability, so ``support_share`` is 1).
* ``--prompts FILE`` (repeatable): sampled continuations, scored with the shipped scorer; toxicity metrics,
  distinct-2 and the share of continuations that mention an identity group (``detox.identity``).

Continuations are written per arm under ``--out`` and reused on a rerun (``generate_and_score`` resumes).

    nice -n 10 python experiments/pair_variants.py --arm shipped --arm keep:tail=keep \\
        --reference-text /tmp/h6/identity/reference.txt --prompts /tmp/h21/benign100.jsonl --out /tmp/h21/v
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from detox.fusion import top_candidates
from detox.methods.contrast import ContrastHead


@dataclass
class VariantHead(ContrastHead):
    """The contrast rule with a tail option and confident-only suppression (suppress-only artifacts)."""

    tau: float = 0.0
    keep_tail: bool = False

    def ratio_at(self, prepared, idx):
        cal_ids = self.token_map[idx]
        ratio = prepared.gather(-1, cal_ids.clamp(min=0)) * (cal_ids >= 0)
        return (ratio + self.tau).clip(max=0.0)

    def apply(self, logits, prepared, strength):
        if not self.keep_tail or strength == 0.0:
            return super().apply(logits, prepared, strength)
        idx, keep = top_candidates(logits[..., : self.vocab_size], self.config.top_k, self.config.plausibility)
        penalty = float(strength) * self.ratio_at(prepared, idx) * keep
        return (logits * 1.0).scatter(-1, idx, logits.gather(-1, idx) + penalty)


@dataclass
class Arm:
    name: str
    cal: str | None = None
    tail: str = "cut"
    tau: float = 0.0
    strength: float | None = None

    @classmethod
    def parse(cls, spec: str) -> "Arm":
        name, _, rest = spec.partition(":")
        kw: dict = {}
        for item in filter(None, rest.split(",")):
            k, _, v = item.partition("=")
            kw[k] = float(v) if k in ("tau", "strength") else v
        arm = cls(name, **kw)
        if arm.tail not in ("cut", "keep"):
            raise SystemExit(f"arm {spec!r}: tail must be cut or keep")
        return arm


def variant_head(fused, arm: Arm) -> VariantHead:
    base = fused.calibrator.fusion_head(fused.model.get_output_embeddings().weight)
    return VariantHead(base.token_map, base.expert_out, base.anti_out, base.config, tau=arm.tau,
                       keep_tail=arm.tail == "keep")


def reference_scores(fused, heads: dict[str, VariantHead], texts: list[str]) -> dict[str, dict]:
    """Every head's scores on ``texts``; the target's logits and the pair's log-ratios are computed once per text
    (all heads share ``fused``'s calibrator)."""
    from tqdm.auto import tqdm

    from detox.adapters.transformers import FusionLogitsProcessor
    from detox.reference_text import _ids_with_context, _ppl, token_log_probs

    proc = FusionLogitsProcessor(fused.calibrator, fused.model, fused.tokenizer, fused.strength)
    acc = {name: {"u": [], "f": [], "us": [], "fs": [], "n": 0, "sup": 0} for name in heads}
    for text in tqdm(texts, desc="reference text", unit="text"):
        ids = torch.tensor([_ids_with_context(fused.tokenizer, text)])
        with torch.inference_mode():
            logits = fused.model(input_ids=ids).logits[0, :-1].float()
            prepared = torch.cat([proc.fusion_term(ids[:, : t + 1]) for t in range(ids.shape[1] - 1)])
        for name, head in heads.items():
            lp = token_log_probs(head, logits, prepared, ids[0, 1:], fused.strength)
            a, s = acc[name], lp["support"]
            a["u"] += lp["unfused"].tolist()
            a["f"] += lp["fused_untruncated"].tolist()
            a["us"] += lp["unfused_in_support"][s].tolist()
            a["fs"] += lp["fused_in_support"][s].tolist()
            a["n"] += int(s.numel())
            a["sup"] += int(s.sum())
    return {name: {"ratio_sampled": _ppl(a["fs"]) / _ppl(a["us"]), "support_share": a["sup"] / a["n"],
                   "ratio_rule_on_all_tokens": _ppl(a["f"]) / _ppl(a["u"]), "perplexity_unfused": _ppl(a["u"]),
                   "perplexity_fused_untruncated": _ppl(a["f"]), "perplexity_sampled": _ppl(a["fs"]), "tokens": a["n"]}
            for name, a in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", action="append", default=[], help="NAME:cal=DIR,tail=cut|keep,tau=T,strength=L")
    ap.add_argument("--reference-text", type=Path, action="append", default=[])
    ap.add_argument("--prompts", type=Path, action="append", default=[])
    ap.add_argument("--max-prompts", type=int, default=None)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gen-arms", default=None, help="comma-separated arms to sample with (default: all)")
    ap.add_argument("--no-plain", action="store_true",
                    help="skip the unfused arm (another run with the same prompts has it)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import detox
    from detox.backends.hf import HFBackend
    from detox.evaluation import EvalRun, EvalSettings, generate_and_score, read_prompts, summarize
    from detox.identity import IdentityTerms, identity_summary, prompt_groups
    from detox.scoring import load_scorer
    from detox.targets import load_hf_target

    model, tok = load_hf_target("smollm2")
    arms = [Arm.parse(s) for s in args.arm]
    args.out.mkdir(parents=True, exist_ok=True)
    res_path = args.out / "results.json"
    results: dict = json.loads(res_path.read_text()) if res_path.exists() else {}

    def save() -> None:
        res_path.write_text(json.dumps(results, indent=1))

    wrapped, heads = {}, {}
    for arm in arms:
        fused = detox.wrap(model, calibrator=arm.cal, strength=arm.strength, tokenizer=tok)
        heads[arm.name] = head = variant_head(fused, arm)
        fused.calibrator.fusion_head = lambda W, _h=head: _h  # this experiment's rule
        wrapped[arm.name] = fused
    for ref in args.reference_text:
        key = f"reference/{ref.stem}"
        texts = [line.strip() for line in ref.read_text().splitlines() if line.strip()]
        by_pair: dict = {}  # arms that share a calibrator and strength are scored in one pass
        for arm in arms:
            if arm.name not in results.get(key, {}):
                by_pair.setdefault((arm.cal, wrapped[arm.name].strength), []).append(arm.name)
        for names in by_pair.values():
            scores = reference_scores(wrapped[names[0]], {n: heads[n] for n in names}, texts)
            for name, r in scores.items():
                results.setdefault(key, {})[name] = r
                print(name, key, json.dumps(r), flush=True)
            save()
    scorer, terms = load_scorer(None), IdentityTerms.load()
    for prompts_file in args.prompts:
        prompts = read_prompts(prompts_file)[: args.max_prompts]
        groups = prompt_groups(prompts_file, terms)
        gen = [a.name for a in arms if args.gen_arms is None or a.name in args.gen_arms.split(",")]
        for name in ([] if args.no_plain else ["plain"]) + gen:
            runner = model if name == "plain" else wrapped[name]
            run = EvalRun(target="smollm2", backend="hf", calibrator=name,
                          strength=0.0 if name == "plain" else runner.strength, prompts_file=str(prompts_file),
                          settings=EvalSettings(samples=args.samples, max_new_tokens=args.max_new_tokens))
            sample = functools.partial(HFBackend(runner, tok).sample, fused=False)  # runner: plain or wrapped
            rows = generate_and_score(run, prompts, sample, scorer, args.out / prompts_file.stem / name)
            s = summarize(rows)
            ident = identity_summary(rows, groups, terms)
            r = {k: s[k] for k in ("expected_max_toxicity", "toxicity_probability", "distinct_2")}
            r["mentions_group"] = ident["mentions_any_group_on_identity_prompts"]
            r["mentions_group_all"] = ident["mentions_any_group"]
            results.setdefault(f"prompts/{prompts_file.stem}", {})[name] = r
            print(name, prompts_file.stem, json.dumps(r), flush=True)
            save()


if __name__ == "__main__":
    main()
