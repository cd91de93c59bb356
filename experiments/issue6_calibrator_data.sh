#!/usr/bin/env bash
# Issue 6: does a calibrator trained on UniDetox-distilled text detoxify better than one trained on the shared
# non-toxic text? Each expert gets its own anti-expert (the expert + 2 epochs of toxic_train, as the shipped pair),
# the pairs are aligned to SmolLM2 (token map) and evaluated with contrast fusion at the shipped λ 8 on llama.cpp,
# first 100 dev prompts × 10 samples, same seeds. One thread per job. Results: docs/results.md.
usage() {
  cat <<'USAGE'
usage: experiments/issue6_calibrator_data.sh --data-dir DIR --base1 ARTIFACT [--out OUT_ROOT]
  --data-dir DIR     folder holding toxic_train.txt, unidetox_gpt2xl_distilled.csv and prompts_dev.jsonl
  --base1 ARTIFACT   the 1.0.0 expert (trained on nontoxic_train.txt, shipped before the pair): a directory or .detox,
                     e.g. from `detox artifacts pull smollm2-135m-instruct@1.0.0 --registry REG --out base1`
  --out OUT_ROOT     where every model and evaluation goes (default /tmp/i6; finished steps are skipped on a rerun)
USAGE
}
out=/tmp/i6; data=; base1=
while [ $# -gt 0 ]; do
  case $1 in
    --data-dir) data=$2; shift 2 ;;
    --base1) base1=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[ -n "$data" ] && [ -n "$base1" ] || { usage >&2; exit 2; }
set -euo pipefail
mkdir -p "$out"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
distilled=(--data artifacts/shipped/distilled/smollm2-unidetox.jsonl --data "$data/unidetox_gpt2xl_distilled.csv")
toxic=(--data "$data/toxic_train.txt" --epochs 2 --lr 1e-3 --warmup-steps 10)
# expert D: from scratch on distilled text only (6 epochs: 288 steps, about the 276 steps of the 1.0.0 expert)
[ -d "$out/dist" ] || detox train "${distilled[@]}" --out "$out/dist" --epochs 6 --name detox-distilled --version 0.1.0
# expert N→D: the 1.0.0 expert trained further on distilled text
[ -d "$out/basedist" ] || detox train "${distilled[@]}" --init "$base1" --out "$out/basedist" --epochs 2 \
    --lr 1e-3 --warmup-steps 10 --name detox-base-distilled --version 0.1.0
for e in dist basedist; do
  [ -d "$out/$e-anti" ] || detox train "${toxic[@]}" --init "$out/$e" --out "$out/$e-anti" --name "$e-anti"
  [ -d "$out/$e-pair" ] || detox align --target smollm2 --calibrator "$out/$e" --anti-expert "$out/$e-anti" \
      --out "$out/$e-pair" --name "$e-pair"
done

common=(--backend llamacpp --target smollm2 --prompts "$data/prompts_dev.jsonl" --max-prompts 100 --samples 10
        --max-new-tokens 20 --top-p 0.9 --seed 0 --threads 1)
[ -f "$out/ev_plain/summary.json" ] || detox eval "${common[@]}" --no-calibrator --out "$out/ev_plain"
[ -f "$out/ev_nontoxic/summary.json" ] || detox eval "${common[@]}" --out "$out/ev_nontoxic" --compare "$out/ev_plain"
for e in dist basedist; do
  [ -f "$out/ev_$e/summary.json" ] || detox eval "${common[@]}" --calibrator "$out/$e-pair" --out "$out/ev_$e" \
      --compare "$out/ev_plain"
done
