"""Issue 21, fusion side: suppress only where the pair's log-ratio is confident.

The shipped contrast rule adds ``λ·min(0, r)`` (``r = log p_expert − log p_anti``) at the target's candidates. The
variant here adds ``λ·min(0, r + τ)``: a token is pushed down only by how far its log-ratio falls below ``−τ``, so
tokens the anti-expert prefers mildly (``r`` in ``(−τ, 0)``) are left alone; ``τ = 0`` is the shipped rule. It is an
experiment only (the shipped default is unchanged): a subclass of the head, put into one wrapped model.

Two measurements on the shipped pair and SmolLM2 (transformers):

* ``--reference-text FILE``: per-token perplexity of the file's lines, unfused vs fused, for every ``τ`` in one pass
  (the target's logits and the calibrator's log-ratios are computed once per text; ``detox.reference_text``).
* ``--prompts FILE`` (repeatable): sampled continuations for ``plain``, ``τ = 0`` and each ``τ``, scored with the
  shipped scorer; toxicity metrics and identity mentions (``detox.identity``) per prompts file and arm.

    nice -n 10 python experiments/confident_suppression.py --tau 1 2 3 --reference-text /tmp/h6/identity/reference.txt \\
        --prompts /tmp/h6/identity/prompts.jsonl --prompts /tmp/h6/toxic_prompts.jsonl --max-prompts 24 --out /tmp/h6/tau
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from detox.methods.contrast import ContrastHead
from pair_variants import VariantHead, reference_scores  # the head with τ, the reference-text pass


def with_tau(head: ContrastHead, tau: float) -> VariantHead:
    return VariantHead(head.token_map, head.expert_out, head.anti_out, head.config, tau=tau)


def reference_sweep(fused, base_head: ContrastHead, texts: list[str], taus: list[float]) -> dict:
    """Every ``τ`` in one pass (:func:`pair_variants.reference_scores`), under this script's result names."""
    scores = reference_scores(fused, {str(tau): with_tau(base_head, tau) for tau in taus}, texts)
    return {tau: {"ratio_untruncated": r["ratio_rule_on_all_tokens"], "ratio_in_support": r["ratio_sampled"],
                  "perplexity_unfused": r["perplexity_unfused"],
                  "perplexity_fused_untruncated": r["perplexity_fused_untruncated"],
                  "support_share": r["support_share"], "tokens": r["tokens"]} for tau, r in scores.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tau", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument("--reference-text", type=Path, default=None,
                    help="text file whose likelihood under each setting is also scored (`detox eval --reference-text`)")
    ap.add_argument("--prompts", type=Path, action="append", default=[],
                    help="prompts JSONL as `detox eval --prompts` reads it (repeatable)")
    ap.add_argument("--max-prompts", type=int, default=24)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
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
    fused = detox.wrap(model, tokenizer=tok)
    taus = [0.0] + [t for t in args.tau if t != 0.0]
    results: dict = {"strength": fused.strength, "taus": taus}
    args.out.mkdir(parents=True, exist_ok=True)
    base_head = fused.calibrator.fusion_head(model.get_output_embeddings().weight)
    if args.reference_text:
        texts = [line.strip() for line in args.reference_text.read_text().splitlines() if line.strip()]
        results["reference_text"] = reference_sweep(fused, base_head, texts, taus)
        print(json.dumps(results["reference_text"], indent=1), flush=True)
    scorer, terms = load_scorer(None), IdentityTerms.load()
    for prompts_file in args.prompts:
        prompts = read_prompts(prompts_file)[: args.max_prompts]
        groups = prompt_groups(prompts_file, terms)
        for arm in ["plain"] + [f"tau={t:g}" for t in taus]:
            if arm == "plain":
                runner = model
            else:
                tau = float(arm.split("=")[1])
                runner = detox.wrap(model, calibrator=fused.calibrator, tokenizer=tok)
                runner.calibrator.fusion_head = lambda W, _t=tau: with_tau(base_head, _t)  # this experiment's rule
            run = EvalRun(target="smollm2", backend="hf", calibrator=arm, strength=fused.strength,
                          prompts_file=str(prompts_file), settings=EvalSettings(samples=args.samples,
                                                                                max_new_tokens=args.max_new_tokens))
            sample = functools.partial(HFBackend(runner, tok).sample, fused=False)
            rows = generate_and_score(run, prompts, sample, scorer, args.out / prompts_file.stem / arm)
            s = summarize(rows)
            s["identity"] = identity_summary(rows, groups, terms)
            results.setdefault(prompts_file.stem, {})[arm] = {
                k: s[k] for k in ("expected_max_toxicity", "toxicity_probability", "distinct_2")}
            results[prompts_file.stem][arm]["identity_share"] = s["identity"]["mentions_any_group_on_identity_prompts"]
            print(arm, prompts_file.stem, json.dumps(results[prompts_file.stem][arm]), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
