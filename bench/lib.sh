# Shared by bench/callgrind and bench/profile (source it from the
# repository's root with `bench_name` set, after scripts/lib.sh, which has
# free_port): a scratch directory and the processes started, both gone at
# exit; an nginx backend; and an ELB routing bench.local to it.
work="$(mktemp -d "/tmp/elb-$bench_name.XXXXXX")"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

wait_http() { # url [host] [seconds, 10]: until it answers 200
  local tries=$((${3:-10} * 10))
  for _ in $(seq "$tries"); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Host: ${2:-x}" "$1" || true)" = 200 ] && return 0
    sleep 0.1
  done
  echo "bench/$bench_name: $1 did not answer 200" >&2
  return 1
}

# One nginx process answering every request with 64 bytes, on $backend.
start_backend() {
  backend=$(free_port)
  local dir="$work/backend"
  mkdir -p "$dir/logs" "$dir/tmp"
  cat >"$dir/nginx.conf" <<CONF
daemon off;
master_process off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/tmp;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$backend;
    location / { default_type text/plain; return 200 "backend-1 .....................................................\n"; }
  }
}
CONF
  /usr/sbin/nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" &
  pids+=($!)
  wait_http "http://127.0.0.1:$backend/"
}

# route_elb admin-port: upstream "bench" = the backend, bench.local to it.
route_elb() {
  curl -sf -XPUT "http://127.0.0.1:$1/__erulb__/upstream" -d "{\"bench\": {\"127.0.0.1:$backend\": \"\"}}" >/dev/null
  curl -sf -XPUT "http://127.0.0.1:$1/__erulb__/domain" \
    -d '{"bench.local": {"init": "go", "rules": {"go": {"type": "backend", "args": {"servername": "bench"}}}}}' >/dev/null
}
