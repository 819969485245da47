#!/usr/bin/env bash
# Re-trains the shipped demo model models/brown-hybrid: a 0.86M-parameter KDA 3:1 hybrid on the
# Brown corpus as bytes (the byte-level tokenizer.json beside it maps byte b to id b).
# Usage: bench/train_demo.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
scripts/get-brown.sh
OUT=$(mktemp -d)
"$BUILD/hla" train --config models/brown-hybrid/config.json --data brown --out "$OUT" \
  --steps 1500 --batch 16 --seq-len 128 --lr 3e-3 --log-every 100 --ckpt-every 500
cp "$OUT/model.safetensors" "$OUT/config.json" models/brown-hybrid/
echo "wrote models/brown-hybrid (from $OUT)"
