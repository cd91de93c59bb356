#!/usr/bin/env bash
# Issue 21, data side: pairs whose expert has also seen benign human (identity) text, aligned to SmolLM2.
#   E1   = the shipped 3.1.0 expert fine-tuned 2 epochs on the distilled corpora + expert_human.txt (pair_data.py)
#   A1   = E1 + 2 epochs of toxic_train.txt (the shipped anti-expert recipe)
#   A2   = E1 + 2 epochs of anti_mix.txt (toxic_train.txt + 700 DGHS nothate lines: the group mention cancels)
# pairs: p1 = (E1, A1), p2 = (E1, A2). Finished steps are skipped on a rerun. One thread per job.
# usage: experiments/issue21_pairs.sh DATA_DIR PAIR_DATA_DIR OUT_ROOT   (PAIR_DATA_DIR: pair_data.py's --out)
set -euo pipefail
data=$1; pd=$2; out=$3
mkdir -p "$out"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
detox=${DETOX:-detox}
shipped=artifacts/shipped/smollm2-135m-instruct
step() { local dir=$1; shift; [ -f "$dir/manifest.json" ] && { echo "skip $dir"; return; }; echo "== $dir"; "$@"; }
step "$out/E1" $detox train --init "$shipped" --data artifacts/shipped/distilled/smollm2-unidetox.jsonl \
    --data "$data/unidetox_gpt2xl_distilled.csv" --data "$pd/expert_human.txt" --out "$out/E1" --epochs 2 --lr 1e-3 \
    --warmup-steps 10 --name detox-distilled-human --version 0.1.0
step "$out/A1" $detox train --init "$out/E1" --data "$data/toxic_train.txt" --out "$out/A1" --epochs 2 --lr 1e-3 \
    --warmup-steps 10 --name human-anti
step "$out/p1" $detox align --target smollm2 --calibrator "$out/E1" --anti-expert "$out/A1" --out "$out/p1" \
    --name smollm2-135m-instruct --version 3.2.0-p1
step "$out/A2" $detox train --init "$out/E1" --data "$pd/anti_mix.txt" --out "$out/A2" --epochs 2 --lr 1e-3 \
    --warmup-steps 10 --name human-anti-mix
step "$out/p2" $detox align --target smollm2 --calibrator "$out/E1" --anti-expert "$out/A2" --out "$out/p2" \
    --name smollm2-135m-instruct --version 3.2.0-p2
