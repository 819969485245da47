#!/usr/bin/env bash
# One command for a new machine: install dependencies, build everything into build/ (the CLI is
# build/hla), then run a demo that needs nothing else: a random-weight ~100M-parameter
# Qwen3-Next-shaped hybrid written by `hla init`, its layout, and generation on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
echo
echo "== demo: hla init / info / generate (random weights, so the ids are noise) =="
build/hla init --config configs/qwen3_next-100m.json --out build/demo-qwen3_next-100m --seed 1
build/hla info --model build/demo-qwen3_next-100m
build/hla generate --model build/demo-qwen3_next-100m --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 32 --stats
