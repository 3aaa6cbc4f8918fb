#!/usr/bin/env bash
# Installs the build in BUILD_DIR into a temporary prefix, builds the consumer
# out of tree twice (find_package; pkg-config), and runs both against the
# fixture checkpoint read lazily from a file:// source (the find_package one
# also mounts it when FUSE is usable). Usage: check-install.sh BUILD_DIR
set -euo pipefail
build=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
work=$(mktemp -d "$build/install-check.XXXXXX")
trap 'mountpoint -q "$work/mnt" && umount -l "$work/mnt"; rm -rf "$work"' EXIT

cmake --install "$build" --prefix "$work/prefix" >/dev/null
test -x "$work/prefix/bin/lazyfs"
test -f "$work/prefix/share/man/man1/lazyfs.1"
ls "$work/prefix/lib/"liblazyfs.so.0 "$work/prefix/lib/"liblazyfs-fuse.so.0 >/dev/null
"$work/prefix/bin/lazyfs" --version

cp -r "$top/test/data/criu-4.2-single" "$work/images"
chmod -R u+w "$work/images"
"$build/bin/lazyfs-make-source" "$work/images" "$work/source" >/dev/null
file=/srv/lazyfs-fixture-a/data/big.bin

# The example in docs/library.md is what gets built: it must be consumer.cc.
mkdir -p "$work/example"
awk '/^```cpp$/ {on = 1; next} /^```$/ {on = 0} on' "$top/docs/library.md" >"$work/example/consumer.cc"
if ! diff -q "$work/example/consumer.cc" "$here/consumer.cc" >/dev/null; then
  echo "check-install: docs/library.md's example differs from test/install/consumer.cc" >&2
  exit 1
fi
cp "$here/CMakeLists.txt" "$work/example/"

echo "== find_package consumer"
cmake -S "$work/example" -B "$work/cmake-build" -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/cmake-build" >/dev/null
mount_args=()
if [[ -w /dev/fuse && $EUID == 0 ]]; then
  mkdir -p "$work/mnt"
  mount_args=(--mount "$work/mnt")
fi
LD_LIBRARY_PATH="$work/prefix/lib" "$work/cmake-build/consumer" "$work/images" \
  "file://$work/source" "$work/cache1" "$file" "${mount_args[@]}"

echo "== pkg-config consumer"
export PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig"
# shellcheck disable=SC2046
g++ -o "$work/consumer-pc" "$work/example/consumer.cc" $(pkg-config --cflags --libs lazyfs lazyfs-fuse)
LD_LIBRARY_PATH="$work/prefix/lib" "$work/consumer-pc" "$work/images" "file://$work/source" \
  "$work/cache2" "$file"
echo "== installed lazyfs works for consumers"
