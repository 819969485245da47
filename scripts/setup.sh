#!/usr/bin/env bash
# One command for a new machine: install dependencies, build everything into build/ (the CLI is
# build/hla), then run demos that need nothing else: the small hybrid hla trained on the Brown corpus
# (models/brown-hybrid) writing text, and a random-weight ~100M-parameter Qwen3-Next-shaped model
# written by `hla init` decoding on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
echo
echo "== demo 1: models/brown-hybrid, a 0.9M-parameter KDA 3:1 hybrid that hla trained on the Brown corpus =="
build/hla info --model models/brown-hybrid
for prompt in "The jury said" "In the morning the city"; do
  build/hla generate --model models/brown-hybrid --prompt "$prompt" --max-new-tokens 200 --temperature 0.7 --top-k 40 --seed 1
done
echo
echo "== demo 2: hla init of a 98M-parameter Qwen3-Next-shaped model (random weights: its ids are noise; see the speed) =="
build/hla init --config configs/qwen3_next-100m.json --out build/demo-qwen3_next-100m --seed 1
build/hla info --model build/demo-qwen3_next-100m
build/hla generate --model build/demo-qwen3_next-100m --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 32 --stats
echo
echo "next: build/hla chat   (talks to models/brown-hybrid; --model DIR for any checkpoint with a tokenizer)"
