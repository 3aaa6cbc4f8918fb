#!/usr/bin/env bash
# The fetch engine against a single `curl` SFTP download of the same file, in
# one run, over a throwaway OpenSSH sshd on 127.0.0.1 (keys generated here,
# removed at exit). Usage: bench/engine-bench.sh [SIZE_MIB] [BLOCK_SIZE...]
# Prints the engine's JSON and a summary; needs root and build/bin (or the
# directory in $LAZYFS_BIN_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-256}
shift || true
blocks=("$@")
((${#blocks[@]})) || blocks=(128K)

work=$(mktemp -d /var/tmp/lazyfs-engine-bench.XXXXXX)
sshd_pid=
cleanup() {
  [[ -n $sshd_pid ]] && kill "$sshd_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

mkdir -p /run/sshd "$work/src"
ssh-keygen -q -t ed25519 -N '' -f "$work/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$work/user_key"
cp "$work/user_key.pub" "$work/authorized_keys"
port=$(( (RANDOM % 20000) + 30000 ))
cat >"$work/sshd_config" <<CONF
ListenAddress 127.0.0.1
Port $port
HostKey $work/host_key
AuthorizedKeysFile $work/authorized_keys
PermitRootLogin yes
PasswordAuthentication no
UsePAM no
StrictModes no
PidFile $work/sshd.pid
# No rc file of the user runs in the sftp-server's shell (see ssh_server.h).
SetEnv HOME=$work
Subsystem sftp /usr/lib/openssh/sftp-server -l INFO -e 2>>$work/sftp-server.log
CONF
/usr/sbin/sshd -D -e -f "$work/sshd_config" 2>"$work/sshd.log" &
sshd_pid=$!
echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$work/host_key.pub")" >"$work/known_hosts"
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

head -c $((size_mib << 20)) /dev/urandom >"$work/src/file.bin"
uri="sftp://root@127.0.0.1:$port$work/src"

# Cold page cache on the server side for both, where allowed.
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
start=$(date +%s.%N)
curl -s -o /dev/null --key "$work/user_key" --pubkey "$work/user_key.pub" \
  --hostpubsha256 "$(ssh-keygen -l -E sha256 -f "$work/host_key.pub" | awk '{print $2}' | cut -d: -f2)" \
  "sftp://root@127.0.0.1:$port$work/src/file.bin"
end=$(date +%s.%N)
curl_s=$(awk "BEGIN {print $end - $start}")

sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
args=()
for b in "${blocks[@]}"; do args+=(--block-size "$b"); done
"${LAZYFS_BIN_DIR:-build/bin}/lazyfs-engine-bench" --source "$uri" --path /file.bin --identity "$work/user_key" \
  --known-hosts "$work/known_hosts" --cache-dir "$work/cache" --curl-seconds "$curl_s" "${args[@]}"
sleep 0.5
echo "sftp-server bytes read in all: $(awk '/bytes read/ {for (i = 1; i < NF; i++) if ($i == "read") s += $(i + 1)} END {print s + 0}' "$work/sftp-server.log")"
