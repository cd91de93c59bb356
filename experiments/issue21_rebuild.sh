#!/usr/bin/env bash
# Issue 21: rebuild the r035 candidate pair of docs/results.md from the shared data in one go (the earlier sessions'
# pairs lived in /tmp and were lost), and align mixes of its two anti-experts.
#   sets  = experiments/issue21_sets.py (toxic100, benign100, the two reference texts)
#   pd    = experiments/pair_data.py (expert_human.txt, toxic_hate_upweighted.txt)
#   E1    = experiments/issue21_pairs.sh's expert (the shipped expert + 2 epochs incl. benign human text)
#   A3    = E1 + 4 epochs of toxic_train.txt (unmasked)          A5 = E1 + 3 epochs hate-weighted, identity mask
#   RNNN  = alpha·A3 + (1 - alpha)·A5 (experiments/mix_anti.py)   pRNNN = (E1, RNNN) aligned to SmolLM2
# A3 and A5 train side by side, one thread each. Finished steps are skipped on a rerun.
# usage: experiments/issue21_rebuild.sh DATA_DIR OUT [ALPHA...]        (default ALPHA: 0.35)
set -euo pipefail
data=$1; out=$2; shift 2; alphas=${*:-0.35}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
detox=${DETOX:-detox}; py=${PYTHON:-python}
step() { local dir=$1; shift; [ -f "$dir/manifest.json" ] && { echo "skip $dir"; return; }; echo "== $dir $(date +%T)"; "$@"; }
mkdir -p "$out/pairs"
[ -f "$out/sets/toxic100.jsonl" ] || $py experiments/issue21_sets.py --data-dir "$data" --out "$out/sets"
[ -f "$out/pd/toxic_hate_upweighted.txt" ] || $py experiments/pair_data.py --data-dir "$data" \
    --holdout-text "$out/sets/control_reference.txt" --out "$out/pd"
md5sum "$out/pd/toxic_hate_upweighted.txt"   # d999ad08... in the runs of docs/results.md
step "$out/pairs/E1" $detox train --init artifacts/shipped/smollm2-135m-instruct \
    --data artifacts/shipped/distilled/smollm2-unidetox.jsonl --data "$data/unidetox_gpt2xl_distilled.csv" \
    --data "$out/pd/expert_human.txt" --out "$out/pairs/E1" --epochs 2 --lr 1e-3 --warmup-steps 10 \
    --name detox-distilled-human --version 0.1.0
step "$out/pairs/A3" $detox train --init "$out/pairs/E1" --data "$data/toxic_train.txt" --out "$out/pairs/A3" \
    --epochs 4 --lr 1e-3 --warmup-steps 10 --name human-anti-4ep > "$out/A3.log" 2>&1 &
step "$out/pairs/A5" $py experiments/masked_anti.py --mask identity --init "$out/pairs/E1" \
    --data "$out/pd/toxic_hate_upweighted.txt" --out "$out/pairs/A5" --epochs 3 --lr 1e-3 --warmup-steps 10 \
    --name anti-idmask-hate3x > "$out/A5.log" 2>&1 &
wait
for a in $alphas; do
    t=$(printf '%03d' "$($py -c "print(round($a*100))")")
    step "$out/pairs/R$t" $py experiments/mix_anti.py --a "$out/pairs/A3" --b "$out/pairs/A5" --alpha "$a" \
        --out "$out/pairs/R$t"
    step "$out/pairs/pR$t" $detox align --target smollm2 --calibrator "$out/pairs/E1" --anti-expert "$out/pairs/R$t" \
        --out "$out/pairs/pR$t" --name smollm2-135m-instruct --version "3.2.0-r$t"
done
