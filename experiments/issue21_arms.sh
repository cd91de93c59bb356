#!/usr/bin/env bash
# Issue 21: judge candidate pairs on the bounded protocol of docs/results.md: N prompts of each set of
# experiments/issue21_sets.py × 5 samples × 20 new tokens, nucleus 0.9, one thread, two judges (the default scorer
# and minilm-head), each arm against a plain (no calibrator) run of the same backend and seed.
# usage: experiments/issue21_arms.sh SETS_DIR PAIRS_DIR OUT N NAME:PAIR[:STRENGTH]...
#   PAIR is a directory under PAIRS_DIR, or "shipped" for the shipped default. Env: BACKEND (llamacpp), TARGET
#   (smollm2), SEED (0), SETS ("toxic100 benign100"), JUDGES ("--scorer default --scorer minilm-head"; the first
#   writes the headline numbers). Finished runs are skipped on a rerun.
set -euo pipefail
sets=$1; pairs=$2; out=$3; n=$4; shift 4
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
detox=${DETOX:-detox}
c="--backend ${BACKEND:-llamacpp} --target ${TARGET:-smollm2} --samples 5 --max-new-tokens 20 --top-p 0.9"
c="$c --seed ${SEED:-0} --threads 1 --no-perplexity --max-prompts $n ${JUDGES:---scorer default --scorer minilm-head}"
for set in ${SETS:-toxic100 benign100}; do
    [ -f "$out/$set/plain/summary.json" ] || $detox eval $c --prompts "$sets/$set.jsonl" --no-calibrator \
        --out "$out/$set/plain"
    for arm in "$@"; do
        IFS=: read -r name pair strength <<<"$arm"
        [ -f "$out/$set/$name/summary.json" ] && continue
        cal=$pairs/$pair; [ "$pair" = shipped ] && cal=artifacts/shipped/smollm2-135m-instruct
        echo "== $set/$name $(date +%T)"
        $detox eval $c --prompts "$sets/$set.jsonl" --calibrator "$cal" ${strength:+--strength $strength} \
            --out "$out/$set/$name" --compare "$out/$set/plain"
    done
done
