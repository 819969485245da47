#!/usr/bin/env bash
# CPU decode speed of a ~100M-parameter Qwen3-Next-shaped hybrid (9 Gated DeltaNet + 3 attention
# layers, 8-expert MoE) written by `hla init`. Prints hla's own prefill/decode timing line.
# Usage: bench/cpu_decode.sh [threads]   (default: all cores)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
build/hla init --config configs/qwen3_next-100m.json --out "$dir" --seed 1 2>/dev/null
export OMP_NUM_THREADS=${1:-$(nproc)} OPENBLAS_NUM_THREADS=${1:-$(nproc)}
prompt=$(seq -s, 1 64)
echo "threads=$OMP_NUM_THREADS prompt=64 new=256 model=configs/qwen3_next-100m.json (98.2M params, f32)"
build/hla generate --model "$dir" --prompt-ids "$prompt" --max-new-tokens 256 --stats 2>&1 >/dev/null
