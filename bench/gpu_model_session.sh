#!/usr/bin/env bash
# The whole model on the device machine (issue: the whole model on the GPU). Steps, logs in $OUT:
#   test      hla_cuda_tests (delta rule, attention, model), then memcheck on the model tests
#   cli       hla logits --device cuda (f32) against the CPU on the fixtures, the max relative error
#   bench     hla init of the 2.0B Qwen3.5-shaped model (configs/qwen3_5-2b.json, bf16 on disk)
#             and hla bench --device cuda --dtype bf16 on it
#   profile   ncu kernel times (gpu__time_duration, clocks free) of one replayed decode step at
#             batch 1 and 16 and of one 8K prefill forward of that model, summed per kernel name
#   serve     hla serve --device cuda with a real HTTP client (bench/serve_check.py): the fixture's
#             greedy completions equal hla generate; then 16 concurrent requests on the 2.0B model
#   moe       the Qwen3-Next-shaped MoE model (configs/qwen3_next-moe-2b.json, 2.5B): hla init + hla bench,
#             then transformers on the same config (bench/e2e_peer.py); needs ~5 minutes
#   peer      transformers (+ FLA's kernels) on the same shape: ../shared/anchors/e2e_anchor.py
# Binaries come built from the CPU machine (bench/carry_delta_rule.sh BUILD BIN); BIN names them.
#   BIN=third_party_local/bin2 bench/gpu_model_session.sh test cli
set -u
OUT=${OUT:-/tmp/hla_out}
BIN=${BIN:-third_party_local/bin2}
steps=${*:-test cli bench serve peer}
has() { [[ " $steps " == *" $1 "* ]]; }
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$PWD/$BIN/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export HLA_FIXTURES=$PWD/third_party_local/fixtures
nvidia-smi -L | tee "$OUT/device.txt"
if has test; then
  timeout ${TEST_TIMEOUT:-300} $BIN/hla_cuda_tests ${TEST_FILTER:+--gtest_filter=$TEST_FILTER} >"$OUT/test.log" 2>&1
  echo "tests rc=$?"
  grep -E "^\[ (model|fixture|op) |FAILED|PASSED|Failure|Expected|Which is|error" "$OUT/test.log" | head -${TEST_LINES:-80}
  timeout ${SAN_TIMEOUT:-200} compute-sanitizer --tool memcheck --error-exitcode 9 $BIN/hla_cuda_tests \
    --gtest_filter="${SAN_FILTER:-*CudaModel*Fp32*}" >"$OUT/sanitize_memcheck.log" 2>&1
  echo "memcheck rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/sanitize_memcheck.log" | tail -1)"
fi
if has cli; then
  for m in qwen3_next qwen3_5 kimi_linear deepseek_v32; do
    d=$HLA_FIXTURES/models/$m
    $BIN/hla logits --model "$d" --input "$d/reference.safetensors" --output "$OUT/$m.cpu.safetensors" &&
      $BIN/hla logits --model "$d" --input "$d/reference.safetensors" --output "$OUT/$m.cuda.safetensors" --device cuda &&
      python3 -c "
from safetensors.torch import load_file as L; import sys
a=L('$OUT/$m.cuda.safetensors')['logits']; b=L('$OUT/$m.cpu.safetensors')['logits']; r=L('$d/reference.safetensors')['logits']
print('$m', 'cuda vs cpu', float((a-b).abs().max()/b.abs().max()), 'cuda vs transformers', float((a-r).abs().max()/r.abs().max()))" 2>&1 | tail -1
  done
fi
M=/tmp/qwen3_5_2b
if has bench || has profile || has serve; then
  [ -d $M ] || $BIN/hla init --config configs/qwen3_5-2b.json --out $M --dtype bf16 >"$OUT/init.log" 2>&1 ||
    { tail "$OUT/init.log"; exit 1; }
fi
if has profile; then
  ncu_run() {  # name, then hla bench arguments
    local name=$1; shift
    timeout ${NCU_TIMEOUT:-240} ncu --clock-control none --metrics gpu__time_duration.sum --csv \
      $BIN/hla bench --model $M --device cuda --dtype bf16 "$@" >"$OUT/ncu_$name.csv" 2>"$OUT/ncu_$name.err"
    echo "ncu $name rc=$?"
  }
  for B in ${PROFILE_BATCHES:-1 16}; do
    ncu_run decode_b$B --prefill 16 --chunk 16 --decode-batch $B --decode-steps 2 --decode-prompt 16
    python3 bench/ncu_kernels.py "$OUT/ncu_decode_b$B.csv" --last-step | head -${PROFILE_LINES:-25}
  done
  if [ -n "${PROFILE_PREFILL-8192}" ]; then  # PROFILE_PREFILL= skips it
    ncu_run prefill --prefill ${PROFILE_PREFILL:-8192} --chunk ${PROFILE_PREFILL:-8192} --decode-batch 1 --decode-steps 1 --decode-prompt 1
    python3 bench/ncu_kernels.py "$OUT/ncu_prefill.csv" --first-forward | head -${PROFILE_LINES:-25}
  fi
fi
if has bench; then
  timeout ${BENCH_TIMEOUT:-300} $BIN/hla bench --model $M --device cuda --dtype bf16 --prefill ${PREFILL:-1024,8192,32768} \
    --chunk ${CHUNK:-32768} --decode-batch ${BATCHES:-1,16,64} --decode-steps ${STEPS:-64} --decode-prompt 512 2>&1 |
    tee "$OUT/bench_hla_2b.csv"
fi
if has serve; then
  python3 bench/serve_check.py --hla $BIN/hla --model $HLA_FIXTURES/models/qwen3_5 --device cuda --dtype f32 \
    --requests 8 --prompt-len 40 --max-tokens 12 --vocab 100 --check
  python3 bench/serve_check.py --hla $BIN/hla --model $M --device cuda --dtype bf16 --requests 16 --prompt-len 512 \
    --max-tokens 64 | tee "$OUT/serve_2b.json"
fi
if has moe; then
  E=/tmp/qwen3_next_moe_2b
  [ -d $E ] || timeout 300 $BIN/hla init --config configs/qwen3_next-moe-2b.json --out $E --dtype bf16 >"$OUT/init_moe.log" 2>&1 ||
    { tail "$OUT/init_moe.log"; exit 1; }
  timeout 300 $BIN/hla bench --model $E --device cuda --dtype bf16 --prefill 1024,8192 --chunk 8192 --decode-batch 1,16 \
    --decode-steps 32 --decode-prompt 512 2>&1 | tee "$OUT/bench_hla_moe.csv"
  OUT=$OUT FLA_PATH=$PWD/third_party_local timeout ${PEER_TIMEOUT:-400} python3 bench/e2e_peer.py \
    configs/qwen3_next-moe-2b.json --new 32 >"$OUT/peer_moe.log" 2>&1
  echo "moe peer rc=$?"; cat "$OUT/e2e_peer.json" 2>/dev/null
fi
if has peer; then
  OUT=$OUT FLA_PATH=$PWD/third_party_local timeout ${PEER_TIMEOUT:-400} python3 third_party_local/e2e_anchor.py \
    >"$OUT/peer.log" 2>&1
  echo "peer rc=$?"; cat "$OUT/e2e.json" 2>/dev/null
fi
