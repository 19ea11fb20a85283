#!/usr/bin/env bash
# Memory per idle client connection: veer, NGINX and HAProxy with compare.sh's configs (one
# worker each, the same 90/10 split over the same loopback upstreams), each started fresh for
# every measurement, rounds interleaved. A client opens CONNECTIONS keep-alive connections and
# leaves them open: first sending nothing, then after one GET answered on each (one at a time,
# so that the proxy has one upstream connection to keep, not one per client). The proxy's
# resident memory (VmRSS summed over its processes) is read before and after each; the figure
# is the growth divided by CONNECTIONS, in KB. Kernel socket buffers are not in it.
#
# With TLS=1 the connections are HTTPS (ALPN http/1.1; one self-signed P-256 certificate): the
# handshake is done in both cases.
#
# Everything listens on 127.0.0.1 only; every process is started under `timeout`, and
# everything is killed on exit.
#
# Usage: loadtest/idle.sh   (ROUNDS=3 CONNECTIONS=2000; TLS=1 for HTTPS)
# Needs: cargo and python3; installs nginx, haproxy and openssl (and compare.sh's load tools)
# with apt-get when missing.
set -euo pipefail

PROTO=h1
TLS=${TLS:-0}
case "$TLS" in
  0 | 1) ;;
  *) echo "TLS must be 0 or 1, not $TLS" >&2; exit 2 ;;
esac
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-2000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/veer-idle.XXXXXX)
LIFE=$((ROUNDS * 3 * 60 + 120))
PIDS=()
# shellcheck source=common.sh
. "$ROOT/loadtest/common.sh"

# Room for the client's connections and the proxies' (they inherit it; HAProxy wants about
# twice its maxconn).
ulimit -n $((CONNECTIONS * 4 + 2000))
prepare

# The client: opens the connections, reads the proxy's RSS (its PIDs in argv) before, after
# opening and after a GET on each; prints the two figures in bytes per connection.
cat >"$WORK/idle.py" <<'PY'
import socket, ssl, sys, time

port, n, tls, pids = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]

def rss():
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as status:
            total += next(int(l.split()[1]) for l in status if l.startswith("VmRSS:"))
    return total * 1024

def settled():
    time.sleep(1)
    return rss()

context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
context.set_alpn_protocols(["http/1.1"])
base = settled()
conns = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    conns.append(context.wrap_socket(s, server_hostname="localhost") if tls else s)
opened = settled()
# One at a time: the proxy needs one upstream connection, whatever it keeps idle.
for s in conns:
    s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    answer = s.recv(65536)
    if not answer.startswith(b"HTTP/1.1 200"):
        sys.exit(f"not a 200: {answer[:40]!r}")
served = settled()
print((opened - base) / n, (served - base) / n)
PY

start_proxy() {
  local name=$1
  PORT[$name]=$(free_port)
  case "$name" in
    veer)
      veer_toml "${PORT[$name]}" "$(free_port)" "$WORK/$name-state" plain >"$WORK/$name.toml"
      start "$name" "$VEER" run -c "$WORK/$name.toml" ;;
    nginx)
      nginx_conf "${PORT[$name]}" >"$WORK/nginx.conf"
      start "$name" "$NGINX" -e "$WORK/nginx-error.log" -p "$WORK/nginx" -c "$WORK/nginx.conf" ;;
    haproxy)
      haproxy_cfg "${PORT[$name]}" | sed "s/maxconn 4000/maxconn $((CONNECTIONS + 1000))/" \
        >"$WORK/haproxy.cfg"
      start "$name" "$HAPROXY" -db -f "$WORK/haproxy.cfg" ;;
  esac
  wait_port "$name"
}

stop_proxy() {
  kill "${ROOTPID[$1]}" 2>/dev/null || true
  wait "${ROOTPID[$1]}" 2>/dev/null || true
}

RESULTS=$WORK/runs.tsv
: >"$RESULTS"
PROXIES=(veer nginx haproxy)
for round in $(seq "$ROUNDS"); do
  for name in "${PROXIES[@]}"; do
    start_proxy "$name"
    mapfile -t pids < <(proxy_pids "${ROOTPID[$name]}")
    # A client that fails (an answer not a 200) ends the script.
    figures=$(python3 "$WORK/idle.py" "${PORT[$name]}" "$CONNECTIONS" "$TLS" "${pids[@]}")
    read -r opened served <<<"$figures"
    stop_proxy "$name"
    awk -v r="$round" -v n="$name" -v o="$opened" -v s="$served" \
      'BEGIN {printf "%s\t%s\t%.2f\t%.2f\n", r, n, o / 1024, s / 1024}' >>"$RESULTS"
    log "round $round $name: $(tail -1 "$RESULTS" | cut -f3) KB per connection opened, $(tail -1 "$RESULTS" | cut -f4) KB after a GET"
  done
done

declare -A OPENED SERVED
for name in "${PROXIES[@]}"; do
  OPENED[$name]=$(awk -v n="$name" -F'\t' '$2 == n {print $3}' "$RESULTS" | median)
  SERVED[$name]=$(awk -v n="$name" -F'\t' '$2 == n {print $4}' "$RESULTS" | median)
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "-"; else printf "%.2f", a / b }'; }
{
  echo "Medians of $ROUNDS interleaved rounds; $CONNECTIONS idle $([ "$TLS" = 1 ] && echo "HTTPS" || echo "HTTP/1.1") connections to a freshly started proxy; resident memory grown per connection (KB), kernel buffers not included."
  echo
  echo "| proxy | opened, nothing sent | after one GET each |"
  echo "|---|---:|---:|"
  for name in "${PROXIES[@]}"; do
    echo "| $name | ${OPENED[$name]} | ${SERVED[$name]} |"
  done
  echo
  for peer in nginx haproxy; do
    echo "veer / $peer: $(ratio "${OPENED[veer]}" "${OPENED[$peer]}") opened, $(ratio "${SERVED[veer]}" "${SERVED[$peer]}") after a GET."
  done
  echo
  echo "Every run:"
  echo
  echo "| round | proxy | opened KB | after a GET KB |"
  echo "|---:|---|---:|---:|"
  awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$RESULTS"
} | tee "$WORK/table.md"
TABLE=idle
[ "$TLS" = 1 ] && TABLE=$TABLE-tls
mkdir -p "$OUT"
cp "$WORK/table.md" "$OUT/$TABLE.md"
log "table written to loadtest/results/$TABLE.md"
