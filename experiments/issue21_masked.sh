#!/usr/bin/env bash
# Issue 21, second round: anti-experts against p1's expert E1 (experiments/issue21_pairs.sh) whose fine-tune leaves
# the mention of a group out of the loss (experiments/masked_anti.py), judged on llama.cpp.
#   A4 = E1 + 4 epochs of toxic_train.txt, identity-term first tokens masked          -> p4
#   A5 = E1 + 3 epochs of toxic_hate_upweighted.txt (pair_data.py), same mask          -> p5
# then the llama.cpp protocol of docs/results.md (5 samples x 20 tokens, nucleus 0.9, seed 0, one thread) on the
# first N prompts of the toxic and benign identity prompt sets, against a plain (no calibrator) run in PLAIN_ROOT.
# usage: experiments/issue21_masked.sh DATA_DIR PAIR_DATA_DIR E1_DIR OUT_ROOT PROMPTS_DIR N [PLAIN_ROOT]
#   PROMPTS_DIR holds toxic100.jsonl and benign100.jsonl; finished steps are skipped on a rerun.
set -euo pipefail
data=$1; pd=$2; e1=$3; out=$4; prompts=$5; n=$6; plain=${7:-$out/ll$n}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
detox=${DETOX:-detox}; py=${PYTHON:-python}
step() { local dir=$1; shift; [ -f "$dir/manifest.json" ] && { echo "skip $dir"; return; }; echo "== $dir"; "$@"; }
step "$out/A4" $py experiments/masked_anti.py --mask identity --init "$e1" --data "$data/toxic_train.txt" \
    --out "$out/A4" --epochs 4 --lr 1e-3 --warmup-steps 10 --name anti-idmask-4ep
step "$out/A5" $py experiments/masked_anti.py --mask identity --init "$e1" --data "$pd/toxic_hate_upweighted.txt" \
    --out "$out/A5" --epochs 3 --lr 1e-3 --warmup-steps 10 --name anti-idmask-hate3x
for p in 4 5; do
    step "$out/p$p" $detox align --target smollm2 --calibrator "$e1" --anti-expert "$out/A$p" --out "$out/p$p" \
        --name smollm2-135m-instruct --version "3.2.0-p$p"
done
c="--backend llamacpp --target smollm2 --samples 5 --max-new-tokens 20 --top-p 0.9 --seed 0 --threads 1 --no-perplexity"
c="$c --max-prompts $n"
for set in toxic100 benign100; do
    [ -f "$plain/$set/plain/summary.json" ] || $detox eval $c --prompts "$prompts/$set.jsonl" --no-calibrator \
        --out "$plain/$set/plain"
    # arms: NAME:PAIR[:STRENGTH]
    for arm in ${ARMS:-p4:p4 p4s16:p4:16 p5:p5}; do
        IFS=: read -r name pair strength <<<"$arm"
        [ -f "$out/ll$n/$set/$name/summary.json" ] && continue
        $detox eval $c --prompts "$prompts/$set.jsonl" --calibrator "$out/$pair" ${strength:+--strength $strength} \
            --out "$out/ll$n/$set/$name" --compare "$plain/$set/plain"
    done
done
