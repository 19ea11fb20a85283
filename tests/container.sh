#!/usr/bin/env bash
# Builds the image from the Dockerfile and checks it as a user would run it: config check exit
# codes, the health check, the non-root user, proxying, hot reload through a mounted config
# directory and through a single-file mount, state written to the volume and restored on
# restart, and a clean stop on SIGTERM.
#
#   bash tests/container.sh            # needs a Docker engine (Linux: uses --network host)
#   BUILD_FLAGS="--network host" bash tests/container.sh   # extra `docker build` flags
#
# Every wait is bounded; the script removes what it made. Exit 0 when every check passed.
set -euo pipefail

docker=${DOCKER:-docker}
image=${IMAGE:-veer:check}
name=veer-check-$$
volume=veer-check-$$
work=$(mktemp -d)
failures=0

cleanup() {
    "$docker" rm -f "$name" >/dev/null 2>&1 || true
    "$docker" volume rm "$volume" >/dev/null 2>&1 || true
    [ -n "${upstream_pid:-}" ] && kill "$upstream_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

check() { # check DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@"; then
        echo "ok   $what"
    else
        echo "FAIL $what"
        failures=$((failures + 1))
    fi
}

until_true() { # until_true SECONDS COMMAND...: polls every 0.2 s
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

cd "$(dirname "$0")/.."
echo "building $image"
# shellcheck disable=SC2086 # BUILD_FLAGS is a list of flags
"$docker" build -q ${BUILD_FLAGS:-} -t "$image" . >/dev/null

upstream_port=$(free_port)
proxy_port=$(free_port)
mkdir -p "$work/www" "$work/conf" "$work/single"
echo hello >"$work/www/index.html"
python3 -m http.server "$upstream_port" --bind 127.0.0.1 --directory "$work/www" \
    >/dev/null 2>&1 &
upstream_pid=$!

write_config() { # write_config FILE GREEN_VERSION
    cat >"$1" <<EOF
[server]
listen = ["127.0.0.1:$proxy_port"]

[admin]
listen = "127.0.0.1:9901"

[state]
dir = "/var/lib/veer"

[[route]]
name = "app"

[route.blue]
endpoints = ["127.0.0.1:$upstream_port"]
version = "v1"

[route.green]
endpoints = ["127.0.0.1:$upstream_port"]
version = "$2"
EOF
}
write_config "$work/conf/veer.toml" v1

run() { "$docker" run "$@"; }
admin() { curl -sf "http://127.0.0.1:9901/api/v1/routes/app"; }
green_is() { admin | grep -q "\"green\": \"$1\""; }
healthy() { [ "$("$docker" inspect -f '{{.State.Health.Status}}' "$name")" = healthy ]; }
logs_have() { "$docker" logs "$name" 2>&1 | grep -q "$1"; }

check "veer check accepts a valid config (exit 0)" \
    run --rm -v "$work/conf:/etc/veer:ro" "$image" check -c /etc/veer/veer.toml
echo 'unknown_key = 1' >"$work/single/bad.toml"
status=0
run --rm -v "$work/single:/etc/veer:ro" "$image" check -c /etc/veer/bad.toml >/dev/null 2>&1 ||
    status=$?
check "veer check rejects a bad config (exit 1)" [ "$status" = 1 ]

start() { # start MOUNT...
    run -d --name "$name" --network host "$@" -v "$volume:/var/lib/veer" "$image" >/dev/null
}

start -v "$work/conf:/etc/veer:ro"
check "the health check reports healthy" until_true 40 healthy
check "veer runs as uid 65532" \
    [ "$("$docker" top "$name" -o pid,uid | awk 'NR == 2 { print $2 }')" = 65532 ]
check "requests are proxied" until_true 5 curl -sf "http://127.0.0.1:$proxy_port/"

# An editor's save: a new file renamed over the old one.
write_config "$work/conf/veer.toml.new" v2
mv "$work/conf/veer.toml.new" "$work/conf/veer.toml"
check "a renamed-over config in the mounted directory is reloaded" until_true 10 green_is v2
check "the rollout starts on the new green version" until_true 5 logs_have 'action="start"'
check "the journal is written to the state volume" \
    "$docker" cp "$name:/var/lib/veer/journal.jsonl" "$work/journal.jsonl"

"$docker" restart -t 40 "$name" >/dev/null
check "the rollout state is restored after a restart" \
    until_true 20 logs_have 'Rollout state restored.*phase="ramping"'

"$docker" stop -t 40 "$name" >/dev/null
check "SIGTERM stops veer with exit code 0" \
    [ "$("$docker" inspect -f '{{.State.ExitCode}}' "$name")" = 0 ]
"$docker" rm "$name" >/dev/null

# A single-file mount: the container keeps the inode, so only writes into it are seen.
write_config "$work/single/veer.toml" v2
start -v "$work/single/veer.toml:/etc/veer/veer.toml:ro"
check "the single-file mount starts healthy" until_true 40 healthy
write_config "$work/single/veer.toml" v3 # truncates and writes the same inode
check "a write into a single-file mount is reloaded" until_true 10 green_is v3
"$docker" stop -t 40 "$name" >/dev/null

if [ "$failures" -gt 0 ]; then
    echo "$failures check(s) failed"
    exit 1
fi
echo "all container checks passed"
