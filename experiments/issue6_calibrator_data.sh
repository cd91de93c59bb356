#!/usr/bin/env bash
# Issue 6: does a calibrator trained on UniDetox-distilled text detoxify better than one trained on the shared
# non-toxic text? Each expert gets its own anti-expert (the expert + 2 epochs of toxic_train, as the shipped pair),
# the pairs are aligned to SmolLM2 (token map) and evaluated with contrast fusion at the shipped λ 8 on llama.cpp,
# first 100 dev prompts × 10 samples, same seeds. One thread per job. Results: docs/results.md.
#   experiments/issue6_calibrator_data.sh [OUT_ROOT]
set -euo pipefail
out=${1:-/tmp/i6}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
distilled=(--data artifacts/shipped/distilled/smollm2-unidetox.jsonl --data ../shared/data/unidetox_gpt2xl_distilled.csv)
toxic=(--data ../shared/data/toxic_train.txt --epochs 2 --lr 1e-3 --warmup-steps 10)

# the 1.0.0 expert (trained on nontoxic_train.txt), as shipped before the pair
if [ ! -d "$out/base1" ]; then
  git archive 52dd933 artifacts/shipped/smollm2-135m-instruct | tar -x -C "$out"
  mv "$out/artifacts/shipped/smollm2-135m-instruct" "$out/base1" && rm -rf "$out/artifacts"
fi
# expert D: from scratch on distilled text only (6 epochs: 288 steps, about the 276 steps of the 1.0.0 expert)
[ -d "$out/dist" ] || detox train "${distilled[@]}" --out "$out/dist" --epochs 6 --name detox-distilled --version 0.1.0
# expert N→D: the 1.0.0 expert trained further on distilled text
[ -d "$out/basedist" ] || detox train "${distilled[@]}" --init "$out/base1" --out "$out/basedist" --epochs 2 \
    --lr 1e-3 --warmup-steps 10 --name detox-base-distilled --version 0.1.0
for e in dist basedist; do
  [ -d "$out/$e-anti" ] || detox train "${toxic[@]}" --init "$out/$e" --out "$out/$e-anti" --name "$e-anti"
  [ -d "$out/$e-pair" ] || detox align --target smollm2 --calibrator "$out/$e" --anti-expert "$out/$e-anti" \
      --out "$out/$e-pair" --name "$e-pair"
done

common=(--backend llamacpp --target smollm2 --prompts ../shared/data/prompts_dev.jsonl --max-prompts 100 --samples 10
        --max-new-tokens 20 --top-p 0.9 --seed 0 --threads 1)
[ -f "$out/ev_plain/summary.json" ] || detox eval "${common[@]}" --no-calibrator --out "$out/ev_plain"
[ -f "$out/ev_nontoxic/summary.json" ] || detox eval "${common[@]}" --out "$out/ev_nontoxic" --compare "$out/ev_plain"
for e in dist basedist; do
  [ -f "$out/ev_$e/summary.json" ] || detox eval "${common[@]}" --calibrator "$out/$e-pair" --out "$out/ev_$e" \
      --compare "$out/ev_plain"
done
