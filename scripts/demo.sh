#!/usr/bin/env bash
# The main job on the embedded sample: installs what is missing, builds, and
# shows which files a restore of the sample CRIU 4.2 checkpoint needs and which
# of them this host lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh build
echo "== lazyfs ls test/data/criu-4.2-single"
build/bin/lazyfs ls test/data/criu-4.2-single
