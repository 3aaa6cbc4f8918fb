#!/usr/bin/env bash
# Configures and builds lazyfs into DIR (default build/), passing any further
# arguments to cmake. The command lands at DIR/bin/lazyfs.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build}
shift || true
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
cmake --build "$dir" -j "$(nproc)"
