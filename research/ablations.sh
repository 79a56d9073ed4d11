#!/usr/bin/env bash
# The small-scale ablations (recipes/ablations/*.toml), one GPU each, in parallel: train, then evaluate
#   NIAH (8 subtasks) at the training memory size (16K) and, for base and global-rope, at 10x it (160K);
#   the two-hop task with 1 and 2 rounds of router injection ("no Memory Interleave" = 1 round of base);
#   no-original-text answers with --interleave off (nothing injected), as it was trained.
# Usage: research/ablations.sh RUNS_DIR OUT_DIR [NIAH_SAMPLES] [NIAH_10X_SAMPLES] [MULTIHOP_SAMPLES]
# then: python research/ablations.py OUT_DIR   (writes research/results/ablations.json and .png)
set -u
runs=$1 out=$2 n=${3:-25} n10=${4:-10} nm=${5:-50}
mkdir -p "$runs" "$out"
ms() { python -m memsparse.cli "$@"; }
one() {  # name gpu
    local name=$1 dir=$runs/$1 mode=router
    export CUDA_VISIBLE_DEVICES=$2
    [ "$name" = no-original-text ] && mode=off
    local t0=$SECONDS
    ms train "recipes/ablations/$name.toml" --out "$dir" > "$out/$name-train.txt" 2>&1 || return 1
    echo "{\"train_seconds\": $((SECONDS - t0)), \"gpu\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0)\"}" \
        > "$out/$name-train.json"
    cp "$dir/train_log.jsonl" "$out/$name-train_log.jsonl"
    ms eval niah --model "$dir/delta" --tokens 16384 --samples "$n" --interleave $mode \
        --out "$out/$name-niah.json" > "$out/$name-eval.txt" 2>&1
    if [ "$mode" = router ]; then
        ms eval multihop --model "$dir/delta" --tokens 16384 --samples "$nm" --router-rounds 1,2 \
            --out "$out/$name-multihop.json" >> "$out/$name-eval.txt" 2>&1
    fi
    if [ "$name" = base ] || [ "$name" = global-rope ]; then
        ms eval niah --model "$dir/delta" --tokens 163840 --samples "$n10" --out "$out/$name-niah10x.json" \
            >> "$out/$name-eval.txt" 2>&1
    fi
    echo "$name done in $((SECONDS - t0)) s"
}
gpu=0
for name in base no-warmup no-original-text global-rope; do
    one "$name" $gpu &
    gpu=$(( (gpu + 1) % $(nvidia-smi -L | wc -l) ))
done
wait
