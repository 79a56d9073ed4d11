#!/usr/bin/env bash
# Write the MSA-SmolLM2 delta shipped at a commit into a directory, as a history recipe's `init` expects it
# (the recipe's init_sha256 then checks it): recipes/parent.sh 7ca0a75 runs/parents/v1
set -euo pipefail
commit=$1 out=$2
mkdir -p "$out"
for f in delta.safetensors delta.json; do
    git show "$commit:src/memsparse/weights/msa-smollm2/$f" > "$out/$f"
done
sha256sum "$out/delta.safetensors"
