#!/usr/bin/env bash
# Builds the CUDA delta-rule binaries on the CPU machine and packs them for the device machine,
# which lacks the Debian packages hla_lib links (OpenBLAS, cpp-httplib): copies hla_cuda_tests,
# bench_delta_rule and hla with, in DEST/lib, a plain CBLAS stand-in as libopenblas.so.0
# (bench/cblas_standin_delta_rule.c: the three calls hla_lib makes, naive loops — a static
# OpenBLAS would add ~30 MB per binary to what travels) and cpp-httplib with its TLS/compression
# libraries.
#   bench/carry_delta_rule.sh [BUILD_DIR] [DEST]   (defaults: build-cuda2, third_party_local/bin2)
# Then on the device: BIN=DEST LD_LIBRARY_PATH=DEST/lib bench/gpu_session.sh test sanitize bench fla
set -eu
B=${1:-build-cuda2}
DEST=${2:-third_party_local/bin2}
[ -d "$B" ] || cmake -S . -B "$B" -DHLA_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$B" -j2 --target hla_cuda_tests bench_delta_rule hla >/dev/null
mkdir -p "$DEST/lib"
for t in hla_cuda_tests bench_delta_rule hla; do cp "$B/$t" "$DEST/$t"; strip "$DEST/$t"; done
cc -O2 -shared -fPIC -o "$DEST/lib/libopenblas.so.0" bench/cblas_standin_delta_rule.c
for l in libcpp-httplib.so.0.11 libbrotlidec.so.1 libbrotlienc.so.1 libbrotlicommon.so.1 libssl.so.3 libcrypto.so.3; do
  cp -L /lib/x86_64-linux-gnu/$l "$DEST/lib/"
done
LD_LIBRARY_PATH=$DEST/lib ldd "$DEST/hla" | grep -E "not found|blas" || true
du -sh "$DEST"
