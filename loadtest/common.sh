# Helpers shared by compare.sh and idle.sh (sourced, not run): cleanup on exit, tool installs,
# free ports, background processes under `timeout`, their PIDs, CPU and memory, and the
# upstreams.
#
# The caller sets ROOT (the repository), WORK (a scratch directory, removed on exit), LIFE (the
# longest any process started here may live, in seconds) and PIDS=(). `http_status` and
# `prepare` read PROTO and TLS. Sets TARGET (cargo's target dir) and OUT (where tables go), and
# brings in proxies.sh (the proxies' configs).

# shellcheck source=proxies.sh
. "$ROOT/loadtest/proxies.sh"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$ROOT/loadtest/results

cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "== $*" >&2; }

install_missing() {
  local need=()
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
  command -v wrk >/dev/null || need+=(wrk)
  command -v h2load >/dev/null || need+=(nghttp2-client)
  command -v curl >/dev/null || need+=(curl)
  command -v openssl >/dev/null || need+=(openssl)
  [ ${#need[@]} -eq 0 ] && return
  log "installing ${need[*]}"
  # Keep the packages from starting their system services (they would listen on port 80 of
  # every interface): a policy-rc.d that refuses, only for the time of the install.
  local policy=/usr/sbin/policy-rc.d created=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [ -n "$created" ]; then
    rm -f "$policy"
  fi
}

# A free loopback TCP port, not handed out before by this script, below the kernel's range of
# ephemeral ports: one in that range may be the local end of some client's connection (wrk's,
# a proxy's to an upstream), which a connect cannot see but which makes the bind fail.
TAKEN=" "
EPHEMERAL_LOW=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
PORT_LOW=10000
[ "$EPHEMERAL_LOW" -gt $((PORT_LOW + 1000)) ] || PORT_LOW=1024
if [ "$EPHEMERAL_LOW" -le $((PORT_LOW + 100)) ]; then
  # Hardly a port below the range: take any, as a connect can tell.
  PORT_LOW=20000
  EPHEMERAL_LOW=60000
fi
free_port() {
  local port
  while :; do
    port=$((PORT_LOW + RANDOM % (EPHEMERAL_LOW - PORT_LOW)))
    case "$TAKEN" in *" $port "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      TAKEN="$TAKEN$port "
      echo "$port"
      return
    fi
  done
}

# Starts a command under `timeout` in the background; its PID (timeout's) goes to PIDS and
# to ROOTPID[name].
declare -A PORT ROOTPID
start() {
  local name=$1
  shift
  timeout "$LIFE" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  PIDS+=($!)
  ROOTPID[$name]=$!
}

# Waits for `name` to listen on its port; shows its log when it does not.
wait_port() {
  local name=$1 i
  for i in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/${PORT[$name]}") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$name does not listen on 127.0.0.1:${PORT[$name]}:" >&2
  tail -20 "$WORK/$name.err" >&2 || true
  return 1
}

# The PIDs of a process and all its descendants.
tree() {
  local pid=$1 child
  echo "$pid"
  for child in $(pgrep -P "$pid" || true); do
    tree "$child"
  done
}

# The proxy's own processes: the tree under timeout's PID, without timeout itself.
proxy_pids() { tree "$1" | tail -n +2; }

# utime + stime, in clock ticks, summed over PIDs.
cpu_ticks() {
  local total=0 pid stat fields
  for pid in "$@"; do
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    # After "pid (comm) ", the words start at field 3 (state): utime (14) and stime (15) are
    # words 11 and 12 from 0.
    read -ra fields <<<"${stat##*) }"
    total=$((total + fields[11] + fields[12]))
  done
  echo "$total"
}

# The status code of GET / on a loopback port, in the clients' protocol.
http_status() {
  local status
  if [ "$TLS" = 1 ]; then
    local version=--http1.1
    [ "$PROTO" = h2 ] && version=--http2
    timeout 10 curl -sk "$version" -o /dev/null -w '%{http_code}' "https://127.0.0.1:$1/" || true
    return
  fi
  if [ "$PROTO" = h2 ]; then
    timeout 10 h2load -n 1 -c 1 "http://127.0.0.1:$1/" 2>/dev/null |
      awk '/^status codes:/ {if ($3 + 0 == 1) print 200; else print "not 200"}'
    return
  fi
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
  status=$(head -1 <&3 | awk '{print $2}')
  exec 3<&-
  echo "$status"
}

# Peak resident set (VmHWM, kB) summed over PIDs.
peak_rss_kb() {
  local total=0 pid kb
  for pid in "$@"; do
    kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$((total + ${kb:-0}))
  done
  echo "$total"
}

# wrk's latency figures in ms.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
    printf "%.3f", n
  }'
}

median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

upstream() {
  local name=$1
  PORT[$name]=$(free_port)
  start "$name" "$UPSTREAM" --name "$name" --listen "127.0.0.1:${PORT[$name]}" --threads 1 \
    --max-time "${LIFE}s"
  wait_port "$name"
}

# Installs what is missing, builds veer and the upstream (release), starts the upstreams blue,
# green and shadow (their ports in BLUE, GREEN and SHADOW) and, with TLS=1, makes the one
# certificate every proxy uses ($WORK/cert.pem, key.pem and both.pem). Sets NGINX, HAPROXY,
# VEER and UPSTREAM.
prepare() {
  install_missing
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
  HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
  log "building veer (release)"
  (cd "$ROOT" && cargo build --release -q -p veer -p veer-loadtest)
  VEER=$TARGET/release/veer
  UPSTREAM=$TARGET/release/upstream
  upstream blue
  upstream green
  upstream shadow
  BLUE=${PORT[blue]}
  GREEN=${PORT[green]}
  SHADOW=${PORT[shadow]}
  log "upstreams: blue :$BLUE, green :$GREEN, shadow :$SHADOW"
  if [ "$TLS" = 1 ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
      -subj /CN=localhost -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
    cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/both.pem"
  fi
}
