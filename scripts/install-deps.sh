#!/usr/bin/env bash
# Installs, as root, the Debian 12 packages lazyfs builds, tests and
# benchmarks with. Idempotent: installs only what is missing, and runs
# apt-get update first whenever something is.
set -euo pipefail

packages=(
  build-essential cmake pkg-config clang-format
  libfuse3-dev fuse3
  libprotobuf-dev protobuf-compiler
  libcurl4-openssl-dev libssh2-1-dev libssl-dev
  libboost-dev libfmt-dev libcli11-dev nlohmann-json3-dev catch2
  openssh-server openssh-client nginx
  sshfs rsync gnuplot iproute2 curl
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
if ((EUID != 0)); then
  echo "install-deps: missing packages (${missing[*]}); run as root to install them" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
