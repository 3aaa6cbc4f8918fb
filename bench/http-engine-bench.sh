#!/usr/bin/env bash
# The fetch engine over the HTTP source against a single `curl -o /dev/null`
# of the same file, in one run, over a throwaway nginx on 127.0.0.1 (its own
# config, logs and file under a temporary directory, removed at exit; the
# machine's nginx is not touched). Usage:
# bench/http-engine-bench.sh [SIZE_MIB] [BLOCK_SIZE...]
# Prints the engine's JSON, a summary, and the body bytes nginx sent.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-256}
shift || true
blocks=("$@")
((${#blocks[@]})) || blocks=(128K)

work=$(mktemp -d /var/tmp/lazyfs-http-bench.XXXXXX)
nginx_pid=
cleanup() {
  [[ -n $nginx_pid ]] && kill "$nginx_pid" 2>/dev/null && wait "$nginx_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

mkdir -p "$work/www" "$work/tmp"
port=$(( (RANDOM % 20000) + 30000 ))
user_line=
((EUID == 0)) && user_line="user root;"
cat >"$work/nginx.conf" <<CONF
$user_line
master_process off;
pid $work/nginx.pid;
error_log $work/error.log;
events { worker_connections 256; }
http {
    default_type application/octet-stream;
    sendfile on;
    client_body_temp_path $work/tmp/client_body;
    proxy_temp_path $work/tmp/proxy;
    fastcgi_temp_path $work/tmp/fastcgi;
    uwsgi_temp_path $work/tmp/uwsgi;
    scgi_temp_path $work/tmp/scgi;
    log_format bytes '\$connection \$status \$body_bytes_sent';
    access_log $work/access.log bytes;
    server {
        listen 127.0.0.1:$port;
        root $work/www;
    }
}
CONF
/usr/sbin/nginx -p "$work/" -e "$work/error.log" -c "$work/nginx.conf" -g 'daemon off;' &
nginx_pid=$!
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

head -c $((size_mib << 20)) /dev/urandom >"$work/www/file.bin"
uri="http://127.0.0.1:$port"

# Cold page cache on the server side for both, where allowed.
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
start=$(date +%s.%N)
curl -s -o /dev/null "$uri/file.bin"
end=$(date +%s.%N)
curl_s=$(awk "BEGIN {print $end - $start}")
: >"$work/access.log"

sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
args=()
for b in "${blocks[@]}"; do args+=(--block-size "$b"); done
"${LAZYFS_BIN_DIR:-build/bin}/lazyfs-engine-bench" --source "$uri" --path /file.bin --cache-dir "$work/cache" \
  --curl-seconds "$curl_s" "${args[@]}"
sleep 0.5
echo "nginx: $(wc -l <"$work/access.log") requests on" \
  "$(awk '{print $1}' "$work/access.log" | sort -u | wc -l) connections," \
  "$(awk '{s += $3} END {print s + 0}' "$work/access.log") body bytes sent"
