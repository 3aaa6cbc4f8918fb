#!/usr/bin/env bash
# The whole migration on the embedded sample (a real CRIU 4.2 checkpoint), on
# this one machine: installs what is missing and builds, then
#   1. starts a throwaway OpenSSH server on 127.0.0.1 that stands for the
#      source host, holding the checkpoint's files at their recorded paths;
#   2. `lazyfs mount`s the checkpoint from it over SFTP and `lazyfs prepare`s
#      the checkpoint so that a restore opens the files through the mount;
#   3. runs a restore-like reader that opens every file the way `criu
#      restore` does (CRIU itself is not needed), then reads 1 MiB of one file;
#   4. prints what it cost, and removes everything it made.
# Run as root (FUSE, sshd).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh build >/dev/null
bin=$PWD/build/bin

work=$(mktemp -d /tmp/lazyfs-demo.XXXXXX)
sshd_pid=
daemon_pid=
cleanup() {
  [[ -n $daemon_pid ]] && kill "$daemon_pid" 2>/dev/null && sleep 0.5
  mountpoint -q "$work/mnt" 2>/dev/null && umount -l "$work/mnt"
  [[ -n $sshd_pid ]] && kill "$sshd_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

step() { printf '\n== %s\n' "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

step "source host: an OpenSSH server on 127.0.0.1 with the checkpoint's files"
mkdir -p /run/sshd "$work/mnt"
cp -r test/data/criu-4.2-single "$work/images"
chmod -R u+w "$work/images"
"$bin/lazyfs-make-source" "$work/images" "$work/source"
ssh-keygen -q -t ed25519 -N '' -f "$work/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$work/user_key"
cp "$work/user_key.pub" "$work/authorized_keys"
for _ in $(seq 20); do
  port=$(( (RANDOM % 20000) + 30000 ))
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
done
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
Subsystem sftp /usr/lib/openssh/sftp-server
CONF
/usr/sbin/sshd -D -e -f "$work/sshd_config" 2>"$work/sshd.log" &
sshd_pid=$!
echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$work/host_key.pub")" >"$work/known_hosts"
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
echo "sshd pid $sshd_pid on 127.0.0.1:$port"

step "what the restore needs (lazyfs ls)"
"$bin/lazyfs" ls "$work/images"

step "lazyfs mount + lazyfs prepare"
start=$(now)
"$bin/lazyfs" mount --cache-dir "$work/cache" --identity "$work/user_key" \
  --known-hosts "$work/known_hosts" "$work/mnt" "$work/images" \
  "sftp://root@127.0.0.1:$port$work/source"
mount_s=$(since "$start")
daemon_pid=$("$bin/lazyfs" status --json "$work/mnt" | grep -o '"pid":[0-9]*' | cut -d: -f2)
"$bin/lazyfs" prepare "$work/images" --mountpoint "$work/mnt" --all
echo "mounted in $mount_s s (daemon pid $daemon_pid)"

step "restore: open every file as criu restore does, through the mount"
"$bin/lazyfs-restore-like" "$work/images"

step "the restored process reads 1 MiB of data/big.bin"
start=$(now)
dd if="$work/mnt/srv/lazyfs-fixture-a/data/big.bin" of=/dev/null bs=64k count=16 status=none
echo "read 1 MiB in $(since "$start") s"

step "what it cost (lazyfs status)"
"$bin/lazyfs" status "$work/mnt" | tail -n 4
json=$("$bin/lazyfs" status --json "$work/mnt")
fetched=$(grep -o '"fetched_bytes":[0-9]*' <<<"$json" | head -1 | cut -d: -f2)
total=$(grep -o '"total_bytes":[0-9]*' <<<"$json" | cut -d: -f2)
awk -v f="$fetched" -v t="$total" -v m="$mount_s" 'BEGIN {
  printf "\nfetched %d of the checkpoint'"'"'s %d bytes (%.1f%%); the mount was ready after %s s\n",
         f, t, 100 * f / t, m }'
echo "(everything under $work is removed now)"
