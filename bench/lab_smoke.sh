#!/usr/bin/env bash
# Runs `hla lab --preset smoke` and times it (the issue's bar: < 20 minutes on a 2-core CPU).
# Usage: bench/lab_smoke.sh [BUILD_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
OUT=${2:-out/lab-smoke}
start=$(date +%s)
"$BUILD/hla" lab --preset smoke --out "$OUT"
echo "hla lab --preset smoke: $(( $(date +%s) - start )) s on $(nproc) cores; report in $OUT/report.md"
