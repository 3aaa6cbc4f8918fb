#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what is missing, checks
# formatting, builds, runs every test, then builds and runs them again under
# AddressSanitizer and UndefinedBehaviorSanitizer (all but the benchmark
# harness). Run as root (the integration tests mount FUSE file systems and
# start sshd and nginx).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

echo "== clang-format"
mapfile -t sources < <(git ls-files '*.cc' '*.h' 2>/dev/null || find lib daemon test bench -name '*.cc' -o -name '*.h')
clang-format --dry-run --Werror "${sources[@]}"

echo "== build"
scripts/build.sh build
echo "== tests"
ctest --test-dir build --output-on-failure -j "$(nproc)"

# The benchmark harness is a test driver: its smoke test (bench-quick) ran
# above and is not repeated under the sanitizers.
echo "== build with ASan+UBSan"
scripts/build.sh build-asan -DCMAKE_BUILD_TYPE=Debug -DLAZYFS_SANITIZE=ON -DLAZYFS_BENCH=OFF
echo "== tests with ASan+UBSan"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build-asan --output-on-failure -j "$(nproc)"
echo "== all tests passed"
