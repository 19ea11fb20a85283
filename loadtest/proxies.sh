# The proxies' configs, shared by compare.sh and instructions.sh (sourced, not run): veer,
# NGINX and HAProxy with one worker, keep-alive on both sides and the same 90/10 split over two
# loopback upstreams.
#
# All read: WORK (a scratch directory), BLUE, GREEN and SHADOW (the upstreams' ports), PROTO
# (h1 or h2) and TLS (0 or 1; with 1, $WORK/cert.pem, $WORK/key.pem and $WORK/both.pem must
# exist).

# veer's config listening on 127.0.0.1:$1, its admin API on 127.0.0.1:$2, its state in $3, on
# stdout. $4 is `plain` (plain forwarding) or `full` (cookie stickiness and a 1 % shadow).
veer_toml() {
  local port=$1 admin=$2 state=$3 features=$4 tls="" sticky='by = "none"' shadow=""
  [ "$TLS" = 1 ] && tls="tls = { cert = \"$WORK/cert.pem\", key = \"$WORK/key.pem\" }"
  if [ "$features" = full ]; then
    sticky='by = "cookie"
cookie = "veer_bench"'
    shadow="[route.shadow]
endpoints = [\"127.0.0.1:$SHADOW\"]
percent = 1"
  fi
  cat <<EOF
[server]
listen = ["127.0.0.1:$port"]
workers = 1
idle_timeout = "120s"
upstream_idle_timeout = "60s"
$tls
[admin]
listen = "127.0.0.1:$admin"
[state]
dir = "$state"

[[route]]
name = "bench"
[route.blue]
endpoints = ["127.0.0.1:$BLUE"]
version = "v1"
[route.green]
endpoints = ["127.0.0.1:$GREEN"]
version = "v2"
[route.sticky]
$sticky
[route.rollout]
mode = "manual"
weight = 10
$shadow
EOF
}

# nginx.conf listening on 127.0.0.1:$1, on stdout; $2 is put first (e.g. "master_process
# off;" to run it as one process under valgrind). Its temp paths are under $WORK/nginx.
nginx_conf() {
  local port=$1 first=${2:-} listen=""
  [ "$PROTO" = h2 ] && listen+=" http2"
  [ "$TLS" = 1 ] && listen+=" ssl;
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem"
  mkdir -p "$WORK/nginx"
  cat <<EOF
$first
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  keepalive_timeout 120s;
  keepalive_requests 1000000;
  split_clients "\${request_id}" \$slot {
    10% green;
    *   blue;
  }
  upstream blue  { server 127.0.0.1:$BLUE;  keepalive 64; keepalive_requests 1000000; }
  upstream green { server 127.0.0.1:$GREEN; keepalive 64; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$port$listen;
    location / {
      proxy_pass http://\$slot;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
    }
  }
}
EOF
}

# haproxy.cfg listening on 127.0.0.1:$1, on stdout.
haproxy_cfg() {
  local port=$1 bind="" scheme=http
  if [ "$TLS" = 1 ]; then
    scheme=https
    bind=" ssl crt $WORK/both.pem alpn $([ "$PROTO" = h2 ] && echo h2,http/1.1 || echo http/1.1)"
  elif [ "$PROTO" = h2 ]; then
    bind=" proto h2"
  fi
  cat <<EOF
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
  option http-keep-alive
  option forwardfor
  http-reuse always
frontend fe
  bind 127.0.0.1:$port$bind
  http-request set-header X-Forwarded-Proto $scheme
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  default_backend be
backend be
  balance roundrobin
  server blue 127.0.0.1:$BLUE weight 90
  server green 127.0.0.1:$GREEN weight 10
EOF
}
