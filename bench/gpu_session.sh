#!/usr/bin/env bash
# One device-machine session for the CUDA delta-rule kernels: build, test (with the op fixtures),
# compute-sanitizer, hla's benchmark, FLA's side of the benchmark. Logs go to $OUT.
#   bench/gpu_session.sh [steps...]   steps: build test sanitize bench fla ncu (default: all but ncu)
# Expects third_party_local/fixtures/ops (copied op fixtures) and third_party_local/fla (FLA's fla/).
# BIN names the folder of hla_cuda_tests and bench_delta_rule (default build-cuda; binaries built
# on the CPU machine can be carried instead when the device machine lacks the CPU build's packages).
# Time limits and the sanitizer's test filter can be narrowed for short device sessions:
# TEST_TIMEOUT, SAN_TIMEOUT (each tool), SAN_FILTER (gtest filter), BENCH_TIMEOUT, FLA_TIMEOUT;
# the ncu step's kernels and launches: NCU_KERNELS (regex), NCU_COUNT.
set -u
OUT=${OUT:-/tmp/hla_out}
mkdir -p "$OUT"
steps=${*:-build test sanitize bench fla}
BIN=${BIN:-build-cuda}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64
export HLA_FIXTURES=$PWD/third_party_local/fixtures
has() { [[ " $steps " == *" $1 "* ]]; }
nvidia-smi -L | tee "$OUT/device.txt"
if has build; then
  cmake -S . -B build-cuda -DHLA_CUDA=ON -DCMAKE_BUILD_TYPE=Release >"$OUT/build.log" 2>&1 &&
    cmake --build build-cuda -j16 --target hla_cuda_tests bench_delta_rule >>"$OUT/build.log" 2>&1 ||
    { tail -40 "$OUT/build.log"; exit 1; }
  echo "build ok"
fi
if has test; then
  # The log is written whole first: a pipe into head would kill the tests at its 60th line.
  timeout ${TEST_TIMEOUT:-180} $BIN/hla_cuda_tests >"$OUT/test.log" 2>&1
  echo "tests rc=$?"
  grep -E "^\[ (fixture|op|cli|bwd|fixture bwd) |FAILED|PASSED|Failure|Expected|error" "$OUT/test.log" | head -${TEST_LINES:-60}
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    timeout ${SAN_TIMEOUT:-150} compute-sanitizer --tool $tool --error-exitcode 9 $BIN/hla_cuda_tests \
      --gtest_filter="${SAN_FILTER:-*Fixtures*:*Decode*:*Deterministic*}" >"$OUT/sanitize_$tool.log" 2>&1
    echo "sanitizer $tool rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)"
  done
fi
if has bench; then
  timeout ${BENCH_TIMEOUT:-150} $BIN/bench_delta_rule ${QUICK:+--quick} 2>&1 | tee "$OUT/bench_hla.csv"
fi
if has fla; then
  FLA_PATH=$PWD/third_party_local PYTHONUNBUFFERED=1 timeout ${FLA_TIMEOUT:-240} python3 bench/fla_peer_bench.py ${QUICK:+--quick} ${FLA_ONLY:+--only=$FLA_ONLY} 2>&1 |
    grep -v Warning | tee "$OUT/bench_fla.csv"
fi
if has ncu; then
  # Per-kernel time and limiters of one forward call (prep, state, output) and one decode.
  IFS=';' read -ra cases <<<"${NCU_CASES:-gdn_chunk_fwd,B1 T16384;kda_chunk_fwd,B1 T16384;gdn_decode,B256}"
  for c in "${cases[@]}"; do
    timeout 120 ncu --clock-control none -k "regex:${NCU_KERNELS:-prep|state_kernel|output_kernel|decode_kernel}" \
      --launch-count ${NCU_COUNT:-3} \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
      $BIN/bench_delta_rule --quick "--only=$c" >"$OUT/ncu_${c%%,*}.txt" 2>&1
    echo "== ncu $c"
    grep -E "^  [a-z_:<>, ()0-9A-Za-z]*(kernel|Kernel)|Duration|Memory Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Dynamic Shared|Block Limit" "$OUT/ncu_${c%%,*}.txt" | head -40
  done
fi
