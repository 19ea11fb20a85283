#!/usr/bin/env bash
# The peer comparison: veer, NGINX and HAProxy with the same 90/10 split over the same two
# loopback upstreams, one worker each, keep-alive on both sides; and veer with every feature on
# (cookie stickiness, 1 % shadow to a third upstream, the admin API scraped every second)
# against veer doing plain forwarding. wrk runs against each in turn, interleaved, several
# rounds; the script prints the medians and veer's ratios, and writes the same table to
# loadtest/results/compare.md.
#
# With PROTO=h2 the clients speak HTTP/2 (cleartext, prior knowledge) instead: h2load with
# CONNECTIONS connections of STREAMS concurrent streams each, every proxy still speaking
# HTTP/1.1 to the upstreams; the table goes to loadtest/results/compare-h2.md. h2load sends the
# same head every time, so veer-full sees a new visitor (and sets a cookie) on every request.
#
# With TLS=1 every proxy terminates TLS (one self-signed P-256 certificate made here with
# openssl; ALPN offers h2 and http/1.1): wrk and h2load connect over https, keep-alive, so
# the figures are of the encrypted exchange, not of handshakes.
#
# Everything listens on 127.0.0.1 only; every process is started under `timeout`, every wrk
# run is bounded, and everything is killed on exit.
#
# Usage: loadtest/compare.sh            (ROUNDS=3 DURATION=10 CONNECTIONS=50 WARMUP=2)
#        PROTO=h2 loadtest/compare.sh   (CONNECTIONS=10 STREAMS=10)
#        TLS=1 loadtest/compare.sh, TLS=1 PROTO=h2 loadtest/compare.sh
# Needs: cargo; installs nginx, haproxy, wrk, h2load (nghttp2-client), curl and openssl with
# apt-get when they are missing.
set -euo pipefail

PROTO=${PROTO:-h1}
case "$PROTO" in
  h1) DEFAULT_CONNECTIONS=50 ;;
  h2) DEFAULT_CONNECTIONS=10 ;;
  *) echo "PROTO must be h1 or h2, not $PROTO" >&2; exit 2 ;;
esac
TLS=${TLS:-0}
case "$TLS" in
  0) SCHEME=http ;;
  1) SCHEME=https ;;
  *) echo "TLS must be 0 or 1, not $TLS" >&2; exit 2 ;;
esac
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-$DEFAULT_CONNECTIONS}
STREAMS=${STREAMS:-10}
WARMUP=${WARMUP:-2}
USERS=${USERS:-10000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/veer-compare.XXXXXX)
# Upper bound on the life of every server started here.
LIFE=$((ROUNDS * 4 * (DURATION + WARMUP + 10) + 120))
PIDS=()

# shellcheck source=common.sh
. "$ROOT/loadtest/common.sh"

prepare
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------- proxies
declare -A ADMIN

start_veer() {
  local name=$1 features=$2
  PORT[$name]=$(free_port)
  ADMIN[$name]=$(free_port)
  veer_toml "${PORT[$name]}" "${ADMIN[$name]}" "$WORK/$name-state" "$features" >"$WORK/$name.toml"
  "$VEER" check -c "$WORK/$name.toml" >/dev/null
  start "$name" "$VEER" run -c "$WORK/$name.toml"
  wait_port "$name"
}

start_veer veer plain
start_veer veer-full full

PORT[nginx]=$(free_port)
nginx_conf "${PORT[nginx]}" >"$WORK/nginx.conf"
start nginx "$NGINX" -e "$WORK/nginx-error.log" -p "$WORK/nginx" -c "$WORK/nginx.conf"
wait_port nginx

PORT[haproxy]=$(free_port)
haproxy_cfg "${PORT[haproxy]}" >"$WORK/haproxy.cfg"
start haproxy "$HAPROXY" -db -f "$WORK/haproxy.cfg"
wait_port haproxy

# Returning users: each request carries one of $USERS veer-style cookie ids (32 hex digits),
# the same for every proxy (only veer-full reads it).
cat >"$WORK/users.lua" <<EOF
local requests, n, i = {}, $USERS, 0
init = function(args)
  math.randomseed(42)
  for k = 1, n do
    local id = string.format("%08x%08x%08x%08x", math.random(0, 0x7fffffff),
      math.random(0, 0x7fffffff), math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
    requests[k] = wrk.format("GET", "/", { ["Cookie"] = "veer_bench=" .. id })
  end
end
request = function()
  i = i % n + 1
  return requests[i]
end
EOF

# The admin API scraped once a second while veer-full is measured (telemetry in use).
scrape() {
  local end=$((SECONDS + DURATION))
  while [ $SECONDS -lt $end ]; do
    exec 3<>"/dev/tcp/127.0.0.1/${ADMIN[veer-full]}" || return 0
    printf 'GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n' >&3
    cat <&3 >/dev/null
    exec 3<&-
    sleep 1
  done
}

# ---------------------------------------------------------------- runs
RESULTS=$WORK/runs.tsv
: >"$RESULTS"
PROXIES=(veer nginx haproxy veer-full)
for name in "${PROXIES[@]}"; do
  status=$(http_status "${PORT[$name]}")
  log "$name on :${PORT[$name]} answers $status"
  if [ "$status" != 200 ]; then
    echo "$name does not answer 200; logs in $WORK/$name.err" >&2
    cat "$WORK/$name.err" >&2 || true
    exit 1
  fi
done

url() { echo "$SCHEME://127.0.0.1:${PORT[$1]}/"; }

# Instructions per request (user + kernel, counted by perf for the proxy's processes) do not
# move with the machine's noise as seconds do; measured when perf can count here.
PERF=""
if command -v perf >/dev/null && perf stat -e instructions true >/dev/null 2>&1; then
  PERF=1
else
  log "perf cannot count instructions here: that column stays empty"
fi

# A warm-up run against `name`, its output thrown away.
warm() {
  if [ "$PROTO" = h2 ]; then
    timeout $((WARMUP + 10)) h2load -c"$CONNECTIONS" -m"$STREAMS" -D"$WARMUP" "$(url "$1")" >/dev/null
  else
    timeout $((WARMUP + 10)) wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" -s "$WORK/users.lua" "$(url "$1")" >/dev/null
  fi
}

# The measured run against `name`: sets rps, requests, p50, p99 (ms) and errors (failed
# requests, socket errors and answers other than 2xx).
measure() {
  if [ "$PROTO" = h2 ]; then
    rm -f "$WORK/h2.log"
    timeout $((DURATION + 15)) h2load -c"$CONNECTIONS" -m"$STREAMS" -D"$DURATION" \
      --log-file="$WORK/h2.log" "$(url "$1")" >"$WORK/h2load.out"
    rps=$(awk '/^finished in/ {print $4}' "$WORK/h2load.out")
    requests=$(awk '/^requests:/ {print $2}' "$WORK/h2load.out")
    errors=$(awk '/^requests:/ {failed = $2 - $8} /^status codes:/ {other = $5 + $7 + $9}
      END {print failed + other}' "$WORK/h2load.out")
    # Per-request times (µs, third column of the log), sorted once for both quantiles.
    cut -f3 "$WORK/h2.log" | sort -n >"$WORK/h2.sorted"
    p50=$(quantile_ms 0.50 "$WORK/h2.sorted")
    p99=$(quantile_ms 0.99 "$WORK/h2.sorted")
  else
    timeout $((DURATION + 15)) wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 5s --latency \
      -s "$WORK/users.lua" "$(url "$1")" >"$WORK/wrk.out"
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$WORK/wrk.out")
    requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
    p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$WORK/wrk.out")")
    p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$WORK/wrk.out")")
    errors=$(awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(/,/, ""); n += $4 + $6 + $8 + $10} END {print n + 0}' "$WORK/wrk.out")
  fi
}

# The q-quantile (nearest rank) of a sorted file of microseconds, in ms.
quantile_ms() {
  awk -v q="$1" '{v[NR] = $1} END {
    if (NR == 0) {print "nan"; exit}
    r = int(q * NR + 0.999999); if (r < 1) r = 1
    printf "%.3f", v[r] / 1000
  }' "$2"
}

for round in $(seq "$ROUNDS"); do
  for name in "${PROXIES[@]}"; do
    warm "$name"
    mapfile -t pids < <(proxy_pids "${ROOTPID[$name]}")
    before=$(cpu_ticks "${pids[@]}")
    scraper=""
    if [ "$name" = veer-full ]; then
      scrape &
      scraper=$!
    fi
    counter=""
    if [ -n "$PERF" ]; then
      perf stat -x, -e instructions -p "$(IFS=,; echo "${pids[*]}")" -o "$WORK/perf.out" \
        -- sleep $((DURATION + 1)) 2>/dev/null &
      counter=$!
    fi
    # Sets rps, requests, p50, p99 and errors.
    measure "$name"
    after=$(cpu_ticks "${pids[@]}")
    kinstr="-"
    if [ -n "$counter" ]; then
      wait "$counter" || true
      kinstr=$(awk -F, -v n="$requests" \
        '$3 ~ /^instructions/ && $1 + 0 > 0 && n > 0 {printf "%.1f", $1 / n / 1000; found = 1}
         END {if (!found) print "-"}' "$WORK/perf.out")
    fi
    if [ -n "$scraper" ]; then
      wait "$scraper"
    fi
    cpu_us=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$requests" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$rps" "$p50" "$p99" "$cpu_us" "$requests" "$errors" "$kinstr" >>"$RESULTS"
    log "round $round $name: $rps req/s, p50 $p50 ms, p99 $p99 ms, $cpu_us us CPU/request, $kinstr k instructions/request, $errors errors"
  done
done

# ---------------------------------------------------------------- summary
declare -A RPS P50 P99 CPU INS RSS ERR
for name in "${PROXIES[@]}"; do
  col() { awk -v n="$name" -v c="$1" -F'\t' '$2 == n {print $c}' "$RESULTS" | median; }
  RPS[$name]=$(col 3)
  P50[$name]=$(col 4)
  P99[$name]=$(col 5)
  CPU[$name]=$(col 6)
  INS[$name]=$(awk -v n="$name" -F'\t' '$2 == n && $9 != "-" {print $9}' "$RESULTS" | median)
  [ "${INS[$name]}" != nan ] || INS[$name]="-"
  ERR[$name]=$(awk -v n="$name" -F'\t' '$2 == n {s += $8} END {print s + 0}' "$RESULTS")
  mapfile -t pids < <(proxy_pids "${ROOTPID[$name]}")
  RSS[$name]=$(awk -v kb="$(peak_rss_kb "${pids[@]}")" 'BEGIN {printf "%.1f", kb / 1024}')
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "-"; else printf "%.2f", a / b }'; }
# The median over rounds of one round's ratio a/b in column c: the two runs of a round are
# seconds apart, so a slow or fast stretch of the machine weighs on both.
round_ratio() {
  awk -F'\t' -v a="$1" -v b="$2" -v c="$3" '$2 == a {x[$1] = $c} $2 == b {y[$1] = $c}
    END {for (r in x) if ((r in y) && y[r] + 0 > 0) print x[r] / y[r]}' "$RESULTS" |
    median | awk '{ if ($1 == "nan") print "-"; else printf "%.2f", $1 }'
}

{
  if [ "$PROTO" = h2 ]; then
    echo "Medians of $ROUNDS interleaved rounds; HTTP/2 clients ($([ "$TLS" = 1 ] && echo "TLS, ALPN h2" || echo "cleartext, prior knowledge")): h2load -c$CONNECTIONS -m$STREAMS -D$DURATION, ${WARMUP}s warm-up per run; quantiles from h2load's per-request log."
  else
    echo "Medians of $ROUNDS interleaved rounds;$([ "$TLS" = 1 ] && echo " HTTP/1.1 over TLS,") wrk -t1 -c$CONNECTIONS -d${DURATION}s --latency, $USERS returning users (cookie), ${WARMUP}s warm-up per run."
  fi
  echo
  echo "| proxy | req/s | p50 ms | p99 ms | CPU µs/request | k instructions/request | peak RSS MiB | errors (all rounds) |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  for name in "${PROXIES[@]}"; do
    echo "| $name | ${RPS[$name]} | ${P50[$name]} | ${P99[$name]} | ${CPU[$name]} | ${INS[$name]} | ${RSS[$name]} | ${ERR[$name]} |"
  done
  echo
  echo "| ratio | req/s | p50 | p99 | CPU/request | instructions/request | peak RSS | req/s, round by round | p99, round by round |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for pair in "veer nginx" "veer haproxy" "veer-full veer"; do
    set -- $pair
    echo "| $1 / $2 | $(ratio "${RPS[$1]}" "${RPS[$2]}") | $(ratio "${P50[$1]}" "${P50[$2]}") | $(ratio "${P99[$1]}" "${P99[$2]}") | $(ratio "${CPU[$1]}" "${CPU[$2]}") | $(ratio "${INS[$1]}" "${INS[$2]}") | $(ratio "${RSS[$1]}" "${RSS[$2]}") | $(round_ratio "$1" "$2" 3) | $(round_ratio "$1" "$2" 5) |"
  done
  echo
  echo "Ratios are of the medians above; the last two columns are the medians of each round's own ratio."
  echo
  echo "Every run:"
  echo
  echo "| round | proxy | req/s | p50 ms | p99 ms | CPU µs/request | k instructions/request | requests | errors |"
  echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|"
  awk -F'\t' '{printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $9, $7, $8}' "$RESULTS"
} | tee "$WORK/table.md"
# Sanity check of the split: what the upstreams served (all proxies and warm-ups together).
for name in blue green shadow; do
  kill "${ROOTPID[$name]}" 2>/dev/null || true
  wait "${ROOTPID[$name]}" 2>/dev/null || true
done
served() { awk '/^served/ {print $2}' "$WORK/$1.err"; }
{
  echo
  echo "Upstreams served: blue $(served blue), green $(served green) ($(awk -v b="$(served blue)" -v g="$(served green)" 'BEGIN {printf "%.2f", 100 * g / (b + g)}') % green), shadow $(served shadow) (veer-full mirrors 1 %)."
} | tee -a "$WORK/table.md"
TABLE=compare
[ "$PROTO" = h2 ] && TABLE=$TABLE-h2
[ "$TLS" = 1 ] && TABLE=$TABLE-tls
TABLE=$TABLE.md
mkdir -p "$OUT"
cp "$WORK/table.md" "$OUT/$TABLE"
log "table written to loadtest/results/$TABLE"
