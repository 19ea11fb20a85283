#!/usr/bin/env bash
# Writes the profile that optimised builds of veer are compiled with (pgo/veer.profdata; see
# pgo/rustc-wrapper): builds veer instrumented, runs it under a training load, and merges what
# it recorded. Run it again after changing the request path: a function changed since the
# profile was written is compiled without its profile (the build still works, only slower).
#
# The training load: veer with one worker, plain forwarding and with every feature on (cookie
# stickiness, a 1 % shadow), in cleartext and over TLS, each from HTTP/1.1 clients (wrk: GETs,
# then POSTs of 1 KiB) and HTTP/2 clients (h2load: GETs, then POSTs of 1 KiB), 3 s each, over
# the loopback upstreams of loadtest/ (the same 90/10 split as compare.sh). About a minute,
# plus two release builds.
#
# Usage: loadtest/pgo.sh
# Needs: wrk, h2load (nghttp2-client), curl and openssl (installed from Debian's packages when
# missing), and rustup's llvm-tools component (added when missing). Every process is bounded by
# `timeout`; everything listens on 127.0.0.1 (ports PORT_BASE+1 to +3, +40, +41; PORT_BASE
# defaults to 32000).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BASE=${PORT_BASE:-32000}
SECONDS_EACH=${SECONDS_EACH:-3}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

missing=()
for tool in wrk:wrk h2load:nghttp2-client curl:curl openssl:openssl; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
host=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$PROFDATA" ]; then
  rustup component add llvm-tools
fi

echo "== building veer instrumented, and the upstream"
cargo build --release -q -p veer-loadtest --bin upstream
RUSTFLAGS="-Cprofile-generate=$WORK/build-profiles" CARGO_TARGET_DIR="$ROOT/target/pgo-generate" \
  cargo build --release -q -p veer --bin veer
VEER="$ROOT/target/pgo-generate/release/veer"
UPSTREAM="$ROOT/target/release/upstream"

BLUE=$((BASE + 1))
GREEN=$((BASE + 2))
SHADOW=$((BASE + 3))
PORT=$((BASE + 40))
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/both.pem"
head -c 1024 /dev/urandom | base64 -w0 | head -c 1024 >"$WORK/body"
cat >"$WORK/post.lua" <<LUA
wrk.method = "POST"
wrk.body = io.open("$WORK/body"):read("*a")
wrk.headers["Content-Type"] = "application/octet-stream"
LUA
# shellcheck source=proxies.sh
. "$ROOT/loadtest/proxies.sh"

for name in blue:$BLUE green:$GREEN shadow:$SHADOW; do
  timeout 600 "$UPSTREAM" --name "${name%%:*}" --listen "127.0.0.1:${name#*:}" --threads 1 \
    --max-time 590s >/dev/null 2>&1 &
  PIDS+=($!)
done

echo "== training (${SECONDS_EACH}s per load, 16 loads)"
for TLS in 0 1; do
  scheme=http
  [ "$TLS" = 1 ] && scheme=https
  for features in plain full; do
    cookie=()
    [ "$features" = full ] && cookie=(-H "cookie: veer_bench=0123456789abcdef0123456789abcdef")
    veer_toml "$PORT" $((BASE + 41)) "$WORK/state-$TLS-$features" "$features" >"$WORK/veer.toml"
    LLVM_PROFILE_FILE="$WORK/profiles/veer-%p-%m.profraw" timeout 300 "$VEER" run -c "$WORK/veer.toml" \
      >/dev/null 2>"$WORK/veer.log" &
    veer=$!
    for _ in $(seq 100); do
      timeout 5 curl -sfk -o /dev/null "$scheme://127.0.0.1:$PORT/" && break
      sleep 0.1
    done
    url="$scheme://127.0.0.1:$PORT/"
    d=${SECONDS_EACH}
    timeout $((d + 20)) wrk -t1 -c50 -d"${d}s" ${cookie[@]+"${cookie[@]}"} "$url" | grep Requests/sec
    timeout $((d + 20)) wrk -t1 -c50 -d"${d}s" -s "$WORK/post.lua" ${cookie[@]+"${cookie[@]}"} "$url" |
      grep Requests/sec
    timeout $((d + 20)) h2load -c10 -m10 -D "$d" ${cookie[@]+"${cookie[@]}"} "$url" | grep '^requests:'
    timeout $((d + 20)) h2load -c10 -m10 -D "$d" -d "$WORK/body" ${cookie[@]+"${cookie[@]}"} "$url" |
      grep '^requests:'
    # The profile is written as veer exits.
    kill -TERM "$veer"
    wait "$veer"
  done
done

"$PROFDATA" merge -o "$ROOT/pgo/veer.profdata" "$WORK"/profiles/veer-*.profraw
rustc --version >"$ROOT/pgo/rustc-version"
# Cargo checks the profile's date for the project's own crates only (it keeps what it built of
# crates.io's): build everything anew with it.
cargo clean --release -q
echo "== wrote pgo/veer.profdata ($(du -h "$ROOT/pgo/veer.profdata" | cut -f1)) for $(cat "$ROOT/pgo/rustc-version"), at $(git rev-parse --short HEAD)"
echo "   target/release is cleaned: the next \`cargo build --release\` compiles everything with it"
