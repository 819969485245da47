#!/usr/bin/env bash
# All tests: the GoogleTest suite (ctest; tests that need ../shared/fixtures skip without them) and
# the libFuzzer targets of the parsers (safetensors, config.json, tokenizer.json, chat templates) for a
# bounded time. Assumes scripts/setup.sh (or the same build).
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
# The JavaScript peers (tokenizer, chat templates, OpenAI client), pinned by package-lock.json.
for peer in tests/text_peer tests/server_peer; do (cd "$peer" && npm ci --silent --no-audit --no-fund); done
ctest --test-dir build --output-on-failure -j"$(nproc)"
# The CUDA backend must keep compiling where there is no GPU (its tests skip themselves there).
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
if [ -x "$nvcc" ]; then
  cmake -S . -B build/cuda -DHLA_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc" >/dev/null
  cmake --build build/cuda -j"$(nproc)" --target hla hla_cuda_tests
  build/cuda/hla_cuda_tests --gtest_brief=1
fi
# libFuzzer needs clang and an instrumented build of the library.
CC=clang CXX=clang++ cmake -S . -B build/fuzz -DHLA_FUZZ=ON -DHLA_TESTS=OFF >/dev/null
cmake --build build/fuzz -j"$(nproc)" --target fuzz_safetensors fuzz_config fuzz_tokenizer fuzz_chat_template
# A fixed seed keeps CI reproducible; HLA_FUZZ_SEED=0 asks libFuzzer for a fresh one.
for target in safetensors config tokenizer chat_template; do
  work=$(mktemp -d)
  if ! build/fuzz/fuzz_$target -max_total_time="${HLA_FUZZ_SECONDS:-60}" -seed="${HLA_FUZZ_SEED:-1}" -max_len=8192 \
      -artifact_prefix="$work/" "$work" fuzz/corpus/$target >"$work/log" 2>&1; then
    tail -40 "$work/log"
    echo "fuzz_$target found a failing input; reproduce with: build/fuzz/fuzz_$target FILE" >&2
    exit 1
  fi
  tail -1 "$work/log"
  rm -rf "$work"
done
