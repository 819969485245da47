#!/usr/bin/env bash
# Installs hla's build and test dependencies from Debian (see README "Dependencies" for why each).
set -euo pipefail
pkgs=(cmake make g++ clang libclang-rt-14-dev libomp-14-dev libgtest-dev nlohmann-json3-dev libcli11-dev
      libopenblas-openmp-dev libcpp-httplib-dev pkg-config)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
# Node.js may come from elsewhere than Debian (it does on these machines); only add it if absent.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" >/dev/null
fi
