#!/usr/bin/env bash
# User-space instructions per request of a veer build, counted by valgrind's callgrind: exact
# and repeatable where seconds are not (the benchmark machines have no hardware counters, and
# their wall clock swings by ±30 % from round to round). Runs the build (one worker, plain
# forwarding, 90/10 split over two loopback upstreams) under callgrind, sends N requests with
# h2load and stops it, at two N; the difference over the requests between them is the cost per
# request, start and shutdown cancelling out. Kernel work (system calls) is not counted.
# `nginx` and `haproxy` in place of a BIN count those (Debian's, one worker, the same split as
# in compare.sh), so that veer can be set against them where seconds cannot tell.
#
# Usage: loadtest/instructions.sh BIN [BIN...]            HTTP/1.1 clients (h2load --h1 -c10)
#        loadtest/instructions.sh BIN nginx haproxy       veer and the peers
#        PROTO=h2 loadtest/instructions.sh BIN [BIN...]   HTTP/2 clients (h2load -c10 -m10)
#        FEATURES=full loadtest/instructions.sh BIN...    every feature on: cookie stickiness (a
#                                                         returning user's cookie on every
#                                                         request) and a 1 % shadow to a third
#                                                         upstream
#        FEATURES=new loadtest/instructions.sh BIN...     the same, with a new visitor (no
#                                                         cookie, a Set-Cookie answered) on
#                                                         every request, as h2load sends in
#                                                         compare.sh
#        CALLGRIND_OUT=DIR ...                            keeps each run's callgrind counts in
#                                                         DIR, for callgrind_annotate
# Needs: valgrind, h2load, curl, `cargo build --release -p veer-loadtest` (the upstream), and
# nginx and haproxy to count them.
# A run whose answers are not all 2xx is refused: it would count veer's error path instead.
# Every process is bounded by `timeout`; everything listens on 127.0.0.1 (ports PORT_BASE+1,
# +2, +3, +40, +41; PORT_BASE defaults to 31000). The proxy's port answers every request of a
# run, peers included.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
UPSTREAM="$ROOT/target/release/upstream"
BASE=${PORT_BASE:-31000}
if [ ! -x "$UPSTREAM" ]; then
  echo "$UPSTREAM not found: run \`cargo build --release -p veer-loadtest\` first" >&2
  exit 2
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The proxies, as compare.sh sets them up (NGINX as one process, so that callgrind sees it all).
BLUE=$((BASE + 1))
GREEN=$((BASE + 2))
SHADOW=$((BASE + 3))
TLS=0
PROTO=${PROTO:-h1}
# shellcheck source=proxies.sh
. "$ROOT/loadtest/proxies.sh"
COOKIE=()
case "${FEATURES:-plain}" in
  plain) ;;
  full) COOKIE=(-H "cookie: veer_bench=0123456789abcdef0123456789abcdef") ;;
  new) ;;
  *) echo "FEATURES must be plain, full or new, not $FEATURES" >&2; exit 2 ;;
esac
features=${FEATURES:-plain}
[ "$features" = new ] && features=full
veer_toml $((BASE + 40)) $((BASE + 41)) "$WORK/state" "$features" >"$WORK/veer.toml"
nginx_conf $((BASE + 40)) "master_process off;" >"$WORK/nginx.conf"
haproxy_cfg $((BASE + 40)) >"$WORK/haproxy.cfg"

if [ "$PROTO" = h2 ]; then
  CLIENT=(-c 10 -m 10)
  CURL=(--http2-prior-knowledge)
else
  CLIENT=(--h1 -c 10)
  CURL=(--http1.1)
fi

# The command line of a proxy: a veer build, or a peer by name.
proxy_command() {
  case "$1" in
    nginx) echo "$(command -v nginx || echo /usr/sbin/nginx) -e $WORK/nginx-error.log -p $WORK/nginx -c $WORK/nginx.conf" ;;
    haproxy) echo "$(command -v haproxy || echo /usr/sbin/haproxy) -db -f $WORK/haproxy.cfg" ;;
    *) echo "$1 run -c $WORK/veer.toml" ;;
  esac
}

# The instructions of one run of $1 serving $2 requests, start and shutdown included.
run() {
  local bin=$1 requests=$2 u1 u2 u3 proxy
  timeout 300 "$UPSTREAM" --name blue --listen "127.0.0.1:$BLUE" --threads 1 \
    --max-time 280s >/dev/null 2>&1 &
  u1=$!
  timeout 300 "$UPSTREAM" --name green --listen "127.0.0.1:$GREEN" --threads 1 \
    --max-time 280s >/dev/null 2>&1 &
  u2=$!
  timeout 300 "$UPSTREAM" --name shadow --listen "127.0.0.1:$SHADOW" --threads 1 \
    --max-time 280s >/dev/null 2>&1 &
  u3=$!
  rm -rf "$WORK/state" "$WORK/cg.out"
  # shellcheck disable=SC2046 # the command line is split on purpose
  timeout 300 valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" \
    $(proxy_command "$bin") >/dev/null 2>"$WORK/valgrind.log" &
  proxy=$!
  for _ in $(seq 150); do
    curl -sf "${CURL[@]}" -o /dev/null "http://127.0.0.1:$((BASE + 40))/" && break
    sleep 0.2
  done
  timeout 120 h2load "${CLIENT[@]}" ${COOKIE[@]+"${COOKIE[@]}"} -n "$requests" "http://127.0.0.1:$((BASE + 40))/" \
    >"$WORK/h2load.out" || true
  # valgrind passes SIGINT on: the proxy stops (veer drains first), and callgrind writes its counts.
  kill -INT "$proxy"
  wait "$proxy" || true
  kill "$u1" "$u2" "$u3" 2>/dev/null || true
  wait "$u1" "$u2" "$u3" 2>/dev/null || true
  if ! grep -q "^status codes: $requests 2xx" "$WORK/h2load.out"; then
    echo "$bin: not every one of the $requests answers was 2xx:" >&2
    grep -E '^(requests|status codes):' "$WORK/h2load.out" >&2
    exit 1
  fi
  awk '/^summary:/ {print $2}' "$WORK/cg.out"
  if [ -n "${CALLGRIND_OUT:-}" ]; then
    mkdir -p "$CALLGRIND_OUT"
    cp "$WORK/cg.out" "$CALLGRIND_OUT/$(basename "$bin")-$PROTO-${FEATURES:-plain}-$requests.out"
  fi
}

for bin in "$@"; do
  case "$bin" in
    nginx | haproxy)
      if [ "${FEATURES:-plain}" != plain ]; then
        echo "FEATURES=$FEATURES is veer's alone: count $bin with plain forwarding" >&2
        exit 2
      fi
      ;;
    *) bin=$(realpath "$bin") ;;
  esac
  small=$(run "$bin" 2000)
  large=$(run "$bin" 22000)
  echo "$bin: $(((large - small) / 20000)) user-space instructions per request ($PROTO, ${FEATURES:-plain})"
done
